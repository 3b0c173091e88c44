"""Tests for train.py: one step updates the models, the loss falls, a killed run resumes exactly,
two DDP processes stay in sync, and start-up errors are one line with exit code 1.

All on CPU with a tiny generator. Only test_train_step_updates_both_discriminators uses the real
HiFi-GAN discriminators (70 M parameters, seconds per step on a shared CPU); the multi-step,
subprocess and DDP tests swap in TinyDiscriminator, which has their call convention and their
weight and spectral norms, so that they run in seconds.
"""

import os
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import train
import utils
from losses import discriminator_adv_loss, feature_matching_loss, generator_adv_loss
from test_utils import booby_trap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")
# The shortest real training clips (0.7-1.4 s) and one 2.1 s validation clip.
REAL_TRAIN = [
    "train/nuwave_single_x2_sample2_p225.wav",
    "train/nuwave_single_x2_sample4_p225.wav",
    "train/nuwave_single_x3_sample2_p225.wav",
    "train/nuwave_single_x3_sample3_p225.wav",
]
REAL_VALID = ["valid/p234_073_svgan.wav"]
TINY = [
    "model.channels=[4,8,8,8]",
    "audio.segment_size=1600",
    "train.batch_size=2",
    "train.seed=7",
    "data.num_workers=0",
    "data.valid_ratios=[4]",
    # 1600-sample crops: the paper's 8192-point STFT would be longer than the signal.
    "loss.stft_fft_sizes=[256,512,1024]",
    "loss.stft_hop_sizes=[64,128,256]",
    "loss.stft_n_mels=32",
    "loss.mel_n_fft=1024",
    "loss.mel_win_size=1024",
    "loss.mel_hop_size=256",
]
# Subprocesses import this file to swap in the small discriminators before calling main().
LAUNCHER = (
    "import sys, test_train, train\n"
    "test_train.use_tiny_discriminators(train)\n"
    "train.main(sys.argv[1:])\n"
)


class TinyDiscriminator(nn.Module):
    """A two-layer stand-in for MultiPeriod/MultiScaleDiscriminator, same call convention."""

    def __init__(self, norm):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                norm(nn.Conv1d(1, 8, 15, 4, padding=7)),
                norm(nn.Conv1d(8, 8, 15, 4, padding=7)),
            ]
        )
        self.conv_post = norm(nn.Conv1d(8, 1, 3, padding=1))

    def _score(self, x):
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return [x.flatten(1)], [fmap]

    def forward(self, y, y_hat):
        d_real, fmap_real = self._score(y)
        d_fake, fmap_fake = self._score(y_hat)
        return d_real, d_fake, fmap_real, fmap_fake


def use_tiny_discriminators(module) -> None:
    module.MultiPeriodDiscriminator = lambda: TinyDiscriminator(weight_norm)
    module.MultiScaleDiscriminator = lambda: TinyDiscriminator(spectral_norm)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_discriminators(monkeypatch):
    monkeypatch.setattr(
        train, "MultiPeriodDiscriminator", lambda: TinyDiscriminator(weight_norm)
    )
    monkeypatch.setattr(
        train, "MultiScaleDiscriminator", lambda: TinyDiscriminator(spectral_norm)
    )


