"""Config loading, atomic checkpoint I/O, seeding and plots: the helpers every script shares.

The config is `cfgs.json` read once into frozen nested dataclasses. Every key must be present
and known: a typo stops the run with its dotted name instead of silently creating a new value.
"""

import contextlib
import ctypes
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import pickle
import random
import re
import socket
import sys
import tempfile
import typing
from dataclasses import dataclass

import numpy as np
import torch


# The model's one sampling rate in Hz: its input and output, and audio.sampling_rate (which may
# only be this) all mean it.
SAMPLING_RATE = 48000
# Value rules for check_ranges: (test, what a value must be). Every value must also be finite.
POSITIVE = (lambda v: v > 0, "positive")
NON_NEGATIVE = (lambda v: v >= 0, "at least 0")
POSITIVE_ODD = (lambda v: v > 0 and v % 2 == 1, "positive and odd")
FRACTION = (lambda v: 0 < v <= 1, "in (0, 1]")
ADAM_BETA = (lambda v: 0 <= v < 1, "in [0, 1)")


def check_ranges(section: str, config, rules: dict) -> None:
    """Checks fields of a config section against rules, as __post_init__ does.

    Args:
        section: the section's name in cfgs.json, for the message ("train").
        config: the section's dataclass.
        rules: field name -> (test, description); a tuple field must be non-empty and every
            item must pass.
    Raises:
        ValueError naming the dotted key, e.g. "audio.peak must be in (0, 1], not 0.0".
    """
    for name, (test, what) in rules.items():
        value = getattr(config, name)
        items = value if isinstance(value, tuple) else (value,)
        if not items or not all(math.isfinite(v) and test(v) for v in items):
            shown = list(value) if isinstance(value, tuple) else value
            each = "a non-empty list, each " if isinstance(value, tuple) else ""
            raise ValueError(f"{section}.{name} must be {each}{what}, not {shown!r}")


@dataclass(frozen=True)
class DataConfig:
    root: str  # corpus root; file lists are relative to it
    train_files: str  # a .txt file list or a folder, relative to root
    valid_files: str
    lowres: str  # "authors" (SPEC §4, faithful) or "random" (robust recipe)
    ratios: tuple[int, ...]  # upsampling ratios drawn per training example
    valid_ratios: tuple[int, ...]
    random_gain_db: float  # +- range of a random gain after peak normalisation; 0 = off
    num_workers: int

    def __post_init__(self):
        if self.lowres not in ("authors", "random"):
            raise ValueError(
                f"data.lowres must be 'authors' or 'random', not {self.lowres!r}"
            )
        for name in ("ratios", "valid_ratios"):
            ratios = getattr(self, name)
            if not ratios or any(r < 1 or SAMPLING_RATE % r for r in ratios):
                raise ValueError(
                    f"data.{name} must be divisors of {SAMPLING_RATE}, not {list(ratios)}"
                )
        check_ranges(
            "data", self, {"random_gain_db": NON_NEGATIVE, "num_workers": NON_NEGATIVE}
        )


@dataclass(frozen=True)
class AudioConfig:
    sampling_rate: int
    segment_size: int  # training crop, in samples at sampling_rate
    peak: float  # peak normalisation target

    def __post_init__(self):
        if self.sampling_rate != SAMPLING_RATE:
            raise ValueError(
                f"audio.sampling_rate must be {SAMPLING_RATE}, not {self.sampling_rate}"
            )
        # Whole frames of the model's hop: checked by Config, which knows the model.
        check_ranges("audio", self, {"segment_size": POSITIVE, "peak": FRACTION})


