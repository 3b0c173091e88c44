"""Super-resolves speech files to 48 kHz with a trained Wave-U-Mamba generator.

Command line (a thin loop over files around `SuperResolver`):

    python inference_wav.py --wav_path IN [IN ...] --output_dir OUT [--checkpoint_file g_X]

writes `OUT/<name>_superresolved.wav` for every input (a folder keeps its sub-folders under OUT).
From Python:

    sr = SuperResolver.from_pretrained("cp_x/g_00100000")
    audio_48k, rate = sr.upsample(audio, 8000)

Per file (any format soundfile reads, any rate, any number of channels), read twice in blocks of
BLOCK_SECONDS so that memory does not grow with the file: a first pass measures each channel's
peak (and the bandwidth, unless --input_sr gives it or --no-keep_lowband is set); the second
runs `stream.StreamProcessor`: soxr to 48 kHz -> a gain per channel (the one that brings its
peak to cfg.audio.peak, as in training, or a fixed --gain) -> the generator, giving exactly what
one pass over the whole file gives (no chunks, no seams) -> the gain undone -> the input's own
content below its bandwidth put back (default; --no-keep_lowband: the model's raw output) -> a
16-bit (scaled down with a warning if it would clip) or float32 WAV, written atomically. Inputs
are only ever read. `python stream.py` is the same processor on a live stream.

The input's own band is kept by default because the model's rewrite of it is worse than the
input itself (shipped model, validation clips: LSD-LF 0.88-1.04 raw, 0.08-0.42 kept; README "The
pretrained model"); evaluate.py scores the raw output by default, as papers do.

The four flags and the output name are those of infected4098/Wave-U-Mamba's inference_wav.py
(MIT); the code is our own.
"""

import argparse
import glob
import math
import numbers
import os
import sys
import tempfile
from collections.abc import Callable, Iterable

import numpy as np
import scipy.signal
import soundfile as sf
import torch
from tqdm import tqdm

import dataset
import ssm
import stream
import utils
from models import WaveUMamba, load_generator
from utils import SAMPLING_RATE, one_line

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAINED_PATH = os.path.join(HERE, "checkpoints", "wave_u_mamba_vctk_cpu.pt")
# Shorter clips carry no usable spectrum and are almost certainly a mistake.
MIN_SECONDS = 0.01
# Input per generator pass: memory grows with it (about 0.9 GB peak in all for 2 s blocks on
# CPU, measured), speed hardly (each pass recomputes a few dozen samples of context).
BLOCK_SECONDS = 2.0
# Shorter blocks cost a generator pass each for little audio (0.001 s took 359 s per second
# of audio); 10 ms is also the default block of a live stream (stream.py --block_ms).
MIN_BLOCK_SECONDS = 0.01
# More "channels" than any recording layout has (22.2 surround has 24, 7th-order ambisonics
# 64): such an array is almost surely [T, channels].
MAX_CHANNELS = 64
# Sample rates outside this range are a mistake (or sr=True read as 1 Hz), not audio.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768000
# Bandwidth detection: the highest frequency whose long-term average power is within
# DETECT_RANGE_DB of the strongest frequency. Full-band VCTK speech stays within 60 dB up to
# 24 kHz, while the stop band of any decent resampler is far below it.
DETECT_RANGE_DB = 60.0
# Detected edges are snapped down to the Nyquist frequency of a common sample rate. Resamplers
# leave their transition band on either side of the Nyquist frequency: soxr's -60 dB point
# lies at 0.95-0.97 of it, a causal Chebyshev filter or scipy's resample_poly up to 1.17 above.
# Snapping the edge times 1.07 down handles all of them on speech and noise.
NYQUIST_HZ = (2000, 3000, 4000, 5512.5, 6000, 8000, 11025, 12000, 16000, 22050, 24000)
EDGE_TOLERANCE = 1.07
PCM16_MAX = 32767 / 32768
# What one bad file may raise; anything else is a bug and keeps its traceback.
FILE_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)


