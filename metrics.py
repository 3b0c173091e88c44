"""Objective metrics for speech super-resolution: log-spectral distance, SNR and SI-SDR.

LSD follows SPEC §7. The "field" variant is the one NU-Wave 2, AP-BWE, AERO and UDM+ report:
STFT with n_fft 2048, hop 512, periodic Hann window, centred frames (torch.stft center=True with
its default pad_mode="reflect"), power |X|^2 clamped below at 1e-8, log10, root mean square over
frequency bins per frame, mean over frames. The "authors" variant reproduces
infected4098/Wave-U-Mamba's inference.py (MIT): uncentred frames and log10(|X|^2 + 1e-10).
The mean over utterances is left to the caller.
"""

import numpy as np
import torch

from utils import SAMPLING_RATE

N_FFT = 2048
HOP_SIZE = 512
VARIANTS = ("field", "authors")


def _as_signal(x, name: str) -> torch.Tensor:
    # Accept [T], [1, T] or [1, 1, T] so validation code can pass model tensors unsqueezed.
    x = torch.as_tensor(x)
    if x.ndim == 0 or x.numel() != x.shape[-1]:
        raise ValueError(f"{name} must be a 1-D signal, got shape {tuple(x.shape)}")
    return x.reshape(-1).to(torch.float32)


def _pair(y, y_hat) -> tuple[torch.Tensor, torch.Tensor]:
    y = _as_signal(y, "y")
    y_hat = _as_signal(y_hat, "y_hat").to(y.device)
    # Other systems' outputs often differ by a few samples of padding; compare the common part.
    n = min(len(y), len(y_hat))
    if n == 0:
        raise ValueError("y and y_hat must be non-empty")
    return y[:n], y_hat[:n]


def _log_power(x: torch.Tensor, variant: str) -> torch.Tensor:
    # x [T] -> log10 power [n_fft // 2 + 1, frames]
    window = torch.hann_window(N_FFT, device=x.device, dtype=x.dtype)
    centre = variant == "field"
    spec = torch.stft(
        x, N_FFT, HOP_SIZE, window=window, center=centre, return_complex=True
    )
    power = spec.real.square() + spec.imag.square()
    if centre:
        return torch.log10(power.clamp(min=1e-8))
    return torch.log10(power + 1e-10)


