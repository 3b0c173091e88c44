"""Scores super-resolution on 48 kHz references: LSD, LSD-HF, LSD-LF, SNR and SI-SDR (SPEC §7).

For every reference, protocol and input rate, the low-resolution input is made with
dataset.simulate_lowres and scored as it is ("input") next to an "oracle" (the reference's
high-band STFT magnitudes with the input's phase) and, when given, a model checkpoint or a folder
of outputs produced elsewhere. References are read with dataset.to_48k_mono and scored in float32
from memory, never through 16-bit files.

    python evaluate.py --references ../shared/data/valid                      # baselines only
    python evaluate.py --references DIR_OR_LIST --checkpoint runs/x/g_00010000  # a model
    python evaluate.py --references DIR --outputs OUT_DIR --protocol sinc --rate 8
"""

import argparse
import csv
import json
import math
import os
import sys

import numpy as np
import torch

import dataset
import metrics
import models
import stream
import utils

# The default: the protocols that published numbers use (all of dataset.PROTOCOLS but "random").
PROTOCOLS = tuple(p for p in dataset.PROTOCOLS if p != "random")
RATES_KHZ = (4, 8, 12, 16, 24)
ALL_RATES_KHZ = (4, 6, 8, 12, 16, 24)
# The level error of the generated band per octave above the input's Nyquist frequency (up to
# four: 2-4, 4-8, 8-16, 16-24 kHz for a 4 kHz input) and the tone measures, for the model only.
LEVEL_OCTAVES = tuple(f"level_oct{i}_db" for i in range(1, 5))
DIAGNOSTICS = (*LEVEL_OCTAVES, "tone_3k_db", "tone_nyquist_db", "level_nyquist_db")
METRICS = ("lsd", "lsd_hf", "lsd_lf", "snr", "si_sdr", *DIAGNOSTICS)
# Spectrogram figures are drawn for the first files of each protocol x rate only.
PLOTS_PER_CONDITION = 2
# inference_wav.py names its output <name>_superresolved.wav; it still matches <name>.
OUTPUT_SUFFIX = "_superresolved"
# An output within this many samples of its reference's length is zero-padded or
# trimmed to it, as the field's scripts do (frame-based systems round lengths to their
# hop); a larger difference means a truncated or wrong file, of which only the part that
# exists would be scored.
LENGTH_TOLERANCE = 1024
# How dataset.simulate_lowres makes each protocol's input, for the printed header.
PROTOCOL_TEXT = {
    "authors": "causal Chebyshev I (order 8, 0.1 dB) + FFT resampling down and up (SPEC §4)",
    "nuwave2": "zero-phase Chebyshev I (order 8, 0.05 dB) + polyphase resampling",
    "sinc": "soxr VHQ resampling down and up (AP-BWE)",
    "stft": "STFT 2048/512 Hann with bins at or above rate/2 zeroed (ssr_eval)",
    "random": "random filter family, order, ripple, phase and resampler per file (seeded)",
}


def run_generator(
    generator, x: np.ndarray, peak: float, lowband_hz: float | None = None
) -> np.ndarray:
    """Super-resolves one whole utterance exactly as inference_wav.SuperResolver does.

    Both run stream.StreamProcessor (here on the whole utterance at once), so what is scored
    is what users get: the input scaled to the training peak level (cfg.audio.peak), the
    generator on it zero-padded to a multiple of its hop, the output trimmed and scaled back,
    so scores are taken at the reference's own level.

    Args:
        generator: a WaveUMamba in eval mode.
        x: low-resolution input at 48 kHz, float32 [T].
        peak: peak level the model was trained on.
        lowband_hz: keep the input below this frequency (inference_wav's --keep_lowband), or
            None for the model's raw output (what papers score).
    Returns:
        y_hat, float32 [T]. Raises ValueError for a silent input (dataset.peak_gains).
    """
    # Deviation: the authors fed files at their own level; training sees peak-normalised audio,
    # so the model gets that level here and the output is scaled back for scoring.
    gain = dataset.peak_gains(np.abs(x).max(), peak, "the low-resolution input")
    sr = utils.SAMPLING_RATE
    return stream.process_whole(generator, x, sr, sr, gain, lowband_hz)


