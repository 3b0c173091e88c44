"""Selective scan speed on CPU: impl "torch" vs "compiled" at the generator's real sizes.

Run from the repo root: `python -m bench.bench_scan` (a few minutes, mostly the PyTorch loop).
For one second of 48 kHz audio the generator's Mamba blocks see d_inner 64 @ 24,000 steps,
128 @ 12,000, 256 @ 6,000, 512 @ 3,000 and (decoder's last stage) 32 @ 48,000; batch 1,
float32. The error column is the largest norm-wise relative error ||a - b|| / ||b|| over the
output and every gradient against `selective_scan_ref` in float64. "CPU ms" is process CPU
time summed over threads, less disturbed than wall-clock time on a shared machine.
`--baseline REV` adds the compiled kernel of an older commit (its ssm.py and ssm_kernel.cpp,
taken with git) beside today's, in the same run, the two taking turns run by run. Prints a
Markdown table; no asserts.
"""

import argparse
import datetime
import functools
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import ssm

SIZES = [(32, 48_000), (64, 24_000), (128, 12_000), (256, 6_000), (512, 3_000)]
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def make_inputs(d_inner, length, seed=0):
    """Float64 inputs shaped like a freshly initialised Mamba block's, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.empty(d_inner).uniform_(-6.9, -2.3, generator=g))
    return [
        torch.randn(1, d_inner, length, generator=g, dtype=torch.float64),
        torch.randn(1, d_inner, length, generator=g, dtype=torch.float64) * 0.5,
        -torch.arange(1, 17, dtype=torch.float64).repeat(d_inner, 1),
        torch.randn(1, 16, length, generator=g, dtype=torch.float64),
        torch.randn(1, 16, length, generator=g, dtype=torch.float64),
        torch.ones(d_inner, dtype=torch.float64),
        torch.randn(1, d_inner, length, generator=g, dtype=torch.float64),
        (dt + torch.log(-torch.expm1(-dt))).double(),
    ]


def load_baseline(rev):
    """ssm.py of git revision rev, as a module of its own (its kernel built in a temp folder)."""
    folder = tempfile.mkdtemp(prefix="ssm_baseline_")
    for name in ("ssm.py", "ssm_kernel.cpp"):
        shown = subprocess.run(
            ["git", "show", f"{rev}:{name}"], capture_output=True, text=True
        )
        if shown.returncode == 0:
            with open(os.path.join(folder, name), "w") as f:
                f.write(shown.stdout)
        elif name == "ssm.py":
            sys.exit(f"git show {rev}:ssm.py failed: {shown.stderr.strip()}")
    spec = importlib.util.spec_from_file_location(
        "ssm_baseline", os.path.join(folder, "ssm.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(inputs, impl, backward, module=ssm):
    """Output and (if backward) the gradients of every input for a fixed output gradient."""
    xs = [x.detach().requires_grad_(backward) for x in inputs]
    y = module.selective_scan(*xs[:7], delta_bias=xs[7], delta_softplus=True, impl=impl)
    if not backward:
        return [y]
    gy = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype).expand_as(y)
    return [y, *torch.autograd.grad(y, xs, gy)]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages as the tables print them: "1.2, 0.8, 0.5"."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def best_ms(fns, repeats):
    """Best wall-clock and best CPU (all threads) time, in ms, of `repeats` runs of each
    function after a warm-up: [(wall, cpu)] in the order of fns. The functions take turns, run
    by run, so that a shared machine's slow minutes fall on all of them alike."""
    for fn in fns:
        fn()  # warm-up (and, the first time, the kernel build)
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    # the best run: the machine is shared, the minimum is the least disturbed
    return [(min(w) * 1e3, min(c) * 1e3) for w, c in zip(wall, cpu)]


def max_rel_err(results, reference):
    return max(
        ((a.double() - b).norm() / b.norm()).item() for a, b in zip(results, reference)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per compiled cell"
    )
    parser.add_argument(
        "--no_error", action="store_true", help="skip the float64 reference"
    )
    parser.add_argument(
        "--baseline", metavar="REV", help="also time the compiled kernel of this commit"
    )
    parser.add_argument("--threads", type=int, default=0, help="0: torch default")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    baseline = load_baseline(a.baseline) if a.baseline else None
    print(
        f"device: cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    )
    load = load_average()
    print(
        f"date: {datetime.datetime.now():%Y-%m-%d %H:%M}, threads: {torch.get_num_threads()},"
        f" load average: {load} (a shared machine: each time is the best of its runs)"
    )
    print()
    vs = "torch" if baseline is None else f"torch / vs @{a.baseline}"
    print(
        "| impl | d_inner | L | ms fwd | ms fwd+bwd | CPU ms fwd+bwd |"
        f" speed-up fwd ({vs}) | speed-up fwd+bwd ({vs}) | max rel err vs ref |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (d_inner, length) in enumerate(SIZES):
        inputs64 = make_inputs(d_inner, length)
        inputs = [x.float() for x in inputs64]
        reference = None if a.no_error else run(inputs64, "ref", backward=True)
        # (label, impl, module) per row
        rows = [("torch", "torch", ssm)]
        if baseline is not None:
            rows.append((f"compiled @{a.baseline}", "compiled", baseline))
        rows.append(("compiled", "compiled", ssm))
        if i == len(SIZES) - 1:
            rows.append(("ref", "ref", ssm))
        # the compiled rows (today's and the baseline's) take turns, a.repeats runs each; the
        # slow ones run once, alone
        compiled = [row for row in rows if row[1] == "compiled"]
        groups = [compiled] + [[row] for row in rows if row[1] != "compiled"]
        timed = {}
        for group in groups:
            repeats = a.repeats if group is compiled else 1
            for backward in (False, True):
                fns = [
                    functools.partial(run, inputs, impl, backward, module)
                    for _, impl, module in group
                ]
                for (label, _, _), result in zip(group, best_ms(fns, repeats)):
                    timed[label, backward] = result
        times = {}
        for label, impl, module in rows:
            (fwd, _), (both, both_cpu) = timed[label, False], timed[label, True]
            times[label] = (fwd, both)
            err = "-"
            if reference is not None:
                err = f"{max_rel_err(run(inputs, impl, True, module), reference):.1e}"
            speedup = [f"{times['torch'][k] / t:.1f}x" for k, t in enumerate((fwd, both))]
            if baseline is not None and label == "compiled":
                old = times[f"compiled @{a.baseline}"]
                speedup = [
                    f"{text} / {old[k] / t:.1f}x"
                    for k, (text, t) in enumerate(zip(speedup, (fwd, both)))
                ]
            print(
                f"| {label} | {d_inner} | {length:,} | {fwd:.1f} | {both:.1f} | {both_cpu:.1f} |"
                f" {speedup[0]} | {speedup[1]} | {err} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
