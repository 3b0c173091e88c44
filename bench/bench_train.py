"""Where a GAN training step's time goes on CPU: train.py's train_step, piece by piece.

Run from the repo root: `python -m bench.bench_train` (a few minutes). Builds the run with
train.build (cfgs.json, batch 4 x 25,600 samples by default) and times, on one fixed batch:
the whole train_step, then each piece it is made of, run alone on the same tensors: the
generator's forward and backward, each loss, each discriminator's one forward (real and fake
audio) and its backward passes (into the generator's output, then into its own weights),
gradient clipping with each optimiser step. Each time is the median of --runs after a
warm-up: --warmup whole steps first (a process's first steps fault its heap's pages in), then
one call of each piece. The conv FLOPs of each discriminator (counted from its layers'
shapes; a backward is counted as twice its forward, the one into the output as the fake half's
forward) and the measured float32 matrix-product rate say how close the discriminators run to
what the CPU can do. `--baseline REV` first times train_step whole, each run in a fresh
process, for the code of an older commit (a temporary `git worktree`) and this checkout's,
alternated `--rounds` times, and prints the ratio of the medians. Prints Markdown tables; no
asserts.
"""

import argparse
import datetime
import itertools
import os
import statistics
import time

import torch
from torch import nn

import models
import train
from bench.bench_model import code_sources, cpu_name, matmul_gflops, run_worker
from bench.bench_scan import load_average
from losses import discriminator_adv_loss, generator_adv_loss
from utils import load_config