@pytest.fixture
def data(tmp_path) -> list[str]:
    """Overrides pointing at four training clips and one validation clip.

    Real clips from ../shared/data when it exists, else synthetic harmonic tones with noise.
    """
    lists = tmp_path / "lists"
    lists.mkdir()
    if all(
        os.path.isfile(os.path.join(SHARED_DATA, f)) for f in REAL_TRAIN + REAL_VALID
    ):
        root = os.path.abspath(SHARED_DATA)
        train_files, valid_files = REAL_TRAIN, REAL_VALID
    else:
        root = str(tmp_path / "data")
        rng = np.random.default_rng(0)
        train_files = [f"train/{i}.wav" for i in range(4)]
        valid_files = ["valid/0.wav"]
        for i, name in enumerate(train_files + valid_files):
            t = np.arange(48000) / 48000
            y = sum(np.sin(2 * np.pi * 150 * (i + 1) * k * t) / k for k in range(1, 60))
            y = 0.1 * y + 0.01 * rng.standard_normal(len(t))
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            sf.write(os.path.join(root, name), y.astype(np.float32), 48000)
    (lists / "train.txt").write_text("\n".join(train_files) + "\n")
    (lists / "valid.txt").write_text("\n".join(valid_files) + "\n")
    return [
        f"data.root={root}",
        f"data.train_files={lists / 'train.txt'}",
        f"data.valid_files={lists / 'valid.txt'}",
    ]


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _params_changed(before: dict, module: nn.Module) -> list[bool]:
    return [not torch.equal(before[k], p) for k, p in module.named_parameters()]


def _batch(run):
    return next(iter(train.epoch_loader(run)))


def test_lr_schedule_warms_up_then_decays():
    cfg = utils.load_config("cfgs.json").train
    factors = [train.lr_factor(e, cfg) for e in range(8)]
    np.testing.assert_allclose(
        factors, [0.2, 0.36, 0.52, 0.68, 0.84, 1.0, 0.999, 0.999**2]
    )


def test_train_step_updates_both_discriminators(data):
    cfg = utils.load_config("cfgs.json", TINY + data)
    run = train.build(cfg)
    before = {name: _state(getattr(run, name)) for name in ("generator", "mpd", "msd")}
    logs = train.train_step(run, _batch(run))
    assert run.step == 1
    for name in ("generator", "mpd", "msd"):
        assert all(_params_changed(before[name], getattr(run, name))), name
    expected = {"mel", "mrstft", "g_adv", "loss_g", "loss_d", "grad_norm_g"}
    assert expected <= logs.keys() and all(np.isfinite(list(logs.values())))
    assert "fm" not in logs  # loss.lambda_fm is 0 in cfgs.json
    # train.zero_head_nyquist: the updated head still passes nothing at 24 kHz
    assert run.generator.head_nyquist_gain().abs().max() < 1e-6


def _assert_same_steps(first, second, batch, atol: float) -> None:
    """Three steps of each (run, step function) on one batch give the same losses (to 1e-5),
    gradient norms (to 1e-3: rounding, which the tiny generator's large, clipped gradients
    amplify in their norm) and weights (to 1e-5 and atol).

    Weights: AdamW divides each gradient by its own running scale, so where a gradient is
    near zero, rounding in it can move that weight's step by up to the step itself (the
    learning rate). A few such weights in a hundred thousand may differ by up to that bound;
    all others must agree to the tolerance."""
    (run, step), (other, other_step) = first, second
    n_steps = 3
    for _ in range(n_steps):
        logs, expected = step(run, batch), other_step(other, batch)
        assert logs.keys() == expected.keys()
        for key in expected:
            rel = 1e-3 if key.startswith("grad_norm") else 1e-5
            assert logs[key] == pytest.approx(expected[key], rel=rel), key
    bound = 2 * n_steps * run.cfg.train.learning_rate
    for name in ("generator", "mpd", "msd"):
        for (key, p), p_expected in zip(
            getattr(run, name).named_parameters(), getattr(other, name).parameters()
        ):
            diff = (p - p_expected).abs()
            outside = diff > atol + 1e-5 * p_expected.abs()
            assert outside.float().mean() <= 1e-5, f"{key}: {outside.sum()} weights differ"
            assert diff.max() <= bound, f"{key}: {diff.max()} > {bound}"


