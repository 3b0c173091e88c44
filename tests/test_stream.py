"""Tests of stream.py: every streaming stage, the whole generator and the command line equal
whole-file processing on random splits of a signal into blocks."""

import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import torch

import dataset
import evaluate
import inference_wav
import metrics
import models
import ssm
import stream
import train
import utils
from models import ConvUnit, ResBlock
from test_inference import ROOT, TINY, tiny_generator


pytestmark = pytest.mark.usefixtures("one_thread")


def random_split(length: int, rng, sizes=None) -> list[int]:
    """Block lengths summing to `length`: all of `sizes` in turn, or random 0..40."""
    cuts, total = [], 0
    while total < length:
        n = sizes[len(cuts) % len(sizes)] if sizes else int(rng.integers(0, 41))
        n = min(n, length - total)
        cuts.append(n)
        total += n
    return cuts


def run_blocks(stage, x: torch.Tensor, blocks) -> torch.Tensor:
    """The stage's outputs for x cut into `blocks` along time, concatenated."""
    outs, start = [], 0
    for n in blocks:
        outs.append(stage.step(x[..., start : start + n], final=False))
        start += n
    outs.append(stage.step(x[..., :0], final=True))
    return torch.cat(outs, dim=-1)


def assert_same(actual, expected):
    # float32 convolutions on different lengths may round differently; nothing more
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


WINDOWS = {
    "conv unit": lambda: stream._unit_window(ConvUnit(3, 5, 4)),
    "residual conv unit": lambda: (
        lambda unit: stream._unit_window(unit, lambda x: x + unit(x))
    )(ConvUnit(3, 3, 3)),
    "resblock": lambda: stream._resblock_window(ResBlock(3, 3, (1, 3))),
    "up k4": lambda: stream._up_window(torch.nn.ConvTranspose1d(3, 2, 4, 2, 1)),
    "up k8": lambda: stream._up_window(torch.nn.ConvTranspose1d(3, 2, 8, 2, 3)),
    "pool": lambda: stream.Window(torch.nn.AvgPool1d(2, 2), 3, den=2),
    "head": lambda: stream._conv_window(torch.nn.Conv1d(3, 1, 7, padding=3)),
}


@pytest.mark.parametrize("name", sorted(WINDOWS))
@pytest.mark.parametrize("split", ["ones", "random", "whole"])
def test_window_stages_equal_the_layer_on_the_whole_signal(name, split):
    torch.manual_seed(0)
    rng = np.random.default_rng(len(name))
    stage = WINDOWS[name]()
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        expected = stage.fn(x)
        sizes = {"ones": [1], "random": None, "whole": [96]}[split]
        actual = run_blocks(stage, x, random_split(96, rng, sizes))
    assert actual.shape == expected.shape
    assert_same(actual, expected)


def test_window_keeps_bounded_context():
    stage = stream._resblock_window(ResBlock(3, 3, (1, 3)))
    with torch.no_grad():
        for _ in range(50):
            stage.step(torch.randn(1, 3, 17), final=False)
    assert stage.buffer.shape[-1] <= 17 + stage.lo + stage.hi


def test_merge_emits_what_both_streams_have():
    merge = stream.Merge(torch.add)
    a, b = torch.arange(6.0)[None, None], 10 * torch.arange(6.0)[None, None]
    assert merge.step(a[..., :4], b[..., :1], False).shape[-1] == 1
    assert merge.step(a[..., 4:], b[..., 1:3], False).shape[-1] == 2
    torch.testing.assert_close(
        merge.step(a[..., :0], b[..., 3:], True), a[..., 3:] + b[..., 3:]
    )


@pytest.mark.parametrize("impl", ["torch", "compiled"])
def test_mamba_state_carried_across_calls_equals_one_call(impl):
    torch.manual_seed(0)
    mamba = ssm.Mamba(8, d_state=4, impl=impl).double()
    x = torch.randn(2, 200, 8, dtype=torch.float64)  # [B, L, d_model]
    with torch.no_grad():
        whole = mamba(x)
        pieces, state, start = [], None, 0
        for n in (1, 2, 0, 3, 17, 77, 100):
            # forward_stream is channels-first
            y, state = mamba.forward_stream(x[:, start : start + n].transpose(1, 2), state)
            pieces.append(y.transpose(1, 2))
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-12)


# --- the whole generator and the processor -----------------------------------------------


SHIPPED = os.path.join(ROOT, "checkpoints", "wave_u_mamba_vctk_cpu.pt")


@pytest.fixture(scope="module")
def tiny():
    generator, _ = tiny_generator(seed=1)
    generator.remove_weight_norm()
    return generator.eval()


