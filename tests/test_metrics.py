"""Tests for metrics.py: LSD (both variants, HF/LF split), SNR and SI-SDR on hand-built cases."""

import math

import numpy as np
import pytest
import torch

import metrics


def noise(n=48000, seed=0, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def lsd_reference(y, y_hat, variant, sr=48000, cutoff_hz=None):
    """Slow float64 LSD: explicit frames, periodic Hann window and numpy rfft."""
    n_fft, hop = 2048, 512
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)

    def log_power(x):
        x = np.asarray(x, dtype=np.float64)
        if variant == "field":
            x = np.pad(x, n_fft // 2, mode="reflect")
        n_frames = 1 + (len(x) - n_fft) // hop
        frames = [x[i * hop : i * hop + n_fft] * window for i in range(n_frames)]
        power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
        if variant == "field":
            return np.log10(np.maximum(power, 1e-8))
        return np.log10(power + 1e-10)

    d = (log_power(y) - log_power(y_hat)) ** 2  # [frames, freq]
    out = {"lsd": np.sqrt(d.mean(axis=1)).mean()}
    if cutoff_hz is not None:
        low = np.array([k * sr / n_fft <= cutoff_hz for k in range(d.shape[1])])
        out["lsd_lf"] = np.sqrt(d[:, low].mean(axis=1)).mean()
        out["lsd_hf"] = np.sqrt(d[:, ~low].mean(axis=1)).mean()
    return out


@pytest.mark.parametrize("variant", ["field", "authors"])
def test_lsd_of_identical_signals_is_zero(variant):
    y = noise()
    out = metrics.lsd(y, y.copy(), cutoff_hz=4000, variant=variant)
    assert out == {"lsd": 0.0, "lsd_hf": 0.0, "lsd_lf": 0.0}


@pytest.mark.parametrize("variant", ["field", "authors"])
def test_doubling_the_signal_gives_log10_4_in_every_band(variant):
    # |2X|^2 = 4|X|^2 in every bin, far above both floors, so every bin differs by log10(4).
    y = noise()
    out = metrics.lsd(y, 2 * y, cutoff_hz=6000, variant=variant)
    for key in ("lsd", "lsd_hf", "lsd_lf"):
        assert out[key] == pytest.approx(math.log10(4), abs=1e-5)


@pytest.mark.parametrize("variant", ["field", "authors"])
@pytest.mark.parametrize("cutoff_hz", [2000, 4000, 6000, 11000.5])
def test_lsd_matches_slow_float64_reference(variant, cutoff_hz):
    y = noise(30000, seed=1)
    y_hat = y + noise(30000, seed=2, scale=0.05)
    y_hat[10000:14000] = 0  # a silent stretch exercises the clamp / epsilon
    got = metrics.lsd(y, y_hat, cutoff_hz=cutoff_hz, variant=variant)
    want = lsd_reference(y, y_hat, variant, cutoff_hz=cutoff_hz)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4)


def test_band_split_adds_up_per_frame_with_171_low_bins_at_4khz():
    # Period 512 = hop, so every uncentred frame is the same and the mean over frames is exact:
    # 1025 * lsd^2 = n_lf * lsd_lf^2 + n_hf * lsd_hf^2, with bins 0..170 (<= 4 kHz) low band.
    period = noise(512, seed=3)
    y = np.tile(period, 20)
    y_hat = np.tile(period + noise(512, seed=4, scale=0.03), 20)
    out = metrics.lsd(y, y_hat, cutoff_hz=4000, variant="authors")
    n_lf, n_hf = 171, 1025 - 171
    assert 1025 * out["lsd"] ** 2 == pytest.approx(
        n_lf * out["lsd_lf"] ** 2 + n_hf * out["lsd_hf"] ** 2, rel=1e-4
    )
    assert out["lsd_hf"] != pytest.approx(out["lsd_lf"], rel=1e-2)


def test_bin_exactly_at_cutoff_is_low_band():
    # 6 kHz is bin 256 exactly; moving the cut-off just below it moves that bin to the high band.
    y = noise(20000, seed=5)
    y_hat = y + noise(20000, seed=6, scale=0.1)
    at = metrics.lsd(y, y_hat, cutoff_hz=6000)
    below = metrics.lsd(y, y_hat, cutoff_hz=5999.9)
    ref = lsd_reference(y, y_hat, "field", cutoff_hz=6000)
    assert at["lsd_lf"] == pytest.approx(ref["lsd_lf"], rel=1e-4)
    assert at["lsd_lf"] != below["lsd_lf"]


