"""Noise2Inverse, the maths: X:1 / 1:X pairs and inputs from K reconstructions.

The projections of a window are split into K disjoint subsets
``J_j = {i : i mod K == j}`` (:func:`bluesky_jit.projections.split_subsets`)
and reconstructed separately into ``r_1 .. r_K``. A network trained to map
one side of a pair to the other learns to remove the noise, because the noise
of disjoint subsets is independent. The estimate of the clean image is the
mean of the network over the K inputs of :func:`inputs`, as
:meth:`bluesky_jit.inference.Denoiser.denoise_mean` computes it. K = 2 gives
the even/odd pairs of Graas et al. (2023).

References
----------
.. [1] Hendriksen, Pelt, Batenburg, "Noise2Inverse: self-supervised deep
   convolutional denoising for tomography", IEEE Transactions on
   Computational Imaging 6 (2020), section III-C.
.. [2] Graas, Coban, Batenburg, Lucka, "Just-in-time deep learning for
   real-time X-ray computed tomography", Scientific Reports 13 (2023).
"""

from __future__ import annotations

import math

import numpy as np

from .config import N2I_STRATEGIES
from .errors import ConfigError, ScanDataError

STRATEGIES = N2I_STRATEGIES
"""Noise2Inverse strategies (:data:`bluesky_jit.config.N2IStrategy`)."""


def check_strategy(strategy: str, splits: int) -> None:
    """Raise a ConfigError unless ``strategy`` is in :data:`STRATEGIES` and ``splits >= 2``."""
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"Unknown Noise2Inverse strategy {strategy!r}; expected one of {STRATEGIES} "
            "(X:1 = mean of K-1 splits in, one split out; 1:X the reverse)."
        )
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 2:
        raise ConfigError(
            f"Noise2Inverse needs at least 2 projection splits; got splits={splits!r}."
        )


