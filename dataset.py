"""Audio I/O, resampling, low-resolution simulation, file lists and the training/validation
datasets.

Low-resolution protocols (`simulate_lowres`): "authors" is the authors' recipe (SPEC §4) and the
default; "random" is the randomised recipe of NU-Wave 2 / AudioLBM for robustness to unknown
anti-aliasing filters; "nuwave2", "sinc" (AP-BWE style) and "stft" (ssr_eval style) reproduce
the inputs other papers score on.

Also a command that writes VCTK file lists from a corpus on disk:

    python dataset.py filelists --root /data/VCTK-Corpus --layout vctk080 --split kuleshov
"""

import argparse
import math
import os
import re
import sys
from fractions import Fraction

import numpy as np
import scipy.fft
import scipy.signal
import soundfile as sf
import soxr
import torch

import utils

# What libsndfile reads, by file-name ending: how folders are searched for audio, for training,
# evaluation and inference alike.
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
# soxr quality of `resample` and of inference's stream resampler (stream.py)
RESAMPLE_QUALITY = "VHQ"
# The order matters: evaluate.py seeds each protocol's inputs by its index here, so a new
# protocol goes at the end.
PROTOCOLS = ("authors", "nuwave2", "sinc", "stft", "random")
FILELISTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "filelists")
VCTK_LAYOUTS = {
    "vctk080": ("wav48", re.compile(r"^(p\d{3}|s\d+)_\d{3}\.wav$")),
    "vctk092": (
        "wav48_silence_trimmed",
        re.compile(r"^(p\d{3}|s\d+)_\d{3}_mic1\.flac$"),
    ),
}
VCTK_SPLITS = {"kuleshov": ("train", "valid"), "common": ("train", "test")}


def load_audio(path: str) -> tuple[np.ndarray, int]:
    """Reads any file libsndfile decodes (WAV PCM 8-32 bit or float, FLAC, OGG, ...).

    Args:
        path: audio file.
    Returns:
        (x, sr): x float32 [channels, T] in [-1, 1] for PCM, sr in Hz.
        Raises ValueError naming the file if it is missing, not audio, truncated, corrupt,
        empty, or holds NaN/Inf samples. (An OGG file stores no length, so one cut short
        loads as a shorter clip.)
    """
    ((sr, x),) = read_audio_blocks(path, None)
    return x, sr