def _two_pass_step(run, batch) -> dict[str, float]:
    """The GAN step as SPEC section 6 words it, slowly: the generator's update with frozen
    discriminators scoring its output, then the discriminators rescoring the detached output."""
    train_cfg, loss_cfg = run.cfg.train, run.cfg.loss
    x, y = batch
    run.mpd.requires_grad_(False)
    run.msd.requires_grad_(False)
    y_hat = run.generator(x)
    mel, mrstft = run.mel_loss(y_hat, y), run.mrstft_loss(y_hat, y)
    _, mpd_fake, mpd_fmap_real, mpd_fmap_fake = run.mpd(y, y_hat)
    _, msd_fake, msd_fmap_real, msd_fmap_fake = run.msd(y, y_hat)
    adv = generator_adv_loss(mpd_fake) + generator_adv_loss(msd_fake)
    fm = feature_matching_loss(mpd_fmap_real, mpd_fmap_fake)
    fm = fm + feature_matching_loss(msd_fmap_real, msd_fmap_fake)
    loss_g = (
        loss_cfg.lambda_mel * mel
        + loss_cfg.lambda_mrstft * mrstft
        + loss_cfg.lambda_adv * adv
        + loss_cfg.lambda_fm * fm
    )
    run.optim_g.zero_grad(set_to_none=True)
    loss_g.backward()
    grad_norm_g = nn.utils.clip_grad_norm_(run.generator.parameters(), train_cfg.grad_clip_g)
    run.optim_g.step()
    train.constrain_generator(run)
    run.mpd.requires_grad_(True)
    run.msd.requires_grad_(True)
    mpd_real, mpd_fake, _, _ = run.mpd(y, y_hat.detach())
    msd_real, msd_fake, _, _ = run.msd(y, y_hat.detach())
    loss_mpd = discriminator_adv_loss(mpd_real, mpd_fake)
    loss_msd = discriminator_adv_loss(msd_real, msd_fake)
    run.optim_d.zero_grad(set_to_none=True)
    (loss_mpd + loss_msd).backward()
    grad_norm_mpd = nn.utils.clip_grad_norm_(run.mpd.parameters(), train_cfg.grad_clip_d)
    grad_norm_msd = nn.utils.clip_grad_norm_(run.msd.parameters(), train_cfg.grad_clip_d)
    run.optim_d.step()
    run.step += 1
    logs = dict(mel=mel, mrstft=mrstft, g_adv=adv, loss_g=loss_g, grad_norm_g=grad_norm_g)
    logs.update(loss_mpd=loss_mpd, loss_msd=loss_msd, loss_d=loss_mpd + loss_msd)
    logs.update(grad_norm_mpd=grad_norm_mpd, grad_norm_msd=grad_norm_msd)
    if loss_cfg.lambda_fm > 0:
        logs["fm"] = fm
    return {key: value.item() for key, value in logs.items()}


@pytest.mark.parametrize("lambda_fm", [0, 2])
def test_one_discriminator_pass_takes_the_two_pass_steps(data, lambda_fm):
    # train_step scores the output once for both updates; the real discriminators, three steps
    # on one batch: the same losses and the same weights as the two-pass step. The spectral
    # norm's power iteration is held still in both: it advances once per pass, so the one-pass
    # step refines its estimate of the largest singular value half as often.
    cfg = utils.load_config("cfgs.json", TINY + data + [f"loss.lambda_fm={lambda_fm}"])
    one_pass, two_pass = train.build(cfg), train.build(cfg)
    for run in (one_pass, two_pass):
        for module in run.msd.modules():
            if type(module).__name__ == "_SpectralNorm":
                module.eval()
    batch = _batch(one_pass)
    # atol: 0.5 % of one AdamW step (lr 2e-4), what rounding in the norms moves
    _assert_same_steps((one_pass, train.train_step), (two_pass, _two_pass_step), batch, 1e-6)


def test_fused_adamw_takes_the_unfused_steps(data, tiny_discriminators):
    # the optimisers' fused=True is a speed setting: the steps of PyTorch's plain AdamW loop
    # with the same settings
    cfg = utils.load_config("cfgs.json", TINY + data)
    fused, plain = train.build(cfg), train.build(cfg)
    for optim in ("optim_g", "optim_d"):
        assert all(g["fused"] for g in getattr(fused, optim).param_groups)
        for group in getattr(plain, optim).param_groups:
            group["fused"] = False
    batch = _batch(fused)
    _assert_same_steps((fused, train.train_step), (plain, train.train_step), batch, 1e-7)


