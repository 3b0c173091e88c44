"""Training losses: least-squares GAN, feature matching, the log-mel L1 loss and the A-weighted
multi-resolution mel-STFT loss.

The GAN losses and the mel spectrogram follow jik876/hifi-gan (MIT). The multi-resolution STFT
loss computes what auraloss's `MultiResolutionSTFTLoss` (csteinmetz1/auraloss, Apache-2.0)
computes with the authors' settings; it is written out here so that both signals share one
A-weighting convolution and one STFT per resolution, and a test checks it against auraloss.
"""

import librosa
import numpy as np
import scipy.fft
import scipy.signal
import torch
import torch.nn.functional as F
from torch import nn


def generator_adv_loss(d_fake: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN generator loss: sum over sub-discriminators of mean((1 - D(y_hat))^2).

    Args:
        d_fake: one score tensor per sub-discriminator, any shape.
    Returns:
        Scalar tensor.
    """
    return sum(torch.mean((1 - dg) ** 2) for dg in d_fake)


def discriminator_adv_loss(
    d_real: list[torch.Tensor], d_fake: list[torch.Tensor]
) -> torch.Tensor:
    """LSGAN discriminator loss: sum of mean((1 - D(y))^2) + mean(D(y_hat)^2).

    Args:
        d_real: scores on real audio, one tensor per sub-discriminator.
        d_fake: scores on the (detached) generator output, same layout.
    Returns:
        Scalar tensor.
    """
    return sum(
        torch.mean((1 - dr) ** 2) + torch.mean(dg**2) for dr, dg in zip(d_real, d_fake)
    )


def feature_matching_loss(
    fmap_real: list[list[torch.Tensor]], fmap_fake: list[list[torch.Tensor]]
) -> torch.Tensor:
    """HiFi-GAN feature matching: 2 * sum over all layers of mean |real - fake|.

    Args:
        fmap_real: per sub-discriminator, the list of its layer activations on y.
        fmap_fake: the same on y_hat.
    Returns:
        Scalar tensor.
    """
    loss = sum(
        torch.mean(torch.abs(rl - gl))
        for dr, dg in zip(fmap_real, fmap_fake)
        for rl, gl in zip(dr, dg)
    )
    return 2 * loss


class MelSpectrogram(nn.Module):
    """HiFi-GAN's log-mel spectrogram, the one mel function of the project.

    Args:
        n_fft: FFT size in samples.
        hop_size: hop in samples.
        win_size: Hann window length in samples.
        n_mels: number of mel bands (librosa Slaney mel filters).
        fmin, fmax: mel filter range in Hz.
        sampling_rate: in Hz.
    """

    def __init__(
        self,
        n_fft: int,
        hop_size: int,
        win_size: int,
        n_mels: int,
        fmin: float,
        fmax: float,
        sampling_rate: int,
    ):
        super().__init__()
        self.n_fft = n_fft
        self.hop_size = hop_size
        self.win_size = win_size
        mel_basis = librosa.filters.mel(
            sr=sampling_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax
        )
        # Not persistent: they are derived from the config and must not enter checkpoints.
        self.register_buffer(
            "mel_basis", torch.from_numpy(mel_basis).float(), persistent=False
        )
        self.register_buffer("window", torch.hann_window(win_size), persistent=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Log-mel spectrogram.

        Args:
            y: [B, T] or [B, 1, T] waveform.
        Returns:
            [B, n_mels, frames] natural-log mel magnitudes, frames = T // hop_size.
        """
        if y.dim() == 3:
            y = y.squeeze(1)
        pad = (self.n_fft - self.hop_size) // 2
        y = F.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            y,
            self.n_fft,
            hop_length=self.hop_size,
            win_length=self.win_size,
            window=self.window,
            center=False,
            return_complex=True,
        )
        # [B, n_fft // 2 + 1, frames]; the 1e-9 keeps the gradient of sqrt finite at zero.
        mag = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
        mel = torch.matmul(self.mel_basis, mag)
        return torch.log(torch.clamp(mel, min=1e-5))


class MelLoss(nn.Module):
    """L1 distance between the log-mel spectrograms of y_hat and y (unweighted).

    Args:
        loss_cfg: the config's loss section (mel_n_fft, mel_hop_size, mel_win_size, mel_n_mels,
            mel_fmin, mel_fmax).
        sampling_rate: in Hz.
    """

    def __init__(self, loss_cfg, sampling_rate: int):
        super().__init__()
        self.mel = MelSpectrogram(
            loss_cfg.mel_n_fft,
            loss_cfg.mel_hop_size,
            loss_cfg.mel_win_size,
            loss_cfg.mel_n_mels,
            loss_cfg.mel_fmin,
            loss_cfg.mel_fmax,
            sampling_rate,
        )

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # y_hat, y: [B, 1, T] or [B, T] -> scalar
        # Deviation: the authors computed this loss outside the autograd graph, so it never
        # trained anything; here it is differentiable, as in HiFi-GAN.
        return F.l1_loss(self.mel(y_hat), self.mel(y))