def _stft(x: np.ndarray) -> torch.Tensor:
    window = torch.hann_window(metrics.N_FFT)
    return torch.stft(
        torch.from_numpy(x),
        metrics.N_FFT,
        metrics.HOP_SIZE,
        window=window,
        return_complex=True,
    )


def oracle(x: np.ndarray, y: np.ndarray, cutoff_hz: float) -> np.ndarray:
    """The input with the reference's true high-band magnitudes and the input's own phase.

    STFT (n_fft 2048, hop 512, Hann, centred) of the input; bins above cutoff_hz take the
    reference's magnitude and keep the input's phase; inverse STFT. It bounds what a model that
    predicts magnitudes perfectly but reuses the input's phase could reach.

    Args:
        x: low-resolution input at 48 kHz, float32 [T].
        y: reference, float32 [T].
        cutoff_hz: Nyquist frequency of the input in Hz (bins above it are replaced).
    Returns:
        float32 [T].
    """
    spec_x, spec_y = _stft(x), _stft(y)
    bin_hz = utils.SAMPLING_RATE / metrics.N_FFT
    high = torch.arange(spec_x.shape[0]) * bin_hz > cutoff_hz
    spec_x[high] = torch.polar(spec_y[high].abs(), spec_x[high].angle())
    window = torch.hann_window(metrics.N_FFT)
    out = torch.istft(
        spec_x, metrics.N_FFT, metrics.HOP_SIZE, window=window, length=len(x)
    )
    return out.numpy().astype(np.float32)


def score(y, y_hat, cutoff_hz: float | None, variant: str, diagnose: bool) -> dict:
    """All METRICS of one utterance: lsd, lsd_hf, lsd_lf (None without a cut-off), snr, si_sdr
    and, when diagnose is set, the spectral DIAGNOSTICS (else None; level errors need a cut-off).
    """
    out = dict.fromkeys(METRICS)
    out.update(metrics.lsd(y, y_hat, cutoff_hz=cutoff_hz, variant=variant))
    out["snr"] = metrics.snr(y, y_hat)
    out["si_sdr"] = metrics.si_sdr(y, y_hat)
    if diagnose:
        out.update(metrics.tone_excess(y, y_hat))
        if cutoff_hz is not None:
            levels = metrics.band_level_errors(y, y_hat, cutoff_hz)
            out.update(zip(LEVEL_OCTAVES, levels))
    return out


def _rows(path, y, signals, protocol, rate_khz, variant) -> list[dict]:
    cutoff = None if rate_khz is None else rate_khz * 500
    common = {"file": _name(path), "protocol": protocol, "rate_khz": rate_khz}
    try:
        return [
            {
                **common,
                "system": system,
                **score(y, y_hat, cutoff, variant, diagnose=system == "model"),
            }
            for system, y_hat in signals.items()
        ]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def make_input(
    y: np.ndarray, protocol: str, rate_khz: int, seed: int, index: int
) -> np.ndarray:
    """The low-resolution input of one reference, as every mode of this script makes it.

    Args:
        y: reference at 48 kHz, float32 [T].
        protocol: a dataset.simulate_lowres protocol.
        rate_khz: input sampling rate in kHz (content above rate_khz / 2 kHz is removed).
        seed, index: the run's seed and the reference's position in the list.
    Returns:
        float32 [T] at 48 kHz.
    """
    # One stream per (protocol, rate, file), so a subset of the grid reproduces the full run.
    rng = np.random.default_rng([seed, dataset.PROTOCOLS.index(protocol), rate_khz, index])
    x = dataset.simulate_lowres(y, rate_khz * 1000, protocol, rng=rng)
    return np.asarray(x, dtype=np.float32)


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def evaluate(
    references: list[str],
    protocols,
    rates_khz,
    variant: str = "field",
    seed: int = 1234,
    generator=None,
    peak: float = 0.9,
    plot=None,
    keep_lowband: bool = False,
):
    """Scores the baselines (and a model) on every reference x protocol x rate.

    Args:
        references: audio files, read with dataset.to_48k_mono.
        protocols: names for dataset.simulate_lowres.
        rates_khz: input sampling rates in kHz.
        variant: LSD variant, "field" or "authors".
        seed: seeds the low-resolution simulation (one stream per protocol, rate and file).
        generator: a WaveUMamba from models.load_generator, or None for baselines only.
        peak: peak level the generator was trained on.
        plot: callable(name, protocol, rate_khz, signals dict) called for each condition, or None.
        keep_lowband: score the model with the input's own band kept below its Nyquist
            frequency (inference_wav's --keep_lowband) instead of its raw output.
    Returns:
        Per-file rows: dicts with file, protocol, rate_khz, system ("model", "input", "oracle")
        and the METRICS.
    """
    rows = []
    for index, path in enumerate(references):
        y = dataset.to_48k_mono(path).astype(np.float32)
        for protocol in protocols:
            for rate in rates_khz:
                x = make_input(y, protocol, rate, seed, index)
                signals = {"input": x, "oracle": oracle(x, y, rate * 500)}
                if generator is not None:
                    lowband_hz = rate * 500 if keep_lowband else None
                    signals["model"] = run_generator(generator, x, peak, lowband_hz)
                rows += _rows(path, y, signals, protocol, rate, variant)
                if plot is not None:
                    plot(_name(path), protocol, rate, {"reference": y} | signals)
    return rows