def test_hf_only_difference_leaves_lf_nearly_untouched():
    t = np.arange(48000) / 48000
    y = noise(48000, seed=7)
    y_hat = y + (0.5 * np.sin(2 * np.pi * 20000 * t)).astype(np.float32)
    out = metrics.lsd(y, y_hat, cutoff_hz=8000)
    assert out["lsd_lf"] < 0.01  # only reflect padding at the edges leaks a little
    assert out["lsd_hf"] > 0.1


def test_authors_variant_uses_epsilon_instead_of_clamp():
    # Below both floors: the clamp makes silence and a whisper equal, the epsilon does not.
    y = np.zeros(8192, dtype=np.float32)
    whisper = noise(8192, seed=8, scale=1e-7)
    assert metrics.lsd(y, whisper)["lsd"] == 0.0
    assert metrics.lsd(y, whisper, variant="authors")["lsd"] > 0.01


def test_authors_variant_on_a_single_frame_impulse_by_hand():
    # One uncentred frame holding an impulse of height a at offset m has flat power (a w[m])^2.
    a, m = 0.5, 700
    y = np.zeros(2048, dtype=np.float32)
    y_hat = y.copy()
    y_hat[m] = a
    w = 0.5 - 0.5 * math.cos(2 * math.pi * m / 2048)
    want = math.log10((a * w) ** 2 + 1e-10) - math.log10(1e-10)
    assert metrics.lsd(y, y_hat, variant="authors")["lsd"] == pytest.approx(
        want, rel=1e-5
    )


def test_lsd_accepts_torch_and_unsqueezed_inputs():
    y = noise(20000, seed=9)
    y_hat = noise(20000, seed=10)
    want = metrics.lsd(y, y_hat, cutoff_hz=4000)
    got = metrics.lsd(
        torch.from_numpy(y)[None, None], torch.from_numpy(y_hat)[None], cutoff_hz=4000
    )
    assert got == want
    assert metrics.lsd(y.astype(np.float64), y_hat)["lsd"] == pytest.approx(want["lsd"])


def test_mismatched_lengths_are_trimmed_to_the_shorter():
    y = noise(20000, seed=11)
    y_hat = noise(20100, seed=12)
    assert metrics.lsd(y, y_hat) == metrics.lsd(y, y_hat[:20000])
    assert metrics.lsd(y_hat, y) == metrics.lsd(y_hat[:20000], y)
    assert metrics.snr(y, y_hat) == metrics.snr(y, y_hat[:20000])
    assert metrics.si_sdr(y_hat, y) == metrics.si_sdr(y_hat[:20000], y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "nuwave"}, "variant"),
        ({"cutoff_hz": 0}, "cutoff_hz"),
        ({"cutoff_hz": 24000}, "cutoff_hz"),
    ],
)
def test_lsd_rejects_bad_arguments(kwargs, match):
    y = noise(4096)
    with pytest.raises(ValueError, match=match):
        metrics.lsd(y, y, **kwargs)


def test_lsd_rejects_bad_shapes_and_short_signals():
    with pytest.raises(ValueError, match="1-D"):
        metrics.lsd(np.zeros((2, 4096)), np.zeros((2, 4096)))
    with pytest.raises(ValueError, match="at least 1025"):
        metrics.lsd(np.zeros(1000), np.zeros(1000))
    with pytest.raises(ValueError, match="at least 2048"):
        metrics.lsd(np.zeros(2000), np.zeros(2000), variant="authors")
    with pytest.raises(ValueError, match="non-empty"):
        metrics.lsd(np.zeros(0), np.zeros(10))


def test_snr_and_si_sdr_by_hand():
    y = np.array([1.0, 1.0, 0.0, 0.0] * 100, dtype=np.float32)
    e = np.array([0.0, 0.0, 0.5, 0.5] * 100, dtype=np.float32)  # orthogonal to y
    # |y|^2 / |e|^2 = 2 / 0.5 = 4 -> 10 log10(4) dB for both when the scale is right.
    assert metrics.snr(y, y + e) == pytest.approx(10 * math.log10(4))
    assert metrics.si_sdr(y, y + e) == pytest.approx(10 * math.log10(4))
    # Scaling by 1.1: SNR sees an error of 0.1 y (20 dB); SI-SDR sees none.
    assert metrics.snr(y, 1.1 * y) == pytest.approx(20.0)
    assert metrics.si_sdr(y, 1.1 * y) > 100
    assert metrics.snr(y, y) == math.inf
    assert metrics.si_sdr(y, np.zeros_like(y)) == -math.inf


