"""Tests for models.py: parameter counts, shapes, the global residual, skips, weight norm."""

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
import ssm
from models import (
    AvgPool2,
    ChannelLayerNorm,
    DiscriminatorP,
    GroupedConv1d,
    MambaResidualBlock,
    MambaStack,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    WaveUMamba,
    WinogradConv1d,
    load_generator,
    winograd_conv,
)
from utils import config_to_dict, load_config

CFG_PATH = Path(__file__).resolve().parent.parent / "cfgs.json"
TINY = ["model.channels=[4,8,8,8]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    cfg = load_config(str(CFG_PATH), TINY)
    return WaveUMamba(**dataclasses.asdict(cfg.model), scan_impl="torch").eval()


def test_paper_generator_parameter_count_and_forward():
    torch.manual_seed(0)
    g = WaveUMamba(scan_impl="torch").eval()
    assert n_params(g) == 4_203_714
    x = torch.randn(1, 1, 1600) * 0.1
    with torch.no_grad():
        y_hat = g(x)
    g.remove_weight_norm()
    assert n_params(g) == 4_202_273
    with torch.no_grad():
        torch.testing.assert_close(g(x), y_hat, rtol=1e-5, atol=1e-6)
    assert y_hat.shape == x.shape
    assert torch.isfinite(y_hat).all()


def test_discriminator_parameter_counts():
    assert n_params(MultiPeriodDiscriminator()) == 41_105_770
    assert n_params(MultiScaleDiscriminator()) == 29_618_821


def test_defaults_equal_config():
    defaults = {
        name: p.default
        for name, p in inspect.signature(WaveUMamba).parameters.items()
        if name != "scan_impl"
    }
    assert defaults == dataclasses.asdict(load_config(str(CFG_PATH)).model)


@pytest.mark.parametrize("grad", [True, False], ids=["pytorch", "compiled"])
@pytest.mark.parametrize("slope", [None, 0.1])
def test_channel_layer_norm_matches_layer_norm(grad, slope):
    # With gradients: the PyTorch ops; without: the compiled kernel's one pass. Both against
    # F.layer_norm over the channels (float64), on lengths around the kernel's 128-step tiles.
    torch.manual_seed(0)
    norm = ChannelLayerNorm(37).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    for length in (1, 20, 128, 300):
        x = torch.randn(3, 37, length, dtype=torch.float64) * 3 + 1
        expected = torch.nn.functional.layer_norm(
            x.transpose(1, 2), (37,), norm.weight, norm.bias, norm.eps
        ).transpose(1, 2)
        if slope is not None:
            expected = torch.nn.functional.leaky_relu(expected, slope)
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(norm(x, slope), expected, rtol=1e-12, atol=1e-12)
            # float32: the kernel's float32 path, against the float64 result
            out32 = norm.float()(x.float(), slope)
            norm.double()
        torch.testing.assert_close(out32.double(), expected, rtol=1e-5, atol=1e-5)


def test_channel_layer_norm_without_gradients_runs_the_compiled_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(
        ssm, "channel_norm_compiled", lambda *a: calls.append(a) or a[0]
    )
    norm = ChannelLayerNorm(4)
    x = torch.randn(1, 4, 10)
    norm(x)
    assert calls == []
    with torch.no_grad():
        norm(x, 0.1)
    assert len(calls) == 1 and calls[0][-1] == 0.1


@pytest.mark.parametrize("length", [16, 48, 160])
def test_shapes(length):
    g = tiny_generator()
    x = torch.randn(2, 1, length)
    with torch.no_grad():
        assert g(x).shape == (2, 1, length)


@pytest.mark.parametrize("shape", [(1, 1, 50), (1, 1, 0), (1, 64), (1, 2, 64)])
def test_bad_input_shape(shape):
    g = tiny_generator()
    with pytest.raises(ValueError, match=str(tuple(shape))):
        g(torch.zeros(shape))


def test_bad_config():
    with pytest.raises(ValueError, match="up_kernels"):
        WaveUMamba(up_kernels=(4, 4, 8))
    with pytest.raises(ValueError, match="even"):
        WaveUMamba(channels=(4, 8), up_kernels=(4, 5))


def test_global_residual():
    g = tiny_generator()
    with torch.no_grad():
        g.head.parametrizations.weight.original0.zero_()
        g.head.bias.zero_()
        x = torch.randn(2, 1, 64)
        assert torch.equal(g(x), x)


def test_output_stays_within_one_of_input():
    g = tiny_generator()
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        residual = g(x) - x
    assert residual.abs().max() <= 1.0
    assert residual.abs().max() > 0


def test_skips_are_stored_before_the_stem_norm():
    g = tiny_generator()
    down_out, skips_in = {}, {}
    for i, down in enumerate(g.downs):
        down.register_forward_hook(lambda m, a, out, i=i: down_out.__setitem__(i, out))
    for j, up in enumerate(g.ups):
        up.register_forward_pre_hook(lambda m, a, j=j: skips_in.__setitem__(j, a[1]))
    with torch.no_grad():
        g(torch.randn(2, 1, 64))
    n = len(g.downs)
    for j in range(n):
        skip, raw = skips_in[j], down_out[n - 1 - j]
        assert torch.equal(skip, raw)
        # the normalised tensor is genuinely different, so the check above means something
        assert not torch.allclose(g.down_norms[n - 1 - j](raw), raw, atol=1e-3)


def test_remove_weight_norm_keeps_output():
    g = tiny_generator()
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        before = g(x)
        g.remove_weight_norm()
        after = g(x)
    assert not any("parametrizations" in k for k in g.state_dict())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_normed", [True, False])
def test_zero_head_nyquist_is_the_smallest_change_that_silences_24_khz(weight_normed):
    g = tiny_generator()
    if not weight_normed:
        g.remove_weight_norm()
    params = dict(g.head.named_parameters())
    before = g.head.weight.detach().double().clone()  # [1, C, K]
    g.zero_head_nyquist()
    after = g.head.weight.detach().double()
    # reference: the least-norm solution of "every channel's kernel sums to zero against
    # (+1, -1, ...)", from the constraint matrix, in float64
    _, channels, k = before.shape
    alternating = torch.tensor([(-1.0) ** i for i in range(k)], dtype=torch.float64)
    constraints = torch.block_diag(*[alternating[None]] * channels)  # [C, C * K]
    w = before.flatten()
    correction = constraints.T @ torch.linalg.solve(
        constraints @ constraints.T, constraints @ w
    )
    torch.testing.assert_close(after.flatten(), w - correction, rtol=1e-6, atol=1e-7)
    assert correction.abs().max() > 1e-3  # a random head does pass 24 kHz
    # the same parameter objects (the optimiser keeps its state), and the head is now deaf to a
    # 24 kHz alternation on every channel while still passing a slow signal
    assert all(p is params[name] for name, p in g.head.named_parameters())
    n = torch.arange(64)
    features = torch.randn(1, channels, 1) * torch.where(n % 2 == 0, 1.0, -1.0)
    with torch.no_grad():
        response = g.head(features) - g.head.bias
        slow = g.head(torch.randn(1, channels, 1) * torch.ones(64)) - g.head.bias
    assert response[..., k:-k].abs().max() < 1e-6
    assert slow[..., k:-k].abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["compiled", "torch"])