def match_outputs(references: list[str], outputs: list[str]) -> list[tuple[str, str]]:
    """Pairs references with outputs of the same file-name stem (a trailing "_superresolved",
    inference_wav.py's suffix, is ignored). Raises ValueError when nothing matches."""
    by_stem = {}
    for path in outputs:
        stem = _name(path)
        if stem.endswith(OUTPUT_SUFFIX):
            stem = stem[: -len(OUTPUT_SUFFIX)]
        if stem in by_stem:
            raise ValueError(f"two outputs for {stem!r}: {by_stem[stem]} and {path}")
        by_stem[stem] = path
    pairs = [(r, by_stem[_name(r)]) for r in references if _name(r) in by_stem]
    if not pairs:
        raise ValueError("no output file name matches a reference file name")
    missing = len(references) - len(pairs)
    if missing:
        print(
            f"warning: {missing} references have no output; scored {len(pairs)}",
            file=sys.stderr,
        )
    return pairs


def evaluate_outputs(
    pairs,
    protocol: str | None,
    rate_khz: int | None,
    variant: str = "field",
    seed: int = 1234,
    plot=None,
):
    """Scores outputs made elsewhere against their references (and the baselines, when the
    protocol and rate that made their inputs are known).

    Args:
        pairs: (reference path, output path) from match_outputs.
        protocol, rate_khz: how the inputs were made, or both None (then only full-band
            metrics of the outputs are computed).
        variant, seed, plot: as in evaluate().
    Returns:
        Per-file rows as in evaluate(), system "model" for the outputs.
    """
    rows = []
    for index, (ref_path, out_path) in enumerate(pairs):
        y = dataset.to_48k_mono(ref_path).astype(np.float32)
        y_hat = dataset.to_48k_mono(out_path).astype(np.float32)
        if abs(len(y_hat) - len(y)) > LENGTH_TOLERANCE:
            error = (
                f"{out_path} has {len(y_hat)} samples at 48 kHz, its reference "
                f"{ref_path} {len(y)}: more than {LENGTH_TOLERANCE} apart, not scored"
            )
            rows.append(_failed_row(ref_path, protocol, rate_khz, error))
            continue
        y_hat = np.pad(y_hat[: len(y)], (0, max(len(y) - len(y_hat), 0)))
        signals = {"model": y_hat}
        if protocol is not None:
            x = make_input(y, protocol, rate_khz, seed, index)
            signals |= {"input": x, "oracle": oracle(x, y, rate_khz * 500)}
        rows += _rows(ref_path, y, signals, protocol, rate_khz, variant)
        if plot is not None and protocol is not None:
            plot(_name(ref_path), protocol, rate_khz, {"reference": y} | signals)
    return rows