def median_s(fn, runs: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall-clock and process CPU (all threads) seconds of runs after warmup calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def conv_gflop(module: nn.Module, *inputs) -> float:
    """Forward FLOPs of every Conv1d / Conv2d in module for these inputs, in GFLOP, as direct
    convolutions (Winograd's layers compute the same outputs with fewer)."""
    total = [0]

    def count(conv, args, out):
        per_output = conv.in_channels // conv.groups * conv.weight[0, 0].numel()
        total[0] += 2 * out.numel() * per_output

    convs = [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    hooks = [m.register_forward_hook(count) for m in convs]
    # the hooks see a conv only when it is called as a module, which the multi-period
    # discriminator skips (the same convolutions, folded or as Winograd's products)
    folded_max, models.COLUMNS_AS_BATCH_MAX_PERIOD = models.COLUMNS_AS_BATCH_MAX_PERIOD, 0
    period_conv, models._period_conv = models._period_conv, lambda conv, x: conv(x)
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        models.COLUMNS_AS_BATCH_MAX_PERIOD = folded_max
        models._period_conv = period_conv
        for h in hooks:
            h.remove()
    return total[0] / 1e9


def pieces(run, x, y, runs: int):
    """Yields (piece, (wall s, CPU s), GFLOP or None) for each part of train_step, run alone."""
    loss_cfg = run.cfg.loss
    g = run.generator
    fwd = median_s(lambda: g(x), runs)
    yield "generator forward", fwd, None

    def g_fwd_bwd():
        g.zero_grad(set_to_none=True)
        g(x).sum().backward()

    both = median_s(g_fwd_bwd, runs)
    yield "generator backward", tuple(b - f for b, f in zip(both, fwd)), None
    with torch.no_grad():
        y_hat = g(x)
    leaf = y_hat.clone().requires_grad_(True)
    for name, loss, weight in (
        ("mel loss", run.mel_loss, loss_cfg.lambda_mel),
        ("MR-STFT loss", run.mrstft_loss, loss_cfg.lambda_mrstft),
    ):
        t = median_s(lambda: (weight * loss(leaf, y)).backward(), runs)
        yield f"{name} forward + backward", t, None
    for name, d in (("MPD", run.mpd), ("MSD", run.msd)):
        gflop = conv_gflop(d, y, y_hat)  # real and fake: each call scores both
        forward = median_s(lambda: d(y, leaf), runs)
        yield f"{name} forward (real and fake)", forward, gflop

        def forward_and_backward():
            # as in train_step: the gradient into the output (the fake half's activation
            # gradients), then the discriminator's (activation and weight gradients)
            real, fake, _, _ = d(y, leaf)
            generator_adv_loss(fake).backward(inputs=[leaf], retain_graph=True)
            discriminator_adv_loss(real, fake).backward(inputs=list(d.parameters()))

        both = median_s(forward_and_backward, runs)
        backward = tuple(b - f for b, f in zip(both, forward))
        yield f"{name} backward (into the output, then weights)", backward, 2.5 * gflop
    train_cfg = run.cfg.train
    for name, params, optim, clip in (
        ("generator", [g.parameters()], run.optim_g, train_cfg.grad_clip_g),
        (
            "discriminators",
            [run.mpd.parameters(), run.msd.parameters()],
            run.optim_d,
            train_cfg.grad_clip_d,
        ),
    ):
        params = list(itertools.chain(*params))
        for p in params:
            p.grad = torch.randn_like(p) * 1e-6

        def clip_and_step():
            nn.utils.clip_grad_norm_(params, clip)
            optim.step()

        yield f"{name} clipping + AdamW step", median_s(clip_and_step, runs), None


def print_baseline_steps(a) -> None:
    """train_step timed whole in a fresh process for the baseline commit's code and this
    checkout's, alternated a.rounds times (bench_model's train worker), and the ratio."""
    worker_args = argparse.Namespace(seconds=0, runs=a.runs, warmup=a.warmup, omp_passive=False)
    extra = ["--batch", str(a.batch), "--segment", str(a.segment)]
    extra += ["--num-threads", str(a.threads), "--data-root", os.path.abspath(a.data_root)]
    print(
        f"## train_step, {a.baseline} against this checkout ({cpu_name()}, "
        f"{a.threads or torch.get_num_threads()} threads, batch {a.batch} x {a.segment}, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}; each process: {a.warmup} warm-up steps, then "
        f"{a.runs} timed)\n"
    )
    print("| round | code | step s (median) | runs (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    medians = {}
    with code_sources(a.baseline) as sources:
        for i in range(a.rounds):
            for label, root in sources:
                r = run_worker("train", a.impl, worker_args, extra, root)
                if "error" in r:
                    print(f"| {i + 1} | {label} | failed: {r['error']} | | |", flush=True)
                    continue
                medians.setdefault(label, []).append(r["step_s"])
                runs = ", ".join(f"{t:.1f}" for t in r["times"])
                print(
                    f"| {i + 1} | {label} | {r['step_s']:.2f} | {runs} |"
                    f" {r['peak_rss_mb']:.0f} |",
                    flush=True,
                )
    if len(medians) == 2:
        before, after = (statistics.median(v) for v in medians.values())
        print(
            f"\nMedian over rounds: {before:.2f} s -> {after:.2f} s, "
            f"**{before / after:.2f}x** faster.\n"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--segment", type=int, default=25600)
    parser.add_argument("--runs", type=int, default=3)
    # a process's first steps page-fault its heap in: 1.5 million minor faults and 10 s of
    # system time in step 0, 274,000 in step 1, 51,000 in step 2, none from step 3 on (measured)
    parser.add_argument("--warmup", type=int, default=4, help="train_steps before timing")
    parser.add_argument("--impl", default="compiled", help="scan impl")
    parser.add_argument("--threads", type=int, default=0, help="0: torch default")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="first time train_step whole for this git commit and this checkout, alternated",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations with --baseline")
    parser.add_argument("--no-pieces", action="store_true", help="skip the breakdown")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.baseline:
        a.data_root = load_config("cfgs.json").data.root
        print_baseline_steps(a)
    if a.no_pieces:
        return
    torch.manual_seed(0)
    y = torch.randn(a.batch, 1, a.segment) * 0.1
    x = y.clone()
    cfg = load_config("cfgs.json", [f"train.batch_size={a.batch}"])
    run = train.build(cfg, scan_impl=a.impl)
    step, step_cpu = median_s(lambda: train.train_step(run, (x, y)), a.runs, a.warmup)
    rate = matmul_gflops()
    load = load_average()
    print(
        f"## GAN training step on CPU ({cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
        f"load average {load})\n"
    )
    print(
        f"Batch {a.batch} x {a.segment} samples, scan impl {a.impl}; float32 matrix "
        f"product (1024^3 torch.mm) {rate:.0f} GFLOP/s.\n"
    )
    print(
        "| piece | wall s | CPU s (all threads) | share (CPU) | conv GFLOP |"
        " GFLOP per wall s |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| train_step (measured whole) | {step:.2f} | {step_cpu:.2f} | 100 % | | |")
    total = [0.0, 0.0]
    for name, (t, t_cpu), gflop in pieces(run, x, y, a.runs):
        flops = f"{gflop:.0f} | {gflop / t:.0f}" if gflop else " | "
        print(
            f"| {name} | {t:.2f} | {t_cpu:.2f} | {100 * t_cpu / step_cpu:.0f} % | {flops} |",
            flush=True,
        )
        total = [total[0] + t, total[1] + t_cpu]
    print(
        f"| sum of the pieces | {total[0]:.2f} | {total[1]:.2f} |"
        f" {100 * total[1] / step_cpu:.0f} % | | |"
    )


if __name__ == "__main__":
    main()