def read_audio_blocks(path: str, seconds: float | None):
    """`load_audio` in blocks, with the same checks, so long files never sit in memory.

    Args:
        path: audio file.
        seconds: length of a block (the last may be shorter); None reads the file at once.
    Yields:
        (sr, block): sr in Hz, block float32 [channels, n]. Raises ValueError as
        `load_audio` does; truncation and emptiness show at the end of the file.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such audio file")
    try:
        with sf.SoundFile(path) as f:
            sr, declared = f.samplerate, f.frames
            # libsndfile silently shortens a WAV whose data chunk is cut off and only logs
            # it; 0 and 0xFFFFFFFF are the placeholders of streamed files, not truncation.
            truncation = r"^data\s*:\s*(\d+) \(should be (\d+)\)"
            for claimed, actual in re.findall(truncation, f.extra_info, re.M):
                if int(claimed) > int(actual) and int(claimed) not in (0, 0xFFFFFFFF):
                    raise ValueError(
                        f"{path}: truncated ({actual} of {claimed} data bytes)"
                    )
            frames = -1 if seconds is None else max(1, math.ceil(seconds * sr))
            total = 0
            while True:
                x = f.read(frames, "float32", always_2d=True)
                if x.shape[0] == 0:
                    break
                if not np.all(np.isfinite(x)):
                    raise ValueError(f"{path}: contains NaN or Inf samples")
                total += x.shape[0]
                yield sr, np.ascontiguousarray(x.T)
                if seconds is None:
                    break
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(
            f"{path}: not a readable audio file, or truncated/corrupt ({e})"
        ) from None
    if total < declared:
        raise ValueError(f"{path}: truncated ({total} of {declared} frames)")
    if total == 0:
        raise ValueError(f"{path}: empty audio file")


def resample(x: np.ndarray, sr_in: float, sr_out: float) -> np.ndarray:
    """Band-limited resampling with soxr "VHQ" along the last axis.

    Args:
        x: [..., T] float array.
        sr_in, sr_out: rates in Hz.
    Returns:
        float32 [..., T'] with T' about T * sr_out / sr_in.
    """
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out:
        return x.copy()
    if x.ndim == 1:
        return soxr.resample(x, sr_in, sr_out, quality=RESAMPLE_QUALITY)
    flat = x.reshape(-1, x.shape[-1])
    # soxr wants [T, channels].
    out = soxr.resample(
        np.ascontiguousarray(flat.T), sr_in, sr_out, quality=RESAMPLE_QUALITY
    )
    return np.ascontiguousarray(out.T).reshape(*x.shape[:-1], -1)


def to_48k_mono(path: str) -> np.ndarray:
    """Loads a file, averages its channels and resamples it to 48 kHz (utils.SAMPLING_RATE).

    Args:
        path: audio file.
    Returns:
        float32 [T] at 48 kHz.
    """
    x, sr = load_audio(path)
    return resample(x.mean(axis=0), sr, utils.SAMPLING_RATE)


def _fit_length(z: np.ndarray, length: int) -> np.ndarray:
    if len(z) >= length:
        return z[:length]
    return np.pad(z, (0, length - len(z)))


def _rate_fraction(sr_low: float, sr: int) -> Fraction:
    return Fraction(sr_low / sr).limit_denominator(1000)


def _fft_down_up(z: np.ndarray, sr_low: float, sr: int) -> np.ndarray:
    # FFT resampling of the whole utterance down to sr_low and back, as the authors did.
    # Deviation: zero-padded to an FFT-friendly length first. The authors resampled the
    # unpadded length, which often has a large prime factor (about 10x slower); on VCTK
    # speech the two differ by under 3e-4 (-66 dB re. peak), mostly near the ends.
    frac = _rate_fraction(sr_low, sr)
    k = scipy.fft.next_fast_len(-(-len(z) // frac.denominator), real=True)
    z = np.pad(z, (0, k * frac.denominator - len(z)))
    low = scipy.signal.resample(z, k * frac.numerator)
    return scipy.signal.resample(low, len(z))


def _poly_down_up(z: np.ndarray, sr_low: float, sr: int) -> np.ndarray:
    frac = _rate_fraction(sr_low, sr)
    low = scipy.signal.resample_poly(z, frac.numerator, frac.denominator)
    return scipy.signal.resample_poly(low, frac.denominator, frac.numerator)


def _soxr_down_up(z: np.ndarray, sr_low: float, sr: int, quality="VHQ") -> np.ndarray:
    low = soxr.resample(z, sr, sr_low, quality=quality)
    return soxr.resample(low, sr_low, sr, quality=quality)


def _random_filter(rng: np.random.Generator, cutoff: float, sr: int) -> np.ndarray:
    family = str(rng.choice(["cheby1", "butter", "bessel", "ellip"]))
    order = int(rng.integers(2, 11))
    ripple_db = rng.uniform(0.05, 1.0)
    stop_db = rng.uniform(40.0, 80.0)
    kwargs = dict(btype="low", output="sos", fs=sr)
    if family == "cheby1":
        return scipy.signal.cheby1(order, ripple_db, cutoff, **kwargs)
    if family == "ellip":
        return scipy.signal.ellip(order, ripple_db, stop_db, cutoff, **kwargs)
    if family == "bessel":
        # norm="mag": -3 dB at the cutoff, like the other families.
        return scipy.signal.bessel(order, cutoff, norm="mag", **kwargs)
    return scipy.signal.butter(order, cutoff, **kwargs)


def simulate_lowres(
    y: np.ndarray,
    sr_low: float,
    protocol: str,
    rng: np.random.Generator | None = None,
    sr: int = utils.SAMPLING_RATE,
) -> np.ndarray:
    """Makes the low-resolution input: content above sr_low / 2 removed, back at rate sr.

    Protocols:
        "authors": Chebyshev I low-pass (order 8, 0.1 dB ripple, cutoff sr_low / 2) applied
            causally, FFT resampling down to sr_low and back up (SPEC §4).
        "random": random family (Chebyshev I, Butterworth, Bessel, elliptic), order 2-10,
            ripple 0.05-1 dB, elliptic stopband 40-80 dB, causal or zero-phase, then FFT,
            polyphase or soxr resampling, all drawn from rng (NU-Wave 2 / AudioLBM recipe).
        "nuwave2": Chebyshev I (order 8, 0.05 dB ripple) zero-phase, polyphase resampling.
        "sinc": soxr VHQ down and up (AP-BWE's band-limited sinc resampling).
        "stft": STFT (n_fft 2048, hop 512, Hann), bins at or above the cutoff zeroed,
            inverse STFT (ssr_eval's hard low-pass).

    Args:
        y: [T] float waveform at rate sr.
        sr_low: the low sampling rate in Hz (0 < sr_low <= sr); the cutoff is sr_low / 2.
        protocol: one of PROTOCOLS.
        rng: numpy Generator, used by "random" only (a fresh unseeded one when None).
        sr: rate of y in Hz.
    Returns:
        float32 [T], the same length as y.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"unknown low-resolution protocol {protocol!r}, use {PROTOCOLS}"
        )
    if not 0 < sr_low <= sr:
        raise ValueError(f"sr_low must be in (0, {sr}], not {sr_low}")
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"simulate_lowres expects a 1-D waveform, not shape {y.shape}")
    if sr_low == sr:
        return y.astype(np.float32)
    cutoff = sr_low / 2
    if protocol == "authors":
        # Second-order sections, where the authors used (b, a) with lfilter: identical to
        # 5e-9 at the cutoffs used here, but (b, a) breaks down at lower cutoffs.
        sos = scipy.signal.cheby1(8, 0.1, cutoff, btype="low", output="sos", fs=sr)
        z = _fft_down_up(scipy.signal.sosfilt(sos, y), sr_low, sr)
    elif protocol == "random":
        rng = np.random.default_rng() if rng is None else rng
        sos = _random_filter(rng, cutoff, sr)
        if rng.random() < 0.5:
            z = scipy.signal.sosfiltfilt(sos, y)
        else:
            z = scipy.signal.sosfilt(sos, y)
        resampler = str(rng.choice(["fft", "poly", "soxr"]))
        if resampler == "fft":
            z = _fft_down_up(z, sr_low, sr)
        elif resampler == "poly":
            z = _poly_down_up(z, sr_low, sr)
        else:
            z = _soxr_down_up(z, sr_low, sr, quality=str(rng.choice(["HQ", "VHQ"])))
    elif protocol == "nuwave2":
        sos = scipy.signal.cheby1(8, 0.05, cutoff, btype="low", output="sos", fs=sr)
        z = _poly_down_up(scipy.signal.sosfiltfilt(sos, y), sr_low, sr)
    elif protocol == "sinc":
        z = _soxr_down_up(y, sr_low, sr)
    else:
        n_fft, hop = 2048, 512
        stft_kw = dict(fs=sr, window="hann", nperseg=n_fft, noverlap=n_fft - hop)
        freqs, _, spec = scipy.signal.stft(y, **stft_kw)
        spec[freqs >= cutoff] = 0
        z = scipy.signal.istft(spec, **stft_kw)[1]
    return _fit_length(z, len(y)).astype(np.float32)


def list_audio_files(root: str, spec: str) -> list[str]:
    """The audio files of a corpus, as paths root/relative.

    Args:
        root: corpus root folder.
        spec: either a .txt file list (one path relative to root per line; blank lines and
            lines starting with "#" are skipped; the .txt itself is looked up as given, then
            under root) or a folder relative to root, searched recursively for files ending
            in one of AUDIO_EXTENSIONS (sorted).
    Returns:
        List of paths. Raises ValueError when the spec is missing, lists missing files, or
        yields no file.
    """
    if spec.endswith(".txt"):
        list_path = spec if os.path.isfile(spec) else os.path.join(root, spec)
        if not os.path.isfile(list_path):
            raise ValueError(f"file list not found: {spec} (nor under {root})")
        with open(list_path) as f:
            names = [s.strip() for s in f if s.strip() and not s.startswith("#")]
        files = [os.path.join(root, name) for name in names]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise ValueError(
                f"{list_path}: {len(missing)} of {len(files)} listed files missing "
                f"under {root}, e.g. {missing[:3]}"
            )
    else:
        folder = os.path.join(root, spec)
        if not os.path.isdir(folder):
            raise ValueError(f"audio folder not found: {folder}")
        files = sorted(
            os.path.join(d, name)
            for d, _, names in os.walk(folder)
            for name in names
            if name.lower().endswith(AUDIO_EXTENSIONS)
        )
    if not files:
        raise ValueError(f"no audio files in {spec} under {root}")
    return files


class _AudioCache:
    """Decoded 48 kHz mono audio kept in memory up to a byte budget (one per worker process)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self.items = {}

    def get(self, path: str) -> np.ndarray:
        if path in self.items:
            return self.items[path]
        y = to_48k_mono(path)
        if self.used + y.nbytes <= self.max_bytes:
            self.items[path] = y
            self.used += y.nbytes
        return y


def peak_gains(levels, peak: float, name: str = "audio") -> np.ndarray:
    """The gains that bring each channel's peak to `peak`: the one level rule of training,
    validation, evaluation and inference.

    Silence: a clip with no sound in any channel has no level to bring anywhere and is an error;
    a silent channel beside others that have sound gets gain 1 (inference then writes it as
    silence).

    Args:
        levels: each channel's largest absolute sample, a number or [channels].
        peak: target peak level (cfg.audio.peak, as in training).
        name: what the clip is (a file name), for the error.
    Returns:
        float64 [channels] (or a 0-d array for a number).
    Raises:
        ValueError naming `name` when every level is 0.
    """
    levels = np.asarray(levels, dtype=np.float64)
    if not np.any(levels > 0):
        raise ValueError(
            f"{name}: silent clip (all samples zero), cannot peak-normalise"
        )
    return np.where(levels > 0, peak / np.where(levels > 0, levels, 1.0), 1.0)


def _peak_normalise(y: np.ndarray, peak: float, path: str) -> np.ndarray:
    # the gain in y's dtype, so that float32 audio stays float32
    return y * peak_gains(np.max(np.abs(y)), peak, path).astype(y.dtype)


class TrainDataset(torch.utils.data.Dataset):
    """Random aligned crops of (low-resolution input, 48 kHz target), SPEC §4.

    Every random draw of item `index` comes from a generator seeded with (seed, epoch, index),
    so batches are reproducible, a resumed run sees the same data, and DataLoader workers
    never share numbers. Call `set_epoch(epoch)` before iterating over each epoch; the epoch
    lives in shared memory, so persistent DataLoader workers see it too.

    Decoded 48 kHz audio is cached per process up to cache_mb. Non-persistent workers lose
    their cache at the end of each epoch; call `preload()` once in the main process so that
    workers forked afterwards share its cache instead.

    Args:
        files: audio paths (any rate, any channel count).
        cfg: the whole Config (reads audio.sampling_rate, audio.segment_size, audio.peak,
            data.ratios, data.lowres, data.random_gain_db).
        seed: base seed (non-negative int).
        cache_mb: per-process budget for decoded audio kept in memory.
    Items:
        (x, y): float32 tensors [1, segment_size], x the low-resolution input at 48 kHz.
    """

    def __init__(self, files, cfg, seed: int = 1234, cache_mb: int = 2048):
        if not files:
            raise ValueError("TrainDataset needs at least one file")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, not {seed}")
        self.files = list(files)
        self.cfg = cfg
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.cache = _AudioCache(cache_mb * 2**20)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose random draws __getitem__ makes (non-negative int)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, not {epoch}")
        self._epoch.fill_(epoch)

    def preload(self) -> None:
        """Decodes the files into this process's cache, until its budget is full."""
        for path in self.files:
            if self.cache.used >= self.cache.max_bytes:
                break
            self.cache.get(path)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        audio, data = self.cfg.audio, self.cfg.data
        rng = np.random.default_rng([self.seed, int(self._epoch), index])
        path = self.files[index]
        y = _peak_normalise(self.cache.get(path), audio.peak, path)
        ratio = int(rng.choice(data.ratios))
        if data.random_gain_db > 0:
            # Gain before the (linear) low-pass equals the same gain on both x and y.
            y = y * 10 ** (rng.uniform(-data.random_gain_db, data.random_gain_db) / 20)
        sr = audio.sampling_rate
        x = simulate_lowres(y, sr / ratio, data.lowres, rng=rng, sr=sr)
        size = audio.segment_size
        if len(y) >= 3 * size:
            # VCTK 0.80 clips start and end with long silences; skip one segment at each end.
            start = int(rng.integers(size, len(y) - 2 * size + 1))
        elif len(y) >= size:
            start = int(rng.integers(0, len(y) - size + 1))
        else:
            start = 0
        x = _fit_length(x[start : start + size], size)
        y = _fit_length(y[start : start + size].astype(np.float32), size)
        return torch.from_numpy(x)[None], torch.from_numpy(y)[None]


class ValidDataset(torch.utils.data.Dataset):
    """Whole utterances, one item per (file, ratio in cfg.data.valid_ratios), deterministic.

    The target is peak-normalised like training data; the input is made with the "authors"
    protocol; both are zero-padded at the end to a multiple of cfg.model.hop samples (what the
    generator takes).

    Args:
        files: audio paths.
        cfg: the whole Config (reads audio.sampling_rate, audio.peak, data.valid_ratios and
            the model's hop).
        cache_mb: per-process budget for decoded audio kept in memory.
    Items:
        (x, y, ratio, name): x, y float32 tensors [1, T] with T % cfg.model.hop == 0; ratio
        int; name the file name without extension.
    """

    def __init__(self, files, cfg, cache_mb: int = 512):
        if not files:
            raise ValueError("ValidDataset needs at least one file")
        self.items = [(path, int(r)) for path in files for r in cfg.data.valid_ratios]
        self.cfg = cfg
        self.cache = _AudioCache(cache_mb * 2**20)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, ratio = self.items[index]
        sr = self.cfg.audio.sampling_rate
        y = _peak_normalise(self.cache.get(path), self.cfg.audio.peak, path)
        x = simulate_lowres(y, sr / ratio, "authors", sr=sr)
        hop = self.cfg.model.hop
        length = -(-len(y) // hop) * hop
        x = _fit_length(x, length)
        y = _fit_length(y.astype(np.float32), length)
        name = os.path.splitext(os.path.basename(path))[0]
        return torch.from_numpy(x)[None], torch.from_numpy(y)[None], ratio, name


def read_speakers(split: str, subset: str) -> list[str]:
    """The speaker IDs of a VCTK split shipped in filelists/ (see filelists/README.md).

    Args:
        split: "kuleshov" or "common".
        subset: "train", "valid" (kuleshov) or "test" (common).
    Returns:
        Speaker IDs such as "p225", in file order.
    """
    if split not in VCTK_SPLITS or subset not in VCTK_SPLITS[split]:
        raise ValueError(f"unknown VCTK split {split!r}/{subset!r}, use {VCTK_SPLITS}")
    path = os.path.join(FILELISTS_DIR, f"speakers_{split}_{subset}.txt")
    with open(path) as f:
        return [s.strip() for s in f if s.strip() and not s.startswith("#")]


def write_vctk_filelists(
    root: str, layout: str, split: str, out_dir: str, allow_missing: bool = False
) -> dict[str, str]:
    """Scans a VCTK corpus on disk and writes one file list per subset of a speaker split.

    Args:
        root: corpus root (holding wav48/ for vctk080, wav48_silence_trimmed/ for vctk092).
        layout: "vctk080" (pXXX/pXXX_NNN.wav) or "vctk092" (pXXX/pXXX_NNN_mic1.flac).
        split: "kuleshov" (train/valid) or "common" (train/test).
        out_dir: folder for <layout>_<split>_<subset>.txt, paths relative to root.
        allow_missing: write the lists even if some split speakers have no file on disk.
    Returns:
        {subset: written path}. Raises ValueError naming the speakers missing from disk
        unless allow_missing.
    """
    if layout not in VCTK_LAYOUTS:
        raise ValueError(f"unknown VCTK layout {layout!r}, use {list(VCTK_LAYOUTS)}")
    audio_dir, pattern = VCTK_LAYOUTS[layout]
    if not os.path.isdir(os.path.join(root, audio_dir)):
        raise ValueError(
            f"{root}: no {audio_dir}/ folder, is this the {layout} layout?"
        )
    subsets = {s: read_speakers(split, s) for s in VCTK_SPLITS[split]}
    found, missing = {}, []
    for subset, speakers in subsets.items():
        found[subset] = []
        for spk in speakers:
            folder = os.path.join(root, audio_dir, spk)
            names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            names = [n for n in names if pattern.match(n) and n.startswith(spk + "_")]
            if not names:
                missing.append(spk)
            found[subset] += [f"{audio_dir}/{spk}/{n}" for n in names]
    if missing and not allow_missing:
        raise ValueError(
            f"{len(missing)} speakers of the {split} split have no {layout} files "
            f"under {root}: {' '.join(missing)} (pass --allow_missing to write the "
            "lists anyway)"
        )
    if missing:
        print(
            f"warning: speakers missing from disk: {' '.join(missing)}",
            file=sys.stderr,
        )
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for subset, paths in found.items():
        written[subset] = os.path.join(out_dir, f"{layout}_{split}_{subset}.txt")
        with open(written[subset], "w") as f:
            f.write("".join(p + "\n" for p in paths))
        n_spk = len(subsets[subset]) - len(set(subsets[subset]) & set(missing))
        print(f"{written[subset]}: {len(paths)} files, {n_spk} speakers")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fl = sub.add_parser("filelists", help="write VCTK train/valid/test file lists")
    fl.add_argument("--root", required=True, help="VCTK corpus root")
    fl.add_argument("--layout", required=True, choices=list(VCTK_LAYOUTS))
    fl.add_argument("--split", required=True, choices=list(VCTK_SPLITS))
    fl.add_argument("--out", default="filelists", help="output folder")
    fl.add_argument("--allow_missing", action="store_true")
    a = parser.parse_args(argv)
    try:
        write_vctk_filelists(a.root, a.layout, a.split, a.out, a.allow_missing)
    except ValueError as e:
        utils.print_error(e)
        sys.exit(1)


if __name__ == "__main__":
    main()