def _failed_row(ref_path: str, protocol, rate_khz, error: str) -> dict:
    """The one row of a file that could not be scored: no metrics, the reason as "error"."""
    return {
        "file": _name(ref_path),
        "protocol": protocol,
        "rate_khz": rate_khz,
        "system": "model",
        **dict.fromkeys(METRICS),
        "error": error,
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Means over files per (protocol, rate, system), in first-seen order, with the count n of
    scored files and the count of failed ones (which the means leave out)."""
    groups, failed = {}, {}
    for row in rows:
        key = (row["protocol"], row["rate_khz"], row["system"])
        if row.get("error"):
            failed[key] = failed.get(key, 0) + 1
            groups.setdefault(key, [])
        else:
            groups.setdefault(key, []).append(row)
    summary = []
    for (protocol, rate, system), group in groups.items():
        entry = {
            "protocol": protocol,
            "rate_khz": rate,
            "system": system,
            "n": len(group),
            "failed": failed.get((protocol, rate, system), 0),
        }
        for key in METRICS:
            values = [row[key] for row in group]
            scored = values and None not in values
            entry[key] = float(np.mean(values)) if scored else None
        summary.append(entry)
    return summary


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(summary: list[dict]) -> str:
    """The Markdown table: one row per protocol x rate, model columns first, then baselines."""
    cells = {(s["protocol"], s["rate_khz"], s["system"]): s for s in summary}
    conditions = list(dict.fromkeys((s["protocol"], s["rate_khz"]) for s in summary))
    has_model = any(s["system"] == "model" for s in summary)
    has_failed = any(s["failed"] for s in summary)
    header = ["protocol", "input rate", "n"] + ["failed"] * has_failed
    if has_model:
        header += ["LSD", "LSD-HF", "LSD-LF", "SNR (dB)", "SI-SDR (dB)"]
        header += ["level error per octave (dB)", "tone 3k (dB)", "tone 24k (dB)"]
    header += ["input LSD", "input LSD-HF", "oracle LSD", "oracle LSD-HF"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for protocol, rate in conditions:
        model = cells.get((protocol, rate, "model"), {})
        base_in = cells.get((protocol, rate, "input"), {})
        base_or = cells.get((protocol, rate, "oracle"), {})
        n = (model or base_in)["n"]
        row = [protocol or "-", "-" if rate is None else f"{rate} kHz", str(n)]
        row += [str(model.get("failed", 0))] * has_failed
        if has_model:
            row += [_fmt(model.get(k), 3) for k in ("lsd", "lsd_hf", "lsd_lf")]
            row += [_fmt(model.get(k), 2) for k in ("snr", "si_sdr")]
            octaves = [model.get(k) for k in LEVEL_OCTAVES]
            row.append(" / ".join(_fmt(v, 1) for v in octaves if v is not None) or "-")
            row += [_fmt(model.get(k), 1) for k in ("tone_3k_db", "tone_nyquist_db")]
        row += [_fmt(base_in.get(k), 3) for k in ("lsd", "lsd_hf")]
        row += [_fmt(base_or.get(k), 3) for k in ("lsd", "lsd_hf")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def describe(settings: dict) -> str:
    """The printed header: what was scored, how the inputs were made and which LSD variant."""
    lsd_text = {
        "field": "field variant (NU-Wave 2 / AP-BWE): torch.stft n_fft 2048, hop 512, periodic "
        "Hann, centred frames (reflect padding), power clamped below at 1e-8, log10",
        "authors": "authors' variant (Wave-U-Mamba inference.py): n_fft 2048, hop 512, periodic "
        "Hann, uncentred frames, log10(power + 1e-10)",
    }[settings["variant"]]
    lines = [
        "## evaluate.py",
        f"- references: {settings['n_references']} files from {settings['references']}, read "
        "with dataset.to_48k_mono (48 kHz mono float32), scored from memory at their own level",
    ]
    if settings["protocols"]:
        lines.append(
            "- inputs: dataset.simulate_lowres(y, rate, protocol) on each whole reference, "
            f"returned at 48 kHz; rates {', '.join(f'{r} kHz' for r in settings['rates_khz'])}; "
            f"seed {settings['seed']}; protocols:"
        )
        lines += [f"  - {p}: {PROTOCOL_TEXT[p]}" for p in settings["protocols"]]
        lines.append(
            "- baselines: input = that low-resolution input as it is (band-limited, at 48 kHz); "
            "oracle = STFT (2048/512, Hann) of the input with magnitudes above rate/2 replaced "
            "by the reference's, input phase kept, inverse STFT"
        )
    else:
        lines.append(
            "- inputs: made elsewhere, protocol and rate unknown (no LSD-HF/LF, no baselines)"
        )
    if settings["mode"] == "checkpoint":
        step = settings["step"]
        lines.append(
            f"- model: {settings['checkpoint']} (step {step}), whole utterance in one pass, "
            "weight norm removed, input zero-padded to a multiple of the model's hop and "
            f"trimmed back, scaled to peak {settings['peak']} for the model and the output "
            "scaled back; "
            + (
                "the input's own band kept below rate/2 (--keep_lowband)"
                if settings["model_output"] == "keep_lowband"
                else "the model's raw output (what papers score)"
            )
        )
    elif settings["mode"] == "outputs":
        lines.append(
            f"- model: outputs from {settings['outputs']} matched by file-name stem, read with "
            "dataset.to_48k_mono, zero-padded or trimmed to the reference's length (an "
            f"output more than {LENGTH_TOLERANCE} samples off is not scored: failed)"
        )
    lines.append(
        f"- LSD: {lsd_text}; RMS over bins per frame, mean over frames, mean over files. "
        "LSD-HF: bins above rate/2; LSD-LF: bins at or below it. SNR and SI-SDR in dB, mean "
        "over files"
    )
    lines.append(
        "- diagnostics (model only), from long-term spectra (mean STFT power, 2048/512 Hann): "
        "level error = output over reference energy per octave above rate/2, in dB (the last "
        "octave stops below 24 kHz); tone 3k / tone 24k = how far the output's spectrum rises "
        "above the median of its own neighbourhood (+-12 bins) minus the same for the "
        "reference, in dB, the largest over the multiples of 3 kHz / at the 24 kHz bin "
        "(0 = no tone the reference lacks)"
    )
    return "\n".join(lines)


def _finite(value):
    return value if value is None or math.isfinite(value) else None


def write_results(
    out_dir: str, settings: dict, summary: list[dict], rows: list[dict]
) -> None:
    """Writes evaluate.csv (one row per file x condition x system) and evaluate.json (settings,
    summary and per-file rows; non-finite values become null), atomically."""
    os.makedirs(out_dir, exist_ok=True)
    fields = ["file", "protocol", "rate_khz", "system", *METRICS, "error"]
    with utils.atomic_path(os.path.join(out_dir, "evaluate.csv")) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    clean = [{k: _finite(v) if k in METRICS else v for k, v in r.items()} for r in rows]
    tidy = [
        {k: _finite(v) if k in METRICS else v for k, v in s.items()} for s in summary
    ]
    with utils.atomic_path(os.path.join(out_dir, "evaluate.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(
                {"settings": settings, "summary": tidy, "per_file": clean}, f, indent=1
            )


def _save(fig, path: str) -> None:
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    utils.pyplot().close(fig)


def spectrogram_plotter(plot_dir: str, per_condition: int = PLOTS_PER_CONDITION):
    """A plot callback for evaluate(): reference / input / outputs side by side, one shared
    colour scale (dB, 80 dB below the reference's peak), frequency in kHz."""
    plt = utils.pyplot()
    os.makedirs(plot_dir, exist_ok=True)
    counts = {}

    def plot(name, protocol, rate_khz, signals):
        key = (protocol, rate_khz)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > per_condition:
            return
        order = [s for s in ("reference", "input", "model", "oracle") if s in signals]
        specs = {
            s: utils.power_db(signals[s], metrics.N_FFT, metrics.HOP_SIZE) for s in order
        }
        vmax = float(specs["reference"].max())
        fig, axes = plt.subplots(
            1, len(order), figsize=(4.5 * len(order), 3.5), squeeze=False
        )
        for ax, system in zip(axes[0], order):
            utils.plot_spectrogram(
                specs[system],
                ax=ax,
                sampling_rate=utils.SAMPLING_RATE,
                vmin=vmax - 80,
                vmax=vmax,
            )
            ax.set_title(f"{system} ({name}, {protocol}, {rate_khz} kHz)", fontsize=8)
        _save(fig, os.path.join(plot_dir, f"{name}_{protocol}_{rate_khz}k.png"))

    return plot


def plot_bars(plot_dir: str, summary: list[dict]) -> None:
    """One bar chart per input rate: mean LSD of model and baselines for each protocol."""
    plt = utils.pyplot()
    os.makedirs(plot_dir, exist_ok=True)
    systems = [
        s
        for s in ("model", "input", "oracle")
        if any(e["system"] == s for e in summary)
    ]
    for rate in dict.fromkeys(
        e["rate_khz"] for e in summary if e["rate_khz"] is not None
    ):
        entries = [e for e in summary if e["rate_khz"] == rate]
        protocols = list(dict.fromkeys(e["protocol"] for e in entries))
        lsd = {(e["protocol"], e["system"]): e["lsd"] for e in entries}
        fig, ax = plt.subplots(figsize=(1.5 + 1.5 * len(protocols), 3.5))
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            positions = np.arange(len(protocols)) + (i - (len(systems) - 1) / 2) * width
            heights = [lsd.get((p, system), 0.0) for p in protocols]
            ax.bar(positions, heights, width, label=system)
        ax.set_xticks(np.arange(len(protocols)), protocols)
        ax.set_ylabel("LSD")
        ax.set_title(f"{rate} kHz input")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, os.path.join(plot_dir, f"lsd_{rate}k.png"))


def _parse_rates(values) -> list[int]:
    rates = []
    for value in values:
        try:
            rate = int(value)
        except ValueError:
            rate = None
        if rate not in ALL_RATES_KHZ:
            raise ValueError(
                f"unknown rate {value!r} (kHz), expected one of {list(ALL_RATES_KHZ)}"
            )
        rates.append(rate)
    return rates


def _parse_protocols(values) -> list[str]:
    for value in values:
        if value not in dataset.PROTOCOLS:
            raise ValueError(
                f"unknown protocol {value!r}, expected one of {list(dataset.PROTOCOLS)}"
            )
    return list(values)


def _fail(message):
    utils.print_error(message, "evaluate.py")
    sys.exit(1)


def main(argv=None) -> str:
    """Command-line entry point; returns the printed report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.error = _fail
    parser.add_argument(
        "--references", required=True, help="folder or .txt list of 48 kHz references"
    )
    parser.add_argument(
        "--data_root", default=".", help="root that a .txt list's paths are relative to"
    )
    parser.add_argument(
        "--checkpoint", help="a g_XXXXXXXX generator checkpoint to evaluate"
    )
    parser.add_argument(
        "--cfgs_path", help="config to use instead of the checkpoint's own"
    )
    parser.add_argument(
        "--outputs", help="folder of outputs made elsewhere, matched by file name"
    )
    parser.add_argument("--protocol", help="with --outputs: how their inputs were made")
    parser.add_argument("--rate", help="with --outputs: their input rate in kHz")
    parser.add_argument(
        "--protocols", nargs="+", help=f"default: {' '.join(PROTOCOLS)}"
    )
    parser.add_argument(
        "--rates", nargs="+", help=f"kHz, default: {' '.join(map(str, RATES_KHZ))}"
    )
    # Deviation: the default LSD is the field's (SPEC §7), not the authors' inference.py one.
    parser.add_argument(
        "--variant", default="field", help="LSD variant: field or authors"
    )
    parser.add_argument(
        "--keep_lowband",
        action="store_true",
        help="with --checkpoint: score the output with the input's own band kept below its "
        "Nyquist frequency (inference_wav's default) instead of the model's raw output",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", help="folder for evaluate.csv and evaluate.json")
    parser.add_argument("--plots", help="folder for spectrogram and bar-chart figures")
    a = parser.parse_args(argv)
    try:
        report, rows = _run(a)
    except (ValueError, OSError) as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else e)
    print(report)
    errors = [row["error"] for row in rows if row.get("error")]
    if errors:
        for error in errors:
            utils.print_error(error, "evaluate.py")
        _fail(f"{len(errors)} output(s) could not be scored (the failed column)")
    return report


def _prepare_folder(flag: str, path: str, names=()) -> None:
    """Creates an output folder before any scoring, so that a bad path costs nothing."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"{flag} {path}: cannot create this folder ({e.strerror})"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: this folder is not writable")
    for name in names:
        if os.path.isdir(os.path.join(path, name)):
            raise ValueError(f"{flag} {path}: {name} in it is a folder, not a file")
    utils.remove_stale_temporaries(path)  # what a killed earlier run left half-written


