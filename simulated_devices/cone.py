"""Analytic cone-beam projections of balls, for FDK tests and benchmarks.

Exact line integrals (chord lengths) through balls, computed in closed form
from the source and pixel positions, so reconstructions are tested without
an inverse crime. The positions are written out here from the convention in
:mod:`bluesky_jit.geometry` (cone beam), not taken from its code:

- stage angle theta: detector column axis ``e_u = (cos, sin, 0)``, beam
  direction ``e_b = (-sin, cos, 0)``, ``z`` along detector rows;
- source at ``-source_origin * e_b``; detector pixel (r, c) at
  ``origin_detector * e_b + (c - center_of_rotation) * pixel_size * e_u +
  (r - center_row) * pixel_size * z``.

Lengths in mm, attenuation in 1/mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Ball",
    "ball_phantom",
    "ball_truth",
    "cone_projection",
    "cone_projections",
    "parallel_projections",
]


@dataclass(frozen=True)
class Ball:
    """A homogeneous ball: centre and radius (mm), attenuation added to what is under it (1/mm)."""

    x: float
    y: float
    z: float
    radius: float
    mu: float


def ball_phantom(scale: float = 1.0) -> tuple[Ball, ...]:
    """A small 3D test object: a large ball holding smaller, denser and hollow ones.

    ``scale`` multiplies every length (``scale=1`` fits a 64-pixel field of view).
    """
    s = scale
    return (
        Ball(0.0, 0.0, 0.0, 26.0 * s, 0.010 / s),
        Ball(8.0 * s, -6.0 * s, 4.0 * s, 7.0 * s, 0.020 / s),
        Ball(-10.0 * s, 6.0 * s, -6.0 * s, 5.0 * s, 0.030 / s),
        Ball(2.0 * s, 12.0 * s, 9.0 * s, 4.0 * s, -0.010 / s),
        Ball(-5.0 * s, -12.0 * s, -12.0 * s, 3.0 * s, 0.040 / s),
    )


def cone_projection(
    balls: Sequence[Ball],
    *,
    angle: float,
    detector_shape: tuple[int, int],
    pixel_size: float,
    source_origin: float,
    origin_detector: float,
    center_of_rotation: float | None = None,
    center_row: float | None = None,
) -> np.ndarray:
    """Line integrals (rows, cols) at stage angle ``angle`` (radians)."""
    rows, cols = detector_shape
    cor = (cols - 1) / 2 if center_of_rotation is None else center_of_rotation
    crow = (rows - 1) / 2 if center_row is None else center_row
    c, s = np.cos(angle), np.sin(angle)
    e_u = np.array([c, s, 0.0])
    e_b = np.array([-s, c, 0.0])
    e_z = np.array([0.0, 0.0, 1.0])
    source = -source_origin * e_b
    a = (np.arange(cols) - cor) * pixel_size
    b = (np.arange(rows) - crow) * pixel_size
    pixels = (
        origin_detector * e_b
        + a[None, :, None] * e_u[None, None, :]
        + b[:, None, None] * e_z[None, None, :]
    )
    direction = pixels - source
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    out = np.zeros((rows, cols))
    for ball in balls:
        to_centre = np.array([ball.x, ball.y, ball.z]) - source
        along = direction @ to_centre
        dist2 = to_centre @ to_centre - along**2
        out += ball.mu * 2.0 * np.sqrt(np.maximum(ball.radius**2 - dist2, 0.0))
    return out


def cone_projections(
    balls: Sequence[Ball], angles: Sequence[float], **geometry: float | tuple[int, int] | None
) -> np.ndarray:
    """Line integrals (n, rows, cols) at each angle (radians); see :func:`cone_projection`."""
    return np.stack([cone_projection(balls, angle=float(a), **geometry) for a in angles])


def ball_truth(balls: Sequence[Ball], points: np.ndarray) -> np.ndarray:
    """Attenuation at world points (..., 3)."""
    points = np.asarray(points, dtype=np.float64)
    out = np.zeros(points.shape[:-1])
    for ball in balls:
        d2 = (
            (points[..., 0] - ball.x) ** 2
            + (points[..., 1] - ball.y) ** 2
            + (points[..., 2] - ball.z) ** 2
        )
        out += ball.mu * (d2 < ball.radius**2)
    return out


def parallel_projections(
    balls: Sequence[Ball],
    angles: Sequence[float],
    *,
    detector_shape: tuple[int, int],
    pixel_size: float = 1.0,
    center_of_rotation: float | None = None,
    center_row: float | None = None,
) -> np.ndarray:
    """Parallel-beam line integrals (n, rows, cols) of balls at each angle (radians).

    The ray through detector pixel (r, c) runs along ``e_b`` through the point
    with ``X . e_u = (c - center_of_rotation) * pixel_size`` and
    ``z = (r - center_row) * pixel_size``.
    """
    rows, cols = detector_shape
    cor = (cols - 1) / 2 if center_of_rotation is None else center_of_rotation
    crow = (rows - 1) / 2 if center_row is None else center_row
    a = (np.arange(cols) - cor) * pixel_size
    b = (np.arange(rows) - crow) * pixel_size
    out = np.zeros((len(angles), rows, cols))
    for k, theta in enumerate(angles):
        for ball in balls:
            s = ball.x * np.cos(theta) + ball.y * np.sin(theta)
            d2 = (a[None, :] - s) ** 2 + (b[:, None] - ball.z) ** 2
            out[k] += ball.mu * 2.0 * np.sqrt(np.maximum(ball.radius**2 - d2, 0.0))
    return out