def test_adamw_leaves_a_log_and_d_undecayed(data, tiny_discriminators):
    # zero gradients: AdamW's step is then its weight decay alone, p *= 1 - lr * decay
    cfg = utils.load_config("cfgs.json", TINY + data + ["train.weight_decay=100"])
    run = train.build(cfg)
    names = [name for name, _ in run.generator.named_parameters()]
    kept = {name for name in names if name.endswith((".A_log", ".D"))}
    assert kept and len(kept) < len(names)
    before = _state(run.generator)
    for p in run.generator.parameters():
        p.grad = torch.zeros_like(p)
    run.optim_g.step()
    shrink = 1 - run.optim_g.param_groups[0]["lr"] * 100
    for name, p in run.generator.named_parameters():
        expected = before[name] if name in kept else before[name] * shrink
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_resume_regroups_a_one_group_generator_optimiser(
    data, tiny_discriminators, tmp_path
):
    # do_ files written before A_log and D left weight decay hold one AdamW group
    cfg = utils.load_config("cfgs.json", TINY + data)
    old = train.build(cfg)
    train_cfg = cfg.train
    old.optim_g = torch.optim.AdamW(
        old.generator.parameters(),
        lr=train_cfg.learning_rate,
        betas=(train_cfg.adam_b1, train_cfg.adam_b2),
        weight_decay=train_cfg.weight_decay,
        fused=True,
    )
    old.sched_g = torch.optim.lr_scheduler.LambdaLR(
        old.optim_g, lambda epoch: train.lr_factor(epoch, train_cfg)
    )
    train.train_step(old, _batch(old))
    train.save_checkpoints(old, str(tmp_path))
    run = train.build(cfg)
    assert train.resume(run, str(tmp_path))
    assert len(run.optim_g.param_groups) == 2
    (old_lr,) = old.sched_g.get_last_lr()
    assert run.sched_g.get_last_lr() == [old_lr, old_lr]
    for p_old, p in zip(old.generator.parameters(), run.generator.parameters()):
        for key, value in old.optim_g.state[p_old].items():
            torch.testing.assert_close(run.optim_g.state[p][key], value)
    train.train_step(run, _batch(run))


def test_generator_warmup_leaves_discriminators_alone_and_lowers_the_loss(
    data, tiny_discriminators
):
    overrides = [
        "train.generator_warmup_steps=5",
        "train.learning_rate=0.0001",
        "train.warmup_start_factor=1.0",
        "loss.lambda_fm=2.0",
    ]
    cfg = utils.load_config("cfgs.json", TINY + data + overrides)
    run = train.build(cfg)
    batch = _batch(run)
    mpd_before = _state(run.mpd)
    recon = []
    for _ in range(5):
        logs = train.train_step(run, batch)
        assert "g_adv" not in logs and "loss_d" not in logs
        recon.append(45 * logs["mel"] + 10 * logs["mrstft"])
    assert not any(_params_changed(mpd_before, run.mpd))
    assert recon[-1] < recon[0]
    logs = train.train_step(run, batch)  # step 6: the GAN starts, with feature matching
    assert {"g_adv", "fm", "loss_d"} <= logs.keys()
    assert all(_params_changed(mpd_before, run.mpd))


def test_discriminator_warmup_leaves_generator_alone(data, tiny_discriminators):
    overrides = ["train.discriminator_warmup_steps=2"]
    cfg = utils.load_config("cfgs.json", TINY + data + overrides)
    run = train.build(cfg)
    batch = _batch(run)
    g_before, mpd_before = _state(run.generator), _state(run.mpd)
    for _ in range(2):
        logs = train.train_step(run, batch)
        assert "loss_g" not in logs and "loss_d" in logs
    assert not any(_params_changed(g_before, run.generator))
    assert all(_params_changed(mpd_before, run.mpd))
    logs = train.train_step(run, batch)  # step 3: the generator joins
    assert {"loss_g", "g_adv", "loss_d"} <= logs.keys()
    assert all(_params_changed(g_before, run.generator))