def pairs(recons: np.ndarray, targets: np.ndarray, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Input-target pairs from K reconstructions of each of m patches.

    Parameters
    ----------
    recons : ndarray, shape (K, m, ...)
        ``recons[i]`` holds the m patches reconstructed from split i.
    targets : ndarray of int, shape (m,)
        The split ``j`` of each pair (drawn uniformly by the caller).
    strategy : {"X:1", "1:X"}

    Returns
    -------
    u, v : ndarray, shape (m, ...)
        X:1: ``u = mean(r_i, i != j)``, ``v = r_j``; 1:X the reverse.
    """
    k, m = recons.shape[:2]
    check_strategy(strategy, k)
    one = recons[targets, np.arange(m)]
    rest = (recons.sum(axis=0) - one) / (k - 1)
    return (rest, one) if strategy == "X:1" else (one, rest)


def inputs(recons: np.ndarray, strategy: str) -> np.ndarray:
    """The K network inputs whose outputs, averaged, are the Noise2Inverse estimate.

    Parameters
    ----------
    recons : ndarray, shape (K, ...)
        Full reconstructions from the K splits.
    strategy : {"X:1", "1:X"}

    Returns
    -------
    ndarray, shape (K, ...), float32
        For ``"X:1"`` the mean of the other K - 1 splits, for ``"1:X"`` each split.
    """
    r = np.asarray(recons, dtype=np.float32)
    check_strategy(strategy, r.shape[0])
    if strategy == "1:X":
        return r
    if r.shape[0] == 2:  # the other split, exactly
        return r[::-1].copy()
    return (r.sum(axis=0, keepdims=True) - r) / (r.shape[0] - 1)


UNCERTAINTY_SCALE = 2.7
"""Calibration of :func:`uncertainty` from the spread alone: the factor that puts 95 % of
the pixels of four phantom slices (two phantoms, 1000 and 300 photons; pooled) within 2
sigma of the truth (``benchmarks/uncertainty.py``). The spread alone would need 1: it
misses the error common to all K outputs (blur, motion within the window)."""
UNCERTAINTY_RMS_SCALE = 0.82
"""The same calibration for the map scaled to :func:`error_rms` (given the inputs): 90-99 %
per slice, against 90-98 % for the spread alone; below 1 as the slice's error estimate
includes the strong edges (the container's wall), where the benchmark does not look."""
UNCERTAINTY_SMOOTH_PX = 1.0
"""Gaussian width (pixels) over which the per-pixel variance is averaged: with K = 2 one
pixel's spread is a single sample, too noisy to be a standard deviation on its own."""


def uncertainty(
    outputs: np.ndarray,
    strategy: str,
    *,
    inputs: np.ndarray | None = None,
    scale: float | None = None,
    smooth_px: float = UNCERTAINTY_SMOOTH_PX,
) -> np.ndarray | None:
    """A calibrated standard deviation of the Noise2Inverse estimate, per pixel.

    The estimate is the mean of the K network outputs; their spread is its
    standard error as if the K were independent, ``std(outputs, ddof=1) /
    sqrt(K)``. X:1 inputs are not: each is the mean of K - 1 splits, so they
    differ by ``1 / (K - 1)`` of the splits' differences, and the spread is
    multiplied by ``K - 1``. The variance is averaged locally (Gaussian,
    ``smooth_px``). The spread says where the error is, not all of how large:
    it misses what the K outputs share (blur, motion within the window). With
    the ``inputs``, the map is scaled to the slice's own estimate of the RMS
    error (:func:`error_rms`, no ground truth needed); then by ``scale``.

    Parameters
    ----------
    outputs : ndarray, shape (K, H, W)
        The network outputs (:meth:`bluesky_jit.inference.Denoiser.denoise_each`).
    strategy : {"X:1", "1:X"}
    inputs : ndarray, shape (K, H, W), optional
        The network inputs (:func:`inputs`); stacks (K, frames, H, W) are not used.
    scale : float, optional
        By default :data:`UNCERTAINTY_RMS_SCALE` with usable ``inputs``, else
        :data:`UNCERTAINTY_SCALE`: fitted so that 95 % of the pixels of
        phantoms have ``|error| <= 2 sigma``.
    smooth_px : float
        0 keeps the raw per-pixel spread.

    Returns
    -------
    ndarray, shape (H, W), float32, or None
        Same units as the slice (1/mm); None for K < 2 (no spread).
    """
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim != 3:
        raise ScanDataError(
            f"uncertainty() needs the K network outputs, shape (K, H, W); got {out.shape}. "
            "Pass Denoiser.denoise_each(inputs)."
        )
    k = out.shape[0]
    if k < 2:
        return None
    check_strategy(strategy, k)
    var = out.var(axis=0, ddof=1) / k
    if strategy == "X:1":
        var *= (k - 1) ** 2
    if smooth_px > 0:
        from scipy.ndimage import gaussian_filter

        var = gaussian_filter(var, smooth_px, mode="reflect")
    sigma = np.sqrt(var)
    rms = error_rms(inputs, out, strategy) if np.shape(inputs) == out.shape else math.nan
    if rms > 0:  # NaN is not
        spread = float(np.sqrt(var.mean()))
        sigma = sigma * (rms / spread) if spread > 0 else np.full_like(sigma, rms)
        scale = UNCERTAINTY_RMS_SCALE if scale is None else scale
    scale = UNCERTAINTY_SCALE if scale is None else scale
    return (scale * sigma).astype(np.float32)


def error_rms(inputs: np.ndarray, outputs: np.ndarray, strategy: str) -> float:
    """The RMS error of one network output, estimated from the slice itself.

    Each output is compared with what its input left out (X:1: the one
    split; 1:X: the mean of the others), whose noise is independent of it, so
    ``mean((A(u_j) - target_j)**2) = mean((A(u_j) - x)**2) + var(target noise)``
    (Graas et al. 2023, eq. 4, as :func:`bluesky_jit.steering.noise_levels`
    uses it on hold-out pairs). The noise variance comes from the splits'
    spread. Inside the slice's inscribed disc (what every projection sees).

    Parameters
    ----------
    inputs, outputs : ndarray, shape (K, H, W)
    strategy : {"X:1", "1:X"}

    Returns
    -------
    float
        In the slice's units; 0 where the noise explains all of the difference.
    """
    from .evaluation import disc_mask

    u = np.asarray(inputs, dtype=np.float64)
    k = u.shape[0]
    check_strategy(strategy, k)
    total = u.sum(axis=0)  # X:1: sum of the inputs = sum of the splits
    splits = total - (k - 1) * u if strategy == "X:1" else u
    targets = splits if strategy == "X:1" else (total - u) / (k - 1)
    inside = disc_mask(u.shape[-1]) if u.shape[-1] == u.shape[-2] else np.ones(u.shape[1:], bool)
    noise = splits.var(axis=0, ddof=1)[inside].mean()
    target_noise = noise if strategy == "X:1" else noise / (k - 1)
    mse = ((np.asarray(outputs) - targets)[:, inside] ** 2).mean()
    return float(np.sqrt(max(mse - target_noise, 0.0)))
