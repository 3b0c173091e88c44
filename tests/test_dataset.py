"""Tests for dataset.py: audio I/O and its errors, resampling, every low-resolution
protocol on white noise and real speech, file lists, the datasets, and the VCTK filelists
command."""

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import torch

import dataset
from dataset import (
    PROTOCOLS,
    TrainDataset,
    ValidDataset,
    list_audio_files,
    load_audio,
    read_speakers,
    resample,
    simulate_lowres,
    to_48k_mono,
    write_vctk_filelists,
)
from utils import load_config

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
RATIOS = (2, 3, 4, 6, 8, 12)
# Upper-band attenuation (dB, 1.1x cutoff to 24 kHz) each protocol reaches on white noise;
# brick-wall FFT, soxr and STFT masking reach 110-150 dB; resample_poly's default Kaiser
# window (nuwave2, and "random" when it draws it) stops at about 41-53 dB.
MIN_ATTENUATION_DB = {
    "authors": 100,
    "random": 40,
    "nuwave2": 40,
    "sinc": 100,
    "stft": 90,
}


def _tone(sr=48000, seconds=0.5, freq=440.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


def _noise_clip(path, seconds, seed, sr=48000, channels=1):
    x = 0.3 * np.random.default_rng(seed).standard_normal((int(sr * seconds), channels))
    sf.write(path, x.astype(np.float32), sr, subtype="FLOAT")
    return str(path)


def _band_levels(x, z, cutoff, pass_edge=0.9, sr=48000):
    """(upper-band attenuation, min and max passband gain over sub-bands), in dB."""
    f, px = scipy.signal.welch(x, sr, nperseg=8192)
    _, pz = scipy.signal.welch(z, sr, nperseg=8192)
    upper = f >= 1.1 * cutoff
    attenuation = -10 * np.log10(pz[upper].mean() / px[upper].mean())
    edges = np.linspace(50.0, pass_edge * cutoff, 10)
    gains = [
        10 * np.log10(pz[band].mean() / px[band].mean())
        for band in ((f >= lo) & (f < hi) for lo, hi in zip(edges[:-1], edges[1:]))
    ]
    return attenuation, min(gains), max(gains)


# ---------------------------------------------------------------- audio I/O


@pytest.mark.parametrize(
    "suffix, subtype, atol",
    [
        (".wav", "PCM_16", 2**-15),
        (".wav", "PCM_24", 2**-23),
        (".wav", "PCM_32", 2**-31),
        (".wav", "PCM_U8", 2**-7),
        (".wav", "FLOAT", 0),
        (".flac", "PCM_16", 2**-15),
        (".flac", "PCM_24", 2**-23),
        (".ogg", "VORBIS", 0.05),
    ],
)
def test_load_audio_formats(tmp_path, suffix, subtype, atol):
    x = _tone(sr=44100, channels=2)
    path = tmp_path / f"a{suffix}"
    sf.write(path, x, 44100, subtype=subtype)
    y, sr = load_audio(str(path))
    assert sr == 44100 and y.dtype == np.float32 and y.shape == (2, len(x))
    np.testing.assert_allclose(y, x.T, atol=atol + 1e-7)


def _error(path):
    with pytest.raises(ValueError) as info:
        load_audio(str(path))
    assert str(path) in str(info.value)
    return str(info.value)


def test_load_audio_errors(tmp_path):
    assert "no such" in _error(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("this is not audio\n" * 10)
    assert "not a readable" in _error(tmp_path / "text.wav")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1)), 48000)
    assert "empty" in _error(tmp_path / "empty.wav")
    x = _tone()
    x[100] = np.nan
    sf.write(tmp_path / "nan.wav", x, 48000, subtype="FLOAT")
    assert "NaN" in _error(tmp_path / "nan.wav")
    for suffix in (".wav", ".flac"):
        full = tmp_path / f"full{suffix}"
        sf.write(full, _tone(), 48000, subtype="PCM_16")
        data = full.read_bytes()
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(data[: len(data) // 2])
        message = _error(cut)
        assert "truncated" in message or "not a readable" in message
        (tmp_path / f"header{suffix}").write_bytes(data[:30])
        _error(tmp_path / f"header{suffix}")


def test_resample_and_to_48k_mono(tmp_path):
    t = np.arange(44100) / 44100
    x = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    y = resample(x, 44100, 48000)
    assert y.dtype == np.float32 and abs(len(y) - 48000) <= 1
    t48 = np.arange(len(y)) / 48000
    expected = np.sin(2 * np.pi * 1000 * t48)
    np.testing.assert_allclose(y[2000:-2000], expected[2000:-2000], atol=1e-3)
    stereo = np.stack([x, 0.5 * x])
    y2 = resample(stereo, 44100, 48000)
    assert y2.shape == (2, len(y))
    np.testing.assert_allclose(y2[0], y, atol=1e-6)
    np.testing.assert_array_equal(resample(x, 48000, 48000), x)

    sf.write(tmp_path / "s.wav", _tone(sr=44100, channels=2), 44100, subtype="PCM_16")
    mono = to_48k_mono(str(tmp_path / "s.wav"))
    assert mono.ndim == 1 and abs(len(mono) - 24000) <= 1
    # The two channels are 0.5x and 1x the tone, so the mix has peak 0.375.
    assert np.max(np.abs(mono[1000:-1000])) == pytest.approx(0.375, abs=0.01)


# ---------------------------------------------------------------- low resolution


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_lowres_white_noise(protocol):
    x = np.random.default_rng(0).standard_normal(48000)
    for ratio in RATIOS:
        cutoff = 24000 / ratio
        seeds = range(6) if protocol == "random" else [0]
        for seed in seeds:
            z = simulate_lowres(x, 48000 / ratio, protocol, np.random.default_rng(seed))
            assert z.dtype == np.float32 and z.shape == x.shape
            # "random" draws low-order Bessel/Butterworth filters whose roll-off starts
            # well below the cutoff; that is the point of the recipe, so its passband is
            # checked only up to half the cutoff.
            edge, tol = (0.5, 2.0) if protocol == "random" else (0.9, 0.5)
            att, lo, hi = _band_levels(x, z, cutoff, pass_edge=edge)
            assert att > MIN_ATTENUATION_DB[protocol], (ratio, seed, att)
            assert -tol < lo and hi < 0.2, (ratio, seed, lo, hi)


def test_lowres_real_speech():
    path = SHARED_DATA / "valid" / "p234_012_svgan.wav"
    if not path.exists():
        pytest.skip(f"real speech not available at {path}")
    y = to_48k_mono(str(path))[: 2 * 48000]
    for protocol in PROTOCOLS:
        for ratio in RATIOS:
            rng = np.random.default_rng(ratio)
            z = simulate_lowres(y, 48000 / ratio, protocol, rng)
            edge, tol = (0.5, 2.0) if protocol == "random" else (0.9, 0.6)
            att, lo, hi = _band_levels(y, z, 24000 / ratio, pass_edge=edge)
            # Speech is loudest just above the cutoff, where resample_poly leaks most.
            assert att > min(MIN_ATTENUATION_DB[protocol], 30), (protocol, ratio, att)
            assert -tol < lo and hi < 0.2, (protocol, ratio, lo, hi)


def test_lowres_lengths_determinism_and_errors():
    x = np.random.default_rng(1).standard_normal(12345)
    for protocol in PROTOCOLS:
        z = simulate_lowres(x, 7000, protocol, np.random.default_rng(0))
        assert z.shape == x.shape and np.all(np.isfinite(z))
    a = simulate_lowres(x, 8000, "random", np.random.default_rng(5))
    b = simulate_lowres(x, 8000, "random", np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    outs = [
        simulate_lowres(x, 8000, "random", np.random.default_rng(s)) for s in range(4)
    ]
    assert any(not np.allclose(outs[0], o) for o in outs[1:])
    np.testing.assert_array_equal(
        simulate_lowres(x, 16000, "authors"), simulate_lowres(x, 16000, "authors")
    )
    with pytest.raises(ValueError, match="protocol"):
        simulate_lowres(x, 8000, "linear")
    with pytest.raises(ValueError, match="sr_low"):
        simulate_lowres(x, 96000, "authors")
    with pytest.raises(ValueError, match="1-D"):
        simulate_lowres(np.zeros((2, 100)), 8000, "authors")


# ---------------------------------------------------------------- file lists


def test_list_audio_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/z.wav", "a/b/y.flac", "a/b/x.ogg", "a/x.WAV", "a/notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    files = list_audio_files(str(tmp_path), "a")
    rel = [os.path.relpath(f, tmp_path) for f in files]
    assert rel == sorted(["a/z.wav", "a/b/y.flac", "a/b/x.ogg", "a/x.WAV"])
    assert rel == [os.path.relpath(f, tmp_path) for f in sorted(files)]

    (tmp_path / "list.txt").write_text("a/z.wav\n\n# comment\na/b/y.flac\n")
    files = list_audio_files(str(tmp_path), "list.txt")
    assert files == [str(tmp_path / "a/z.wav"), str(tmp_path / "a/b/y.flac")]
    # A list path given from the working directory works too.
    assert list_audio_files(str(tmp_path), str(tmp_path / "list.txt")) == files

    (tmp_path / "bad.txt").write_text("a/z.wav\nnope1.wav\nnope2.wav\n")
    with pytest.raises(ValueError, match="2 of 3 listed files missing.*nope1"):
        list_audio_files(str(tmp_path), "bad.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        list_audio_files(str(tmp_path), "empty")
    with pytest.raises(ValueError, match="not found"):
        list_audio_files(str(tmp_path), "missing_dir")
    with pytest.raises(ValueError, match="not found"):
        list_audio_files(str(tmp_path), "missing.txt")


# ---------------------------------------------------------------- datasets


# 1600-sample crops need loss windows no longer than the crop (the config refuses others).
SHORT_CROPS = [
    "audio.segment_size=1600",
    "loss.stft_fft_sizes=[256,512,1024]",
    "loss.stft_hop_sizes=[64,128,256]",
    "loss.mel_n_fft=1024",
    "loss.mel_win_size=1024",
]


@pytest.fixture
def cfg():
    return load_config("cfgs.json", SHORT_CROPS)


@pytest.fixture
def clips(tmp_path):
    return [
        _noise_clip(tmp_path / "long.wav", 0.5, 0),  # >= 3 segments
        _noise_clip(tmp_path / "mid.wav", 0.06, 1),  # 1-3 segments
        _noise_clip(tmp_path / "short.wav", 0.02, 2),  # < 1 segment
        _noise_clip(tmp_path / "stereo44k.wav", 0.3, 3, sr=44100, channels=2),
    ]


def test_train_dataset_items_and_reproducibility(cfg, clips):
    ds = TrainDataset(clips, cfg, seed=7)
    assert len(ds) == 4
    first = [ds[i] for i in range(4)]
    for x, y in first:
        assert x.shape == y.shape == (1, 1600)
        assert x.dtype == y.dtype == torch.float32
    again = TrainDataset(clips, cfg, seed=7)
    for i in range(4):
        assert all(torch.equal(a, b) for a, b in zip(first[i], again[i]))
    ds.set_epoch(1)
    assert not torch.equal(ds[0][1], first[0][1])
    # The short clip (960 samples) is zero-padded at the end.
    x, y = first[2]
    assert torch.all(y[0, 960:] == 0) and torch.all(x[0, 960:] == 0)
    assert torch.all(y[0, :960] != 0)
    assert TrainDataset(clips, cfg, seed=8)[0][1].ne(first[0][1]).any()


def test_train_dataset_crop_alignment_and_gain(clips):
    cfg = load_config(
        "cfgs.json",
        SHORT_CROPS + ["data.ratios=[3]", "data.random_gain_db=6"],
    )
    y_full = to_48k_mono(clips[0])
    y_full = y_full * (0.9 / np.max(np.abs(y_full)))
    x_full = simulate_lowres(y_full, 16000, "authors")
    ds = TrainDataset(clips[:1], cfg, seed=0)
    gains = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        x, y = (t[0].numpy() for t in ds[0])
        # Find the crop by cross-correlation, then check the whole window and the gain.
        corr = np.correlate(y_full, y, mode="valid")
        start = int(np.argmax(np.abs(corr)))
        assert 1600 <= start <= len(y_full) - 2 * 1600
        gain = y[0] / y_full[start]
        np.testing.assert_allclose(y, gain * y_full[start : start + 1600], rtol=1e-4)
        np.testing.assert_allclose(x, gain * x_full[start : start + 1600], atol=1e-5)
        assert 10 ** (-6 / 20) - 1e-4 <= gain <= 10 ** (6 / 20) + 1e-4
        gains.append(gain)
    assert len(set(np.round(gains, 4))) > 1


def test_train_dataset_workers_match_single_process(cfg, clips):
    # One clip four times: the items differ only through their random draws.
    ds = TrainDataset(clips[:1] * 4, cfg, seed=3)
    ds.set_epoch(2)
    batches = [
        list(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=n))
        for n in (0, 2)
    ]
    for (x0, y0), (x2, y2) in zip(*batches):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    ys = [y for _, y in batches[1]]
    assert all(not torch.equal(ys[i], ys[j]) for i in range(4) for j in range(i))
    # Persistent workers follow set_epoch and keep their cache between epochs.
    loader = torch.utils.data.DataLoader(
        ds, batch_size=1, num_workers=2, persistent_workers=True
    )
    for epoch in (2, 5):
        ds.set_epoch(epoch)
        got = list(loader)
        ds.set_epoch(epoch)
        expected = [ds[i] for i in range(4)]
        for (x, y), (xe, ye) in zip(got, expected):
            assert torch.equal(x[0], xe) and torch.equal(y[0], ye)


def test_train_dataset_preload_is_shared_with_workers(cfg, clips):
    ds = TrainDataset(clips, cfg, seed=4)
    expected = [ds[i] for i in range(4)]
    ds = TrainDataset(clips, cfg, seed=4)
    ds.preload()
    assert ds.cache.used > 0
    for path in clips:
        os.remove(path)
    # Forked workers can only have read the audio from the preloaded cache.
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    for (x, y), (xe, ye) in zip(loader, expected):
        assert torch.equal(x[0], xe) and torch.equal(y[0], ye)


def test_train_dataset_rejects_silent_clip(cfg, tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(4800), 48000)
    with pytest.raises(ValueError, match="silent.wav.*silent"):
        TrainDataset([str(silent)], cfg)[0]
    with pytest.raises(ValueError):
        TrainDataset([], cfg)


def test_valid_dataset(cfg, clips):
    ds = ValidDataset(clips[:2], cfg)
    assert len(ds) == 2 * len(cfg.data.valid_ratios)
    for i in range(len(ds)):
        x, y, ratio, name = ds[i]
        assert x.shape == y.shape and x.shape[0] == 1 and x.shape[1] % 16 == 0
        assert ratio == cfg.data.valid_ratios[i % len(cfg.data.valid_ratios)]
        assert name == ("long" if i < len(cfg.data.valid_ratios) else "mid")
        x2, y2, _, _ = ValidDataset(clips[:2], cfg)[i]
        assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y, ratio, _ = ds[1]
    y_full = to_48k_mono(clips[0])
    y_full = y_full * (0.9 / np.max(np.abs(y_full)))
    np.testing.assert_allclose(y[0, : len(y_full)].numpy(), y_full, rtol=1e-6)
    expected = simulate_lowres(y_full, 48000 / ratio, "authors")
    np.testing.assert_allclose(x[0, : len(y_full)].numpy(), expected, atol=1e-6)
    assert x.shape[1] - len(y_full) < 16



def test_valid_dataset_pads_to_the_model_hop(clips):
    # a five-stage model takes multiples of 32 samples, not the paper's 16
    five_stages = ["model.channels=[4,8,8,8,8]", "model.up_kernels=[4,4,4,4,4]"]
    cfg = load_config("cfgs.json", SHORT_CROPS + five_stages)
    assert cfg.model.hop == 32
    ds = ValidDataset(clips[:2], cfg)
    for i in range(len(ds)):
        x, y, _, _ = ds[i]
        assert x.shape == y.shape and x.shape[1] % 32 == 0


def test_peak_gains_silence_rule():
    # each channel to the target peak; a silent channel beside others keeps gain 1
    gains = dataset.peak_gains([0.5, 0.0, 2.0], 0.9)
    np.testing.assert_allclose(gains, [1.8, 1.0, 0.45], rtol=1e-12)
    assert dataset.peak_gains(0.3, 0.9) == pytest.approx(3.0)
    # a clip silent in every channel has no level: an error naming it
    for silent in (0.0, [0.0, 0.0]):
        with pytest.raises(ValueError, match=r"^clip\.wav: silent clip"):
            dataset.peak_gains(silent, 0.9, "clip.wav")


# ---------------------------------------------------------------- VCTK file lists


def test_speaker_splits():
    k_train = read_speakers("kuleshov", "train")
    k_valid = read_speakers("kuleshov", "valid")
    c_train, c_test = read_speakers("common", "train"), read_speakers("common", "test")
    assert (len(k_train), len(k_valid), len(c_train), len(c_test)) == (100, 9, 100, 8)
    assert len(set(k_train + k_valid)) == 109 and not set(k_train) & set(k_valid)
    assert not set(c_train) & set(c_test) and len(set(c_train)) == 100
    assert k_valid == "p347 p351 p360 p361 p362 p363 p364 p374 p376".split()
    assert c_test == "p360 p361 p362 p363 p364 p374 p376 s5".split()
    assert all(int(s[1:]) <= 345 for s in k_train)
    # VCTK 0.92 = the 109 speakers of 0.80 plus s5; the common split drops p280, p315.
    assert set(c_train + c_test) | {"p280", "p315"} == set(k_train + k_valid) | {"s5"}


def _fake_vctk(root, layout, speakers):
    audio_dir, _ = dataset.VCTK_LAYOUTS[layout]
    for spk in speakers:
        folder = root / audio_dir / spk
        folder.mkdir(parents=True)
        for n in (1, 2):
            suffix = ".wav" if layout == "vctk080" else "_mic1.flac"
            (folder / f"{spk}_{n:03d}{suffix}").write_bytes(b"")
        # Files the lists must skip: other microphone, transcripts.
        (folder / f"{spk}_001_mic2.flac").write_bytes(b"")
        (folder / f"{spk}_001.txt").write_bytes(b"")


@pytest.mark.parametrize(
    "layout, split, subsets",
    [
        ("vctk080", "kuleshov", ("train", "valid")),
        ("vctk092", "common", ("train", "test")),
    ],
)
def test_filelists_command(tmp_path, capsys, layout, split, subsets):
    root, out = tmp_path / "VCTK", tmp_path / "lists"
    speakers = {s: read_speakers(split, s) for s in subsets}
    _fake_vctk(root, layout, speakers[subsets[0]] + speakers[subsets[1]])
    argv = ["filelists", "--root", str(root), "--layout", layout, "--split", split]
    argv += ["--out", str(out)]
    dataset.main(argv)
    for subset in subsets:
        list_path = out / f"{layout}_{split}_{subset}.txt"
        listed = list_path.read_text().split()
        assert len(listed) == 2 * len(speakers[subset])
        assert {p.split("/")[1] for p in listed} == set(speakers[subset])
        # Paths are relative to root and load through list_audio_files.
        assert len(list_audio_files(str(root), str(list_path))) == len(listed)
    assert "100 speakers" in capsys.readouterr().out

    # A missing test/valid speaker stops the command, naming it ...
    audio_dir, _ = dataset.VCTK_LAYOUTS[layout]
    for f in (root / audio_dir / "p362").iterdir():
        f.unlink()
    with pytest.raises(SystemExit) as info:
        dataset.main(argv)
    assert info.value.code == 1
    assert "p362" in capsys.readouterr().err
    # ... unless explicitly allowed, which still reports it.
    write_vctk_filelists(str(root), layout, split, str(out), allow_missing=True)
    assert "p362" in capsys.readouterr().err
    held_out = (out / f"{layout}_{split}_{subsets[1]}.txt").read_text()
    assert "p362" not in held_out and "p361" in held_out
    other_layout = "vctk092" if layout == "vctk080" else "vctk080"
    with pytest.raises(ValueError, match="layout"):
        write_vctk_filelists(str(root), other_layout, split, str(out))
