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
8000 | aplay -r 48000 -f S16_LE -c 1. It keeps the input's own band below input_sr / 2 and takes
only the band above from the model (--no-keep_lowband: the model's raw output).
"""

import argparse
import os
import sys

import numpy as np
import scipy.signal
import soxr
import torch
import torch.nn as nn
import torch.nn.functional as F

import dataset
import ssm
import utils
from models import HEAD_LRELU_SLOPE, LRELU_SLOPE, ConvUnit, EncoderBlock, UpBlock

# A stream cannot peak-normalise what it has not seen: by default it feeds the model the input
# at its own level (gain 1). Speech recorded near full scale suits the model best (it was
# trained on clips peaking at cfg.audio.peak, 0.9, +-3 dB): raise the gain for quiet sources.
DEFAULT_GAIN = 1.0
# --keep_lowband cross-over: a linear-phase Kaiser low-pass whose transition band spans the
# top CROSSOVER_WIDTH of the input's band; below it the output is the input to within -80 dB.
CROSSOVER_WIDTH = 0.1
CROSSOVER_ATTENUATION_DB = 80.0


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
        # keep the inputs of whole frames (den samples) that outputs from `emitted` on need;
        # a copy, since a view would keep the whole block's buffer alive until the next one
        frame = max(0, (self.emitted - self.lo) // self.num)
        self.buffer = self.buffer[..., frame * self.den - self.start :].clone()
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
        # copies: views would keep the whole buffers alive
        self.a, self.b = self.a[..., n:].clone(), self.b[..., n:].clone()
        return y


class MambaStackStream:
    """A models.MambaStack run block by block, carrying each Mamba's state."""

    def __init__(self, stack):
        self.stack = stack
        self.states = None

    def step(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        # x: [B, C, n]
        y, self.states = self.stack.forward_stream(x, self.states)
        return y


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
            h = norm(h, LRELU_SLOPE)
        h = self.generator.bottleneck_norm(self.bottleneck.step(h, final))
        for skip_add, stages, skip in zip(self.skip_adds, self.ups, skips[::-1]):
            h = stages.step(skip_add.step(h, skip, final), final)
        return self.residual.step(x, self.head.step(h, final), final)  # [B, 1, m]


def lowband_filter(cutoff_hz: float, sr: int) -> np.ndarray | None:
    """The cross-over low-pass of keep_lowband, or None when the cut-off is the Nyquist.

    A Kaiser-window FIR of odd length (a whole-sample delay, removed by centring it) whose
    transition runs from (1 - CROSSOVER_WIDTH) * cutoff_hz to cutoff_hz with 80 dB stop band.

    Args:
        cutoff_hz: the input's bandwidth in Hz.
        sr: sample rate in Hz.
    Returns:
        float64 [taps] or None.
    """
    if cutoff_hz >= sr / 2:
        return None
    width = CROSSOVER_WIDTH * cutoff_hz
    taps, beta = scipy.signal.kaiserord(CROSSOVER_ATTENUATION_DB, width / (sr / 2))
    return scipy.signal.firwin(
        taps | 1, cutoff_hz - width / 2, window=("kaiser", beta), fs=sr
    )


class LowbandStream:
    """keep_lowband as a stream: out = y + h * (x - y) for the centred low-pass h.

    Below the cut-off the output is the input x, above it the model's output y (the cross-over
    is complementary); h's half-length is the added latency. Computed in float64.

    Args:
        h: the filter from `lowband_filter`; None keeps x whole.
    """

    def __init__(self, h: np.ndarray | None):
        self.diff = Merge(lambda x, y: x.double() - y)
        if h is None:
            self.fir = None
            self.out = Merge(lambda y, x: x)
            return
        half = len(h) // 2
        kernel = h[None, None]  # [1, 1, taps]
        self.fir = Window(
            lambda d: torch.from_numpy(
                scipy.signal.oaconvolve(d.numpy(), kernel, mode="same", axes=-1)
            ),
            1,
            lo=half,
            hi=half,
        )
        self.out = Merge(lambda y, f: (y + f).float())

    def step(self, x: torch.Tensor, y: torch.Tensor, final: bool) -> torch.Tensor:
        # x, y: [C, 1, n] input and model output (streams of the same length)
        if self.fir is None:
            return self.out.step(y, x, final)
        d = self.fir.step(self.diff.step(x, y, final), final)
        return self.out.step(y.double(), d, final)


def make_resampler(sr: int, out_sr: int, channels: int) -> soxr.ResampleStream:
    """The resampler of `StreamProcessor`: soxr at dataset.RESAMPLE_QUALITY, variable-rate.

    Its output does not depend on how the input is split, and it ends at round(T * out_sr /
    sr) samples. Variable-rate mode, because soxr's fixed-rate mode works in FFT blocks that
    at 8 and 16 kHz input come out 70-150 ms at a time (170 and 77 ms late, measured); this
    one is 30 and 15 ms late. Its pass band ends a little lower (-10 dB at 0.95 of the input's
    Nyquist frequency, against -3 dB); its stop band is below -110 dB.
    """
    return soxr.ResampleStream(
        sr, out_sr, channels, "float32", dataset.RESAMPLE_QUALITY, vr=True
    )


class StreamProcessor:
    """Super-resolution of a stream of blocks at any rate, with a fixed gain.

    Each block is resampled to the model's rate (`make_resampler`), multiplied by the gain, run through the generator as a
    `GeneratorStream`, divided by the gain and, with a cut-off, crossed over with the input
    (`LowbandStream`). The output ends at round(T * out_sr / sr) samples for T input samples:
    all blocks together equal `process_whole` on the whole signal (to float rounding).

    Args:
        generator: a WaveUMamba in eval mode, weight norm removed.
        sr: input rate in Hz.
        out_sr: the generator's rate (48 kHz).
        gain: input gain, a number or one per channel; the output is divided by it again.
        channels: channels per block (run as one batch).
        lowband_hz: keep the input below this frequency (None: the model's output throughout).
    """

    def __init__(
        self, generator, sr, out_sr, gain=DEFAULT_GAIN, channels=1, lowband_hz=None
    ):
        if int(sr) != sr or sr <= 0:
            raise ValueError(f"sample rate must be a positive integer, not {sr!r}")
        gain = np.broadcast_to(np.asarray(gain, dtype=np.float64), (channels,))
        if not (np.isfinite(gain).all() and (gain > 0).all()):
            raise ValueError(f"gain must be positive and finite, not {gain.tolist()}")
        self.sr, self.out_sr, self.channels = int(sr), int(out_sr), channels
        self.gain = torch.from_numpy(gain.astype(np.float32))[:, None, None]
        self.resampler = None
        if self.sr != self.out_sr:
            self.resampler = make_resampler(self.sr, self.out_sr, channels)
        self.model = GeneratorStream(generator)
        self.device = next(generator.parameters()).device
        self.lowband = None
        if lowband_hz is not None:
            self.lowband = LowbandStream(lowband_filter(lowband_hz, self.out_sr))
        self.received = 0  # input samples
        self.resampled = 0  # samples given to the model
        self.flat = channels == 1  # blocks come as [n], not [1, n]

    def process(self, block: np.ndarray) -> np.ndarray:
        """The output made final by the next input block.

        Args:
            block: [n] (one channel) or [channels, n] float samples at `sr`.
        Returns:
            float32 [m] or [channels, m] at `out_sr` (m may be 0).
        """
        self.flat = np.ndim(block) == 1
        x = self._check(block)
        self.received += x.shape[1]
        if self.resampler is not None:
            x = self.resampler.resample_chunk(np.ascontiguousarray(x.T)).T
        return self._run(x, final=False)

    def flush(self) -> np.ndarray:
        """The rest of the output, once the input has ended, in the layout of the blocks; the
        processor is then closed."""
        x = np.zeros((self.channels, 0), np.float32)
        if self.resampler is not None:
            x = self.resampler.resample_chunk(x.T, last=True).T
        # soxr gives round(T * out_sr / sr) samples in all; make sure of it
        total = round(self.received * self.out_sr / self.sr)
        missing = total - self.resampled - x.shape[1]
        if missing < 0 and -missing > x.shape[1]:
            raise RuntimeError("the resampler gave more samples than it should")
        x = np.pad(x, ((0, 0), (0, max(0, missing))))[:, : x.shape[1] + missing]
        return self._run(x, final=True)

    def _check(self, block) -> np.ndarray:
        x = np.asarray(block, dtype=np.float32)
        if x.ndim == 1 and self.channels == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[0] != self.channels:
            raise ValueError(
                f"expected blocks of {self.channels} channel(s), got shape {x.shape}"
            )
        if not np.isfinite(x).all():
            raise ValueError("audio contains NaN or Inf samples")
        return x

    def _run(self, x48: np.ndarray, final: bool) -> np.ndarray:
        # x48: [channels, n] at out_sr
        self.resampled += x48.shape[1]
        x = torch.from_numpy(np.ascontiguousarray(x48, dtype=np.float32))[:, None]
        y = self.model.push((x * self.gain).to(self.device)) if x.shape[-1] else None
        if final:
            tail = self.model.flush()
            y = tail if y is None else torch.cat([y, tail], dim=-1)
        y = (y.cpu() / self.gain) if y is not None else x[..., :0]
        if self.lowband is not None:
            y = self.lowband.step(x, y, final)
        y = y[:, 0].numpy()
        return y[0] if self.flat else y


def process_whole(generator, audio, sr, out_sr, gain=DEFAULT_GAIN, lowband_hz=None):
    """`StreamProcessor` on one whole signal: what whole-file inference, evaluation and
    validation run.

    Args:
        generator, sr, out_sr, gain, lowband_hz: as `StreamProcessor`.
        audio: [T] or [channels, T] float samples at sr.
    Returns:
        float32, [round(T * out_sr / sr)] or [channels, ...] in the layout of audio.
    """
    channels = 1 if np.ndim(audio) == 1 else np.shape(audio)[0]
    processor = StreamProcessor(generator, sr, out_sr, gain, channels, lowband_hz)
    return np.concatenate([processor.process(audio), processor.flush()], axis=-1)


def _pcm16(y: np.ndarray) -> tuple[bytes, bool]:
    # float samples -> raw S16_LE bytes (the scale of 16-bit input, 1 / 32768), and whether
    # any sample had to be clipped
    scaled = np.round(y * 32768.0)
    clipped = bool(np.any(scaled > 32767) or np.any(scaled < -32768))
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes(), clipped


def _serve(processor: StreamProcessor, block_bytes: int) -> None:
    """Copies stdin to stdout through the processor until stdin ends."""
    stdin, stdout = sys.stdin.buffer.fileno(), sys.stdout.buffer
    odd = b""  # the first byte of a sample split between two reads
    warned = False
    while True:
        # os.read returns what the pipe holds, so a block is processed as soon as it arrives
        data = os.read(stdin, block_bytes)
        if data:
            data = odd + data
            whole = len(data) - len(data) % 2
            data, odd = data[:whole], data[whole:]
            x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
            y = processor.process(x)
        else:  # the end of the input (a lone last byte is half a sample: dropped)
            y = processor.flush()
        pcm, clipped = _pcm16(y)
        if clipped and not warned:
            print("warning: output clipped at 16-bit full scale", file=sys.stderr)
            warned = True
        stdout.write(pcm)
        stdout.flush()
        if not data:
            return


def main(argv=None) -> int:
    """The command line; returns the exit code."""
    # inference_wav builds its SuperResolver on this module, so it is imported here, not at
    # the top: the model is loaded (and its checksum checked) exactly as inference_wav does
    import inference_wav

    parser = argparse.ArgumentParser(
        description="Super-resolves a live stream: raw 16-bit little-endian mono PCM at "
        "--input_sr on stdin, raw 16-bit mono PCM at 48 kHz on stdout, as it goes."
    )
    parser.add_argument("--input_sr", type=int, required=True, help="input rate in Hz")
    parser.add_argument(
        "--gain",
        type=float,
        default=DEFAULT_GAIN,
        help="input gain for the model, undone at its output (default %(default)s: "
        "the input's own level; the model was trained on speech peaking near 0.9)",
    )
    parser.add_argument(
        "--keep_lowband",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the input's own band (below input_sr / 2) and take only the band above it "
        "from the model (default; at --input_sr 48000 that is the whole input, so the output "
        "is the input; --no-keep_lowband: the model's raw output)",
    )
    parser.add_argument(
        "--block_ms",
        type=float,
        default=10.0,
        help="largest block read at once, in ms (a smaller one is processed as it comes)",
    )
    parser.add_argument("--checkpoint_file", default=None, help="as inference_wav.py")
    parser.add_argument("--cfgs_path", default=None, help="as inference_wav.py")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--scan_impl", choices=ssm.IMPLS, default="auto"
    )
    a = parser.parse_args(argv)
    if not 0 < a.gain < float("inf"):
        parser.error(f"--gain must be positive, not {a.gain}")
    try:
        # the rules of inference_wav.py's --input_sr and block size
        inference_wav.check_sample_rate(a.input_sr, "--input_sr")
        inference_wav.check_seconds(
            "--block_ms / 1000", a.block_ms / 1000, inference_wav.MIN_BLOCK_SECONDS
        )
    except ValueError as e:
        parser.error(str(e))
    try:
        resolver = inference_wav.SuperResolver.from_pretrained(
            a.checkpoint_file, a.device, a.scan_impl, a.cfgs_path
        )
        lowband_hz = min(a.input_sr, utils.SAMPLING_RATE) / 2
        processor = resolver.stream(
            a.input_sr, a.gain, lowband_hz=lowband_hz if a.keep_lowband else None
        )
        block_bytes = 2 * max(1, round(a.block_ms / 1000 * a.input_sr))
        _serve(processor, block_bytes)
    except BrokenPipeError:
        # the reader went away: stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except inference_wav.FILE_ERRORS as e:
        utils.print_error(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