@dataclass(frozen=True)
class ModelConfig:
    channels: tuple[
        int, ...
    ]  # encoder widths; the decoder halves back down to channels[0] // 2
    down_kernel: int
    bottleneck_kernel: int
    up_kernels: tuple[int, ...]  # one transposed-conv kernel per decoder stage
    resblock_kernel: int
    resblock_dilations: tuple[int, ...]
    head_kernel: int
    n_mamba_down: int
    n_mamba_bottleneck: int
    n_mamba_up: int
    d_state: int
    d_conv: int
    expand: int

    def __post_init__(self):
        check_ranges(
            "model",
            self,
            {
                "channels": POSITIVE,
                "down_kernel": POSITIVE,
                "bottleneck_kernel": POSITIVE,
                # stride 2 with padding (k - 2) / 2 doubles the length exactly
                "up_kernels": (lambda k: k >= 2 and k % 2 == 0, "even and at least 2"),
                "resblock_kernel": POSITIVE_ODD,  # odd: "same" padding keeps the length
                "resblock_dilations": POSITIVE,
                "head_kernel": POSITIVE_ODD,
                "n_mamba_down": NON_NEGATIVE,
                "n_mamba_bottleneck": NON_NEGATIVE,
                "n_mamba_up": NON_NEGATIVE,
                "d_state": POSITIVE,
                "d_conv": POSITIVE,
                "expand": POSITIVE,
            },
        )
        if len(self.up_kernels) != len(self.channels):
            raise ValueError(
                f"model.up_kernels needs one kernel per stage ({len(self.channels)}), "
                f"not {list(self.up_kernels)}"
            )
        if self.channels[0] < 2:
            raise ValueError(
                "model.channels[0] must be at least 2 (the decoder ends at "
                f"channels[0] // 2 channels), not {list(self.channels)}"
            )

    @property
    def hop(self) -> int:
        """The model's hop: its input length must be a multiple of it (see unet_hop)."""
        return unet_hop(self.channels)


def unet_hop(channels) -> int:
    """Input samples per bottleneck frame of a generator with these encoder widths.

    Each of the len(channels) encoder stages halves the length, so an input must be a
    multiple of 2 ** len(channels) samples (16 for the paper's four stages).
    """
    return 2 ** len(channels)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int  # global batch, split over processes
    learning_rate: float
    adam_b1: float
    adam_b2: float
    weight_decay: float
    warmup_epochs: int
    warmup_start_factor: float
    lr_decay: float  # per-epoch factor after warm-up
    grad_clip_g: float
    grad_clip_d: float
    epochs: int
    generator_warmup_steps: int  # steps on reconstruction losses only, before the GAN
    discriminator_warmup_steps: int  # steps training only the discriminators, first
    zero_head_nyquist: bool  # hold the head's gain at 24 kHz at zero (models.zero_head_nyquist)
    seed: int
    stdout_interval: int
    summary_interval: int
    validation_interval: int
    checkpoint_interval: int
    keep_checkpoints: int
    early_stop_patience: int  # validations without improvement before stopping

    def __post_init__(self):
        if self.generator_warmup_steps > 0 and self.discriminator_warmup_steps > 0:
            raise ValueError(
                "train.generator_warmup_steps and train.discriminator_warmup_steps "
                "cannot both be set: one warms up a new generator, the other new "
                "discriminators for a trained one"
            )
        check_ranges(
            "train",
            self,
            {
                "batch_size": POSITIVE,
                "learning_rate": POSITIVE,
                "adam_b1": ADAM_BETA,
                "adam_b2": ADAM_BETA,
                "weight_decay": NON_NEGATIVE,
                "warmup_epochs": NON_NEGATIVE,
                "warmup_start_factor": FRACTION,
                "lr_decay": FRACTION,
                "grad_clip_g": POSITIVE,
                "grad_clip_d": POSITIVE,
                "epochs": POSITIVE,
                "generator_warmup_steps": NON_NEGATIVE,
                "discriminator_warmup_steps": NON_NEGATIVE,
                # NumPy seeds are unsigned 32-bit
                "seed": (lambda v: 0 <= v < 2**32, "in [0, 2 ** 32)"),
                "stdout_interval": POSITIVE,
                "summary_interval": POSITIVE,
                "validation_interval": POSITIVE,
                "checkpoint_interval": POSITIVE,
                "keep_checkpoints": POSITIVE,
                "early_stop_patience": NON_NEGATIVE,
            },
        )


