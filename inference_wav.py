"""Super-resolves speech files to 48 kHz with a trained Wave-U-Mamba generator.

Command line (a thin loop over files around `SuperResolver`):

    python inference_wav.py --wav_path IN [IN ...] --output_dir OUT [--checkpoint_file g_X]

writes `OUT/<name>_superresolved.wav` for every input (a folder keeps its sub-folders under OUT).
From Python:

    sr = SuperResolver.from_pretrained("cp_x/g_00100000")
    audio_48k, rate = sr.upsample(audio, 8000)

Per file: load (any format soundfile reads, any rate, any number of channels) -> soxr to 48 kHz
-> per channel, peak-normalise to cfg.audio.peak as in training -> the generator in overlapping
chunks with cross-fades -> original level restored -> optionally the input's own content below
its bandwidth put back (--keep_lowband) -> a 16-bit (scaled down with a warning if it would clip)
or float32 WAV, written atomically. Inputs are only ever read.

The four flags and the output name are those of infected4098/Wave-U-Mamba's inference_wav.py
(MIT); the code is our own.
"""

import argparse
import glob
import hashlib
import os
import sys
from collections.abc import Callable

import numpy as np
import scipy.signal
import soundfile as sf
import torch
from tqdm import tqdm

import dataset
import utils
from models import WaveUMamba, load_generator

SAMPLING_RATE = 48000
HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAINED_PATH = os.path.join(HERE, "checkpoints", "wave_u_mamba_vctk_cpu.pt")
# Shorter clips carry no usable spectrum and are almost certainly a mistake.
MIN_SECONDS = 0.01
CHUNK_SECONDS = 10.0
OVERLAP_SECONDS = 0.5
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
# --keep_lowband cross-over: a linear-phase Kaiser low-pass whose transition band spans the
# top CROSSOVER_WIDTH of the input's band; below it the output is the input to within -80 dB.
CROSSOVER_WIDTH = 0.1
CROSSOVER_ATTENUATION_DB = 80.0
PCM16_MAX = 32767 / 32768
AUDIO_EXTENSIONS = (
    ".wav",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".mp3",
    ".aif",
    ".aiff",
    ".aifc",
    ".au",
    ".caf",
    ".w64",
    ".rf64",
)
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
    audio = np.atleast_2d(np.asarray(audio, dtype=np.float64))
    nperseg = min(max(16, round(sr * 2048 / SAMPLING_RATE)), audio.shape[1])
    freqs, power = scipy.signal.welch(audio, fs=sr, nperseg=nperseg)
    power = np.convolve(power.mean(axis=0), np.ones(5) / 5, mode="same")
    if not power.max() > 0:
        raise ValueError("cannot detect the bandwidth of silent audio")
    level_db = 10 * np.log10(np.maximum(power / power.max(), 1e-30))
    top = np.nonzero(level_db > -DETECT_RANGE_DB)[0].max()
    edge = min(freqs[top] + (freqs[1] - freqs[0]) / 2, sr / 2)
    candidates = [f for f in NYQUIST_HZ if f <= min(edge * EDGE_TOLERANCE, sr / 2)]
    return float(candidates[-1] if candidates else edge)