def detect_bandwidth(audio: np.ndarray, sr: int) -> float:
    """Estimates the effective bandwidth of a recording from its long-term spectrum.

    The rule: the Welch power spectrum (about 23 Hz resolution, averaged over all frames and
    channels, smoothed over 5 bins) is compared with its maximum; the highest frequency within
    DETECT_RANGE_DB (60 dB) of it is the edge; the result is the largest of NYQUIST_HZ (the
    Nyquist frequencies of common sample rates, 2 to 24 kHz) not above 1.07 times the edge,
    and never above sr / 2. An edge below 2 kHz is returned as it is.

    Args:
        audio: [T] or [channels, T] samples.
        sr: sample rate in Hz.
    Returns:
        The cut-off frequency in Hz, e.g. 4000.0 for a 48 kHz file that was once 8 kHz audio.
    """
    meter = BandwidthMeter(sr)
    meter.add(audio)
    return meter.bandwidth()


class BandwidthMeter:
    """`detect_bandwidth` of a signal that arrives in blocks: the same Welch segments (the
    samples of a segment that straddles two blocks are carried over), so the same answer.

    Args:
        sr: sample rate in Hz.
    """

    def __init__(self, sr: int):
        self.sr = sr
        self.nperseg = max(16, round(sr * 2048 / SAMPLING_RATE))
        self.step = self.nperseg - self.nperseg // 2  # welch's default half overlap
        self.carry = np.zeros((1, 0))
        self.power_sum, self.segments = 0.0, 0

    def add(self, block: np.ndarray) -> None:
        """Adds the next [T] or [channels, T] samples."""
        x = np.atleast_2d(np.asarray(block, dtype=np.float64))
        if self.carry.shape[1]:
            x = np.concatenate([self.carry, x], axis=1)
        n = max(0, (x.shape[1] - self.nperseg) // self.step + 1)
        if n:
            used = (n - 1) * self.step + self.nperseg
            self.freqs, power = scipy.signal.welch(
                x[:, :used], fs=self.sr, nperseg=self.nperseg
            )
            self.power_sum = self.power_sum + n * power.mean(axis=0)
            self.segments += n
        self.carry = x[:, n * self.step :]

    def bandwidth(self) -> float:
        """The cut-off in Hz of everything added so far (see `detect_bandwidth`)."""
        if self.segments:
            freqs, power = self.freqs, self.power_sum / self.segments
        else:  # shorter than one segment: one segment of the whole signal
            freqs, power = scipy.signal.welch(
                self.carry, fs=self.sr, nperseg=self.carry.shape[1]
            )
            power = power.mean(axis=0)
        power = np.convolve(power, np.ones(5) / 5, mode="same")
        if not power.max() > 0:
            raise ValueError("cannot detect the bandwidth of silent audio")
        level_db = 10 * np.log10(np.maximum(power / power.max(), 1e-30))
        top = np.nonzero(level_db > -DETECT_RANGE_DB)[0].max()
        edge = min(freqs[top] + (freqs[1] - freqs[0]) / 2, self.sr / 2)
        candidates = [
            f for f in NYQUIST_HZ if f <= min(edge * EDGE_TOLERANCE, self.sr / 2)
        ]
        return float(candidates[-1] if candidates else edge)


def check_seconds(name: str, seconds, minimum: float) -> float:
    """A user-chosen duration as float seconds: a finite number, at least `minimum`.

    Raises:
        ValueError naming `name`, e.g. for inf (which would overflow later), NaN or 0.001.
    """
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, numbers.Real)
        or not math.isfinite(seconds)
        or seconds < minimum
    ):
        raise ValueError(
            f"{name} must be a finite number of seconds, at least {minimum:g}, "
            f"not {seconds!r}"
        )
    return float(seconds)


def check_sample_rate(sr, name: str = "sr") -> int:
    """A sample rate as int Hz: an integral number (not a bool) in the sane range.

    Raises:
        ValueError naming `name` otherwise (True, 16000.5, "16000", 0, 10 MHz).
    """
    if (
        isinstance(sr, bool)
        or not isinstance(sr, numbers.Real)
        or not math.isfinite(sr)
        or sr != int(sr)
        or not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE
    ):
        raise ValueError(
            f"{name} must be an integer sample rate in Hz from {MIN_SAMPLE_RATE} to "
            f"{MAX_SAMPLE_RATE}, not {sr!r}"
        )
    return int(sr)