@dataclass(frozen=True)
class LossConfig:
    lambda_adv: float
    lambda_mrstft: float
    lambda_mel: float
    lambda_fm: float
    stft_fft_sizes: tuple[int, ...]
    stft_hop_sizes: tuple[int, ...]
    stft_n_mels: int
    mel_n_fft: int
    mel_hop_size: int
    mel_win_size: int
    mel_n_mels: int
    mel_fmin: float
    mel_fmax: float

    def __post_init__(self):
        if len(self.stft_fft_sizes) != len(self.stft_hop_sizes):
            raise ValueError(
                "loss.stft_fft_sizes and loss.stft_hop_sizes differ in length"
            )
        check_ranges(
            "loss",
            self,
            {
                "lambda_adv": NON_NEGATIVE,
                "lambda_mrstft": NON_NEGATIVE,
                "lambda_mel": NON_NEGATIVE,
                "lambda_fm": NON_NEGATIVE,
                "stft_fft_sizes": POSITIVE,
                "stft_hop_sizes": POSITIVE,
                "stft_n_mels": POSITIVE,
                "mel_n_fft": POSITIVE,
                "mel_hop_size": POSITIVE,
                "mel_win_size": POSITIVE,
                "mel_n_mels": POSITIVE,
                "mel_fmin": NON_NEGATIVE,
                "mel_fmax": POSITIVE,
            },
        )
        if self.mel_win_size > self.mel_n_fft:
            raise ValueError(
                f"loss.mel_win_size ({self.mel_win_size}) must be at most "
                f"loss.mel_n_fft ({self.mel_n_fft})"
            )
        if self.mel_fmax <= self.mel_fmin:
            raise ValueError(
                f"loss.mel_fmax ({self.mel_fmax}) must be above loss.mel_fmin "
                f"({self.mel_fmin})"
            )


@dataclass(frozen=True)
class Config:
    data: DataConfig
    audio: AudioConfig
    model: ModelConfig
    train: TrainConfig
    loss: LossConfig

    def __post_init__(self):
        segment, hop = self.audio.segment_size, self.model.hop
        if segment % hop:
            raise ValueError(
                f"audio.segment_size must be a multiple of the model's hop "
                f"2 ** len(model.channels) = {hop}, not {segment}"
            )
        loss = self.loss
        window = max(loss.stft_fft_sizes + (loss.mel_n_fft, loss.mel_win_size))
        if segment < window:
            raise ValueError(
                f"audio.segment_size ({segment}) is shorter than the longest loss window "
                f"({window}, from loss.stft_fft_sizes, loss.mel_n_fft, loss.mel_win_size)"
            )
        if loss.mel_fmax > self.audio.sampling_rate / 2:
            raise ValueError(
                f"loss.mel_fmax ({loss.mel_fmax}) must be at most the Nyquist frequency "
                f"audio.sampling_rate / 2 ({self.audio.sampling_rate / 2:g})"
            )


def _convert(value, annotation, key: str, source: str):
    """Checks one JSON value against a field's type; ints pass for floats, lists become tuples."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: '{key}' must be a list, not {value!r}")
        return tuple(_convert(v, item_type, key, source) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, annotation) or (
        annotation is int and isinstance(value, bool)
    ):
        raise ValueError(
            f"{source}: '{key}' must be {annotation.__name__}, not {value!r}"
        )
    return value


def _build(cls, values: dict, prefix: str, source: str):
    if not isinstance(values, dict):
        raise ValueError(f"{source}: '{prefix.rstrip('.')}' must be an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ValueError(f"{source}: unknown key '{prefix}{key}'")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name in fields:
        if name not in values:
            raise ValueError(f"{source}: missing key '{prefix}{name}'")
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], values[name], f"{prefix}{name}.", source)
        else:
            kwargs[name] = _convert(values[name], hints[name], prefix + name, source)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_from_dict(values: dict, source: str = "config") -> Config:
    """Builds a Config from a plain dict, rejecting unknown, missing and mistyped keys.

    Args:
        values: nested dict with the sections of cfgs.json.
        source: name used in error messages (usually the file).
    Returns:
        The frozen Config.
    """
    return _build(Config, values, "", source)


def config_from_checkpoint(values: dict, source: str) -> Config:
    """The Config stored in a checkpoint; keys added to cfgs.json since it was written take
    the repository's values (they cannot have mattered to it: its code had no such key)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cfgs.json")) as f:
        current = json.load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{source}: the config is not a dict")
    merged = dict(current)
    for section, keys in values.items():
        if isinstance(keys, dict) and isinstance(current.get(section), dict):
            merged[section] = {**current[section], **keys}
        else:
            merged[section] = keys
    return config_from_dict(merged, source)


