"""The discriminators' convolutions on CPU, as a GAN step runs them: PyTorch's vs ours.

Run from the repo root: `python -m bench.bench_conv [--threads 2]` (a few minutes). Three tables,
forward and backward (input and weight gradients) on the real batch shapes (batch 4 x 25,600
samples, float32):
- every grouped layer of the multi-scale discriminator at its three scales, F.conv1d against
  ssm.conv1d_compiled (what models.GroupedConv1d runs on CPU), each pass's GFLOP/s;
- each period's DiscriminatorP, forward + backward through all its layers, with its (k, 1)
  convs as Conv2d modules on [B, C, H, p] against conv1d on the columns as batch items
  [B p, C, H] (models.COLUMNS_AS_BATCH_MAX_PERIOD picks one per period).
- the stride-1 5-tap layers (each period's last 1024 -> 1024, in its layout, and the
  multi-scale discriminator's 1024 -> 1024 at its three scales), F.conv1d / F.conv2d against
  models.winograd_conv, GFLOP/s counted as a direct convolution's.
The two ways take turns run by run (bench_scan's timing); each time is the best of --repeats.
Prints Markdown tables; no asserts.
"""

import argparse
import datetime

import torch
import torch.nn.functional as F

import models
import ssm
from bench.bench_scan import best_ms, load_average

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


def print_passes(row, gflop, theirs, ours, inputs, grad_out, repeats) -> list[float]:
    """Prints a forward and a backward (gradients of inputs) row, each starting with row, of
    two functions computing one convolution of gflop, timed taking turns: GFLOP/s of each and
    the speed-up. Returns the forward + backward ms of each."""
    with torch.no_grad():
        forward = [t for t, _ in best_ms([theirs, ours], repeats)]
    both = [
        t
        for t, _ in best_ms(
            [
                lambda: torch.autograd.grad(theirs(), inputs, grad_out),
                lambda: torch.autograd.grad(ours(), inputs, grad_out),
            ],
            repeats,
        )
    ]
    backward = [a - f for a, f in zip(both, forward)]
    for what, (t_theirs, t_ours), work in (
        ("forward", forward, gflop),
        ("backward", backward, 2 * gflop),
    ):
        print(
            f"{row} | {what} | {work / t_theirs * 1e3:.0f} | {work / t_ours * 1e3:.0f} "
            f"| {t_theirs / t_ours:.2f}x |"
        )
    return both


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

        both = print_passes(
            f"| {scale} | {c_in}->{c_out}, stride {stride}, groups {groups} | {gflop:.1f}",
            gflop,
            torch_conv,
            compiled_conv,
            [x, w, b],
            gout,
            repeats,
        )
        totals = [totals[0] + both[0], totals[1] + both[1]]
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


def winograd_layers():
    # (name, input shape) of every stride-1 5-tap layer, in the layout the discriminators run
    layers = []
    for period in (2, 3, 5, 7, 11):
        height = -(-SEGMENT // period)
        for _ in range(4):  # the four (5, 1) convs at stride 3, padding 2
            height = (height - 1) // 3 + 1
        if period <= models.COLUMNS_AS_BATCH_MAX_PERIOD:
            layers.append((f"period {period}, columns as batch", (BATCH * period, 1024, height)))
        else:
            layers.append((f"period {period}, [B, C, H, p]", (BATCH, 1024, height, period)))
    for scale, c_in, c_out, taps, stride, groups, length in msd_grouped_layers():
        if c_in == c_out == 1024:  # the last grouped layer, stride 1: the dense layer's input
            layers.append((f"scale x{scale}", (BATCH, 1024, length)))
    return layers


def winograd_table(repeats: int) -> None:
    print("\n| layer | input | GFLOP | pass | direct GFLOP/s | Winograd GFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name, shape in winograd_layers():
        x = torch.randn(*shape, requires_grad=True)
        w = (torch.randn(1024, 1024, 5, *[1] * (len(shape) - 3)) / 70).requires_grad_(True)
        b = torch.randn(1024, requires_grad=True)
        conv, padding = (F.conv2d, (2, 0)) if len(shape) == 4 else (F.conv1d, 2)
        gout = torch.randn(conv(x, w, b, padding=padding).shape)
        gflop = 2 * gout.numel() * 1024 * 5 / 1e9

        def direct():
            return conv(x, w, b, padding=padding)

        def winograd():
            return models.winograd_conv(x, w, b)

        both = print_passes(
            f"| {name} | {list(shape)} | {gflop:.1f}", gflop, direct, winograd, [x, w, b], gout,
            repeats,
        )
        totals = [totals[0] + both[0], totals[1] + both[1]]
    print(
        f"| all | forward + backward, ms | | | {totals[0]:.0f} | {totals[1]:.0f} "
        f"| {totals[0] / totals[1]:.2f}x |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="0: torch default")
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    load = load_average()
    print(
        f"date: {datetime.datetime.now():%Y-%m-%d %H:%M}, threads: {torch.get_num_threads()}, "
        f"load average: {load}, batch {BATCH} x {SEGMENT} samples\n"
    )
    grouped_table(a.repeats)
    period_table(a.repeats)
    winograd_table(a.repeats)


if __name__ == "__main__":
    main()