def test_both_warmups_are_refused(data):
    overrides = ["train.discriminator_warmup_steps=2", "train.generator_warmup_steps=2"]
    with pytest.raises(ValueError, match="cannot both be set"):
        utils.load_config("cfgs.json", TINY + data + overrides)


def test_init_generator_starts_fresh_from_trained_weights(data, tmp_path):
    # A finished run's g_ file seeds a new run: same generator, fresh everything else;
    # in a folder that already holds checkpoints, resume wins and the option is unused.
    config = ["--config", "cfgs.json"]
    overrides = TINY + data + ["train.epochs=1", "train.validation_interval=100"]
    first = tmp_path / "first"
    done = _run_train([*config, "--checkpoint_path", str(first), *overrides])
    assert done.wait(timeout=300) == 0, done.stderr.read()
    trained = utils.load_checkpoint(str(first / "g_00000002"))["generator"]

    cfg = utils.load_config("cfgs.json", overrides)
    run = train.build(cfg)
    assert train.init_generator(run, str(first / "g_00000002")) == 2
    assert run.step == 0 and run.optim_g.state == {}
    state = run.generator.state_dict()
    # the head is projected again (train.zero_head_nyquist), which returns it to rounding
    for key, value in trained.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=0, msg=key)

    second = tmp_path / "second"
    warm = [*config, "--checkpoint_path", str(second), "--init_generator"]
    done = _run_train([*warm, str(first / "g_00000002"), *overrides])
    assert done.wait(timeout=300) == 0, done.stderr.read()
    assert "generator initialised from" in done.stdout.read()
    again = _run_train([*warm, str(first / "g_00000002"), *overrides])
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert "--init_generator is not used" in again.stdout.read()


def test_init_generator_refuses_another_model(data, tmp_path):
    cfg = utils.load_config("cfgs.json", TINY + data)
    run = train.build(cfg)
    with pytest.raises(ValueError, match="does not fit the model of this config"):
        train.init_generator(run, "checkpoints/wave_u_mamba_vctk_cpu.pt")


def test_epochs_reshuffle_and_redraw(data, tiny_discriminators):
    cfg = utils.load_config("cfgs.json", TINY + data)
    run = train.build(cfg)
    first = _batch(run)
    assert all(torch.equal(a, b) for a, b in zip(first, _batch(run)))
    run.epoch = 1
    assert not torch.equal(first[1], _batch(run)[1])


def test_best_generator_and_early_stop(data, tiny_discriminators, tmp_path):
    cfg = utils.load_config("cfgs.json", TINY + data + ["train.early_stop_patience=2"])
    run = train.build(cfg)
    run.step = 10
    assert not train.track_best(run, {"lsd": 2.0}, str(tmp_path))
    assert utils.load_checkpoint(str(tmp_path / "g_best"))["step"] == 10
    run.step = 20
    assert not train.track_best(run, {"lsd": 2.5}, str(tmp_path))
    assert run.best == {"lsd": 2.0, "step": 10, "since_improvement": 1}
    assert train.track_best(run, {"lsd": 2.0}, str(tmp_path))  # not better: stop
    assert utils.load_checkpoint(str(tmp_path / "g_best"))["step"] == 10
    train.train(run, str(tmp_path))  # a stopped run trains no further
    assert run.step == 20 and (tmp_path / "do_00000020").exists()


