"""Tests of stream.py: every streaming stage, the whole generator and the command line equal
whole-file processing on random splits of a signal into blocks."""

import numpy as np
import pytest
import torch

import stream
from models import ConvUnit, ResBlock
from test_inference import tiny_generator


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # small tensors: a second thread only adds wake-ups on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