def test_si_sdr_is_scale_invariant_and_snr_is_not():
    y = noise(10000, seed=13)
    y_hat = y + noise(10000, seed=14, scale=0.03)
    for gain in (0.1, 3.0, -2.0):
        assert metrics.si_sdr(y, gain * y_hat) == pytest.approx(
            metrics.si_sdr(y, y_hat), abs=1e-6
        )
    assert metrics.snr(y, 3.0 * y_hat) < metrics.snr(y, y_hat) - 5


def test_snr_rejects_silent_reference():
    with pytest.raises(ValueError, match="silent"):
        metrics.snr(np.zeros(100), np.ones(100))
    with pytest.raises(ValueError, match="silent"):
        metrics.si_sdr(np.zeros(100), np.ones(100))


def _long_term_spectrum_ref(x: np.ndarray) -> np.ndarray:
    # Frame by frame in float64 with numpy: mean |rfft(frame * hann)|^2.
    n = metrics.N_FFT
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)  # periodic Hann
    starts = range(0, len(x) - n + 1, metrics.HOP_SIZE)
    return np.mean([np.abs(np.fft.rfft(x[s : s + n] * window)) ** 2 for s in starts], 0)


def test_long_term_spectrum_matches_numpy_reference():
    # Signals arrive in float32, as every metric here takes them.
    x = np.random.default_rng(0).standard_normal(9000).astype(np.float32)
    np.testing.assert_allclose(
        metrics.long_term_spectrum(x), _long_term_spectrum_ref(x.astype(np.float64)), rtol=1e-9
    )


def test_band_level_errors_per_octave():
    # White noise against itself with the 4-8 kHz octave scaled by 0.5 (-6 dB) and the rest by
    # 2 (+6 dB): the octaves above 4 kHz are 4-8, 8-16 and 16-24 kHz (Nyquist bin left out).
    rng = np.random.default_rng(1)
    y = rng.standard_normal(48000 * 2).astype(np.float32)
    spec = np.fft.rfft(y)
    freqs = np.fft.rfftfreq(len(y), 1 / 48000)
    scaled = np.where((freqs > 4000) & (freqs <= 8000), 0.5, 2.0)
    y_hat = np.fft.irfft(spec * scaled, len(y)).astype(np.float32)
    errors = metrics.band_level_errors(y, y_hat, 4000)
    ref, out = (_long_term_spectrum_ref(s.astype(np.float64)) for s in (y, y_hat))
    bins = np.arange(len(ref)) * 48000 / metrics.N_FFT
    bands = [(4000, 8000), (8000, 16000), (16000, 23953)]  # up to bin 1022
    expected = [
        10 * np.log10(out[(bins > lo) & (bins <= hi)].sum() / ref[(bins > lo) & (bins <= hi)].sum())
        for lo, hi in bands
    ]
    np.testing.assert_allclose(errors, expected, rtol=1e-6)
    np.testing.assert_allclose(errors, [-6.02, 6.02, 6.02], atol=0.5)
    assert metrics.band_level_errors(y, y, 12000) == [0.0]


def test_tone_excess_finds_nyquist_and_3k_tones():
    rng = np.random.default_rng(2)
    t = np.arange(48000 * 2)
    y = 0.1 * rng.standard_normal(len(t))
    clean = metrics.tone_excess(y, y)
    assert clean == {"tone_nyquist_db": 0.0, "tone_3k_db": 0.0, "level_nyquist_db": 0.0}
    nyquist = y + 0.2 * (-1.0) ** t  # a constant tone at exactly 24 kHz
    found = metrics.tone_excess(y, nyquist)
    assert found["tone_nyquist_db"] > 20 and found["level_nyquist_db"] > 20
    assert abs(found["tone_3k_db"]) < 3
    nine_k = y + 0.2 * np.sin(2 * np.pi * 9000 * t / 48000)
    found = metrics.tone_excess(y, nine_k)
    assert found["tone_3k_db"] > 20 and abs(found["tone_nyquist_db"]) < 3
