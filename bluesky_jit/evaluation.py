"""Image quality against a known truth (simulated phantoms)."""

from __future__ import annotations

import math

import numpy as np


def psnr(
    image: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float | None = None,
) -> float:
    """Peak signal-to-noise ratio (dB) of ``image`` against ``truth``, inside ``mask``.

    scikit-image's ``peak_signal_noise_ratio`` with the peak ``data_range``:
    by default the range of ``truth`` inside ``mask`` (the whole image
    without one). An exact image gives ``inf``.
    """
    from skimage.metrics import peak_signal_noise_ratio

    image, truth = np.asarray(image, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if mask is not None:
        image, truth = image[mask], truth[mask]
    if np.array_equal(image, truth):
        return math.inf
    peak = float(truth.max() - truth.min()) if data_range is None else data_range
    return float(peak_signal_noise_ratio(truth, image, data_range=peak))


def disc_mask(n: int, radius_fraction: float = 0.9) -> np.ndarray:
    """Boolean (n, n) mask of the disc inscribed in the slice, scaled by ``radius_fraction``."""
    c = (np.arange(n) - (n - 1) / 2) / (n / 2)
    return (c[:, None] ** 2 + c[None, :] ** 2) <= radius_fraction**2