def resolve_device(device: str) -> torch.device:
    """Maps "auto" to cuda when available, else cpu; ValueError if cuda is absent."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return torch.device(device)


def verify_checksum(path: str, required: bool) -> None:
    """Checks `path` against the SHA-256 in `path`.sha256 (sha256sum's format).

    Args:
        path: the checkpoint file.
        required: if True, a missing .sha256 file is an error; else it skips the check.
    """
    sha_path = path + ".sha256"
    if not os.path.isfile(sha_path):
        if required:
            raise ValueError(f"checksum file missing: {sha_path}")
        return
    with open(sha_path) as f:
        fields = f.read().split()
    expected = fields[0].lower() if fields else ""
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"{sha_path}: not a SHA-256 hex digest")
    digest = utils.sha256_file(path)
    if digest != expected:
        raise ValueError(
            f"checksum mismatch for {path}: expected {expected}, got {digest} "
            "(the file is corrupt or was replaced)"
        )


class SuperResolver:
    """A loaded generator that upsamples audio of any rate and layout to 48 kHz.

    Clips (`upsample`), files (`upsample_file`) and live streams (`stream`) all run through
    `stream.StreamProcessor` in blocks, and give what one pass over the whole signal gives.

    Args:
        generator: a WaveUMamba in eval mode, weight norm removed, on `device`.
        cfg: the Config it was built from (cfg.audio.peak is the normalisation target).
        device: where the generator runs.
        block_seconds: input per generator pass (None: BLOCK_SECONDS); memory grows with it.
            Finite and at least MIN_BLOCK_SECONDS.
    """

    def __init__(
        self,
        generator: WaveUMamba,
        cfg: utils.Config,
        device: torch.device,
        block_seconds: float | None = None,
    ):
        self.generator = generator
        self.peak = cfg.audio.peak
        self.device = device
        self.block_seconds = check_seconds(
            "block_seconds",
            BLOCK_SECONDS if block_seconds is None else block_seconds,
            MIN_BLOCK_SECONDS,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        device: str = "auto",
        scan_impl: str = "auto",
        cfgs_path: str | None = None,
        block_seconds: float | None = None,
    ) -> "SuperResolver":
        """Loads a generator checkpoint, ready for inference.

        Args:
            path: a g_ checkpoint ({"generator", "config", "step"}), possibly saved under DDP
                ("module." prefixes), or a bare generator state_dict; float16 is cast to
                float32. None: the shipped checkpoints/wave_u_mamba_vctk_cpu.pt, whose SHA-256
                must match the .sha256 file beside it (any path is checked when one exists).
            device: "auto", "cpu" or "cuda".
            scan_impl: selective-scan implementation ("auto", "torch", "compiled", "ref").
            cfgs_path: config JSON; default the checkpoint's own config, else config.json or
                cfgs.json beside the checkpoint, else the repo's cfgs.json.
            block_seconds: see the class.
        Returns:
            The SuperResolver. Raises ValueError with a one-line reason on any problem.
        """
        if path is None:
            path = PRETRAINED_PATH
            if not os.path.isfile(path):
                raise ValueError(
                    f"no pretrained model is available ({path} does not exist); "
                    "pass --checkpoint_file"
                )
        verify_checksum(path, required=os.path.abspath(path) == PRETRAINED_PATH)
        device = resolve_device(device)
        generator, cfg, _ = load_generator(path, cfgs_path, scan_impl)
        generator.requires_grad_(False).eval().to(device)
        return cls(generator, cfg, device, block_seconds)

    def stream(
        self,
        sr: int,
        gain=stream.DEFAULT_GAIN,
        channels: int = 1,
        lowband_hz: float | None = None,
    ) -> stream.StreamProcessor:
        """A stream processor: `process(block)` returns the 48 kHz output that the block made
        final, `flush()` the rest once the input has ended (see stream.StreamProcessor).

        Args:
            sr: input rate in Hz.
            gain: fixed input gain (the output is divided by it again), a number or one per
                channel; a stream cannot peak-normalise, so by default the input's own level.
            channels: channels per block.
            lowband_hz: keep the input's own content below this frequency (None: off).
        """
        sr = check_sample_rate(sr)
        return stream.StreamProcessor(
            self.generator, sr, SAMPLING_RATE, gain, channels, lowband_hz
        )

    def upsample(
        self,
        audio: np.ndarray | torch.Tensor,
        sr: int,
        input_sr: int | str | None = None,
        keep_lowband: bool = True,
        progress: Callable[[float], None] | None = None,
        gain: float | None = None,
    ) -> tuple[np.ndarray, int]:
        """Super-resolves one clip to 48 kHz.

        Args:
            audio: [T] or [channels, T] samples at `sr`, float or int (any level; each channel
                is normalised for the model and its level restored afterwards).
            sr: sample rate of `audio` in Hz.
            input_sr: the rate whose Nyquist frequency is the input's real bandwidth (e.g. 8000
                for a 48 kHz file that was once 8 kHz audio); None or "auto": detect it with
                `detect_bandwidth`. Only `keep_lowband` uses it.
            keep_lowband: keep the input's own content below its bandwidth and take only the
                band above from the model (see stream.LowbandStream); False: the model's raw
                output, the input's band rewritten too.
            progress: called with the fraction done (0-1) after each generator pass; an
                exception it raises stops the work and propagates (how serve.py cancels).
            gain: a fixed input gain in place of the per-channel peak normalisation (the
                output is divided by it again), e.g. to match a stream's output.
        Returns:
            (audio_48k, 48000): float32 numpy array in the layout of `audio`, of duration
            round(T * 48000 / sr) samples. Levels are restored, so samples may exceed 1.
        """
        # Deviation: upstream mixes to mono with librosa.load(sr=48000), trims the tail to a
        # multiple of 128 samples and feeds the raw level; we keep every channel and every
        # sample, and normalise each channel as training does (SPEC section 4).
        x, sr = self._validate(audio, sr)
        lowband_hz = self._lowband_hz(
            input_sr, sr, keep_lowband, lambda: detect_bandwidth(x, sr)
        )
        peaks = np.abs(x).max(axis=1)
        processor = self.stream(sr, self._gains(peaks, gain), len(x), lowband_hz)
        report = progress or (lambda fraction: None)
        frames = max(1, round(self.block_seconds * sr))
        pieces = []
        for start in range(0, x.shape[1], frames):
            pieces.append(processor.process(x[:, start : start + frames]))
            report(min(start + frames, x.shape[1]) / x.shape[1])
        y48 = np.concatenate(pieces + [processor.flush()], axis=1)
        # a silent channel of a multichannel file stays silent
        y48[peaks == 0] = 0
        return (y48[0] if np.ndim(audio) == 1 else y48), SAMPLING_RATE

    def upsample_file(
        self,
        path: str,
        out: str,
        fmt: str = "pcm16",
        input_sr: int | str | None = None,
        keep_lowband: bool = True,
        gain: float | None = None,
    ) -> None:
        """Super-resolves an audio file into a 48 kHz WAV: `upsample` and `write_audio` on the
        whole file, run block by block so that memory does not grow with the file.

        Args:
            path: input audio file (read twice: levels and bandwidth first, then the audio).
            out: output WAV, written atomically.
            fmt, input_sr, keep_lowband, gain: as `write_audio` and `upsample`.
        """
        peaks, frames, meter = 0.0, 0, None
        detect = keep_lowband and input_sr in (None, "auto")
        for sr, block in dataset.read_audio_blocks(path, self.block_seconds):
            meter = meter or BandwidthMeter(sr)
            peaks = np.maximum(peaks, np.abs(block).max(axis=1))
            frames += block.shape[1]
            if detect:
                meter.add(block)
        self._check_clip(frames, sr, peaks)
        lowband_hz = self._lowband_hz(input_sr, sr, keep_lowband, meter.bandwidth)
        processor = self.stream(sr, self._gains(peaks, gain), len(peaks), lowband_hz)

        def outputs():
            # a silent channel of a multichannel file stays silent
            for _, block in dataset.read_audio_blocks(path, self.block_seconds):
                yield np.where(peaks[:, None] > 0, processor.process(block), 0)
                utils.release_free_memory()
            yield np.where(peaks[:, None] > 0, processor.flush(), 0)

        write_audio_blocks(out, outputs(), len(peaks), fmt, path)

    def _gains(self, peaks: np.ndarray, gain: float | None):
        # the fixed gain, else the training level (cfg.audio.peak) per channel
        return dataset.peak_gains(peaks, self.peak) if gain is None else gain

    @staticmethod
    def _lowband_hz(input_sr, sr: int, keep_lowband: bool, detect) -> float | None:
        # keep_lowband's cut-off: half of input_sr, or detect() for None / "auto"
        if not keep_lowband:
            return None
        if input_sr is None or input_sr == "auto":
            return detect()
        integral = isinstance(input_sr, numbers.Integral) and not isinstance(input_sr, bool)
        if integral and 0 < input_sr <= sr:
            return input_sr / 2
        raise ValueError(
            f"input_sr must be auto or a positive integer at most the file's rate "
            f"{sr}, not {input_sr!r}"
        )

    @staticmethod
    def _validate(audio, sr) -> tuple[np.ndarray, int]:
        """The clip as float32 [channels, T] and sr as int; ValueError for unusable input."""
        sr = check_sample_rate(sr)
        if torch.is_tensor(audio):
            audio = audio.detach().cpu().numpy()
        audio = np.asarray(audio)
        if audio.ndim not in (1, 2):
            raise ValueError(f"audio must be [T] or [channels, T], not {audio.shape}")
        if audio.ndim == 2 and audio.shape[0] > MAX_CHANNELS:
            hint = ""
            if audio.shape[1] <= MAX_CHANNELS:
                hint = "; it looks like [T, channels]: pass it transposed (audio.T)"
            raise ValueError(
                f"audio of shape {tuple(audio.shape)} would be {audio.shape[0]} channels; "
                f"give [channels, T] with at most {MAX_CHANNELS} channels{hint}"
            )
        if np.issubdtype(audio.dtype, np.signedinteger):
            audio = audio / float(np.iinfo(audio.dtype).max + 1)
        elif not np.issubdtype(audio.dtype, np.floating):
            raise ValueError(f"audio must be float or signed int, not {audio.dtype}")
        x = np.atleast_2d(audio).astype(np.float32)
        if x.size == 0:
            raise ValueError(f"audio is empty (shape {audio.shape})")
        if not np.isfinite(x).all():
            raise ValueError("audio contains NaN or Inf samples")
        SuperResolver._check_clip(x.shape[1], sr, np.abs(x).max(axis=1))
        return x, sr

    @staticmethod
    def _check_clip(frames: int, sr: int, peaks: np.ndarray) -> None:
        # ValueError for a clip too short or silent to process
        if frames < MIN_SECONDS * sr:
            raise ValueError(
                f"clip too short: {frames} samples at {sr} Hz "
                f"(minimum {MIN_SECONDS * 1000:g} ms)"
            )
        if not np.max(peaks) > 0:
            raise ValueError("audio is silent (all samples are zero)")


def output_paths(
    wav_paths: list[str], output_dir: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """Expands files, folders and globs into (input, output) pairs.

    A folder contributes its audio files recursively (skipping output_dir if it lies inside)
    and keeps their sub-folders under output_dir; a file or glob match is written to
    output_dir directly.

    Args:
        wav_paths: the --wav_path arguments.
        output_dir: the --output_dir argument.
    Returns:
        (pairs, errors): pairs in a stable order; errors as one-line messages (missing paths,
        globs matching nothing, empty folders, outputs that would collide with another output
        or overwrite an input).
    """
    found, errors = [], []
    out_real = os.path.realpath(output_dir)
    for arg in wav_paths:
        if os.path.isdir(arg):
            files = []
            for folder, subfolders, names in os.walk(arg):
                # an output folder inside the input folder holds earlier results, not inputs
                subfolders[:] = sorted(
                    d
                    for d in subfolders
                    if os.path.realpath(os.path.join(folder, d)) != out_real
                )
                files += [
                    os.path.join(folder, name)
                    for name in sorted(names)
                    if name.lower().endswith(dataset.AUDIO_EXTENSIONS)
                ]
            if not files:
                errors.append(f"{arg}: no audio files in this folder")
            found += [(f, os.path.dirname(os.path.relpath(f, arg))) for f in files]
        elif os.path.exists(arg):
            found.append((arg, ""))
        elif glob.has_magic(arg):
            files = sorted(
                f for f in glob.glob(arg, recursive=True) if os.path.isfile(f)
            )
            if not files:
                errors.append(f"{arg}: no files match")
            found += [(f, "") for f in files]
        else:
            errors.append(f"{arg}: no such file or folder")
    inputs = {os.path.realpath(f) for f, _ in found}
    pairs, claimed, seen = [], {}, set()
    for path, subfolder in found:
        # the same file named twice (a folder and a glob, say) is processed once
        if os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        # Deviation: upstream names the output after wav_path[-7:-3] (4 characters of the
        # path); we use the whole file name.
        stem = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(output_dir, subfolder, stem + "_superresolved.wav")
        real = os.path.realpath(out)
        if real in inputs:
            errors.append(f"{path}: its output {out} would overwrite an input file")
        elif real in claimed:
            errors.append(
                f"{path}: its output {out} is also the output of {claimed[real]}"
            )
        else:
            claimed[real] = path
            pairs.append((path, out))
    return pairs, errors


def write_audio(path: str, audio: np.ndarray, fmt: str, name: str) -> None:
    """Writes [T] or [channels, T] 48 kHz audio as a WAV file, atomically.

    Args:
        path: output file.
        audio: samples at their restored level.
        fmt: "pcm16" (scaled down to fit, with a warning on stderr naming `name`, if it would
            clip) or "float" (float32, written as it is).
        name: the input file, for the warning.
    """
    audio = np.atleast_2d(audio)
    write_audio_blocks(path, [audio], audio.shape[0], fmt, name)


def write_audio_blocks(
    path: str, blocks: Iterable[np.ndarray], channels: int, fmt: str, name: str
) -> None:
    """`write_audio` of the concatenation of 48 kHz blocks [channels, n], one at a time.

    For pcm16 the blocks go to a float32 scratch file first: whether the output must be scaled
    down is known only at its end.
    """
    # Deviation: upstream always writes float32; 16-bit PCM is what players and most tools
    # expect, and --format float keeps upstream's behaviour.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with utils.atomic_path(path) as tmp:
        if fmt != "pcm16":
            _write_wav(tmp, blocks, channels, "FLOAT")
            return
        with tempfile.TemporaryDirectory() as scratch_dir:
            scratch = os.path.join(scratch_dir, "float.wav")
            peak = _write_wav(scratch, blocks, channels, "FLOAT")
            scale = 1.0
            if peak > PCM16_MAX:
                scale = PCM16_MAX / peak
                tqdm.write(
                    f"warning: {name}: output peak {peak:.3f} would clip in 16-bit PCM; "
                    f"scaled down by {20 * np.log10(peak / PCM16_MAX):.1f} dB "
                    "(use --format float to keep the level)",
                    file=sys.stderr,
                )
            frames = round(BLOCK_SECONDS * SAMPLING_RATE)
            scaled = (
                block.T * np.float32(scale)
                for block in sf.blocks(scratch, frames, dtype="float32", always_2d=True)
            )
            _write_wav(tmp, scaled, channels, "PCM_16")


def _write_wav(path: str, blocks, channels: int, subtype: str) -> float:
    # writes [channels, n] blocks at 48 kHz; returns the peak sample magnitude
    peak = 0.0
    with sf.SoundFile(path, "w", SAMPLING_RATE, channels, subtype, format="WAV") as f:
        for block in blocks:
            f.write(block.T)
            peak = max(peak, float(np.abs(block).max(initial=0.0)))
    return peak


def _parse_args(argv) -> argparse.Namespace:
    """The command line's arguments, checked; input_sr becomes None (auto) or an int."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wav_path",
        nargs="+",
        required=True,
        help="audio files, folders (searched recursively) or globs",
    )
    parser.add_argument(
        "--output_dir", default="out", help="where <name>_superresolved.wav go"
    )
    parser.add_argument(
        "--checkpoint_file",
        default=None,
        help="g_ checkpoint or generator state_dict (default: the shipped pretrained model)",
    )
    parser.add_argument(
        "--cfgs_path",
        default=None,
        help="config JSON (default: the checkpoint's own config)",
    )
    parser.add_argument(
        "--input_sr",
        default="auto",
        help="for keep_lowband: the rate whose Nyquist frequency is the input's real "
        "bandwidth (8000 for audio that was once 8 kHz), or auto to detect it",
    )
    parser.add_argument(
        "--keep_lowband",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the input's own content below its bandwidth and take only the band above "
        "it from the model (default; --no-keep_lowband: the model's raw output)",
    )
    parser.add_argument(
        "--gain",
        type=float,
        default=None,
        help="a fixed input gain in place of per-channel peak normalisation (the output is "
        "divided by it again); gives what stream.py --gain gives",
    )
    parser.add_argument(
        "--format",
        choices=("pcm16", "float"),
        default="pcm16",
        help="pcm16: scaled down, with a warning, if it would clip; float: float32",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs that already exist (by default such a file is an error)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--scan_impl", choices=ssm.IMPLS, default="auto"
    )
    a = parser.parse_args(argv)
    if a.input_sr != "auto" and not (a.input_sr.isdigit() and int(a.input_sr) > 0):
        parser.error(
            f"--input_sr must be auto or a positive integer, not {a.input_sr!r}"
        )
    if a.gain is not None and not 0 < a.gain < float("inf"):
        parser.error(f"--gain must be positive, not {a.gain}")
    a.input_sr = None if a.input_sr == "auto" else int(a.input_sr)
    return a