def restore_lowband(
    x: np.ndarray, y_hat: np.ndarray, cutoff_hz: float, sr: int = SAMPLING_RATE
) -> np.ndarray:
    """Combines the input's band below `cutoff_hz` with the model's output above it.

    The cross-over is complementary: low = h * x, high = y_hat - h * y_hat for a zero-phase
    Kaiser low-pass h, so out = y_hat + h * (x - y_hat). The transition runs from
    0.9 * cutoff_hz to cutoff_hz; below it the output equals x to within 80 dB.

    Args:
        x: input resampled to `sr`, [T].
        y_hat: the model's output, [T].
        cutoff_hz: the input's bandwidth in Hz.
        sr: sample rate of both, in Hz.
    Returns:
        [T] float32.
    """
    if cutoff_hz >= sr / 2:
        return np.array(x, dtype=np.float32)
    width = CROSSOVER_WIDTH * cutoff_hz
    numtaps, beta = scipy.signal.kaiserord(CROSSOVER_ATTENUATION_DB, width / (sr / 2))
    # odd length: a whole-sample delay that mode="same" removes exactly
    numtaps |= 1
    h = scipy.signal.firwin(
        numtaps, cutoff_hz - width / 2, window=("kaiser", beta), fs=sr
    )
    diff = np.asarray(x, dtype=np.float64) - y_hat
    return (y_hat + scipy.signal.oaconvolve(diff, h, mode="same")).astype(np.float32)


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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"checksum mismatch for {path}: expected {expected}, got {digest.hexdigest()} "
            "(the file is corrupt or was replaced)"
        )


