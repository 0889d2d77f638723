"""Parallel-beam backprojection in torch (CPU and CUDA).

Pixel-driven: every point gathers the linearly interpolated filtered
projection value at its detector position, summed over projections and
weighted by pi/n (:func:`bluesky_jit.geometry.window_weight`). Points that fall
off the detector gather zeros.
"""

from __future__ import annotations

import torch

from ..geometry import window_weight


class TorchBackprojector:
    """Backproject filtered parallel-beam projections onto arbitrary points.

    Parameters
    ----------
    cols : int
        Detector width (pixels).
    center_of_rotation : float
        Detector column of the rotation axis.
    pixel_size : float
    chunk_elements : int
        Projections x points handled per step; bounds temporary memory.
    """

    def __init__(
        self,
        *,
        cols: int,
        center_of_rotation: float,
        pixel_size: float = 1.0,
        chunk_elements: int = 1 << 22,
    ) -> None:
        self.cols = cols
        self.center_of_rotation = center_of_rotation
        self.pixel_size = pixel_size
        self.chunk_elements = chunk_elements

    def backproject(
        self, filtered: torch.Tensor, angles: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """FBP values at points (x, y).

        Parameters
        ----------
        filtered : Tensor, shape (n, cols)
            Ramp-filtered projections of one detector row.
        angles : Tensor, shape (n,)
            Projection angles (radians).
        x, y : Tensor, any shape S
            Point coordinates (same unit as ``pixel_size``).

        Returns
        -------
        Tensor, shape S
        """
        n, cols = filtered.shape
        shape = x.shape
        xs = x.reshape(-1) / self.pixel_size
        ys = y.reshape(-1) / self.pixel_size
        m = xs.numel()
        # pad: one zero column before, two after; positions shift by one
        padded = torch.nn.functional.pad(filtered, (1, 2))
        width = cols + 3
        out = torch.zeros(m, dtype=filtered.dtype, device=filtered.device)
        step = max(1, self.chunk_elements // max(m, 1))
        cos = torch.cos(angles).to(filtered.dtype)
        sin = torch.sin(angles).to(filtered.dtype)
        offset = self.center_of_rotation + 1.0
        for k in range(0, n, step):
            c, s = cos[k : k + step, None], sin[k : k + step, None]
            pos = (xs[None, :] * c + ys[None, :] * s).add_(offset).clamp_(0.0, cols + 1.0)
            left = pos.floor()
            weight = pos.sub_(left)
            base = torch.arange(k, k + c.shape[0], device=filtered.device)[:, None] * width
            idx = left.long().add_(base)
            flat = padded.reshape(-1)
            v0 = flat.take(idx)
            v1 = flat.take(idx.add_(1))
            out += torch.lerp(v0, v1, weight).sum(0)
        return (out * window_weight(n)).reshape(shape)