def _run_train(args, env_extra=None, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_killed_run_resumes_exactly(data, tmp_path):
    # 4 clips / batch 2 = 2 steps per epoch, 3 epochs: the kill lands after the mid-epoch
    # checkpoint at step 3, once the GAN has started (step 3) and the LR has changed.
    overrides = (
        TINY
        + data
        + [
            "train.epochs=3",
            "train.warmup_epochs=2",
            "train.generator_warmup_steps=2",
            "train.checkpoint_interval=3",
            "train.validation_interval=3",
            "train.keep_checkpoints=2",
            "train.stdout_interval=1",
            "train.summary_interval=1",
        ]
    )
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    config = ["--config", "cfgs.json"]
    uninterrupted = _run_train(config + ["--checkpoint_path", str(whole)] + overrides)
    killed = _run_train(config + ["--checkpoint_path", str(broken)] + overrides)
    deadline = time.time() + 300
    while not (broken / "do_00000003").exists():
        assert killed.poll() is None, killed.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    assert not (broken / "g_00000006").exists(), "the run finished before the kill"
    resumed = _run_train(config + ["--checkpoint_path", str(broken)] + overrides)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming at step 3" in out
    out, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err

    for prefix in ("g_", "do_"):
        assert utils.scan_checkpoint(str(broken), prefix).endswith(f"{prefix}00000006")
    g = [utils.load_checkpoint(str(d / "g_00000006")) for d in (whole, broken)]
    do = [utils.load_checkpoint(str(d / "do_00000006")) for d in (whole, broken)]
    for key, value in g[0]["generator"].items():
        assert torch.equal(value, g[1]["generator"][key]), key
    for name in ("mpd", "msd"):
        for key, value in do[0][name].items():
            assert torch.equal(value, do[1][name][key]), (name, key)
    for name in ("optim_g", "optim_d"):
        for i, state in do[0][name]["state"].items():
            assert torch.equal(
                state["exp_avg_sq"], do[1][name]["state"][i]["exp_avg_sq"]
            )
    assert do[0]["sched_g"] == do[1]["sched_g"]
    assert do[0]["best"] == do[1]["best"] and do[0]["best"]["step"] in (3, 6)
    assert (do[0]["epoch"], do[0]["epoch_step"]) == (3, 0)
    assert sorted(p.name for p in whole.glob("g_0*")) == ["g_00000003", "g_00000006"]
    assert (whole / "g_best").exists() and (whole / "config.json").exists()
    assert any((whole / "logs").iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, overrides: list[str], folder: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    use_tiny_discriminators(train)
    rank, world_size, device = train.init_distributed()
    run = train.build(
        utils.load_config("cfgs.json", overrides), device, rank, world_size
    )
    indices = train._batches(run)
    train.train(run, folder)
    torch.save(
        {
            "indices": indices,
            **{
                name: getattr(run, name).state_dict()
                for name in ("generator", "mpd", "msd")
            },
        },
        os.path.join(folder, f"rank{rank}.pt"),
    )
    torch.distributed.destroy_process_group()


def test_two_ddp_processes_stay_identical(data, tmp_path):
    # Global batch 4 over 2 processes of 2 clips each: 1 step per epoch, 2 epochs.
    overrides = (
        TINY
        + data
        + [
            "train.batch_size=4",
            "train.epochs=2",
            "train.validation_interval=2",
        ]
    )
    mp.spawn(
        _ddp_worker, args=(_free_port(), overrides, str(tmp_path)), nprocs=2, join=True
    )
    ranks = [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)
    ]
    # Different data in each process: without gradient averaging the weights would differ.
    assert ranks[0]["indices"] != ranks[1]["indices"]
    for name in ("generator", "mpd", "msd"):
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), (name, key)
    saved = utils.load_checkpoint(str(tmp_path / "g_00000002"))
    assert saved["step"] == 2
    for key, value in ranks[1]["generator"].items():
        assert torch.equal(value, saved["generator"][key]), key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.batch_sise=4"], "unknown key 'train.batch_sise'"),
        (["data.root=/nonexistent", "data.train_files=train"], "folder not found"),
        (["data.train_files={tmp_path}/empty"], "no audio files"),
    ],
)
def test_startup_errors_are_one_line(data, tmp_path, capsys, overrides, message):
    folder = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    overrides = [o.format(tmp_path=tmp_path) for o in overrides]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--checkpoint_path", str(folder)] + TINY + data + overrides)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not folder.exists()


