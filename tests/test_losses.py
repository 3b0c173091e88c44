"""Tests for losses.py: GAN losses on hand-made scores, the mel spectrogram against a float64
numpy reference, and the MR-STFT loss against auraloss."""

import auraloss
import librosa
import numpy as np
import pytest
import scipy.signal
import torch

from losses import (
    MelLoss,
    MelSpectrogram,
    MRSTFTLoss,
    a_weighting_fir,
    discriminator_adv_loss,
    feature_matching_loss,
    generator_adv_loss,
)
from utils import load_config


@pytest.fixture(scope="module")
def loss_cfg():
    return load_config("cfgs.json").loss


def _signals(batch=2, length=12000, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = 0.3 * torch.randn(batch, 1, length, generator=g)
    y_hat = y + 0.05 * torch.randn(batch, 1, length, generator=g)
    return y_hat, y


def test_lsgan_hand_values():
    ones, zeros, half = torch.ones(2, 3), torch.zeros(4), torch.full((5,), 0.5)
    assert generator_adv_loss([ones, ones]).item() == 0
    assert generator_adv_loss([ones, zeros]).item() == 1
    assert generator_adv_loss([half]).item() == pytest.approx(0.25)
    assert discriminator_adv_loss([ones, ones], [zeros, zeros]).item() == 0
    assert discriminator_adv_loss([half], [half]).item() == pytest.approx(0.5)
    # Real scored 0 and fake scored 1: the worst discriminator, 1 + 1 per sub-discriminator.
    assert discriminator_adv_loss([zeros, zeros], [ones, ones]).item() == 4


def test_feature_matching_hand_values():
    real = [[torch.zeros(2, 3), torch.zeros(4)], [torch.ones(3)]]
    fake = [[torch.ones(2, 3), torch.full((4,), 2.0)], [torch.ones(3)]]
    assert feature_matching_loss(real, real).item() == 0
    assert feature_matching_loss(real, fake).item() == pytest.approx(2 * (1 + 2 + 0))


def _mel_reference(y, n_fft, hop, win, n_mels, fmin, fmax, sr):
    """HiFi-GAN's mel spectrogram written with numpy in float64, frame by frame."""
    pad = (n_fft - hop) // 2
    y = np.pad(y.astype(np.float64), (pad, pad), mode="reflect")
    window = np.zeros(n_fft)
    offset = (n_fft - win) // 2
    window[offset : offset + win] = scipy.signal.get_window("hann", win, fftbins=True)
    n_frames = 1 + (len(y) - n_fft) // hop
    frames = np.stack([y[i * hop : i * hop + n_fft] * window for i in range(n_frames)])
    spec = np.fft.rfft(frames, axis=1).T
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    basis = librosa.filters.mel(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, dtype=np.float64
    )
    return np.log(np.maximum(basis @ mag, 1e-5))


@pytest.mark.parametrize("win", [2048, 1024])
def test_mel_spectrogram_matches_reference(win):
    args = (2048, 512, win, 80, 0.0, 24000.0, 48000)
    mel = MelSpectrogram(*args)
    y_hat, _ = _signals(batch=2, length=9000)
    out = mel(y_hat)
    assert out.shape == (2, 80, 9000 // 512)
    assert torch.equal(out, mel(y_hat.squeeze(1)))
    for b in range(2):
        ref = _mel_reference(y_hat[b, 0].numpy(), *args)
        np.testing.assert_allclose(out[b].numpy(), ref, atol=2e-4)
    assert not list(mel.state_dict())


@pytest.mark.parametrize("loss_class, length", [(MelLoss, 12000), (MRSTFTLoss, 16000)])
def test_spectral_losses_zero_for_identical_and_differentiable(
    loss_cfg, loss_class, length
):
    loss_fn = loss_class(loss_cfg, 48000)
    y_hat, y = _signals(length=length)
    assert loss_fn(y, y.clone()).item() == 0
    y_hat.requires_grad_(True)
    loss = loss_fn(y_hat, y)
    loss.backward()
    assert loss.item() > 0
    assert torch.isfinite(y_hat.grad).all() and y_hat.grad.abs().sum() > 0
    assert not list(loss_fn.state_dict())


def test_a_weighting_fir_follows_the_standard_curve():
    taps = a_weighting_fir(48000)
    assert len(taps) == 101
    np.testing.assert_allclose(taps, taps[::-1])  # linear phase
    freqs, h = scipy.signal.freqz(taps, worN=[100.0, 1000.0, 4000.0], fs=48000)
    gain_db = 20 * np.log10(np.abs(h))
    # IEC 61672 A-weighting: -19.1 dB at 100 Hz, 0 at 1 kHz, +1.0 at 4 kHz; a 101-tap FIR
    # cannot follow the steep low end exactly.
    assert abs(gain_db[0] - -19.1) < 3.0
    assert abs(gain_db[1]) < 0.3 and abs(gain_db[2] - 1.0) < 0.3


def test_mrstft_matches_auraloss(loss_cfg):
    ours = MRSTFTLoss(loss_cfg, 48000)
    reference = auraloss.freq.MultiResolutionSTFTLoss(
        fft_sizes=[1024, 2048, 8192],
        hop_sizes=[256, 512, 2048],
        win_lengths=[1024, 2048, 8192],
        scale="mel",
        n_bins=128,
        perceptual_weighting=True,
        sample_rate=48000,
    )
    for seed, batch in [(0, 1), (1, 3)]:
        y_hat, y = _signals(batch=batch, length=20000, seed=seed)
        # auraloss's forward(input, target): the prediction goes first.
        expected = reference(y_hat, y).item()
        assert ours(y_hat, y).item() == pytest.approx(expected, rel=1e-5)
        # Order matters (spectral convergence divides by the target's norm).
        assert ours(y, y_hat).item() != pytest.approx(expected, rel=1e-5)