def config_to_dict(cfg: Config) -> dict:
    """The plain-JSON form of a Config (tuples become lists), as stored in checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_overrides(values: dict, overrides, source: str) -> dict:
    """Applies "section.key=value" strings (value parsed as JSON, else taken as a string)."""
    values = json.loads(json.dumps(values))
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2:
            raise ValueError(
                f"override must look like 'section.key=value', not {item!r}"
            )
        section, name = parts
        if section not in values or name not in values[section]:
            raise ValueError(f"{source}: unknown key '{key}' in override {item!r}")
        try:
            values[section][name] = json.loads(raw)
        except json.JSONDecodeError:
            values[section][name] = raw
    return values


def load_config(path: str, overrides=()) -> Config:
    """Reads a JSON config and applies command-line overrides.

    Args:
        path: the JSON file, e.g. "cfgs.json".
        overrides: strings "section.key=value", e.g. "train.batch_size=4".
    Returns:
        The frozen Config. Raises ValueError naming the file and the dotted key on any problem.
    """
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(apply_overrides(values, overrides, path), path)


def _machine_prefix() -> str:
    # atomic_path's temporaries are named .tmp_<host>_<pid>_*: a later run can tell those
    # of a killed writer from those still being written.
    return f".tmp_{socket.gethostname()}_"


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path` that replaces `path` only if the block succeeds.

    A killed process therefore never leaves a half-written checkpoint or audio file, only a
    hidden `.tmp_<host>_<pid>_*` file, which remove_stale_temporaries deletes later. The
    temporary name keeps the suffix of `path`, so format detection by extension still works.
    """
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    prefix = f"{_machine_prefix()}{os.getpid()}_"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.close(fd)
    # mkstemp makes 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def remove_stale_temporaries(directory: str) -> list[str]:
    """Deletes the temporaries that killed atomic_path writers left in `directory`.

    Only files named by atomic_path on this machine whose process no longer exists are
    removed: a write in progress (here or on another machine sharing the folder) is kept.

    Returns:
        The paths removed.
    """
    machine = _machine_prefix()
    try:
        names = [name for name in os.listdir(directory) if name.startswith(machine)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(directory, name)
        pid, _, rest = name[len(machine) :].partition("_")
        ours = pid.isdigit() and rest and os.path.isfile(path)
        if ours and not _process_exists(int(pid)):
            try:
                os.remove(path)
            except OSError:
                continue
            removed.append(path)
    return removed


def save_checkpoint(path: str, obj: dict) -> None:
    """torch.save, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load of one of our checkpoints, restricted to tensors and plain Python values.

    weights_only=True: unpickling anything else (a class, a function) could run code hidden in
    the file, so such a file is refused rather than loaded.

    Raises:
        ValueError: one line, if the file is missing, unreadable or holds more than weights.
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # The weights-only unpickler names the class or function it would have had to import.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and found:
            raise ValueError(
                f"refusing to load {path}: it holds {found.group(1)}, not only tensors and "
                "plain values, and unpickling it could run code"
            ) from None
        reason = str(e).split("WeightsUnpickler error:")[-1].split("Check the doc")[0]
        reason = " ".join(reason.split()) or f"{type(e).__name__}, empty or truncated"
        raise ValueError(f"cannot read checkpoint {path}: {reason}") from None


def _numbered_checkpoints(directory: str, prefix: str) -> list[str]:
    pattern = re.compile(re.escape(prefix) + r"\d{8}$")
    paths = glob.glob(os.path.join(glob.escape(directory), prefix + "*"))
    return sorted(p for p in paths if pattern.match(os.path.basename(p)))


def checkpoint_steps(directory: str, prefix: str) -> list[int]:
    """The step numbers of the `prefix########` checkpoints in `directory`, ascending."""
    return [
        int(os.path.basename(path)[len(prefix) :])
        for path in _numbered_checkpoints(directory, prefix)
    ]


def scan_checkpoint(directory: str, prefix: str) -> str | None:
    """The newest `prefix########` checkpoint in `directory` (by step number), or None."""
    found = _numbered_checkpoints(directory, prefix)
    return found[-1] if found else None


def prune_checkpoints(directory: str, prefix: str, keep: int) -> None:
    """Deletes all but the newest `keep` numbered checkpoints with this prefix."""
    found = _numbered_checkpoints(directory, prefix)
    for path in found[: max(len(found) - keep, 0)]:
        os.remove(path)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sha256_file(path: str) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def one_line(error) -> str:
    """An exception's (or a message's) text on one line; an empty one gives its type's name."""
    return " ".join(str(error).split()) or type(error).__name__


