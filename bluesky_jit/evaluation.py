"""Image quality against a known truth (simulated phantoms)."""

from __future__ import annotations

import math

import numpy as np


def psnr(image: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio (dB) of ``image`` against ``truth``.

    The peak is the range of ``truth`` inside ``mask`` (the whole image by default).
    """
    if mask is None:
        mask = np.ones(truth.shape, dtype=bool)
    diff = (np.asarray(image) - truth)[mask]
    mse = float(np.mean(diff**2))
    peak = float(truth[mask].max() - truth[mask].min())
    if mse == 0:
        return math.inf
    return 10 * math.log10(peak**2 / mse)


def disc_mask(n: int, radius_fraction: float = 0.9) -> np.ndarray:
    """Boolean (n, n) mask of the disc inscribed in the slice, scaled by ``radius_fraction``."""
    c = (np.arange(n) - (n - 1) / 2) / (n / 2)
    return (c[:, None] ** 2 + c[None, :] ** 2) <= radius_fraction**2
