"""Tests for evaluate.py: input protocols, baselines, the three modes, determinism and CLI errors."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import dataset
import evaluate
import metrics
import models
import utils
from test_utils import booby_trap

SR = 48000


def speechlike(n, seed):
    """Full-band test signal: a 150 Hz harmonic series to 20 kHz plus noise, syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    harmonics = sum(
        np.sin(2 * np.pi * 150 * k * t + rng.uniform(0, 6)) / k for k in range(1, 134)
    )
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    y = envelope * (0.2 * harmonics + 0.05 * rng.standard_normal(n))
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


def write_clips(folder, names, n=SR // 2):
    os.makedirs(folder, exist_ok=True)
    clips = {}
    for i, name in enumerate(names):
        clips[name] = speechlike(n, seed=i)
        sf.write(os.path.join(folder, name + ".wav"), clips[name], SR, subtype="FLOAT")
    return clips


def table_row(report, first_cell):
    return next(r for r in report.splitlines() if r.startswith(f"| {first_cell} "))


def band_energy(x, low_hz, high_hz):
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    power = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    return power[(freqs >= low_hz) & (freqs < high_hz)].sum()


@pytest.mark.parametrize("protocol", dataset.PROTOCOLS)
@pytest.mark.parametrize("rate_khz", [4, 8, 24])
def test_every_protocol_removes_content_above_the_cutoff(protocol, rate_khz):
    y = speechlike(SR // 2, seed=0)
    x = evaluate.make_input(y, protocol, rate_khz, seed=0, index=0)
    cutoff = rate_khz * 500
    assert x.dtype == np.float32 and x.shape == y.shape
    # Above 1.25x the cut-off (past every transition band) at least 40 dB down: polyphase
    # resampling ("nuwave2") leaks the strong low band at about -44 dB at 4 kHz.
    removed = band_energy(x, 1.25 * cutoff, SR / 2) / band_energy(
        y, 1.25 * cutoff, SR / 2
    )
    assert 10 * np.log10(removed) < -40
    kept = band_energy(x, 0, 0.8 * cutoff) / band_energy(y, 0, 0.8 * cutoff)
    assert abs(10 * np.log10(kept)) < 1


def test_oracle_keeps_input_low_band_and_takes_reference_magnitudes():
    y = speechlike(SR // 2, seed=1)
    x = evaluate.make_input(y, "sinc", 8, seed=0, index=0)
    # With the reference as the "input" the oracle is the reference itself (up to STFT round-off).
    np.testing.assert_allclose(evaluate.oracle(y, y, 4000), y, atol=1e-5)
    out = evaluate.oracle(x, y, 4000)
    assert out.dtype == np.float32 and out.shape == y.shape
    assert metrics.lsd(y, out, cutoff_hz=4000)["lsd_hf"] < 1.5


@pytest.mark.parametrize("protocol", evaluate.PROTOCOLS)
def test_oracle_beats_the_unprocessed_input_on_lsd_hf(protocol):
    y = speechlike(SR // 2, seed=2)
    x = evaluate.make_input(y, protocol, 8, seed=0, index=0)
    base = metrics.lsd(y, x, cutoff_hz=4000)
    best = metrics.lsd(y, evaluate.oracle(x, y, 4000), cutoff_hz=4000)
    assert best["lsd_hf"] < base["lsd_hf"] - 1


def test_baselines_table_lists_every_condition_and_states_the_protocol(
    tmp_path, capsys
):
    write_clips(tmp_path / "refs", ["a", "b"])
    report = evaluate.main(
        ["--references", str(tmp_path / "refs"), "--rates", "8", "16"]
    )
    assert capsys.readouterr().out.strip() == report.strip()
    rows = [line for line in report.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(evaluate.PROTOCOLS) * 2
    assert "| sinc | 8 kHz | 2 |" in report
    assert "centred frames (reflect padding), power clamped below at 1e-8" in report
    assert "soxr VHQ resampling down and up" in report
    assert "LSD-LF" in report and "SI-SDR" not in report.split("\n\n")[-1]


def test_table_is_deterministic_for_a_fixed_seed(tmp_path):
    write_clips(tmp_path / "refs", ["a", "b"])
    args = ["--references", str(tmp_path / "refs"), "--protocols", "random", "sinc"]
    args += ["--rates", "8"]
    first = evaluate.main(args + ["--seed", "3", "--out", str(tmp_path / "o1")])
    second = evaluate.main(args + ["--seed", "3", "--out", str(tmp_path / "o2")])
    other = evaluate.main(args + ["--seed", "4"])
    assert first == second
    assert (tmp_path / "o1" / "evaluate.json").read_text() == (
        tmp_path / "o2" / "evaluate.json"
    ).read_text()
    # Only the random protocol depends on the seed.
    assert table_row(first, "sinc") == table_row(other, "sinc")
    assert table_row(first, "random") != table_row(other, "random")


def test_outputs_folder_mode_scores_files_matched_by_stem(tmp_path):
    refs = write_clips(tmp_path / "refs", ["a", "b", "c"])
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    rng = np.random.default_rng(5)
    noisy = refs["a"] + 0.01 * rng.standard_normal(len(refs["a"])).astype(np.float32)
    sf.write(out_dir / "a_superresolved.wav", noisy, SR, subtype="FLOAT")
    sf.write(out_dir / "b.flac", refs["b"], SR, subtype="PCM_24")  # c has no output
    sf.write(out_dir / "zz.wav", refs["c"], SR, subtype="FLOAT")  # matches no reference
    report = evaluate.main(
        ["--references", str(tmp_path / "refs"), "--outputs", str(out_dir)]
        + ["--protocol", "sinc", "--rate", "8", "--out", str(tmp_path / "res")]
    )
    assert "| sinc | 8 kHz | 2 |" in report
    with open(tmp_path / "res" / "evaluate.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["file"], r["system"]) for r in rows) == [
        (f, s) for f in ("a", "b") for s in ("input", "model", "oracle")
    ]
    model_a = next(r for r in rows if r["file"] == "a" and r["system"] == "model")
    want = metrics.lsd(refs["a"], noisy, cutoff_hz=4000)
    assert float(model_a["lsd"]) == pytest.approx(want["lsd"], rel=1e-6)
    assert float(model_a["lsd_hf"]) == pytest.approx(want["lsd_hf"], rel=1e-6)
    assert float(model_a["snr"]) == pytest.approx(
        metrics.snr(refs["a"], noisy), rel=1e-6
    )
    model_b = next(r for r in rows if r["file"] == "b" and r["system"] == "model")
    assert float(model_b["lsd"]) < 0.01 and float(model_b["si_sdr"]) > 60
    summary = json.loads((tmp_path / "res" / "evaluate.json").read_text())["summary"]
    model = next(s for s in summary if s["system"] == "model")
    lsds = [float(r["lsd"]) for r in rows if r["system"] == "model"]
    assert model["n"] == 2 and model["lsd"] == pytest.approx(np.mean(lsds))


def test_diagnostics_flag_a_quiet_band_and_a_nyquist_tone(tmp_path):
    # An "output" that is the reference with its top octave 20 dB down and a 24 kHz tone added:
    # the level error of that octave and the tone measure say so; the model rows only.
    refs = write_clips(tmp_path / "refs", ["a"], n=48000)
    y = refs["a"]
    freqs = np.fft.rfftfreq(len(y), 1 / SR)
    quiet = np.fft.irfft(np.fft.rfft(y) * np.where(freqs > 12000, 0.1, 1.0), len(y))
    tone = 0.05 * np.abs(y).max() * (-1.0) ** np.arange(len(y))
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    sf.write(out_dir / "a.wav", (quiet + tone).astype(np.float32), SR, subtype="FLOAT")
    report = evaluate.main(
        ["--references", str(tmp_path / "refs"), "--outputs", str(out_dir)]
        + ["--protocol", "sinc", "--rate", "12", "--out", str(tmp_path / "res")]
    )
    assert "level error per octave (dB)" in report
    rows = json.loads((tmp_path / "res" / "evaluate.json").read_text())["per_file"]
    model = next(r for r in rows if r["system"] == "model")
    want = metrics.band_level_errors(y, (quiet + tone).astype(np.float32), 6000)
    assert [model["level_oct1_db"], model["level_oct2_db"]] == pytest.approx(want)
    assert model["level_oct2_db"] < -15 and model["level_oct3_db"] is None
    assert model["tone_nyquist_db"] > 20
    assert all(r["tone_3k_db"] is None for r in rows if r["system"] != "model")


def test_outputs_mode_without_protocol_scores_full_band_only(tmp_path):
    write_clips(tmp_path / "refs", ["a"])
    write_clips(tmp_path / "outs", ["a"])
    report = evaluate.main(
        ["--references", str(tmp_path / "refs"), "--outputs", str(tmp_path / "outs")]
    )
    cells = [c.strip() for c in table_row(report, "-").strip("|").split("|")]
    assert cells[:4] == ["-", "-", "1", "0.000"] and cells[4] == "-"
    assert "protocol and rate unknown" in report


def tiny_checkpoint(tmp_path):
    cfg = utils.load_config("cfgs.json", ["model.channels=[4,8,8,8]"])
    torch.manual_seed(0)
    generator = models.WaveUMamba(**dataclasses.asdict(cfg.model))
    path = str(tmp_path / "g_00000007")
    utils.save_checkpoint(
        path,
        {
            "generator": generator.state_dict(),
            "config": utils.config_to_dict(cfg),
            "step": 7,
        },
    )
    return path


def test_checkpoint_mode_end_to_end_with_a_tiny_generator(tmp_path):
    # 6001 samples: not a multiple of 16, so padding and trimming are exercised.
    refs = write_clips(tmp_path / "refs", ["a"], n=6001)
    ckpt = tiny_checkpoint(tmp_path)
    report = evaluate.main(
        ["--references", str(tmp_path / "refs"), "--checkpoint", ckpt]
        + ["--protocols", "sinc", "--rates", "8", "--seed", "1"]
        + ["--out", str(tmp_path / "res"), "--plots", str(tmp_path / "plots")]
    )
    assert "g_00000007 (step 7)" in report
    assert "| protocol | input rate | n | LSD | LSD-HF | LSD-LF |" in report
    results = json.loads((tmp_path / "res" / "evaluate.json").read_text())
    model = [r for r in results["per_file"] if r["system"] == "model"]
    assert len(model) == 1 and results["settings"]["step"] == 7
    # The scored output is exactly what the loaded generator makes of the protocol's input.
    generator, cfg, step = models.load_generator(ckpt)
    x = evaluate.make_input(refs["a"], "sinc", 8, seed=1, index=0)
    y_hat = evaluate.run_generator(generator, x, cfg.audio.peak)
    assert y_hat.shape == x.shape and np.all(np.isfinite(y_hat))
    assert model[0]["lsd"] == pytest.approx(
        metrics.lsd(refs["a"], y_hat, cutoff_hz=4000)["lsd"], rel=1e-5
    )
    assert (tmp_path / "plots" / "a_sinc_8k.png").stat().st_size > 0
    assert (tmp_path / "plots" / "lsd_8k.png").stat().st_size > 0


def test_keep_lowband_scores_the_output_with_the_input_band_kept(tmp_path):
    refs = write_clips(tmp_path / "refs", ["a"], n=24000)
    ckpt = tiny_checkpoint(tmp_path)
    common = ["--references", str(tmp_path / "refs"), "--checkpoint", ckpt]
    common += ["--protocols", "sinc", "--rates", "8", "--seed", "1"]
    evaluate.main(common + ["--out", str(tmp_path / "raw")])
    report = evaluate.main(common + ["--keep_lowband", "--out", str(tmp_path / "kept")])
    assert "--keep_lowband" in report

    def model_row(folder):
        results = json.loads((tmp_path / folder / "evaluate.json").read_text())
        return results, [r for r in results["per_file"] if r["system"] == "model"][0]

    raw_results, raw = model_row("raw")
    kept_results, kept = model_row("kept")
    assert raw_results["settings"]["model_output"] == "raw"
    assert kept_results["settings"]["model_output"] == "keep_lowband"
    # The scored output is the stream processor's with the low band of the input kept: the
    # untrained model's low band is wrong, the input's is the reference's, so LSD-LF falls.
    generator, cfg, _ = models.load_generator(ckpt)
    x = evaluate.make_input(refs["a"], "sinc", 8, seed=1, index=0)
    y_kept = evaluate.run_generator(generator, x, cfg.audio.peak, lowband_hz=4000)
    assert kept["lsd"] == pytest.approx(
        metrics.lsd(refs["a"], y_kept, cutoff_hz=4000)["lsd"], rel=1e-5
    )
    assert kept["lsd_lf"] < raw["lsd_lf"]


def test_keep_lowband_needs_a_checkpoint(tmp_path, capsys):
    write_clips(tmp_path / "refs", ["a"], n=6001)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--references", str(tmp_path / "refs"), "--keep_lowband"])
    assert e.value.code == 1
    assert "--keep_lowband needs --checkpoint" in capsys.readouterr().err


def test_run_generator_pads_to_the_hop_and_restores_the_level(tmp_path):
    generator, cfg, _ = models.load_generator(tiny_checkpoint(tmp_path))
    x = speechlike(1000, seed=3) * 0.1  # 1000: not a multiple of the hop
    gain = 0.9 / np.abs(x).max()
    with torch.no_grad():
        padded = torch.from_numpy(np.pad(x * gain, (0, 8)))[None, None]
        expected = generator(padded)[0, 0, :1000].numpy() / gain
    y_hat = evaluate.run_generator(generator, x, 0.9)
    assert y_hat.dtype == np.float32
    np.testing.assert_allclose(y_hat, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
def refs_dir(tmp_path):
    write_clips(tmp_path / "refs", ["a"], n=4000)
    return str(tmp_path / "refs")


def bad_checkpoints(tmp_path):
    garbage = tmp_path / "g_garbage"
    garbage.write_bytes(b"not a checkpoint")
    no_gen = tmp_path / "g_nogen"
    torch.save({"step": 1}, no_gen)
    return str(garbage), str(no_gen)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--references", "{tmp}/nowhere"], "not found"),
        (["--references", "{tmp}/empty"], "no audio files"),
        (["--references", "{tmp}/list.txt"], "not found"),
        (["--references", "{refs}", "--checkpoint", "{tmp}/g_00000001"], "not found"),
        (["--references", "{refs}", "--checkpoint", "{tmp}/g_garbage"], "cannot read"),
        (
            ["--references", "{refs}", "--checkpoint", "{tmp}/g_nogen"],
            "holds no generator",
        ),
        (["--references", "{refs}", "--protocols", "cubic"], "unknown protocol"),
        (["--references", "{refs}", "--rates", "7"], "unknown rate"),
        (["--references", "{refs}", "--rates", "8k"], "unknown rate"),
        (["--references", "{refs}", "--variant", "ssr_eval"], "variant"),
        (["--references", "{refs}", "--outputs", "{refs}", "--rate", "8"], "both"),
        (["--references", "{refs}", "--outputs", "{tmp}/empty"], "no audio files"),
        (["--rates", "8"], "--references"),
    ],
)
def test_cli_errors_exit_1_with_one_line(tmp_path, refs_dir, capsys, args, match):
    (tmp_path / "empty").mkdir()
    bad_checkpoints(tmp_path)
    args = [a.format(tmp=tmp_path, refs=refs_dir) for a in args]
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and err.count("\n") == 1
    assert match in err


def test_checkpoint_that_does_not_fit_the_config_exits_1(tmp_path, refs_dir, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate.main(
            ["--references", refs_dir, "--checkpoint", ckpt, "--cfgs_path", "cfgs.json"]
        )
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "does not fit the model of its config" in err and err.count("\n") == 1


def test_cli_process_prints_no_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "evaluate.py", "--references", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert run.stdout == ""


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path, refs_dir, capsys):
    marker = tmp_path / "payload_ran"
    good = utils.load_checkpoint(tiny_checkpoint(tmp_path))
    trap = booby_trap(tmp_path / "g_trap", good, marker)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--references", refs_dir, "--checkpoint", trap])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "refusing to load" in err
    assert not marker.exists()


def test_outputs_of_the_wrong_length_fail_beyond_the_tolerance(tmp_path, capsys):
    refs = write_clips(tmp_path / "refs", ["a", "b", "c"])
    outs = tmp_path / "outs"
    outs.mkdir()
    n = len(refs["a"])
    short_b = refs["b"][: n - 100]  # within the tolerance: zero-padded
    long_c = np.r_[refs["c"], np.full(100, 0.1, np.float32)]  # within it: trimmed
    sf.write(outs / "a.wav", refs["a"][: n // 2], SR, subtype="FLOAT")  # truncated
    sf.write(outs / "b.wav", short_b, SR, subtype="FLOAT")
    sf.write(outs / "c.wav", long_c, SR, subtype="FLOAT")
    args = ["--references", str(tmp_path / "refs"), "--outputs", str(outs)]
    args += ["--protocol", "sinc", "--rate", "8", "--out", str(tmp_path / "res")]
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert "| protocol | input rate | n | failed |" in out
    assert "| sinc | 8 kHz | 2 | 1 |" in out
    hits = [line for line in err.splitlines() if "a.wav" in line]
    assert len(hits) == 1 and hits[0].startswith("evaluate.py: error: ")
    assert f"{n // 2} samples" in hits[0] and f"{n}" in hits[0]
    with open(tmp_path / "res" / "evaluate.csv") as f:
        rows = list(csv.DictReader(f))
    failed = [r for r in rows if r["error"]]
    assert [(r["file"], r["system"], r["lsd"]) for r in failed] == [("a", "model", "")]
    assert not any(r["file"] == "a" and not r["error"] for r in rows)
    model = {r["file"]: r for r in rows if r["system"] == "model"}
    padded = np.r_[short_b, np.zeros(100, np.float32)]
    want_b = metrics.lsd(refs["b"], padded, cutoff_hz=4000)["lsd"]
    assert float(model["b"]["lsd"]) == pytest.approx(want_b, rel=1e-6)
    assert float(model["c"]["si_sdr"]) > 60  # the extra tail was cut, not scored


def test_output_paths_are_checked_before_any_work(
    tmp_path, refs_dir, capsys, monkeypatch
):
    (tmp_path / "file").write_text("")
    scored = []
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: scored.append(a) or [])
    for flag in ("--out", "--plots"):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--references", refs_dir, flag, str(tmp_path / "file")])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1
        assert err.startswith(f"evaluate.py: error: {flag} ") and "file" in err
    assert scored == []