def print_error(error, program: str | None = None) -> None:
    """The scripts' one-line error on stderr: "[program: ]error: <message on one line>"."""
    prefix = f"{program}: " if program else ""
    print(f"{prefix}error: {one_line(error)}", file=sys.stderr)


@functools.cache
def _glibc():
    # the C library when it is glibc (it has mallopt and malloc_trim), else None
    libc = ctypes.CDLL(None)
    has_both = hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")
    return libc if has_both else None


def keep_freed_memory() -> None:
    """Lets glibc reuse freed blocks of any size up to 1 GB instead of unmapping them.

    By default glibc serves every block over 32 MB from a fresh mmap and unmaps it when it is
    freed, so each layer of the generator on a long input page-faults its whole output in
    again (about 50 ms for 61 MB here): the generator on 10 s of audio ran 1.2x faster with
    this (bench_model), at the same peak memory. release_free_memory still trims on request.
    """
    libc = _glibc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)


def release_free_memory() -> None:
    """Hands the memory freed by a block's tensors back to the system (glibc only).

    glibc keeps freed memory for reuse, and blocks whose buffers differ a little in size
    fragment it: without this a 10-minute file peaked at 1.21 GB against a 1-minute file's
    0.96 GB (2 s blocks, measured); with it at 0.87 GB against 0.95 GB.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def pyplot():
    """matplotlib.pyplot on the Agg backend, which draws files without a display.

    Imported on first use, so that scripts which never plot do not pay matplotlib's start-up.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def power_db(signal, n_fft: int = 2048, hop_size: int = 512) -> np.ndarray:
    """The log power spectrogram that the figures show (train's TensorBoard, evaluate's plots).

    Args:
        signal: [T] float samples, numpy or torch.
        n_fft, hop_size: STFT size and hop (periodic Hann window, centred frames).
    Returns:
        float32 [n_fft // 2 + 1, frames]: 10 * log10(|X|^2), floored at -100 dB.
    """
    x = torch.as_tensor(np.asarray(signal, dtype=np.float32)).reshape(-1)
    window = torch.hann_window(n_fft)
    spec = torch.stft(x, n_fft, hop_size, window=window, return_complex=True)
    return (10 * torch.log10(spec.abs().square().clamp(min=1e-10))).numpy()


def plot_spectrogram(
    spectrogram: np.ndarray,
    ax=None,
    sampling_rate: int = SAMPLING_RATE,
    vmin=None,
    vmax=None,
):
    """Draws a [freq_bins, frames] log-magnitude array with a frequency axis in kHz.

    Args:
        spectrogram: [F, N] log magnitudes, bin 0 = 0 Hz, bin F-1 = sampling_rate / 2.
        ax: matplotlib axes to draw into; a new figure is made when None.
        sampling_rate: in Hz, for the frequency axis.
        vmin, vmax: colour range; pass the same values to compare several plots.
    Returns:
        The matplotlib Figure.
    """
    plt = pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 3))
    else:
        fig = ax.figure
    nyquist_khz = sampling_rate / 2000
    image = ax.imshow(
        spectrogram,
        aspect="auto",
        origin="lower",
        interpolation="none",
        extent=(0, spectrogram.shape[1], 0, nyquist_khz),
        vmin=vmin,
        vmax=vmax,
    )
    ax.set_ylabel("kHz")
    ax.set_xlabel("frame")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
