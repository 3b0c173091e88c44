"""The discriminators' convolutions on CPU, as a GAN step runs them: PyTorch's vs ours.

Run from the repo root: `python -m bench.bench_conv [--threads 2]` (a few minutes). Two tables,
forward and backward (input and weight gradients) on the real batch shapes (batch 4 x 25,600
samples, float32):
- every grouped layer of the multi-scale discriminator at its three scales, F.conv1d against
  ssm.conv1d_compiled (what models.GroupedConv1d runs on CPU), each pass's GFLOP/s;
- each period's DiscriminatorP, forward + backward through all its layers, with its (k, 1)
  convs as Conv2d modules on [B, C, H, p] against conv1d on the columns as batch items
  [B p, C, H] (models.COLUMNS_AS_BATCH_MAX_PERIOD picks one per period).
The two ways take turns run by run (bench_scan's timing); each time is the best of --repeats.
Prints Markdown tables; no asserts.
"""

import argparse
import datetime
import os

import torch
import torch.nn.functional as F

import models
import ssm
from bench.bench_scan import best_ms

BATCH, SEGMENT = 4, 25600


def msd_grouped_layers():
    # (pooling factor, c_in, c_out, taps, stride, groups, input length) of every grouped layer
    layers = []
    for scale, length in ((1, SEGMENT), (2, SEGMENT // 2 + 1), (4, SEGMENT // 4 + 1)):
        for conv in models.DiscriminatorS().convs:
            c_out, c_in_group, taps = conv.weight.shape
            stride, padding, groups = conv.stride[0], conv.padding[0], conv.groups
            if groups > 1:
                layers.append((scale, c_in_group * groups, c_out, taps, stride, groups, length))
            length = (length + 2 * padding - taps) // stride + 1
    return layers


def grouped_table(repeats: int) -> None:
    print("| pooling | layer | GFLOP | pass | F.conv1d GFLOP/s | compiled GFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for scale, c_in, c_out, taps, stride, groups, length in msd_grouped_layers():
        padding = (taps - 1) // 2
        x = torch.randn(BATCH, c_in, length, requires_grad=True)
        w = torch.randn(c_out, c_in // groups, taps, requires_grad=True)
        b = torch.randn(c_out, requires_grad=True)
        args = (stride, padding, groups)
        out = F.conv1d(x, w, b, stride, padding, 1, groups)
        gout = torch.randn_like(out)
        gflop = 2 * out.numel() * c_in // groups * taps / 1e9

        def torch_conv():
            return F.conv1d(x, w, b, stride, padding, 1, groups)

        def compiled_conv():
            return ssm.conv1d_compiled(x, w, b, *args)

        with torch.no_grad():
            forward = best_ms([torch_conv, compiled_conv], repeats)
        both = best_ms(
            [
                lambda: torch.autograd.grad(torch_conv(), [x, w, b], gout),
                lambda: torch.autograd.grad(compiled_conv(), [x, w, b], gout),
            ],
            repeats,
        )
        backward = [(a[0] - f[0]) for a, f in zip(both, forward)]
        name = f"{c_in}->{c_out}, stride {stride}, groups {groups}"
        for what, (t_torch, t_ours), work in (
            ("forward", [f[0] for f in forward], gflop),
            ("backward", backward, 2 * gflop),
        ):
            print(
                f"| {scale} | {name} | {gflop:.1f} | {what} | {work / t_torch * 1e3:.0f} "
                f"| {work / t_ours * 1e3:.0f} | {t_torch / t_ours:.2f}x |"
            )
        totals = [totals[0] + both[0][0], totals[1] + both[1][0]]
    print(
        f"| all | forward + backward, ms | | | {totals[0]:.0f} | {totals[1]:.0f} "
        f"| {totals[0] / totals[1]:.2f}x |"
    )


def period_table(repeats: int) -> None:
    print("\n| period | Conv2d on [B, C, H, p], ms | conv1d on [B p, C, H], ms | ratio |")
    print("|---|---|---|---|")
    folded_max = models.COLUMNS_AS_BATCH_MAX_PERIOD
    try:
        for period in (2, 3, 5, 7, 11):
            d = models.DiscriminatorP(period)
            y = (torch.randn(BATCH, 1, SEGMENT) * 0.1).requires_grad_(True)

            def forward_backward(max_period):
                def run():
                    models.COLUMNS_AS_BATCH_MAX_PERIOD = max_period
                    score, fmap = d(y)
                    loss = score.square().mean() + sum(f.square().mean() for f in fmap[:-1])
                    torch.autograd.grad(loss, [y, *d.parameters()])

                return run

            (conv2d, _), (columns, _) = best_ms(
                [forward_backward(0), forward_backward(period)], repeats
            )
            print(f"| {period} | {conv2d:.0f} | {columns:.0f} | {conv2d / columns:.2f}x |")
    finally:
        models.COLUMNS_AS_BATCH_MAX_PERIOD = folded_max


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="0: torch default")
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"date: {datetime.datetime.now():%Y-%m-%d %H:%M}, threads: {torch.get_num_threads()}, "
        f"load average: {load}, batch {BATCH} x {SEGMENT} samples\n"
    )
    grouped_table(a.repeats)
    period_table(a.repeats)


if __name__ == "__main__":
    main()