def lsd(
    y,
    y_hat,
    sr: int = SAMPLING_RATE,
    cutoff_hz: float | None = None,
    variant: str = "field",
) -> dict:
    """Log-spectral distance of one utterance (SPEC §7), computed in float32.

    Signals of different lengths are trimmed to the shorter one.

    Args:
        y: reference waveform, numpy array or tensor [T] (or [1, T], [1, 1, T]).
        y_hat: estimate, same layout as y.
        sr: sampling rate in Hz; only used to place cutoff_hz on the frequency bins.
        cutoff_hz: Nyquist frequency of the low-resolution input, in Hz, 0 < cutoff_hz < sr / 2.
            Bin k (at k * sr / 2048 Hz) is low band when its frequency is <= cutoff_hz and high
            band when it is > cutoff_hz, so a bin exactly at the cut-off counts as low band.
        variant: "field" (centred frames, power clamped at 1e-8) or "authors" (uncentred frames,
            power + 1e-10).

    Returns:
        {"lsd": float} and, when cutoff_hz is given, also "lsd_hf" and "lsd_lf" (floats).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown LSD variant {variant!r}, expected one of {VARIANTS}")
    y, y_hat = _pair(y, y_hat)
    min_len = N_FFT // 2 + 1 if variant == "field" else N_FFT
    if len(y) < min_len:
        raise ValueError(f"LSD needs at least {min_len} samples, got {len(y)}")
    diff = (_log_power(y, variant) - _log_power(y_hat, variant)).square()
    # diff [freq, frames]: RMS over frequency per frame, then mean over frames.
    out = {"lsd": diff.mean(dim=0).sqrt().mean().item()}
    if cutoff_hz is not None:
        if not 0 < cutoff_hz < sr / 2:
            raise ValueError(f"cutoff_hz must be in (0, {sr / 2}), got {cutoff_hz}")
        freqs = torch.arange(diff.shape[0], device=diff.device) * (sr / N_FFT)
        high = freqs > cutoff_hz
        out["lsd_hf"] = diff[high].mean(dim=0).sqrt().mean().item()
        out["lsd_lf"] = diff[~high].mean(dim=0).sqrt().mean().item()
    return out


def _energies(y, y_hat) -> tuple[np.ndarray, np.ndarray]:
    y, y_hat = _pair(y, y_hat)
    y = y.cpu().numpy().astype(np.float64)
    y_hat = y_hat.cpu().numpy().astype(np.float64)
    if not np.any(y):
        raise ValueError("reference y is silent; SNR and SI-SDR are undefined")
    return y, y_hat


def snr(y, y_hat) -> float:
    """Signal-to-noise ratio of y_hat against y, in dB (inf when they are equal).

    Args:
        y: reference waveform [T] (numpy or tensor); must not be all zeros.
        y_hat: estimate [T]; trimmed with y to the shorter length.

    Returns:
        10 * log10(sum(y^2) / sum((y - y_hat)^2)) in dB, accumulated in float64.
    """
    y, y_hat = _energies(y, y_hat)
    noise = np.sum((y - y_hat) ** 2)
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(np.sum(y**2) / noise))


def si_sdr(y, y_hat) -> float:
    """Scale-invariant signal-to-distortion ratio (Le Roux et al. 2019), in dB.

    The signals are not made zero-mean first (as torchmetrics' default, unlike asteroid's).

    Args:
        y: reference waveform [T] (numpy or tensor); must not be all zeros.
        y_hat: estimate [T]; trimmed with y to the shorter length.

    Returns:
        10 * log10(|a y|^2 / |a y - y_hat|^2) with a = <y_hat, y> / <y, y>, in dB, float64.
    """
    y, y_hat = _energies(y, y_hat)
    target = (np.dot(y_hat, y) / np.dot(y, y)) * y
    signal = np.sum(target**2)
    noise = np.sum((y_hat - target) ** 2)
    if signal == 0:
        return float("-inf")
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise))


# Spectral diagnostics: the long-term spectrum of the output against the reference's. LSD alone
# cannot tell a model that lowered it honestly from one that traded one artefact for another.
TONE_SPACING_HZ = 3000  # 48 kHz / 16: the tones a 16x down-sampling U-Net tends to leave
TONE_NEIGHBOURHOOD = 12  # bins each side whose median is a tone's background (281 Hz)


def long_term_spectrum(x) -> np.ndarray:
    """Mean power over STFT frames (n_fft 2048, hop 512, Hann, uncentred), float64 [1025]."""
    x = _as_signal(x, "x").to(torch.float64)
    if len(x) < N_FFT:
        raise ValueError(f"the long-term spectrum needs {N_FFT} samples, got {len(x)}")
    window = torch.hann_window(N_FFT, dtype=x.dtype)
    spec = torch.stft(x, N_FFT, HOP_SIZE, window=window, center=False, return_complex=True)
    return spec.abs().square().mean(dim=-1).numpy()


def _db(ratio: float) -> float:
    return float(10 * np.log10(max(ratio, 1e-30)))


def band_level_errors(
    y, y_hat, cutoff_hz: float, sr: int = SAMPLING_RATE
) -> list[float]:
    """Output over reference energy, in dB, per octave above cutoff_hz: (cutoff, 2 cutoff],
    (2 cutoff, 4 cutoff], ... Negative: too quiet. The last octave stops two bins below the
    Nyquist frequency, outside the Hann main lobe of a 24 kHz tone, which tone_excess covers."""
    y, y_hat = _pair(y, y_hat)
    ref, out = long_term_spectrum(y), long_term_spectrum(y_hat)
    freqs = np.arange(len(ref)) * sr / N_FFT
    errors, low = [], cutoff_hz
    while low < sr / 2:
        band = (freqs > low) & (freqs <= 2 * low) & (freqs < freqs[-2])
        errors.append(_db(out[band].sum() / max(ref[band].sum(), 1e-30)))
        low *= 2
    return errors


def _prominence_db(power: np.ndarray, k: int) -> float:
    # The bin's level over the median of its neighbourhood (the bins right beside it excluded:
    # a Hann window spreads a tone over three bins).
    lo, hi = max(k - TONE_NEIGHBOURHOOD, 0), min(k + TONE_NEIGHBOURHOOD + 1, len(power))
    around = np.r_[power[lo : max(k - 1, lo)], power[min(k + 2, hi) : hi]]
    return _db(power[k] / max(np.median(around), 1e-30))


def tone_excess(y, y_hat, sr: int = SAMPLING_RATE) -> dict:
    """How far the output's long-term spectrum rises above its own neighbourhood, minus the same
    for the reference, in dB: at the Nyquist bin ("tone_nyquist_db") and the largest over the
    multiples of 3 kHz below it ("tone_3k_db"); near 0 for a clean output. Also the output's
    level at the Nyquist bin over the reference's ("level_nyquist_db")."""
    y, y_hat = _pair(y, y_hat)
    ref, out = long_term_spectrum(y), long_term_spectrum(y_hat)
    nyquist = len(ref) - 1
    step = round(TONE_SPACING_HZ * N_FFT / sr)
    excess = [
        _prominence_db(out, k) - _prominence_db(ref, k) for k in range(step, nyquist, step)
    ]
    return {
        "tone_nyquist_db": _prominence_db(out, nyquist) - _prominence_db(ref, nyquist),
        "tone_3k_db": max(excess),
        "level_nyquist_db": _db(out[nyquist] / max(ref[nyquist], 1e-30)),
    }
