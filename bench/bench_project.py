"""Mamba's projections on CPU: torch.bmm (training's path) vs ssm.project_compiled (inference's).

Run from the repo root: `python -m bench.bench_project [--threads 2]` (under a minute). The
shapes are every distinct projection of the paper's generator (in_proj, x_proj, dt_proj,
out_proj of each stage's Mamba blocks) on one piece of models.MambaStack.CHUNK_STEPS steps,
batch 1, float32, the layout the mixer uses ([C_out, C_in] @ [1, C_in, L]). The two take turns
run by run (bench_scan's timing), so a shared machine's slow minutes fall on both; each time is
the best of its runs. Prints a Markdown table; no asserts.
"""

import argparse
import datetime

import torch

import ssm
from bench.bench_scan import best_ms, load_average
from models import MambaStack, WaveUMamba


def projection_shapes():
    # (name, C_out, C_in) of every distinct projection in the generator, in model order
    shapes = {}
    for module in WaveUMamba().modules():
        if isinstance(module, ssm.Mamba):
            for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
                c_out, c_in = getattr(module, name).weight.shape
                shapes.setdefault((c_out, c_in), name)
    return [(name, c_out, c_in) for (c_out, c_in), name in shapes.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="0: torch default")
    parser.add_argument("--repeats", type=int, default=30)
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    length = MambaStack.CHUNK_STEPS
    load = load_average()
    print(
        f"date: {datetime.datetime.now():%Y-%m-%d %H:%M}, threads: {torch.get_num_threads()}, "
        f"load average: {load}, steps: {length}\n"
    )
    print("| projection | C_out x C_in | bmm ms | bmm GFLOP/s | compiled ms | compiled GFLOP/s "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|")
    total_bmm = total_compiled = 0.0
    for name, c_out, c_in in projection_shapes():
        weight, x = torch.randn(c_out, c_in), torch.randn(1, c_in, length)
        with torch.inference_mode():
            (bmm, _), (compiled, _) = best_ms(
                [lambda: ssm._project(weight, x), lambda: ssm.project_compiled(weight, x)],
                a.repeats,
            )
        total_bmm, total_compiled = total_bmm + bmm, total_compiled + compiled
        gflop = 2 * c_out * c_in * length / 1e9
        print(
            f"| {name} | {c_out} x {c_in} | {bmm:.3f} | {gflop / bmm * 1e3:.0f} "
            f"| {compiled:.3f} | {gflop / compiled * 1e3:.0f} | {bmm / compiled:.2f}x |"
        )
    print(
        f"| all, once each | | {total_bmm:.2f} | | {total_compiled:.2f} | "
        f"| {total_bmm / total_compiled:.2f}x |"
    )


if __name__ == "__main__":
    main()
