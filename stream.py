"""Exact streaming super-resolution: audio in blocks of any length, out as soon as it is final.

WaveUMamba is non-causal only through a few samples of right context: the conv units pad k - 1
zeros on the right, the ResBlock and head convs pad both sides, AvgPool1d and the transposed
convs work on pairs of samples, while every Mamba scan runs left to right and every LayerNorm
works per time step. So every layer becomes a stage whose `step(x, final)` takes the next input
samples and returns the output samples that no later input can change; the last call
(final=True) computes the rest with exactly the zero padding whole-file processing uses. Skip
additions emit what both of their streams have. The concatenated output is then the whole-file
output (to float rounding), a few milliseconds late, with memory and time per block that depend
on the block only.

    python stream.py --input_sr 8000 [--gain G] < in.raw > out.raw

reads raw 16-bit little-endian mono PCM at --input_sr on stdin and writes raw 16-bit mono PCM at
48 kHz on stdout as it goes, e.g. arecord -r 8000 -f S16_LE -c 1 | python stream.py --input_sr
8000 | aplay -r 48000 -f S16_LE -c 1.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import HEAD_LRELU_SLOPE, LRELU_SLOPE, ConvUnit, EncoderBlock, UpBlock


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b if a.shape[-1] == 0 else torch.cat([a, b], dim=-1)


class Window:
    """A layer whose output o reads the inputs around o * num / den, run on a sliding buffer.

    The layer `fn` maps inputs [B, C_in, L] (L a multiple of den) to [B, C_out, L * num / den],
    zero-padding its input as whole-file processing does. Called on the buffered inputs from
    global sample `start` on, its outputs are exact except the first `lo` (their padding stands
    in for earlier inputs, unless start is 0) and the last `hi` (it stands in for later inputs,
    unless this is the end). Those are recomputed at the next call, so per call the layer runs
    on the new samples plus lo + hi outputs' worth of context.

    Args:
        fn: the layer (a module or a function of one tensor).
        out_channels: C_out.
        num, den: output samples per input sample, as a ratio (2, 1 upsamples; 1, 2 pools).
        lo, hi: outputs at each end of a buffer that its padding makes inexact.
    """

    def __init__(self, fn, out_channels: int, num=1, den=1, lo=0, hi=0):
        self.fn, self.out_channels = fn, out_channels
        self.num, self.den, self.lo, self.hi = num, den, lo, hi
        self.buffer = None  # inputs from global sample self.start on
        self.start = 0  # a multiple of den
        self.emitted = 0  # outputs returned so far

    def step(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        # x: [B, C_in, n]
        self.buffer = x if self.buffer is None else _cat(self.buffer, x)
        end = self.start + self.buffer.shape[-1]
        if final:
            if end % self.den:
                raise ValueError(f"stream length {end} is not a multiple of {self.den}")
            stop = end * self.num // self.den
        else:
            stop = end // self.den * self.num - self.hi
        if stop <= self.emitted:
            return x.new_zeros(x.shape[0], self.out_channels, 0)
        first = self.start // self.den * self.num  # the global index of fn's output 0
        y = self.fn(self.buffer)[..., self.emitted - first : stop - first]
        self.emitted = stop
        # keep the inputs of whole frames (den samples) that outputs from `emitted` on need
        frame = max(0, (self.emitted - self.lo) // self.num)
        self.buffer = self.buffer[..., frame * self.den - self.start :]
        self.start = frame * self.den
        return y  # [B, C_out, m]


def _conv_margins(conv: nn.Conv1d) -> tuple[int, int]:
    """(lo, hi): outputs at each end that a stride-1 conv's own zero padding makes inexact."""
    if conv.stride != (1,) or not isinstance(conv.padding, tuple):
        raise ValueError(f"expected a stride-1 conv with numeric padding, got {conv}")
    reach = conv.dilation[0] * (conv.kernel_size[0] - 1)
    return conv.padding[0], reach - conv.padding[0]


def _conv_window(conv: nn.Conv1d, fn=None) -> Window:
    """A stride-1 conv, or fn(x) = conv(elementwise(x)), as a Window."""
    lo, hi = _conv_margins(conv)
    return Window(fn or conv, conv.out_channels, lo=lo, hi=hi)


def _unit_window(unit: ConvUnit, fn=None) -> Window:
    # ConvUnit pads kernel_size - 1 zeros on the right only
    return Window(fn or unit, unit.conv.out_channels, hi=unit.kernel_size - 1)


def _resblock_window(resblock) -> Window:
    # The branch convs run one after the other: their margins add up.
    convs = list(resblock.convs1) + list(resblock.convs2)
    lo = sum(_conv_margins(c)[0] for c in convs)
    hi = sum(_conv_margins(c)[1] for c in convs)
    return Window(resblock, resblock.convs2[-1].out_channels, lo=lo, hi=hi)


def _up_window(up: nn.ConvTranspose1d) -> Window:
    # Output o of a transposed conv (stride s, padding p, kernel k) reads inputs
    # ceil((o + p - k + 1) / s) .. floor((o + p) / s), so on a buffer the first k - p - s and
    # the last p outputs are inexact; with k - 2p = s it returns exactly s outputs per input.
    (k,), (s,), (p,) = up.kernel_size, up.stride, up.padding
    if k - 2 * p != s or up.output_padding != (0,) or up.dilation != (1,):
        raise ValueError(f"expected a transposed conv that multiplies by its stride: {up}")
    return Window(up, up.out_channels, num=s, lo=k - p - s, hi=p)