def test_mamba_stack_without_gradients_runs_in_pieces_with_the_same_result(
    impl, monkeypatch
):
    # Inference carries the state across pieces of CHUNK_STEPS steps; training runs one pass.
    # 250 steps in pieces of 64: three whole pieces and a ragged one.
    monkeypatch.setattr(MambaStack, "CHUNK_STEPS", 64)
    torch.manual_seed(0)
    stack = MambaStack(8, 2, d_state=4, d_conv=4, expand=2, scan_impl=impl)
    x = torch.randn(2, 8, 250)
    pieces = []
    original = MambaResidualBlock.forward_stream
    monkeypatch.setattr(
        MambaResidualBlock,
        "forward_stream",
        lambda self, h, state=None: pieces.append(h.shape[-1]) or original(self, h, state),
    )
    with torch.no_grad():
        chunked = stack(x)
    one_pass = stack(x).detach()  # gradients enabled: one pass
    assert pieces == [64, 64, 64, 64, 64, 64, 58, 58]  # each piece through both blocks
    torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-6)
    # and the one pass is the blocks applied in order, in mamba_ssm's layout [B, L, C]
    h = x.transpose(1, 2)
    for block in stack.blocks:
        normed = F.layer_norm(h, (8,), block.norm.weight, block.norm.bias, block.norm.eps)
        h = h + block.mamba(normed)
    torch.testing.assert_close(one_pass, h.transpose(1, 2).detach())