def test_batch_not_divisible_by_processes(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--checkpoint_path", str(tmp_path / "run")] + TINY + data)
    assert exit_info.value.code == 1
    assert "not divisible by the 3 processes" in capsys.readouterr().err


def test_startup_error_exit_code_without_traceback(tmp_path):
    process = subprocess.run(
        [sys.executable, "train.py", "--checkpoint_path", str(tmp_path), "train.lr=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == [
        "train.py: error: cfgs.json: unknown key 'train.lr' in override 'train.lr=1'"
    ]


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Both Python and NumPy cache the second value of a Gaussian pair in their state.
    random.gauss(0, 1)
    np.random.standard_normal()
    utils.save_checkpoint(str(tmp_path / "rng"), {"rng": train._rng_states()})
    expected = (random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    utils.seed_everything(0)
    train._set_rng_states(utils.load_checkpoint(str(tmp_path / "rng"))["rng"])
    assert random.gauss(0, 1) == expected[0]
    assert np.array_equal(np.random.standard_normal(3), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


def test_resume_refuses_pickled_code(data, tiny_discriminators, tmp_path, capsys):
    # a do_ file dropped into a run folder is the newest checkpoint: resume must not run it
    folder = tmp_path / "run"
    folder.mkdir()
    marker = tmp_path / "payload_ran"
    utils.save_checkpoint(str(folder / "g_00000001"), {"generator": {}, "step": 1})
    booby_trap(folder / "do_00000001", {"step": 1}, marker)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--checkpoint_path", str(folder)] + TINY + data)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "refusing to load" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


def _two_checkpoint_pairs(data, folder) -> utils.Config:
    cfg = utils.load_config("cfgs.json", TINY + data + ["train.keep_checkpoints=3"])
    run = train.build(cfg)
    for step in (2, 4):
        run.step = step
        train.save_checkpoints(run, str(folder))
    return cfg


@pytest.mark.parametrize(
    "name, damage, reason",
    [
        ("do_00000004", "truncate", "cannot read"),
        ("g_00000004", "empty", "cannot read"),
        ("g_00000004", "delete", "no g_00000004"),
        ("do_00000004", "delete", "no do_00000004"),  # killed between the two writes
        ("do_00000004", "trap", "refusing to load"),
        ("do_00000004", "malform", "optim_g"),
    ],
)
def test_resume_skips_a_damaged_newest_pair(
    data, tiny_discriminators, tmp_path, capsys, name, damage, reason
):
    cfg = _two_checkpoint_pairs(data, tmp_path)
    path = tmp_path / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "delete":
        path.unlink()
    elif damage == "trap":
        booby_trap(path, utils.load_checkpoint(str(path)), tmp_path / "payload_ran")
    else:
        broken = {**utils.load_checkpoint(str(path)), "optim_g": "not a state"}
        utils.save_checkpoint(str(path), broken)
    run = train.build(cfg)
    capsys.readouterr()
    assert train.resume(run, str(tmp_path))
    assert (run.step, run.epoch_step) == (2, 0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "step 4" in lines[0] and reason in lines[0], lines
    assert path.exists() == (damage != "delete")  # left in place, never deleted
    assert not (tmp_path / "payload_ran").exists()


def test_resume_without_a_loadable_pair_is_one_line(data, tiny_discriminators, tmp_path):
    cfg = _two_checkpoint_pairs(data, tmp_path)
    for name in ("do_00000002", "do_00000004"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="no complete, loadable") as info:
        train.resume(train.build(cfg), str(tmp_path))
    assert "\n" not in str(info.value) and "do_00000004" in str(info.value)