@pytest.fixture(scope="module")
def shipped():
    if not os.path.isfile(SHIPPED):
        pytest.skip("the shipped checkpoint is absent")
    return models.load_generator(SHIPPED)[0]


def speech_like(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """Voiced bursts with noise, band-limited to sr / 2: a float32 [T] test signal."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 48000)) / 48000
    pitch = 120 + 40 * np.sin(2 * np.pi * 3 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / 48000) / k for k in range(1, 30))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    x = (0.1 * voiced * envelope + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    return dataset.resample(x, 48000, sr)[: round(seconds * sr)] if sr < 48000 else x


def offline(generator, x: np.ndarray, sr: int, gain: float) -> np.ndarray:
    """Whole-file processing written plainly: soxr to 48 kHz in one call, gain, one generator
    pass over the signal zero-padded to the hop, gain undone."""
    x48 = resample(x, sr)
    n = round(len(x) * 48000 / sr)
    x48 = np.pad(x48[:n], (0, n - len(x48[:n])))
    padded = np.pad(x48 * np.float32(gain), (0, -n % generator.hop))
    with torch.no_grad():
        y = generator(torch.from_numpy(padded)[None, None])[0, 0, :n].numpy()
    return y / np.float32(gain)


def resample(x: np.ndarray, sr: int) -> np.ndarray:
    """[T] or [channels, T] at sr to 48 kHz with the processor's resampler, in one call."""
    if sr == 48000:
        return x
    x2 = np.atleast_2d(x)
    resampler = stream.make_resampler(sr, 48000, len(x2))
    y = resampler.resample_chunk(np.ascontiguousarray(x2.T), last=True).T
    return y[0] if x.ndim == 1 else y


def assert_relative(actual, expected, tol=1e-4):
    # every sample within tol of the largest expected sample
    assert actual.shape == expected.shape
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= tol, error


def stream_blocks(processor, x: np.ndarray, blocks) -> np.ndarray:
    outs, start = [], 0
    for n in blocks:
        outs.append(processor.process(x[..., start : start + n]))
        start += n
    outs.append(processor.flush())
    return np.concatenate(outs, axis=-1)


@pytest.mark.parametrize("sizes", [[1], [17], None, [3 * 48000]], ids=str)
def test_generator_stream_equals_one_pass(tiny, sizes):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(speech_like(0.05, 48000))[None, None].repeat(2, 1, 1)
    x[1] *= -0.5
    with torch.no_grad():
        expected = tiny(torch.nn.functional.pad(x, (0, -x.shape[-1] % 16)))
    g = stream.GeneratorStream(tiny)
    blocks = random_split(x.shape[-1], rng, sizes)
    outs = [g.push(x[..., a : a + n]) for a, n in zip(np.cumsum([0] + blocks), blocks)]
    actual = torch.cat(outs + [g.flush()], dim=-1)
    assert_relative(actual.numpy(), expected[..., : x.shape[-1]].numpy())


@pytest.mark.parametrize("sr", [8000, 16000, 48000])
@pytest.mark.parametrize("sizes", [[1], [17], None, [3 * 48000]], ids=str)
def test_processor_equals_offline_tiny_model(tiny, sr, sizes):
    rng = np.random.default_rng(sr)
    x = speech_like(0.04, sr, seed=1)
    processor = stream.StreamProcessor(tiny, sr, 48000, gain=2.0)
    actual = stream_blocks(processor, x, random_split(len(x), rng, sizes))
    assert_relative(actual, offline(tiny, x, sr, 2.0))


@pytest.mark.parametrize("sr", [8000, 16000, 48000])
def test_processor_equals_offline_shipped_model(shipped, sr):
    # random blocks of 1 to 400 samples over 0.25 s, the first ones single samples
    rng = np.random.default_rng(sr)
    x = speech_like(0.25, sr, seed=2)
    blocks = [1] * 5 + [int(n) for n in rng.integers(1, 400, size=len(x))]
    blocks = random_split(len(x), rng, blocks)
    processor = stream.StreamProcessor(shipped, sr, 48000, gain=3.0)
    expected = offline(shipped, x, sr, 3.0)
    assert_relative(stream_blocks(processor, x, blocks), expected)
    assert_relative(stream.process_whole(shipped, x, sr, 48000, 3.0), expected)


def test_processor_multichannel_gains_and_lowband(tiny):
    rng = np.random.default_rng(5)
    x = np.stack([speech_like(0.05, 16000, seed=s) for s in (3, 4)])
    gains = np.array([0.5, 4.0])
    whole = stream.process_whole(tiny, x, 16000, 48000, gains, lowband_hz=4000)
    processor = stream.StreamProcessor(tiny, 16000, 48000, gains, 2, lowband_hz=4000)
    assert_relative(stream_blocks(processor, x, random_split(x.shape[1], rng)), whole)
    # each channel as it would be alone, then crossed over with the input
    for channel, gain in zip(x, gains):
        y = offline(tiny, channel, 16000, gain)
        x48 = resample(channel, 16000)
        h = stream.lowband_filter(4000, 48000)
        expected = y + scipy.signal.oaconvolve(x48.astype(np.float64) - y, h, "same")
        assert_relative(whole[list(gains).index(gain)], expected.astype(np.float32))


def test_lowband_is_complementary():
    x = torch.randn(2, 1, 4800)
    lowband = stream.LowbandStream(stream.lowband_filter(3000, 48000))
    # equal inputs: nothing to cross over
    y = torch.cat([lowband.step(x[..., :1000], x[..., :1000], False),
                   lowband.step(x[..., 1000:], x[..., 1000:], True)], dim=-1)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    # at the Nyquist frequency the input is kept whole
    assert stream.lowband_filter(24000, 48000) is None
    whole = stream.LowbandStream(None).step(x, torch.zeros_like(x), True)
    assert torch.equal(whole, x)


def test_stream_gain_and_closing(tiny):
    with pytest.raises(ValueError, match="gain"):
        stream.StreamProcessor(tiny, 8000, 48000, gain=0.0)
    with pytest.raises(ValueError, match="channel"):
        stream.StreamProcessor(tiny, 8000, 48000, channels=2).process(np.zeros(5))
    g = stream.GeneratorStream(tiny)
    g.push(torch.zeros(1, 1, 3))
    assert g.flush().shape == (1, 1, 3)
    with pytest.raises(ValueError, match="flushed"):
        g.push(torch.zeros(1, 1, 3))


# --- one inference path --------------------------------------------------------------------


def test_validation_and_evaluation_score_what_inference_returns(tmp_path, tiny):
    generator, cfg = tiny_generator(seed=1)  # weight norm kept, as in training
    path = str(tmp_path / "clip.wav")
    sf.write(path, speech_like(0.1, 48000, seed=6), 48000)
    cfg = utils.load_config(os.path.join(ROOT, "cfgs.json"), TINY + ["data.valid_ratios=[6]"])
    run = types.SimpleNamespace(
        cfg=cfg, generator=generator, valid_set=dataset.ValidDataset([path], cfg)
    )
    scores = train.validate(run)
    x, y, ratio, _ = run.valid_set[0]
    resolver = inference_wav.SuperResolver(tiny, cfg, torch.device("cpu"), 0.01)
    users, _ = resolver.upsample(x[0].numpy(), 48000, keep_lowband=False)
    scored = evaluate.run_generator(tiny, x[0].numpy(), cfg.audio.peak)
    assert_relative(scored, users)
    expected = metrics.lsd(y[0], users, 48000, cutoff_hz=4000)
    assert scores["lsd"] == pytest.approx(expected["lsd"], rel=1e-4)
    assert scores["lsd_hf"] == pytest.approx(expected["lsd_hf"], rel=1e-4)


# --- the command line -------------------------------------------------------------------


def run_cli(args, feed: bytes, rng, close_after: int | None = None):
    """stream.py with `feed` written to its stdin in random pieces while its stdout is read;
    with close_after, the reader hangs up after that many bytes. Returns (code, out, err)."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "stream.py")] + args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        # one thread: on a busy 2-core machine a second one mostly waits for the first
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    out = bytearray()

    def read():
        while close_after is None or len(out) < close_after:
            data = proc.stdout.read1(65536)
            if not data:
                break
            out.extend(data)
        proc.stdout.close()

    reader = threading.Thread(target=read)
    reader.start()
    start = 0
    try:
        while start < len(feed):
            n = int(rng.integers(1, 3000))  # odd sizes split samples between reads
            proc.stdin.write(feed[start : start + n])
            proc.stdin.flush()
            start += n
            time.sleep(0.0005)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    reader.join(timeout=300)
    err = proc.stderr.read().decode()
    return proc.wait(timeout=300), bytes(out), err


@pytest.mark.parametrize(
    "rate, flags",
    # at 48 kHz the input's own band is all of it: the model is heard only without it
    [(48000, ["--no-keep_lowband"]), (8000, [])],
)
def test_cli_stream_equals_inference_wav(tmp_path, shipped, rate, flags):
    # Done-when of issue 11: a 16-bit recording through `stream.py --gain 1` in random pieces
    # gives inference_wav.py --gain 1 --format float's samples to 16-bit rounding; with the
    # input's band kept (the default of both) or not.
    x = (speech_like(0.3, rate, seed=7) * 32768).round().astype("<i2")
    sf.write(tmp_path / "in.wav", x, rate, subtype="PCM_16")
    code = inference_wav.main(
        ["--wav_path", str(tmp_path / "in.wav"), "--output_dir", str(tmp_path)]
        + ["--gain", "1", "--format", "float", "--device", "cpu"]
        + flags
    )
    assert code == 0
    y, sr = sf.read(tmp_path / "in_superresolved.wav", dtype="float32")
    code, out, err = run_cli(
        ["--input_sr", str(rate), "--gain", "1", "--device", "cpu"] + flags,
        x.tobytes(),
        np.random.default_rng(0),
    )
    assert code == 0 and "error" not in err, err
    streamed = np.frombuffer(out, dtype="<i2").astype(np.int64)
    expected = np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int64)
    assert sr == 48000 and streamed.shape == expected.shape
    assert np.abs(streamed - expected).max() <= 1


def test_cli_closed_pipe_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    feed = (0.1 * 32768 * rng.standard_normal(48000)).astype("<i2").tobytes()
    # the reader hangs up after 1000 bytes: the stream ends quietly
    code, out, err = run_cli(["--input_sr", "16000", "--device", "cpu"], feed, rng, 1000)
    assert code == 0 and err == "", err
    code, out, err = run_cli(
        ["--input_sr", "8000", "--checkpoint_file", str(tmp_path / "none.pt")], b"", rng
    )
    assert code == 1 and out == b"" and len(err.splitlines()) == 1 and "none.pt" in err


def test_files_block_by_block_equal_one_pass(tmp_path, tiny):
    cfg = utils.load_config(os.path.join(ROOT, "cfgs.json"), TINY)
    x = np.stack([speech_like(0.2, 16000, seed=8), np.zeros(3200, np.float32)])
    x[0, 1000:1100] = 0.95  # a peak that the output will exceed: pcm16 scales it down
    path = str(tmp_path / "in.flac")
    sf.write(path, x.T, 16000, subtype="PCM_24")
    audio, _ = dataset.load_audio(path)
    whole = inference_wav.SuperResolver(tiny, cfg, torch.device("cpu"), 10.0)
    expected, _ = whole.upsample(audio, 16000, input_sr="auto", keep_lowband=True)
    blocks = inference_wav.SuperResolver(tiny, cfg, torch.device("cpu"), 0.013)
    blocks.upsample_file(path, str(tmp_path / "f.wav"), "float", keep_lowband=True)
    y, sr = sf.read(tmp_path / "f.wav", dtype="float32", always_2d=True)
    assert sr == 48000 and not y[:, 1].any()
    assert_relative(y.T, expected)
    blocks.upsample_file(path, str(tmp_path / "p.wav"), "pcm16", keep_lowband=True)
    y16, _ = sf.read(tmp_path / "p.wav", dtype="float32", always_2d=True)
    scale = (32767 / 32768) / np.abs(expected).max()
    assert scale < 1
    np.testing.assert_allclose(y16.T, expected * scale, atol=1.5 / 32768)


def test_bandwidth_meter_in_blocks_equals_the_whole_signal():
    rng = np.random.default_rng(3)
    for sr, cutoff in ((48000, 8000), (16000, 4000), (44100, 6000)):
        x = scipy.signal.sosfilt(
            scipy.signal.ellip(10, 0.1, 90, cutoff * 0.98, fs=sr, output="sos"),
            rng.standard_normal((2, sr // 2)),
        )
        meter = inference_wav.BandwidthMeter(sr)
        cuts = random_split(sr // 2, rng, [997])
        for start, n in zip(np.cumsum([0] + cuts), cuts):
            meter.add(x[:, start : start + n])
        # the same segments, so the same spectrum (to float rounding) and the same answer
        assert meter.bandwidth() == inference_wav.detect_bandwidth(x, sr) == cutoff


@pytest.mark.parametrize(
    "args, match",
    [
        (["--block_ms", "inf"], "--block_ms / 1000 must be a finite number"),
        (["--block_ms", "nan"], "--block_ms / 1000 must be a finite number"),
        (["--block_ms", "0.001"], "at least 0.01"),
        (["--input_sr", "0"], "--input_sr"),
    ],
)
def test_cli_bad_arguments_are_one_line(args, match, capsys):
    # the rules of inference_wav.py's block size and rates: no OverflowError for inf
    full = ["--input_sr", "16000", *args] if "--input_sr" not in args else args
    with pytest.raises(SystemExit) as stop:
        stream.main(full)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert match in err[-1] and "Traceback" not in "\n".join(err)
