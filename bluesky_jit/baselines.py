"""Classical denoisers to beat: total variation and BM3D, tuned on held-out data.

Graas et al. 2023 (Results III): "For TV, the regularization parameter was set to
lambda = 0.03 and the number of iterations to n_iter = 300, after tuning on
3200 samples"; TV "was not able to outperform the data-driven denoisers".
Here the weight is tuned per data set, either

- against a known truth on held-out images (simulations: the best a TV
  denoiser can do with one weight), or
- self-supervised on Noise2Inverse halves, without any truth: the weight that
  minimises ``||TV(u) - v||^2`` for independent reconstructions ``u`` and
  ``v`` of the same object also minimises ``||TV(u) - x||^2`` in expectation,
  because the noise of ``v`` is independent of ``TV(u)`` (the Noise2Noise
  argument of Graas et al. 2023, eq. 4).

BM3D needs the ``bm3d`` package (``pip install bm3d``); its noise level is
tuned the same ways.

References
----------
.. [1] A. Chambolle, "An algorithm for total variation minimization and
   applications", J. Math. Imaging Vis. 20 (2004) 89-97.
.. [2] K. Dabov, A. Foi, V. Katkovnik, K. Egiazarian, "Image denoising by sparse
   3D transform-domain collaborative filtering", IEEE TIP 16 (2007).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, ScanDataError

Denoise = Callable[[np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class Tuning:
    """The outcome of tuning one parameter of a denoiser.

    Attributes
    ----------
    value : float
        The best parameter (TV weight, or BM3D noise level).
    score : float
        Its mean squared error on the tuning data (against truth, or against
        the independent half for self-supervised tuning).
    values, scores : list of float
        Every parameter tried and its score.
    """

    value: float
    score: float
    values: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def tv_denoise(image: np.ndarray, weight: float, *, max_num_iter: int = 300) -> np.ndarray:
    """Chambolle's TV denoising (scikit-image), float32 in and out.

    Parameters
    ----------
    image : ndarray, shape (H, W)
    weight : float
        Regularisation weight in the image's units (larger: smoother).
    max_num_iter : int
        300 as in Graas et al. 2023.
    """
    from skimage.restoration import denoise_tv_chambolle

    image = _image(image)
    if not (np.isfinite(weight) and weight >= 0):
        raise ConfigError(f"TV weight must be a finite number >= 0; got {weight!r}.")
    if weight == 0:
        return image.copy()
    out = denoise_tv_chambolle(image, weight=float(weight), max_num_iter=max_num_iter)
    return np.asarray(out, dtype=np.float32)


def bm3d_available() -> bool:
    """Whether the ``bm3d`` package can be imported."""
    try:
        import bm3d  # noqa: F401
    except ImportError:
        return False
    return True


def bm3d_denoise(image: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D with white-noise level ``sigma`` (image units).

    Raises
    ------
    ConfigError
        If the ``bm3d`` package is not installed (``pip install bm3d``).
    """
    try:
        import bm3d
    except ImportError as exc:
        raise ConfigError(
            "The BM3D baseline needs the 'bm3d' package; install it with `pip install bm3d`."
        ) from exc
    image = _image(image)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"BM3D sigma must be a finite number > 0; got {sigma!r}.")
    return np.asarray(bm3d.bm3d(image, sigma_psd=float(sigma)), dtype=np.float32)


def noise_sigma(u: np.ndarray, v: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Noise standard deviation of one of two independent reconstructions ``u``, ``v``.

    ``std(u - v) / sqrt(2)``; the mean ``(u + v) / 2`` has half that variance.
    """
    d = _image(u).astype(np.float64) - _image(v)
    if mask is not None:
        d = d[mask]
    return float(d.std() / np.sqrt(2))


def tune(
    denoise: Denoise,
    images: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    *,
    values: Sequence[float],
    mask: np.ndarray | None = None,
    refine: int = 1,
) -> Tuning:
    """Pick the parameter of ``denoise`` with the least mean squared error.

    Tries every value, then ``refine`` times a finer geometric grid around the
    best one.

    Parameters
    ----------
    denoise : callable
        ``denoise(image, value) -> image``.
    images : sequence of ndarray (H, W)
        Images to denoise (held out from what is evaluated later).
    references : sequence of ndarray (H, W)
        Truths, or for self-supervised tuning the independent halves.
    values : sequence of float
        Positive parameters, increasing (a geometric grid works best).
    mask : ndarray of bool, optional
        Pixels that count.
    """
    images, references = list(images), list(references)
    if not images or len(images) != len(references):
        raise ConfigError(
            f"tune() needs as many references as images, at least one; got {len(images)} "
            f"images and {len(references)} references."
        )
    grid = sorted(float(x) for x in values)
    if not grid or grid[0] <= 0:
        raise ConfigError(f"tune() needs positive values to try; got {values!r}.")
    tried: dict[float, float] = {}

    def score(value: float) -> float:
        if value not in tried:
            errors = []
            for image, ref in zip(images, references, strict=True):
                diff = denoise(image, value).astype(np.float64) - ref
                errors.append(np.mean(diff[mask] ** 2 if mask is not None else diff**2))
            tried[value] = float(np.mean(errors))
        return tried[value]

    for value in grid:
        score(value)
    ratio = (grid[-1] / grid[0]) ** (1 / max(len(grid) - 1, 1)) if len(grid) > 1 else 2.0
    for _ in range(refine):
        best = min(tried, key=tried.get)  # type: ignore[arg-type]
        ratio = np.sqrt(ratio)
        for value in (best / ratio, best * ratio):
            score(value)
    best = min(tried, key=tried.get)  # type: ignore[arg-type]
    ordered = sorted(tried)
    return Tuning(best, tried[best], ordered, [tried[v] for v in ordered])


def tune_tv(
    images: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    *,
    mask: np.ndarray | None = None,
    values: Sequence[float] | None = None,
    max_num_iter: int = 300,
) -> Tuning:
    """Tune the TV weight on held-out images (against truth or independent halves).

    By default the weights tried are 13 steps from 0.01 to 10 times the
    images' noise-dominated standard deviation, then refined.
    """
    if values is None:
        spread = float(np.median([np.std(_image(im)) for im in images]))
        values = spread * np.geomspace(0.01, 10.0, 13)
    return tune(
        lambda im, w: tv_denoise(im, w, max_num_iter=max_num_iter),
        images,
        references,
        values=values,
        mask=mask,
    )


def tune_bm3d(
    images: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    *,
    sigma: float,
    mask: np.ndarray | None = None,
    factors: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
) -> Tuning:
    """Tune BM3D's noise level as ``factor * sigma`` (FBP noise is not white)."""
    if not (np.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"tune_bm3d() needs a noise estimate sigma > 0; got {sigma!r}.")
    return tune(bm3d_denoise, images, references, values=[f * sigma for f in factors], mask=mask)


def _image(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 2 or min(a.shape) < 2 or not np.all(np.isfinite(a)):
        raise ScanDataError(
            f"Expected a finite 2D image (H, W); got shape {a.shape}"
            + ("" if np.all(np.isfinite(a)) else " with NaN or infinite values")
            + "."
        )
    return a