class SuperResolver:
    """A loaded generator that upsamples audio of any rate and layout to 48 kHz.

    Args:
        generator: a WaveUMamba in eval mode, weight norm removed, on `device`.
        cfg: the Config it was built from (cfg.audio.peak is the normalisation target).
        device: where the generator runs.
        chunk_seconds: longest piece given to the generator at once (None: whole files).
        overlap_seconds: cross-fade between chunks (at most a quarter of a chunk).
    """

    def __init__(
        self,
        generator: WaveUMamba,
        cfg: utils.Config,
        device: torch.device,
        chunk_seconds: float | None = CHUNK_SECONDS,
        overlap_seconds: float = OVERLAP_SECONDS,
    ):
        self.generator = generator
        self.peak = cfg.audio.peak
        self.device = device
        self.hop = 2 ** len(cfg.model.channels)
        if chunk_seconds is None:
            self.chunk = None
        else:
            if not chunk_seconds > 0 or not overlap_seconds > 0:
                raise ValueError(
                    f"chunk and overlap must be positive, not {chunk_seconds}, {overlap_seconds}"
                )
            overlap_seconds = min(overlap_seconds, chunk_seconds / 4)
            self.overlap = max(1, round(overlap_seconds * SAMPLING_RATE / self.hop))
            self.chunk = max(
                2 * self.overlap, round(chunk_seconds * SAMPLING_RATE / self.hop)
            )
            self.overlap *= self.hop
            self.chunk *= self.hop

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        device: str = "auto",
        scan_impl: str = "auto",
        cfgs_path: str | None = None,
        chunk_seconds: float | None = CHUNK_SECONDS,
        overlap_seconds: float = OVERLAP_SECONDS,
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
            chunk_seconds, overlap_seconds: see the class.
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
        return cls(generator, cfg, device, chunk_seconds, overlap_seconds)

    def upsample(
        self,
        audio: np.ndarray | torch.Tensor,
        sr: int,
        input_sr: int | str | None = None,
        keep_lowband: bool = False,
        progress: Callable[[float], None] | None = None,
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
                band above from the model (see `restore_lowband`).
            progress: called with the fraction done (0-1) after each generator pass; an
                exception it raises stops the work and propagates (how serve.py cancels).
        Returns:
            (audio_48k, 48000): float32 numpy array in the layout of `audio`, of duration
            round(T * 48000 / sr) samples. Levels are restored, so samples may exceed 1.
        """
        # Deviation: upstream mixes to mono with librosa.load(sr=48000), trims the tail to a
        # multiple of 128 samples and feeds the raw level; we keep every channel and every
        # sample, and normalise each channel as training does (SPEC section 4).
        x = self._validate(audio, sr)
        if keep_lowband:
            if input_sr is None or input_sr == "auto":
                cutoff = detect_bandwidth(x, sr)
            elif isinstance(input_sr, (int, np.integer)) and 0 < input_sr <= sr:
                cutoff = input_sr / 2
            else:
                raise ValueError(
                    f"input_sr must be auto or a positive integer at most the file's rate "
                    f"{sr}, not {input_sr!r}"
                )
        n_out = round(x.shape[-1] * SAMPLING_RATE / sr)
        resampled = dataset.resample(x, sr, SAMPLING_RATE)[:, :n_out]
        x48 = np.pad(resampled, ((0, 0), (0, n_out - resampled.shape[1])))
        report = progress or (lambda fraction: None)
        y48 = np.stack(
            [
                self._generate(channel, lambda done, c=c: report((c + done) / len(x48)))
                for c, channel in enumerate(x48)
            ]
        )
        if keep_lowband:
            y48 = np.stack([restore_lowband(a, b, cutoff) for a, b in zip(x48, y48)])
        return (y48[0] if np.ndim(audio) == 1 else y48), SAMPLING_RATE

    @staticmethod
    def _validate(audio, sr) -> np.ndarray:
        """The clip as float32 [channels, T]; ValueError for unusable input."""
        if torch.is_tensor(audio):
            audio = audio.detach().cpu().numpy()
        audio = np.asarray(audio)
        if audio.ndim not in (1, 2):
            raise ValueError(f"audio must be [T] or [channels, T], not {audio.shape}")
        if np.issubdtype(audio.dtype, np.signedinteger):
            audio = audio / float(np.iinfo(audio.dtype).max + 1)
        elif not np.issubdtype(audio.dtype, np.floating):
            raise ValueError(f"audio must be float or signed int, not {audio.dtype}")
        x = np.atleast_2d(audio).astype(np.float32)
        if int(sr) != sr or sr <= 0:
            raise ValueError(f"sample rate must be a positive integer, not {sr!r}")
        if x.size == 0:
            raise ValueError(f"audio is empty (shape {audio.shape})")
        if x.shape[1] < MIN_SECONDS * sr:
            raise ValueError(
                f"clip too short: {x.shape[-1]} samples at {sr} Hz "
                f"(minimum {MIN_SECONDS * 1000:g} ms)"
            )
        if not np.isfinite(x).all():
            raise ValueError("audio contains NaN or Inf samples")
        if not np.abs(x).max() > 0:
            raise ValueError("audio is silent (all samples are zero)")
        return x

    def _generate(
        self, x: np.ndarray, report: Callable[[float], None] = lambda done: None
    ) -> np.ndarray:
        """The generator's output for one 48 kHz channel [T], at the channel's own level;
        `report` gets the fraction of the channel done after each generator pass."""
        peak = np.abs(x).max()
        # a silent channel of a multichannel file stays silent
        if not peak > 0:
            return np.zeros_like(x)
        gain = self.peak / peak
        x = x * gain
        if self.chunk is None or len(x) <= self.chunk:
            y = self._forward(x)
            report(1.0)
            return y / gain
        # Chunks overlap by self.overlap samples and are cross-faded with sin^2 / cos^2, which
        # sum to one: both chunks estimate the same signal, so amplitudes (not powers) must
        # add up. Every chunk but the first starts with a fade-in, which also hides the Mamba
        # state starting from zero there.
        ramp = (np.arange(self.overlap) + 0.5) / self.overlap
        fade_in = (np.sin(np.pi / 2 * ramp) ** 2).astype(np.float32)
        y = np.zeros_like(x)
        hop = self.chunk - self.overlap
        for start in range(0, len(x) - self.overlap, hop):
            end = min(start + self.chunk, len(x))
            piece = self._forward(x[start:end])
            if start > 0:
                piece[: self.overlap] *= fade_in
            if end < len(x):
                piece[-self.overlap :] *= 1 - fade_in
            y[start:end] += piece
            report(end / len(x))
        return y / gain

    @torch.inference_mode()
    def _forward(self, x: np.ndarray) -> np.ndarray:
        """One generator pass over [L] samples, zero-padded on the right to a multiple of hop."""
        padded = -len(x) % self.hop
        batch = torch.from_numpy(np.pad(x, (0, padded))).to(self.device)
        y_hat = self.generator(batch[None, None])  # [1, 1, L + padded]
        return y_hat[0, 0, : len(x)].float().cpu().numpy()


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
                    if name.lower().endswith(AUDIO_EXTENSIONS)
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
    if fmt == "pcm16":
        peak = float(np.abs(audio).max())
        if peak > PCM16_MAX:
            audio = audio * (PCM16_MAX / peak)
            tqdm.write(
                f"warning: {name}: output peak {peak:.3f} would clip in 16-bit PCM; "
                f"scaled down by {20 * np.log10(peak / PCM16_MAX):.1f} dB "
                "(use --format float to keep the level)",
                file=sys.stderr,
            )
    # Deviation: upstream always writes float32; 16-bit PCM is what players and most tools
    # expect, and --format float keeps upstream's behaviour.
    subtype = "PCM_16" if fmt == "pcm16" else "FLOAT"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with utils.atomic_path(path) as tmp:
        sf.write(tmp, audio.T, SAMPLING_RATE, subtype=subtype, format="WAV")


def one_line(error: Exception) -> str:
    """An exception's message on one line, for the CLI's one-line errors."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv=None) -> int:
    """The command line; returns the exit code (1 if anything failed)."""
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
        help="for --keep_lowband: the rate whose Nyquist frequency is the input's real "
        "bandwidth (8000 for audio that was once 8 kHz), or auto to detect it",
    )
    parser.add_argument(
        "--keep_lowband",
        action="store_true",
        help="keep the input's own content below its bandwidth; the model adds the rest",
    )
    parser.add_argument(
        "--chunk_seconds",
        type=float,
        default=CHUNK_SECONDS,
        help="process long files in chunks of this length (0: whole files)",
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
        "--scan_impl", choices=("auto", "torch", "compiled", "ref"), default="auto"
    )
    a = parser.parse_args(argv)
    if a.input_sr != "auto" and not (a.input_sr.isdigit() and int(a.input_sr) > 0):
        parser.error(
            f"--input_sr must be auto or a positive integer, not {a.input_sr!r}"
        )
    if a.chunk_seconds < 0:
        parser.error(f"--chunk_seconds must be >= 0, not {a.chunk_seconds}")
    input_sr = None if a.input_sr == "auto" else int(a.input_sr)

    try:
        resolver = SuperResolver.from_pretrained(
            a.checkpoint_file,
            a.device,
            a.scan_impl,
            a.cfgs_path,
            chunk_seconds=a.chunk_seconds if a.chunk_seconds > 0 else None,
        )
    except FILE_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    pairs, errors = output_paths(a.wav_path, a.output_dir)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    try:
        os.makedirs(a.output_dir, exist_ok=True)
    except OSError as e:
        print(
            f"error: cannot create output folder {a.output_dir}: {e.strerror}",
            file=sys.stderr,
        )
        return 1
    if not os.access(a.output_dir, os.W_OK | os.X_OK):
        print(f"error: output folder {a.output_dir} is not writable", file=sys.stderr)
        return 1

    failed = len(errors)
    # disable=None: no bar when stderr is not a terminal (logs, tests)
    for path, out in tqdm(pairs, unit="file", disable=None):
        try:
            if not a.overwrite and os.path.lexists(out):
                raise ValueError(
                    f"{path}: its output {out} already exists (--overwrite replaces it)"
                )
            audio, sr = dataset.load_audio(path)
            y, _ = resolver.upsample(audio, sr, input_sr, a.keep_lowband)
            write_audio(out, y, a.format, path)
        except FILE_ERRORS as e:
            message = one_line(e) if path in str(e) else f"{path}: {one_line(e)}"
            tqdm.write(f"error: {message}", file=sys.stderr)
            failed += 1
            continue
        tqdm.write(out)
    if failed:
        print(f"error: {failed} input(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
