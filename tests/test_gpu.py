"""GPU readiness: run with `python -m pytest -m gpu` on a machine with CUDA.

mamba_ssm's CUDA scan against our compiled CPU scan on the same inputs, a checkpoint saved on
the CPU giving the same output on the GPU, and 20 training steps on one GPU. Every test here
skips without CUDA (and the first without mamba_ssm), so the CPU-only suite passes through.
"""

import math

import pytest
import torch

import ssm
import train
import utils
from models import WaveUMamba, load_generator
from test_ssm import rel_err, scan_inputs
from test_train import TINY, data  # noqa: F401 (data is a fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_kernels_missing():
    return ssm._cuda_import_error() is not None


@pytest.mark.skipif(cuda_kernels_missing(), reason="needs mamba_ssm and causal_conv1d")
@pytest.mark.parametrize("length", [1, 300, 4096])
def test_mamba_ssm_scan_matches_the_compiled_scan(length):
    # the model's float32 and its options: D, gate, bias and softplus, and the last state
    inputs = {k: v.float() for k, v in scan_inputs(2, 64, length).items()}
    names = list(inputs)
    results = {}
    for impl, device in (("compiled", "cpu"), ("cuda", "cuda")):
        leaves = {k: v.to(device).requires_grad_(True) for k, v in inputs.items()}
        y, last = ssm.selective_scan(
            **leaves, delta_softplus=True, impl=impl, return_last_state=True
        )
        g = torch.Generator().manual_seed(1)
        gy = torch.randn(y.shape, generator=g).to(device)
        grads = torch.autograd.grad((y * gy).sum(), [leaves[k] for k in names])
        results[impl] = [t.detach().cpu() for t in (y, last, *grads)]
    for name, ours, theirs in zip(["y", "last", *names], results["compiled"], results["cuda"]):
        assert rel_err(theirs, ours) <= 1e-4, name


def test_cpu_checkpoint_gives_the_same_output_on_cuda(tmp_path):
    torch.manual_seed(0)
    generator = WaveUMamba()
    path = str(tmp_path / "g_00000001")
    utils.save_checkpoint(path, {"generator": generator.state_dict(), "step": 1})
    x = 0.1 * torch.randn(1, 1, 48000 // 16 * 16)
    outputs = {}
    for device in ("cpu", "cuda"):
        model, _, _ = load_generator(path, scan_impl="auto")
        model = model.to(device)
        with torch.inference_mode():
            outputs[device] = model(x.to(device)).cpu()
    assert rel_err(outputs["cuda"] - x, outputs["cpu"] - x) <= 1e-4


def test_twenty_training_steps_on_one_gpu(data):  # noqa: F811 (the fixture)
    cfg = utils.load_config("cfgs.json", TINY + data)
    run = train.build(cfg, device=torch.device("cuda"))
    assert next(run.generator.parameters()).is_cuda
    before = {k: v.detach().clone() for k, v in run.generator.state_dict().items()}
    loader = iter(train.epoch_loader(run))
    for _ in range(20):
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(train.epoch_loader(run))
            batch = next(loader)
        logs = train.train_step(run, batch)
        assert all(math.isfinite(v) for v in logs.values()), logs
    assert run.step == 20
    after = run.generator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
