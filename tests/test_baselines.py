"""Classical baselines: TV (Chambolle) and BM3D, tuned on held-out data."""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_jit.baselines import (
    bm3d_available,
    bm3d_denoise,
    noise_sigma,
    tune,
    tune_bm3d,
    tune_tv,
    tv_denoise,
)
from bluesky_jit.errors import ConfigError, ScanDataError


def piecewise(rng, n=48, k=6):
    """Disks on a background: what TV is good at."""
    yy, xx = np.mgrid[:n, :n]
    img = np.full((n, n), 1.0)
    for _ in range(k):
        cy, cx, r = rng.uniform(8, n - 8), rng.uniform(8, n - 8), rng.uniform(3, 7)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 2)
    return img


def mse(a, b):
    return float(np.mean((a - b) ** 2))


def test_tv_lowers_the_error_of_a_noisy_image():
    rng = np.random.default_rng(0)
    clean = piecewise(rng)
    noisy = clean + 0.4 * rng.standard_normal(clean.shape)
    assert mse(tv_denoise(noisy, 0.3), clean) < 0.5 * mse(noisy, clean)
    np.testing.assert_array_equal(tv_denoise(noisy, 0.0), noisy.astype(np.float32))


def test_tv_weight_tuned_on_held_out_truth_and_on_noise2inverse_halves():
    rng = np.random.default_rng(1)
    sigma = 0.4
    held_clean = piecewise(rng)
    held = held_clean + sigma * rng.standard_normal(held_clean.shape)
    supervised = tune_tv([held], [held_clean], max_num_iter=100)
    assert supervised.values == sorted(supervised.values)
    assert supervised.score == min(supervised.scores)
    # halves: two independent noisy copies (each sqrt(2) noisier than their mean)
    u = held_clean + sigma * np.sqrt(2) * rng.standard_normal(held_clean.shape)
    v = held_clean + sigma * np.sqrt(2) * rng.standard_normal(held_clean.shape)
    self_supervised = tune_tv([u, v], [v, u], max_num_iter=100)
    # the halves are noisier, so their best weight is larger, about sqrt(2) times
    ratio = self_supervised.value / supervised.value
    assert 1.0 < ratio < 2.5
    # the tuned weight generalises to a new image of the same kind
    test_clean = piecewise(rng)
    test = test_clean + sigma * rng.standard_normal(test_clean.shape)
    best = mse(tv_denoise(test, supervised.value, max_num_iter=100), test_clean)
    for w in (supervised.value / 10, supervised.value * 10):
        assert best < mse(tv_denoise(test, w, max_num_iter=100), test_clean)


def test_tune_refines_around_the_best_grid_value():
    result = tune(lambda im, w: im * 0 + w, [np.zeros((4, 4))], [np.full((4, 4), 3.0)],
                  values=[1.0, 2.0, 4.0, 8.0])  # fmt: skip
    assert result.value == pytest.approx(2.0 * np.sqrt(2))  # refined between 2 and 4
    assert len(result.values) == 6
    with pytest.raises(ConfigError, match="references"):
        tune(lambda im, w: im, [np.zeros((4, 4))], [], values=[1.0])
    with pytest.raises(ConfigError, match="positive"):
        tune(lambda im, w: im, [np.zeros((4, 4))], [np.zeros((4, 4))], values=[0.0, 1.0])


def test_noise_sigma_of_two_halves():
    rng = np.random.default_rng(2)
    clean = piecewise(rng, n=128)
    u = clean + 0.2 * rng.standard_normal(clean.shape)
    v = clean + 0.2 * rng.standard_normal(clean.shape)
    assert noise_sigma(u, v) == pytest.approx(0.2, rel=0.03)


def test_bad_inputs():
    with pytest.raises(ScanDataError, match="2D"):
        tv_denoise(np.zeros(5), 0.1)
    with pytest.raises(ScanDataError, match="NaN"):
        tv_denoise(np.full((4, 4), np.nan), 0.1)
    with pytest.raises(ConfigError, match="weight"):
        tv_denoise(np.zeros((4, 4)), -1.0)
    with pytest.raises(ConfigError, match="sigma"):
        tune_bm3d([np.zeros((4, 4))], [np.zeros((4, 4))], sigma=0.0)


@pytest.mark.skipif(not bm3d_available(), reason="the bm3d package is not installed")
def test_bm3d_lowers_the_error():
    # one call (about 1-4 s, whatever the size): tuning is tested with tune() above
    rng = np.random.default_rng(3)
    clean = piecewise(rng, n=32)
    noisy = clean + 0.3 * rng.standard_normal(clean.shape)
    assert mse(bm3d_denoise(noisy, 0.3), clean) < 0.5 * mse(noisy, clean)