def _run(a) -> tuple[str, list[dict]]:
    if a.variant not in metrics.VARIANTS:
        raise ValueError(
            f"unknown LSD variant {a.variant!r}, expected one of {metrics.VARIANTS}"
        )
    if a.checkpoint and a.outputs:
        raise ValueError("give --checkpoint or --outputs, not both")
    if a.outputs and (a.protocols or a.rates):
        raise ValueError(
            "with --outputs, give the one --protocol and --rate that made the inputs"
        )
    if not a.outputs and (a.protocol or a.rate):
        raise ValueError(
            "--protocol and --rate go with --outputs; use --protocols and --rates"
        )
    if (a.protocol is None) != (a.rate is None):
        raise ValueError("give both --protocol and --rate, or neither")
    if a.cfgs_path and not a.checkpoint:
        raise ValueError("--cfgs_path needs --checkpoint")
    if a.keep_lowband and not a.checkpoint:
        raise ValueError("--keep_lowband needs --checkpoint")
    if a.out:
        _prepare_folder("--out", a.out, ("evaluate.csv", "evaluate.json"))
    if a.plots:
        _prepare_folder("--plots", a.plots)
    references = dataset.list_audio_files(a.data_root, a.references)
    utils.seed_everything(a.seed)
    settings = {
        "references": a.references,
        "n_references": len(references),
        "variant": a.variant,
        "seed": a.seed,
        "mode": (
            "checkpoint" if a.checkpoint else "outputs" if a.outputs else "baselines"
        ),
    }
    plot = spectrogram_plotter(a.plots) if a.plots else None
    if a.outputs:
        protocols = _parse_protocols([a.protocol]) if a.protocol else []
        rates = _parse_rates([a.rate]) if a.rate else []
        pairs = match_outputs(references, dataset.list_audio_files(".", a.outputs))
        settings |= {"outputs": a.outputs, "protocols": protocols, "rates_khz": rates}
        rows = evaluate_outputs(
            pairs,
            protocols[0] if protocols else None,
            rates[0] if rates else None,
            a.variant,
            a.seed,
            plot,
        )
    else:
        protocols = _parse_protocols(a.protocols or PROTOCOLS)
        rates = _parse_rates(a.rates or RATES_KHZ)
        settings |= {"protocols": protocols, "rates_khz": rates}
        generator, peak = None, None
        if a.checkpoint:
            generator, cfg, step = models.load_generator(a.checkpoint, a.cfgs_path)
            peak = cfg.audio.peak
            settings |= {
                "checkpoint": a.checkpoint,
                "step": step,
                "peak": peak,
                "model_output": "keep_lowband" if a.keep_lowband else "raw",
            }
        rows = evaluate(
            references,
            protocols,
            rates,
            a.variant,
            a.seed,
            generator,
            peak,
            plot,
            a.keep_lowband,
        )
    summary = summarise(rows)
    report = describe(settings) + "\n\n" + format_table(summary)
    if a.out:
        write_results(a.out, settings, summary, rows)
    if a.plots:
        plot_bars(a.plots, summary)
    return report, rows


if __name__ == "__main__":
    main()
