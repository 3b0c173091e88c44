"""Tests of inference_wav.py: the CLI end to end, SuperResolver, bandwidth detection, the
low-band cross-over, blocks, levels, clipping, checkpoint formats and bad input.

A tiny random generator (a few thousand parameters) stands in for the trained model, and the
signals are synthetic, so every test runs on CPU in seconds.
"""

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import torch

import dataset
import inference_wav
import stream
import utils
from inference_wav import SuperResolver
from models import WaveUMamba
from test_utils import booby_trap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECH = os.path.join(ROOT, "..", "shared", "data", "valid", "p234_012_svgan.wav")
TINY = [
    "model.channels=[4,8,8,8]",
    "model.n_mamba_down=1",
    "model.n_mamba_bottleneck=1",
    "model.n_mamba_up=1",
    "model.d_state=4",
]


def tiny_generator(seed=0, identity=False):
    cfg = utils.load_config(os.path.join(ROOT, "cfgs.json"), TINY)
    torch.manual_seed(seed)
    generator = WaveUMamba(**dataclasses.asdict(cfg.model))
    if identity:
        # a zero head (weight-norm gain and bias) makes the residual tanh(0): output = input
        for name, p in generator.head.named_parameters():
            if not name.endswith("original1"):
                p.data.zero_()
    return generator, cfg


def save_g(path, generator, cfg, step=0):
    utils.save_checkpoint(
        str(path),
        {
            "generator": generator.state_dict(),
            "config": utils.config_to_dict(cfg),
            "step": step,
        },
    )
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_g(tmp_path_factory.mktemp("ckpt") / "g_00000000", *tiny_generator())


@pytest.fixture(scope="module")
def resolver(ckpt):
    return SuperResolver.from_pretrained(ckpt, device="cpu")


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    path = tmp_path_factory.mktemp("ident") / "g_00000000"
    save_g(path, *tiny_generator(identity=True))
    return SuperResolver.from_pretrained(str(path), device="cpu")


def noise(seconds, sr=48000, seed=0, channels=None):
    rng = np.random.default_rng(seed)
    shape = (int(seconds * sr),) if channels is None else (channels, int(seconds * sr))
    return (0.3 * rng.standard_normal(shape)).clip(-0.99, 0.99).astype(np.float32)


def band_limit(x, cutoff, sr=48000):
    """Elliptic low-pass, zero-phase: 0.1 dB ripple, 90 dB stop band."""
    sos = scipy.signal.ellip(12, 0.1, 90, cutoff, fs=sr, output="sos")
    return scipy.signal.sosfiltfilt(sos, x).astype(np.float32)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree_hashes(folder):
    paths = glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    return {p: sha(p) for p in paths if os.path.isfile(p)}


# --- the command line, end to end ------------------------------------------------------------


