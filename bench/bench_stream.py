"""Streaming: algorithmic latency, and compute time per block with its real-time factor.

Run from the repo root: `python -m bench.bench_stream` (a few minutes; see --help). Prints
Markdown tables; no asserts.

- Latency: the input is fed one sample at a time; for every output sample, the time of the
  input sample whose arrival made it final minus its own time. The largest value is the
  algorithmic latency (the lookahead of the convolutions and pooling phases, plus soxr's for a
  resampled input); a real stream adds one block and the compute time of a block.
- Per block: the stream processor on speech (../shared/data, or a synthetic signal) cut into
  blocks of 10, 20 and 40 ms, timed block by block after a warm-up; the real-time factor is the
  compute time over the audio time.
"""

import argparse
import datetime
import glob
import os
import platform
import statistics
import time

import numpy as np
import torch

import dataset
from bench.bench_scan import load_average
from inference_wav import PRETRAINED_PATH, SuperResolver
from utils import SAMPLING_RATE

SHARED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "..", "shared", "data")


def speech(seconds: float, sr: int) -> np.ndarray:
    """`seconds` of the training clips (repeated), or of noise without them, at sr."""
    files = sorted(glob.glob(os.path.join(SHARED, "train", "*.wav")))
    if files:
        x = np.concatenate([dataset.to_48k_mono(f) for f in files])
    else:
        x = 0.1 * np.random.default_rng(0).standard_normal(SAMPLING_RATE)
    x = np.tile(x, -(-int(seconds * SAMPLING_RATE) // len(x)))
    x = dataset.resample(x[: int(seconds * SAMPLING_RATE)], SAMPLING_RATE, sr)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def latency_ms(resolver: SuperResolver, sr: int, seconds: float) -> float:
    processor = resolver.stream(sr)
    x = speech(seconds, sr)
    worst, emitted = -np.inf, 0
    for i in range(len(x)):
        n = len(processor.process(x[i : i + 1]))
        if n:
            # the first sample of this output block waited longest for input sample i
            worst = max(worst, i / sr - emitted / SAMPLING_RATE)
            emitted += n
    return 1000 * worst


def block_times(resolver, sr, block_ms, seconds, warmup_seconds) -> dict:
    processor = resolver.stream(sr)
    x = speech(seconds + warmup_seconds, sr)
    n = max(1, round(block_ms / 1000 * sr))
    skip = round(warmup_seconds * sr) // n
    times = []
    for start in range(0, len(x) - n + 1, n):
        t0 = time.perf_counter()
        processor.process(x[start : start + n])
        times.append(time.perf_counter() - t0)
    times = times[skip:]
    return {
        "blocks": len(times),
        "median": 1000 * statistics.median(times),
        "p95": 1000 * float(np.percentile(times, 95)),
        "max": 1000 * max(times),
        "rtf": sum(times) / (len(times) * n / sr),
    }


def whole_rtf(resolver, sr, seconds) -> float:
    x = speech(seconds, sr)
    resolver.upsample(x[: round(0.2 * sr)], sr, gain=1.0)  # warm-up
    t0 = time.perf_counter()
    resolver.upsample(x, sr, gain=1.0)
    return (time.perf_counter() - t0) / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=PRETRAINED_PATH)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rates", type=int, nargs="+", default=[8000, 16000, 48000])
    parser.add_argument("--blocks-ms", type=float, nargs="+", default=[10, 20, 40])
    parser.add_argument("--seconds", type=float, default=5.0, help="timed audio per row")
    # enough for soxr's delay at 8 kHz (30 ms) and the model's to pass and repeat
    parser.add_argument("--latency-seconds", type=float, default=0.08)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    resolver = SuperResolver.from_pretrained(args.checkpoint, device="cpu")
    load = load_average()
    print(
        f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores), torch {torch.__version__}, {args.threads} threads, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, load average {load} (1, 5, 15 min)\n"
    )
    print("| input rate | algorithmic latency (ms) |")
    print("|---|---|")
    for sr in args.rates:
        print(f"| {sr} Hz | {latency_ms(resolver, sr, args.latency_seconds):.2f} |")
    print(
        "\n| input rate | block (ms) | blocks timed | median (ms) | p95 (ms) | max (ms) "
        "| real-time factor |"
    )
    print("|---|---|---|---|---|---|---|")
    for sr in args.rates:
        for block_ms in args.blocks_ms:
            r = block_times(resolver, sr, block_ms, args.seconds, 0.5)
            print(
                f"| {sr} Hz | {block_ms:g} | {r['blocks']} | {r['median']:.1f} "
                f"| {r['p95']:.1f} | {r['max']:.1f} | {r['rtf']:.2f} |"
            )
        rtf = whole_rtf(resolver, sr, args.seconds)
        whole = f"upsample(), {resolver.block_seconds:g} s blocks"
        print(f"| {sr} Hz | {whole} | | | | | {rtf:.2f} |")
    load = load_average()
    print(f"\nload average at the end: {load}")


if __name__ == "__main__":
    main()
