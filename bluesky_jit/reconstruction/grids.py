"""Point grids for slices and patches (see ``bluesky_jit.geometry`` for axes)."""

from __future__ import annotations

import torch


def slice_grid(
    n: int, *, pixel_size: float = 1.0, center: tuple[float, float] = (0.0, 0.0), device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of an n x n axial slice.

    Returns
    -------
    x, y : Tensor, shape (n, n)
        ``x[i, j] = cx + (j - (n-1)/2) * pixel_size`` and
        ``y[i, j] = cy + (i - (n-1)/2) * pixel_size``.
    """
    offsets = (torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2) * pixel_size
    y, x = torch.meshgrid(offsets + center[1], offsets + center[0], indexing="ij")
    return x, y


def patch_grid(
    centers: torch.Tensor, size: int, *, pixel_size: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of square patches.

    Parameters
    ----------
    centers : Tensor, shape (m, 2)
        Patch centres (x, y).
    size : int
        Patch side in pixels.

    Returns
    -------
    x, y : Tensor, shape (m, size, size)
    """
    offsets = (
        torch.arange(size, dtype=torch.float32, device=centers.device) - (size - 1) / 2
    ) * pixel_size
    x = centers[:, 0, None, None] + offsets[None, None, :]
    y = centers[:, 1, None, None] + offsets[None, :, None]
    return x.expand(-1, size, size), y.expand(-1, size, size)