class Merge:
    """Combines two streams sample by sample as soon as both have a sample.

    Args:
        combine: fn(a, b) on [B, C, n] tensors of equal length, elementwise in time.
    """

    def __init__(self, combine):
        self.combine = combine
        self.a = self.b = None

    def step(self, a: torch.Tensor, b: torch.Tensor, final: bool) -> torch.Tensor:
        self.a = a if self.a is None else _cat(self.a, a)
        self.b = b if self.b is None else _cat(self.b, b)
        n = min(self.a.shape[-1], self.b.shape[-1])
        if final and self.a.shape[-1] != self.b.shape[-1]:
            raise ValueError(
                f"streams end at different lengths {self.a.shape[-1]}, {self.b.shape[-1]}"
            )
        y = self.combine(self.a[..., :n], self.b[..., :n])
        self.a, self.b = self.a[..., n:], self.b[..., n:]
        return y


class MambaStackStream:
    """A models.MambaStack run block by block, carrying each Mamba's state."""

    def __init__(self, stack):
        self.blocks = list(stack.blocks)
        self.states = [None] * len(self.blocks)

    def step(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        # x: [B, C, n]
        if x.shape[-1] == 0:
            return x
        h = x.transpose(1, 2)  # [B, n, C]
        for i, block in enumerate(self.blocks):
            # MambaBlock.forward, with the state carried: x + mamba(norm(x))
            y, self.states[i] = block.mamba.forward_stream(block.norm(h), self.states[i])
            h = h + y
        return h.transpose(1, 2)  # [B, C, n]


class Chain:
    """Stages applied one after the other."""

    def __init__(self, stages):
        self.stages = stages

    def step(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        for stage in self.stages:
            x = stage.step(x, final)
        return x


def _encoder_stream(block: EncoderBlock) -> Chain:
    # EncoderBlock.forward: conv_in, x + conv_res(x), pool, Mamba
    stages = [
        _unit_window(block.conv_in),
        _unit_window(block.conv_res, lambda x: x + block.conv_res(x)),
    ]
    if isinstance(block.pool, nn.AvgPool1d):
        (size,) = block.pool.kernel_size
        if block.pool.stride != (size,) or block.pool.padding != (0,):
            raise ValueError(f"expected non-overlapping pooling, got {block.pool}")
        stages.append(Window(block.pool, block.conv_res.conv.out_channels, den=size))
    return Chain(stages + [MambaStackStream(block.mamba)])


def _decoder_stream(block: UpBlock) -> Chain:
    # UpBlock.forward after the skip: up, Mamba, ResBlock
    return Chain(
        [
            _up_window(block.up),
            MambaStackStream(block.mamba),
            _resblock_window(block.resblock),
        ]
    )


class GeneratorStream:
    """A WaveUMamba run on a stream of 48 kHz blocks [B, 1, n]; see the module docstring.

    `push(x)` returns the outputs that x made final ([B, 1, m], m may be 0); `flush()` the rest,
    after which the stream is closed. The concatenation of all returned blocks equals
    generator(x) on the whole stream zero-padded to a multiple of generator.hop, trimmed back.

    Args:
        generator: a WaveUMamba in eval mode (its modules are called, never copied).
    """

    def __init__(self, generator):
        g = self.generator = generator
        self.downs = [_encoder_stream(block) for block in g.downs]
        self.bottleneck = _encoder_stream(g.bottleneck)
        self.skip_adds = [
            Merge(lambda h, skip: F.leaky_relu(h, LRELU_SLOPE) + skip) for _ in g.ups
        ]
        self.ups = [_decoder_stream(block) for block in g.ups]
        self.head = _conv_window(
            g.head, lambda h: g.head(F.leaky_relu(h, HEAD_LRELU_SLOPE))
        )
        self.residual = Merge(lambda x, h: x + torch.tanh(h))
        self.received = 0
        self.closed = False

    @torch.inference_mode()
    def push(self, x: torch.Tensor) -> torch.Tensor:
        if self.closed:
            raise ValueError("the stream was flushed; start a new one")
        self.received += x.shape[-1]
        return self._step(x, final=False)

    @torch.inference_mode()
    def flush(self) -> torch.Tensor:
        if self.closed:
            raise ValueError("the stream was flushed already")
        self.closed = True
        if self.received == 0:
            return torch.zeros(0)
        batch = self.residual.a.shape[0]
        # whole-file processing pads with zeros to a multiple of the hop and trims back
        pad = -self.received % self.generator.hop
        device = next(self.generator.parameters()).device
        y = self._step(torch.zeros(batch, 1, pad, device=device), final=True)
        return y[..., : y.shape[-1] - pad]

    def _step(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        # WaveUMamba.forward, stage by stage; x: [B, 1, n]
        skips = []
        h = x
        for stages, norm in zip(self.downs, self.generator.down_norms):
            h = stages.step(h, final)
            skips.append(h)
            h = F.leaky_relu(norm(h), LRELU_SLOPE)
        h = self.generator.bottleneck_norm(self.bottleneck.step(h, final))
        for skip_add, stages, skip in zip(self.skip_adds, self.ups, skips[::-1]):
            h = stages.step(skip_add.step(h, skip, final), final)
        return self.residual.step(x, self.head.step(h, final), final)  # [B, 1, m]