def a_weighting_fir(sampling_rate: int, ntaps: int = 101) -> np.ndarray:
    """A 101-tap linear-phase FIR fit to the A-weighting curve (IEC 61672), as auraloss builds it.

    The analog A-weighting filter is discretised with the bilinear transform, its response is
    sampled at 512 frequencies, and a least-squares FIR is fitted to that magnitude.

    Args:
        sampling_rate: in Hz.
        ntaps: odd number of taps.
    Returns:
        [ntaps] float64 taps.
    """
    # Pole frequencies (Hz) of the analog A-weighting curve and its gain at 1 kHz (dB).
    f1, f2, f3, f4, gain_1k_db = 20.598997, 107.65265, 737.86223, 12194.217, 1.9997
    w1, w2, w3, w4 = (2 * np.pi * f for f in (f1, f2, f3, f4))
    num = [w4**2 * 10 ** (gain_1k_db / 20), 0, 0, 0, 0]
    den = np.polymul([1, 2 * w4, w4**2], [1, 2 * w1, w1**2])
    den = np.polymul(np.polymul(den, [1, w3]), [1, w2])
    b, a = scipy.signal.bilinear(num, den, fs=sampling_rate)
    freqs, response = scipy.signal.freqz(b, a, worN=512, fs=sampling_rate)
    return scipy.signal.firls(ntaps, freqs, np.abs(response), fs=sampling_rate)


class MRSTFTLoss(nn.Module):
    """A-weighted multi-resolution mel-STFT loss (SPEC §3), unweighted.

    Both signals pass through the A-weighting FIR, then for each resolution (Hann window of
    the FFT size, centred reflect-padded frames) the magnitudes are projected onto mel bands;
    the loss is spectral convergence plus mean |log mel difference|, averaged over resolutions.
    Hand-written rather than wrapping auraloss, to be faster on CPU: the FIR runs as an FFT
    convolution (a 1-channel conv1d is slow on CPU, in backward most of all), and the target
    goes through no autograd graph. tests/test_losses.py checks it equals auraloss's
    MultiResolutionSTFTLoss(scale="mel", perceptual_weighting=True) called as
    loss(input=y_hat, target=y).

    Args:
        loss_cfg: the config's loss section (stft_fft_sizes, stft_hop_sizes, stft_n_mels).
        sampling_rate: in Hz.
    """

    def __init__(self, loss_cfg, sampling_rate: int):
        super().__init__()
        self.fft_sizes = tuple(loss_cfg.stft_fft_sizes)
        self.hop_sizes = tuple(loss_cfg.stft_hop_sizes)
        # float32 taps, as auraloss rounds them, so the two agree to float precision.
        fir = torch.tensor(a_weighting_fir(sampling_rate), dtype=torch.float32)
        self.register_buffer("fir", fir, persistent=False)
        for i, n_fft in enumerate(self.fft_sizes):
            fb = librosa.filters.mel(
                sr=sampling_rate, n_fft=n_fft, n_mels=loss_cfg.stft_n_mels
            )
            fb = torch.from_numpy(fb).float()
            self.register_buffer(f"mel_{i}", fb, persistent=False)
            window = torch.hann_window(n_fft)
            self.register_buffer(f"window_{i}", window, persistent=False)

    def _a_weight(self, y: torch.Tensor) -> torch.Tensor:
        # [B, T] -> [B, T]: what conv1d(y, fir, padding=ntaps // 2) computes (a
        # cross-correlation, hence the flip), done with FFTs.
        ntaps, length = self.fir.shape[-1], y.shape[-1]
        n = scipy.fft.next_fast_len(length + ntaps - 1)
        spec = torch.fft.rfft(y, n) * torch.fft.rfft(self.fir.flip(-1), n)
        full = torch.fft.irfft(spec, n)
        return full[..., ntaps // 2 : ntaps // 2 + length]

    def _mels(self, y: torch.Tensor) -> list[torch.Tensor]:
        # [B, T] -> per resolution [B, n_mels, frames]
        y = self._a_weight(y)
        mels = []
        for i, (n_fft, hop) in enumerate(zip(self.fft_sizes, self.hop_sizes)):
            spec = torch.stft(
                y,
                n_fft,
                hop_length=hop,
                window=getattr(self, f"window_{i}"),
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )
            mag = torch.sqrt(torch.clamp(spec.real**2 + spec.imag**2, min=1e-8))
            mels.append(torch.matmul(getattr(self, f"mel_{i}"), mag))
        return mels

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # y_hat, y: [B, 1, T] or [B, T] -> scalar
        # Deviation: the authors called auraloss as loss(y, y_hat), making the target the
        # "input"; spectral convergence then divides by the norm of the prediction. We pass
        # (input=y_hat, target=y) as auraloss intends.
        batch = y_hat.shape[0]
        mels_hat = self._mels(y_hat.reshape(batch, -1))
        with torch.no_grad():
            mels_ref = self._mels(y.reshape(batch, -1))
        loss = 0.0
        for mel_hat, mel_ref in zip(mels_hat, mels_ref):
            # Spectral convergence over the whole batch at once, as auraloss computes it.
            sc = torch.linalg.norm(mel_ref - mel_hat) / torch.linalg.norm(mel_ref)
            log_mag = F.l1_loss(torch.log(mel_hat), torch.log(mel_ref))
            loss = loss + sc + log_mag
        return loss / len(self.fft_sizes)