@pytest.mark.parametrize("length", [2, 7, 250])
def test_avg_pool2_is_avg_pool1d(length):
    torch.manual_seed(0)
    x = torch.randn(2, 3, length, requires_grad=True)
    y, y_ref = AvgPool2()(x), torch.nn.AvgPool1d(2, 2)(x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(gx, gx_ref)


def test_state_dict_round_trip():
    g1, g2 = tiny_generator(seed=0), tiny_generator(seed=1)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert not torch.equal(g1(x), g2(x))
        g2.load_state_dict(g1.state_dict(), strict=True)
        assert torch.equal(g1(x), g2(x))


def test_gradients_reach_every_parameter():
    g = tiny_generator().train()
    g(torch.randn(1, 1, 32)).square().sum().backward()
    missing = [n for n, p in g.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize(
    "disc, n_subs, n_fmaps",
    [(MultiPeriodDiscriminator, 5, 6), (MultiScaleDiscriminator, 3, 8)],
)
def test_discriminator_outputs(disc, n_subs, n_fmaps):
    torch.manual_seed(0)
    d = disc()
    y = torch.randn(2, 1, 1001)  # divisible by none of the periods
    with torch.no_grad():
        d_real, d_fake, fmap_real, fmap_fake = d(y, y * 0.5)
    assert len(d_real) == len(d_fake) == len(fmap_real) == len(fmap_fake) == n_subs
    for r, f, fr, ff in zip(d_real, d_fake, fmap_real, fmap_fake):
        assert r.shape == f.shape and r.dim() == 2 and r.shape[0] == 2
        assert len(fr) == len(ff) == n_fmaps
        assert all(a.shape == b.shape for a, b in zip(fr, ff))
        assert not torch.equal(r, f)


@pytest.mark.parametrize(
    "shape", [(2, 3, 1), (2, 3, 4), (3, 5, 7), (1, 4, 30), (2, 4, 13, 3), (1, 2, 2, 5)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_conv_is_the_5_tap_same_convolution(shape, bias):
    # lengths shorter than the kernel, not a multiple of the 4-output tile, and the 2-D
    # layout [N, C, H, p] of the multi-period discriminator
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w_shape = (6, shape[1], 5) + (1,) * (len(shape) - 3)
    w = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    conv, padding = (F.conv2d, (2, 0)) if len(shape) == 4 else (F.conv1d, 2)
    inputs = [x, w] + ([b] if bias else [])
    expected = conv(x, w, b, padding=padding)
    y = winograd_conv(x, w, b)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(y)
    for got, want in zip(
        torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_winograd_conv_float32_error_is_within_10x_a_direct_convolutions():
    # The discriminators' width (1,024 channels) in float32, against float64: Winograd's
    # transforms add rounding, bounded here relative to the largest output.
    torch.manual_seed(0)
    x = torch.randn(2, 1024, 97, dtype=torch.float64)
    w = torch.randn(1024, 1024, 5, dtype=torch.float64) / 70
    b = torch.randn(1024, dtype=torch.float64)
    exact = F.conv1d(x, w, b, padding=2)
    scale = exact.abs().max()
    direct_error = (F.conv1d(x.float(), w.float(), b.float(), padding=2) - exact).abs().max()
    winograd_error = (winograd_conv(x.float(), w.float(), b.float()) - exact).abs().max()
    assert winograd_error / scale < 5e-6
    assert winograd_error < 10 * direct_error


@pytest.mark.parametrize("period", [2, 5, 7])
def test_mpd_columns_as_batch_items_give_the_conv2d_results(monkeypatch, period):
    torch.manual_seed(0)
    d = DiscriminatorP(period).double()
    y = torch.randn(2, 1, 3001, dtype=torch.float64, requires_grad=True)  # padded to p columns

    def scores_and_grads():
        score, fmap = d(y)
        loss = score.square().mean() + sum(f.square().mean() for f in fmap)
        return [score, *fmap], torch.autograd.grad(loss, [y, *d.parameters()])

    outputs, grads = scores_and_grads()
    # each Conv2d as a module: the 2-D layout and no Winograd
    monkeypatch.setattr(models, "COLUMNS_AS_BATCH_MAX_PERIOD", 0)
    monkeypatch.setattr(models, "_period_conv", lambda conv, x: conv(x))
    expected_outputs, expected_grads = scores_and_grads()
    for out, expected in zip(outputs + list(grads), expected_outputs + list(expected_grads)):
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_msd_grouped_and_winograd_layers_give_nn_conv1d_results(monkeypatch):
    torch.manual_seed(0)
    msd = MultiScaleDiscriminator().double()
    msd.discriminators[0].eval()  # holds the spectral norm's estimate between the two runs
    y = torch.randn(2, 1, 3001, dtype=torch.float64)
    y_hat = torch.randn(2, 1, 3001, dtype=torch.float64, requires_grad=True)

    def scores_and_grads():
        d_real, d_fake, fmap_real, fmap_fake = msd(y, y_hat)
        outputs = [*d_real, *d_fake, *(f for fmap in fmap_real + fmap_fake for f in fmap)]
        loss = sum(o.square().mean() for o in outputs)
        return outputs, torch.autograd.grad(loss, [y_hat, *msd.parameters()])

    calls = []
    conv1d_compiled = ssm.conv1d_compiled
    monkeypatch.setattr(ssm, "conv1d_compiled", lambda *a: calls.append(a) or conv1d_compiled(*a))
    outputs, grads = scores_and_grads()
    assert len(calls) == 2 * 3 * 5  # real and fake, three scales, five grouped layers each
    monkeypatch.setattr(GroupedConv1d, "_conv_forward", torch.nn.Conv1d._conv_forward)
    monkeypatch.setattr(WinogradConv1d, "_conv_forward", torch.nn.Conv1d._conv_forward)
    expected_outputs, expected_grads = scores_and_grads()
    for out, expected in zip(outputs + list(grads), expected_outputs + list(expected_grads)):
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_checkpoint_config_from_before_a_key_was_added(tmp_path):
    # A checkpoint whose config predates a cfgs.json key still loads, with the repo's value;
    # a key the code does not know is still refused.
    import utils
    from models import load_generator

    cfg = load_config(str(CFG_PATH), TINY)
    config = utils.config_to_dict(cfg)
    del config["train"]["discriminator_warmup_steps"]
    generator = tiny_generator()
    path = str(tmp_path / "g_old")
    utils.save_checkpoint(path, {"generator": generator.state_dict(), "config": config})
    loaded, loaded_cfg, _ = load_generator(path, scan_impl="torch")
    assert loaded_cfg.train.discriminator_warmup_steps == 0
    assert loaded_cfg.model == cfg.model
    config["train"]["no_such_key"] = 1
    utils.save_checkpoint(path, {"generator": generator.state_dict(), "config": config})
    with pytest.raises(ValueError, match="unknown key 'train.no_such_key'"):
        load_generator(path, scan_impl="torch")


def _malformed(kind: str, checkpoint: dict):
    """A tiny generator's checkpoint, broken in one way."""
    state, config = checkpoint["generator"], checkpoint["config"]
    first = next(iter(state))
    return {
        "str weight": {"generator": {"a": "str"}},
        "generator not a dict": {**checkpoint, "generator": "weights"},
        "int key": {**checkpoint, "generator": {1: torch.ones(1), **state}},
        "NaN weight": {
            **checkpoint,
            "generator": {**state, first: torch.full_like(state[first], math.nan)},
        },
        "complex weight": {
            **checkpoint,
            "generator": {**state, first: state[first].to(torch.complex64)},
        },
        "config not a dict": {**checkpoint, "config": "cfgs.json"},
        "section not a dict": {**checkpoint, "config": {**config, "model": [4, 8]}},
        "value out of range": {
            **checkpoint,
            "config": {**config, "audio": {**config["audio"], "peak": 0}},
        },
        "step not a count": {**checkpoint, "step": "three"},
        "bare, mixed keys": {1: torch.ones(1), "x": torch.ones(1)},
        "a list": [checkpoint],
    }[kind]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("str weight", "named tensors"),
        ("generator not a dict", "named tensors"),
        ("int key", "named tensors"),
        ("NaN weight", "NaN"),
        ("complex weight", "complex"),
        ("config not a dict", "config"),
        ("section not a dict", "'model'"),
        ("value out of range", "audio.peak"),
        ("step not a count", "step"),
        ("bare, mixed keys", "named tensors"),
        ("a list", "not a checkpoint dict"),
    ],
)
def test_malformed_checkpoints_are_one_line_errors(tmp_path, kind, message):
    cfg = load_config(str(CFG_PATH), TINY)
    good = {
        "generator": tiny_generator().state_dict(),
        "config": config_to_dict(cfg),
        "step": 3,
    }
    path = str(tmp_path / "g_bad")
    torch.save(_malformed(kind, good), path)
    with pytest.raises(ValueError, match=message) as info:
        load_generator(path)
    assert "\n" not in str(info.value) and path in str(info.value)