def test_cli_batch_end_to_end(tmp_path, ckpt):
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "sub").mkdir(parents=True)
    good = {  # name: (samples [T, C] or [T], rate, subtype)
        "a_8k.wav": (noise(0.1, 8000), 8000, "PCM_16"),
        "b_44k.flac": (noise(0.1, 44100, channels=2).T, 44100, "PCM_24"),
        "sub/c_16k.wav": (noise(0.1, 16000), 16000, "FLOAT"),
        "d_22k.ogg": (noise(0.1, 22050), 22050, "VORBIS"),
        "e_11k.wav": (noise(0.1, 11025, channels=3).T, 11025, "PCM_U8"),
        "f_24k.wav": (noise(0.1, 24000), 24000, "PCM_32"),
    }
    for name, (x, sr, subtype) in good.items():
        sf.write(inp / name, x, sr, subtype=subtype)
    sf.write(inp / "silent.wav", np.zeros(800, np.int16), 8000)
    sf.write(inp / "short.wav", noise(0.002, 8000), 8000)
    sf.write(inp / "empty.wav", np.zeros(0, np.int16), 8000)
    sf.write(inp / "nan.wav", np.array([0.1, np.nan] * 400, np.float32), 8000, "FLOAT")
    (inp / "notaudio.wav").write_text("this is not a RIFF file\n")
    whole = (inp / "a_8k.wav").read_bytes()
    (inp / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    bad = ["silent", "short", "empty", "nan", "notaudio", "truncated"]
    before = tree_hashes(str(inp))

    run = subprocess.run(
        [sys.executable, "inference_wav.py", "--wav_path", str(inp), "missing.wav"]
        + ["--output_dir", str(out), "--checkpoint_file", ckpt, "--device", "cpu"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    for name in bad + ["missing"]:
        hits = [line for line in lines if f"{name}.wav" in line]
        assert len(hits) == 1 and hits[0].startswith("error: "), (name, run.stderr)
        assert not (out / f"{name}_superresolved.wav").exists()
    for name, (x, sr, _) in good.items():
        stem = os.path.splitext(name)[0]
        y, sr_out = sf.read(out / f"{stem}_superresolved.wav", always_2d=True)
        assert sr_out == 48000
        assert y.shape == (round(len(x) * 48000 / sr), 1 if x.ndim == 1 else x.shape[1])
        assert sf.info(str(out / f"{stem}_superresolved.wav")).subtype == "PCM_16"
    assert tree_hashes(str(inp)) == before
    assert not glob.glob(str(out / "**" / ".tmp_*"), recursive=True)


def test_cli_glob_float_and_keep_lowband(tmp_path, ckpt, capsys, monkeypatch):
    monkeypatch.setattr(inference_wav, "BLOCK_SECONDS", 0.01)  # several blocks per file
    for name in ("x.wav", "y.wav", "z.flac"):
        sf.write(tmp_path / name, noise(0.03, 16000), 16000)
    code = inference_wav.main(
        ["--wav_path", str(tmp_path / "*.wav"), "--output_dir", str(tmp_path / "o")]
        + ["--checkpoint_file", ckpt, "--device", "cpu", "--format", "float"]
        + ["--keep_lowband", "--input_sr", "8000"]
    )
    assert code == 0
    written = sorted(os.listdir(tmp_path / "o"))
    assert written == ["x_superresolved.wav", "y_superresolved.wav"]
    assert sf.info(str(tmp_path / "o" / written[0])).subtype == "FLOAT"
    err = capsys.readouterr().err
    assert "error" not in err and "warning" not in err


def test_cli_keeps_the_input_band_by_default_and_no_keep_lowband_gives_the_raw_output(
    tmp_path, ckpt, resolver
):
    x = noise(0.1, 8000)
    sf.write(tmp_path / "in.wav", x, 8000, subtype="FLOAT")
    outputs = {}
    for flag in (None, "--keep_lowband", "--no-keep_lowband"):
        out = tmp_path / str(flag)
        code = inference_wav.main(
            ["--wav_path", str(tmp_path / "in.wav"), "--output_dir", str(out)]
            + ["--checkpoint_file", ckpt, "--device", "cpu", "--format", "float"]
            + ([flag] if flag else [])
        )
        assert code == 0
        outputs[flag], _ = sf.read(out / "in_superresolved.wav", dtype="float32")
    kept, _ = resolver.upsample(x, 8000, keep_lowband=True)
    raw, _ = resolver.upsample(x, 8000, keep_lowband=False)
    np.testing.assert_array_equal(resolver.upsample(x, 8000)[0], kept)
    np.testing.assert_allclose(outputs[None], kept, atol=1e-6)
    np.testing.assert_allclose(outputs["--keep_lowband"], kept, atol=1e-6)
    np.testing.assert_allclose(outputs["--no-keep_lowband"], raw, atol=1e-6)
    # the tiny random model rewrites the band the input has, so the two really differ
    assert np.sqrt(np.mean((kept - raw) ** 2)) > 0.1 * np.sqrt(np.mean(raw**2))


def test_cli_no_pretrained_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inference_wav, "PRETRAINED_PATH", str(tmp_path / "none.pt"))
    sf.write(tmp_path / "a.wav", noise(0.05), 48000)
    code = inference_wav.main(["--wav_path", str(tmp_path / "a.wav")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1
    assert "no pretrained model" in err and "--checkpoint_file" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_unavailable(tmp_path, ckpt, capsys):
    sf.write(tmp_path / "a.wav", noise(0.05), 48000)
    code = inference_wav.main(
        ["--wav_path", str(tmp_path / "a.wav"), "--checkpoint_file", ckpt]
        + ["--output_dir", str(tmp_path / "out"), "--device", "cuda"]
    )
    err = capsys.readouterr().err
    assert (
        code == 1 and err == "error: device cuda requested but CUDA is not available\n"
    )


def test_cli_unwritable_output_folder(tmp_path, ckpt, capsys):
    sf.write(tmp_path / "a.wav", noise(0.05), 48000)
    (tmp_path / "file").write_text("")
    code = inference_wav.main(
        ["--wav_path", str(tmp_path / "a.wav"), "--checkpoint_file", ckpt]
        + ["--output_dir", str(tmp_path / "file" / "out"), "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1
    assert "cannot create output folder" in err and str(tmp_path / "file") in err


def test_cli_never_overwrites_an_input(tmp_path, ckpt, capsys):
    sf.write(tmp_path / "a.wav", noise(0.05), 48000)
    sf.write(tmp_path / "a_superresolved.wav", noise(0.05, seed=1), 48000)
    before = tree_hashes(str(tmp_path))
    code = inference_wav.main(
        ["--wav_path", str(tmp_path), "--output_dir", str(tmp_path)]
        + ["--checkpoint_file", ckpt, "--device", "cpu"]
    )
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert any("a.wav" in line and "overwrite an input" in line for line in err)
    assert os.path.exists(tmp_path / "a_superresolved_superresolved.wav")
    assert all(sha(p) == h for p, h in before.items())


def test_output_paths_mirror_dedupe_and_collide(tmp_path):
    for name in (
        "a.wav",
        "a.flac",
        "sub/b.ogg",
        "out/a_superresolved.wav",
        "notes.txt",
    ):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    out = str(tmp_path / "out")
    pairs, errors = inference_wav.output_paths(
        [str(tmp_path), str(tmp_path / "*.wav"), str(tmp_path / "nothing*")], out
    )
    assert pairs == [
        (str(tmp_path / "a.flac"), os.path.join(out, "a_superresolved.wav")),
        (
            str(tmp_path / "sub" / "b.ogg"),
            os.path.join(out, "sub", "b_superresolved.wav"),
        ),
    ]
    assert len(errors) == 2
    assert "nothing*" in errors[0] and "no files match" in errors[0]
    assert "a.wav" in errors[1] and "also the output of" in errors[1]


# --- the Python API ----------------------------------------------------------------------------


@pytest.mark.parametrize("cutoff", [2000, 4000, 6000, 8000, 12000, 24000])
def test_detect_bandwidth_on_noise(cutoff):
    x = noise(1.0, seed=cutoff)
    if cutoff < 24000:
        x = band_limit(x, cutoff)
    assert inference_wav.detect_bandwidth(x, 48000) == cutoff


def test_detect_bandwidth_native_rate_and_channels():
    # an 8 kHz file is band-limited at its own Nyquist frequency
    assert inference_wav.detect_bandwidth(noise(0.5, 8000), 8000) == 4000
    stereo = np.stack([band_limit(noise(0.5, seed=s), 6000) for s in (1, 2)])
    assert inference_wav.detect_bandwidth(stereo, 48000) == 6000


@pytest.mark.skipif(
    not os.path.exists(SPEECH), reason="../shared/data is not available"
)
def test_detect_bandwidth_on_speech_made_lowres_every_way():
    y, sr = dataset.load_audio(SPEECH)
    assert sr == 48000
    assert inference_wav.detect_bandwidth(y, sr) == 24000
    rng = np.random.default_rng(0)
    for low in (4000, 8000, 12000, 16000, 24000):
        x = dataset.resample(dataset.resample(y[0], sr, low), low, sr)
        assert inference_wav.detect_bandwidth(x, sr) == low / 2
        for protocol in ("authors", "random"):
            x = dataset.simulate_lowres(y[0], low, protocol, rng=rng)
            assert inference_wav.detect_bandwidth(x, sr) == low / 2, protocol


def test_upsample_shapes_and_types(resolver):
    mono = noise(0.02, 16000)
    y, sr = resolver.upsample(mono, 16000)
    assert sr == 48000 and y.shape == (960,) and y.dtype == np.float32
    y, _ = resolver.upsample(torch.from_numpy(noise(0.02, 8000, channels=2)), 8000)
    assert y.shape == (2, 960) and y.dtype == np.float32
    y16, _ = resolver.upsample((mono * 32768).astype(np.int16), 16000)
    np.testing.assert_allclose(y16, resolver.upsample(mono, 16000)[0], atol=1e-3)


def test_level_restored_and_silent_channel_kept(identity):
    # the identity generator returns its input, so the output is the resampled input
    x = noise(0.1, 16000, channels=3)
    x[0] *= 0.01
    x[2] = 0
    y, _ = identity.upsample(x, 16000)
    resampler = stream.make_resampler(16000, 48000, 3)
    expected = resampler.resample_chunk(np.ascontiguousarray(x.T), last=True).T
    np.testing.assert_allclose(y, expected, atol=2e-7, rtol=1e-5)
    assert not y[2].any()
    y, _ = identity.upsample(3.0 * x[1], 16000)
    np.testing.assert_allclose(y, 3.0 * expected[1], rtol=1e-5, atol=1e-6)


def test_blocks_match_one_pass(ckpt, resolver):
    # no seams: blocks of 10 ms give what one pass over the whole clip gives
    generator = resolver.generator
    cfg = utils.load_config(os.path.join(ROOT, "cfgs.json"), TINY)
    blocks = SuperResolver(generator, cfg, torch.device("cpu"), block_seconds=0.01)
    x = noise(0.15)
    gain = 0.9 / np.abs(x).max()
    with torch.no_grad():
        padded = torch.from_numpy(np.pad(x * gain, (0, -len(x) % 16)))
        expected = generator(padded[None, None])[0, 0, : len(x)].numpy() / gain
    y, _ = blocks.upsample(x, 48000, keep_lowband=False)
    assert np.sqrt(np.mean((expected - x) ** 2)) > 0.05
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_keep_lowband_keeps_the_input_below_the_cutoff(resolver):
    x = band_limit(noise(0.1), 4000)
    y_model, _ = resolver.upsample(x, 48000, keep_lowband=False)
    y_keep, _ = resolver.upsample(x, 48000, input_sr="auto", keep_lowband=True)
    f, _, X = scipy.signal.stft(x, 48000, nperseg=512)
    _, _, M = scipy.signal.stft(y_model, 48000, nperseg=512)
    _, _, K = scipy.signal.stft(y_keep, 48000, nperseg=512)
    # frames more than half the cross-over filter away from the ends
    # bins clear of the cross-over band by the STFT window's main lobe
    low, high, mid = f < 0.9 * 4000 - 300, f > 4000 + 300, slice(3, -3)

    def error_db(a, b):
        return 10 * np.log10(np.sum(np.abs(a - b) ** 2) / np.sum(np.abs(b) ** 2))

    assert error_db(K[low, mid], X[low, mid]) < -70
    assert error_db(K[high, mid], M[high, mid]) < -70
    # without it the tiny random model does change the low band
    assert error_db(M[low, mid], X[low, mid]) > -30
    # a full-band input is kept whole
    y_full, _ = resolver.upsample(noise(0.05), 48000, input_sr=48000, keep_lowband=True)
    np.testing.assert_array_equal(y_full, noise(0.05))


def test_write_audio_never_clips(tmp_path, capsys):
    y = np.stack([np.sin(np.linspace(0, 60, 4800)), 0.5 * np.ones(4800)])
    y[0] *= 1.5
    inference_wav.write_audio(str(tmp_path / "a.wav"), y, "pcm16", "in.flac")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "in.flac" in err[0] and "clip" in err[0]
    z, sr = sf.read(tmp_path / "a.wav", always_2d=True)
    assert np.abs(z).max() <= 32767 / 32768
    # scaled, not clipped: the shape of the waveform is kept
    np.testing.assert_allclose(z.T, y * (z[:, 1].mean() / 0.5), atol=2 / 32768)
    inference_wav.write_audio(str(tmp_path / "b.wav"), y, "float", "in.flac")
    assert capsys.readouterr().err == ""
    np.testing.assert_allclose(sf.read(tmp_path / "b.wav")[0].T, y, rtol=1e-6)
    inference_wav.write_audio(str(tmp_path / "c.wav"), 0.5 * y, "pcm16", "in.flac")
    assert capsys.readouterr().err == ""


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_write(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"RIFF half")
        raise OSError("disk full")

    monkeypatch.setattr(inference_wav, "_write_wav", broken_write)
    for fmt in ("pcm16", "float"):
        with pytest.raises(OSError, match="disk full"):
            inference_wav.write_audio(str(tmp_path / "a.wav"), np.zeros(48), fmt, "x")
        assert os.listdir(tmp_path) == []


def test_scan_impl_reaches_the_model(ckpt, resolver):
    x = noise(0.02)
    torch_scan = SuperResolver.from_pretrained(ckpt, device="cpu", scan_impl="torch")
    np.testing.assert_allclose(
        torch_scan.upsample(x, 48000, keep_lowband=False)[0],
        resolver.upsample(x, 48000, keep_lowband=False)[0],
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="impl"):
        SuperResolver.from_pretrained(ckpt, device="cpu", scan_impl="nope").upsample(
            x, 48000
        )


@pytest.mark.parametrize(
    "audio, sr, message",
    [
        (np.zeros(0, np.float32), 48000, "empty"),
        (np.zeros(4800, np.float32), 48000, "silent"),
        (np.full(4800, np.nan, np.float32), 48000, "NaN"),
        (np.r_[noise(0.05), np.inf].astype(np.float32), 48000, "Inf"),
        (noise(0.009, 8000), 8000, "too short"),
        (noise(0.05)[None, None], 48000, "[T] or [channels, T]"),
        (noise(0.05), 0, "sample rate"),
    ],
)
def test_upsample_rejects_bad_audio(resolver, audio, sr, message):
    with pytest.raises(
        ValueError, match=message.replace("[", r"\[").replace("]", r"\]")
    ):
        resolver.upsample(audio, sr)


def test_upsample_rejects_bad_input_sr(resolver):
    with pytest.raises(ValueError, match="input_sr"):
        resolver.upsample(noise(0.05, 16000), 16000, input_sr=48000, keep_lowband=True)


def test_shortest_clip_is_accepted(resolver):
    y, _ = resolver.upsample(noise(inference_wav.MIN_SECONDS, 8000), 8000)
    assert y.shape == (480,)


# --- checkpoints -----------------------------------------------------------------------------


def test_ddp_bare_and_plain_checkpoints_load_identically(tmp_path, ckpt, resolver):
    state = utils.load_checkpoint(ckpt)
    x = noise(0.05)
    expected, _ = resolver.upsample(x, 48000, keep_lowband=False)
    ddp = {"module." + k: v for k, v in state["generator"].items()}
    utils.save_checkpoint(str(tmp_path / "g_ddp"), {**state, "generator": ddp})
    (tmp_path / "bare").mkdir()
    torch.save(state["generator"], tmp_path / "bare" / "generator.pt")
    with open(tmp_path / "bare" / "config.json", "w") as f:
        f.write(json.dumps(state["config"]))
    # saved after remove_weight_norm, as a small release file may be
    plain = WaveUMamba(
        **dataclasses.asdict(utils.config_from_dict(state["config"]).model)
    )
    plain.load_state_dict(state["generator"])
    plain.remove_weight_norm()
    utils.save_checkpoint(
        str(tmp_path / "g_plain"), {**state, "generator": plain.state_dict()}
    )
    for name in ("g_ddp", "bare/generator.pt", "g_plain"):
        loaded = SuperResolver.from_pretrained(str(tmp_path / name), device="cpu")
        y, _ = loaded.upsample(x, 48000, keep_lowband=False)
        np.testing.assert_allclose(y, expected, atol=1e-6)
    # a bare state_dict with no config beside it falls back to the full-size cfgs.json
    shutil.copy(tmp_path / "bare" / "generator.pt", tmp_path / "lonely.pt")
    with pytest.raises(ValueError, match="does not fit"):
        SuperResolver.from_pretrained(str(tmp_path / "lonely.pt"), device="cpu")
    # --cfgs_path wins over the checkpoint's config
    with pytest.raises(ValueError, match="does not fit"):
        SuperResolver.from_pretrained(
            ckpt, device="cpu", cfgs_path=os.path.join(ROOT, "cfgs.json")
        )


def test_pretrained_checksum_and_float16(tmp_path, ckpt, resolver, monkeypatch):
    state = utils.load_checkpoint(ckpt)
    half = {k: v.half() for k, v in state["generator"].items()}
    path = tmp_path / "wave_u_mamba_vctk_cpu.pt"
    torch.save({**state, "generator": half}, path)
    monkeypatch.setattr(inference_wav, "PRETRAINED_PATH", str(path))
    with pytest.raises(ValueError, match="checksum file missing"):
        SuperResolver.from_pretrained(device="cpu")
    (tmp_path / (path.name + ".sha256")).write_text(f"{'0' * 64}  {path.name}\n")
    with pytest.raises(ValueError, match="checksum mismatch"):
        SuperResolver.from_pretrained(device="cpu")
    (tmp_path / (path.name + ".sha256")).write_text(f"{sha(path)}  {path.name}\n")
    loaded = SuperResolver.from_pretrained(device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.generator.parameters())
    x = noise(0.05)
    np.testing.assert_allclose(
        loaded.upsample(x, 48000, keep_lowband=False)[0],
        resolver.upsample(x, 48000, keep_lowband=False)[0],
        atol=0.02,
    )


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save({"mpd": {}, "step": 3}, tmp_path / "do_00000003")
    for name, message in (
        ("missing.pt", "not found"),
        ("junk.pt", "cannot read"),
        ("do_00000003", "holds no generator"),
    ):
        with pytest.raises(ValueError, match=message) as info:
            SuperResolver.from_pretrained(str(tmp_path / name), device="cpu")
        assert "\n" not in str(info.value)


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path, ckpt, capsys):
    # a working copy of a good checkpoint with a payload added: refused, never run
    marker = tmp_path / "payload_ran"
    trap = booby_trap(tmp_path / "g_trap", utils.load_checkpoint(ckpt), marker)
    with pytest.raises(ValueError, match="refusing to load") as info:
        SuperResolver.from_pretrained(trap, device="cpu")
    assert "\n" not in str(info.value)
    sf.write(tmp_path / "a.wav", noise(0.05), 48000)
    code = inference_wav.main(
        ["--wav_path", str(tmp_path / "a.wav"), "--output_dir", str(tmp_path / "out")]
        + ["--checkpoint_file", trap, "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1 and "refusing to load" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_shipped_model_loads_as_weights_only():
    checkpoint = torch.load(inference_wav.PRETRAINED_PATH, weights_only=True)
    assert {"generator", "config", "step"} <= checkpoint.keys()


def test_cli_refuses_to_overwrite_an_output_unless_asked(tmp_path, ckpt, capsys):
    sf.write(tmp_path / "a.wav", noise(0.05), 48000)
    sf.write(tmp_path / "b.wav", noise(0.05, seed=1), 48000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_superresolved.wav").write_bytes(b"an earlier result")
    args = ["--wav_path", str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
    args += ["--output_dir", str(out), "--checkpoint_file", ckpt, "--device", "cpu"]
    code = inference_wav.main(args)
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    hits = [line for line in err if "a_superresolved.wav" in line]
    assert len(hits) == 1 and "already exists" in hits[0] and "--overwrite" in hits[0]
    assert (out / "a_superresolved.wav").read_bytes() == b"an earlier result"
    assert sf.info(str(out / "b_superresolved.wav")).samplerate == 48000  # the rest ran
    assert inference_wav.main(args + ["--overwrite"]) == 0
    assert sf.info(str(out / "a_superresolved.wav")).samplerate == 48000


@pytest.mark.parametrize("seconds", [math.inf, math.nan, 0.001, 0, -1, True, "2"])
def test_block_seconds_must_be_finite_and_not_tiny(ckpt, seconds):
    with pytest.raises(ValueError, match="block_seconds must be a finite number") as info:
        SuperResolver.from_pretrained(ckpt, device="cpu", block_seconds=seconds)
    assert f"{inference_wav.MIN_BLOCK_SECONDS:g}" in str(info.value)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_channels_last_audio_is_refused_naming_the_transposition(resolver, as_tensor):
    def convert(a):
        return torch.from_numpy(a) if as_tensor else a

    stereo = noise(0.05, 16000, channels=2)
    with pytest.raises(ValueError, match=r"\[T, channels\].*audio\.T"):
        resolver.upsample(convert(stereo.T), 16000)
    # 300 x 170 at 16 kHz would be 300 channels of 10.6 ms: too many to be channels
    with pytest.raises(ValueError, match="300 channels"):
        resolver.upsample(convert(noise(1.0, 51000)[: 300 * 170].reshape(300, 170)), 16000)
    y, _ = resolver.upsample(convert(stereo), 16000)
    assert y.shape == (2, 2400)


@pytest.mark.parametrize(
    "sr", [True, 0, -8000, 16000.5, "16000", 10**7, math.nan, None, 500]
)
def test_upsample_rejects_sample_rates_that_are_not_sane_integers(resolver, sr):
    with pytest.raises(ValueError, match="sr must be an integer sample rate in Hz"):
        resolver.upsample(noise(0.05, 16000), sr)


def test_sample_rates_as_integral_numbers_are_accepted(resolver):
    x = noise(0.05, 16000)
    expected, _ = resolver.upsample(x, 16000)
    for sr in (np.int64(16000), 16000.0):
        np.testing.assert_array_equal(resolver.upsample(x, sr)[0], expected)
    with pytest.raises(ValueError, match="input_sr"):
        resolver.upsample(x, 16000, input_sr=True, keep_lowband=True)


def test_temporaries_of_a_killed_write_are_removed_by_the_next_run(tmp_path, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out / "a_superresolved.wav")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    assert len(glob.glob(str(out / ".tmp_*"))) == 1
    (out / ".tmp_notes.wav").write_text("not ours: another program's name")
    sf.write(tmp_path / "a.wav", noise(0.05), 48000)
    code = inference_wav.main(
        ["--wav_path", str(tmp_path / "a.wav"), "--output_dir", str(out)]
        + ["--checkpoint_file", ckpt, "--device", "cpu", "--overwrite"]
    )
    assert code == 0
    assert sorted(os.listdir(out)) == [".tmp_notes.wav", "a_superresolved.wav"]


# Starts an atomic write of its argument and waits there to be killed.
KILLED_WRITER = (
    "import sys, time, utils\n"
    "with utils.atomic_path(sys.argv[1]) as tmp:\n"
    "    open(tmp, 'w').write('half a file')\n"
    "    print('writing', flush=True)\n"
    "    time.sleep(300)\n"
)