def main(argv=None) -> int:
    """The command line; returns the exit code (1 if anything failed)."""
    a = _parse_args(argv)
    try:
        resolver = SuperResolver.from_pretrained(
            a.checkpoint_file, a.device, a.scan_impl, a.cfgs_path
        )
    except FILE_ERRORS as e:
        utils.print_error(e)
        return 1
    pairs, errors = output_paths(a.wav_path, a.output_dir)
    for message in errors:
        utils.print_error(message)
    try:
        os.makedirs(a.output_dir, exist_ok=True)
    except OSError as e:
        utils.print_error(f"cannot create output folder {a.output_dir}: {e.strerror}")
        return 1
    if not os.access(a.output_dir, os.W_OK | os.X_OK):
        utils.print_error(f"output folder {a.output_dir} is not writable")
        return 1
    # what a killed earlier run left half-written
    for folder in {os.path.dirname(out) for _, out in pairs}:
        utils.remove_stale_temporaries(folder or ".")

    failed = len(errors)
    # disable=None: no bar when stderr is not a terminal (logs, tests)
    for path, out in tqdm(pairs, unit="file", disable=None):
        try:
            if not a.overwrite and os.path.lexists(out):
                raise ValueError(
                    f"{path}: its output {out} already exists (--overwrite replaces it)"
                )
            resolver.upsample_file(
                path, out, a.format, a.input_sr, a.keep_lowband, a.gain
            )
        except FILE_ERRORS as e:
            message = one_line(e) if path in str(e) else f"{path}: {one_line(e)}"
            tqdm.write(f"error: {message}", file=sys.stderr)
            failed += 1
            continue
        tqdm.write(out)
    if failed:
        utils.print_error(f"{failed} input(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
