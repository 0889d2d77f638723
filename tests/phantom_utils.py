"""Small analytic phantoms for reconstruction tests (exact line integrals)."""

import numpy as np

from bluesky_jit.evaluation import psnr  # noqa: F401 - test_pairs.py imports it from here

DISKS = [(20.0, -10.0, 15.0, 0.02), (-30.0, 25.0, 8.0, 0.05), (0.0, 0.0, 50.0, 0.01)]


def disk_sinogram(angles, cols, cor, pixel_size=1.0, disks=DISKS):
    """Line integrals (n_angles, cols) of disks (x, y, r, mu) in geometry.py's convention."""
    u = (np.arange(cols) - cor) * pixel_size
    sino = np.zeros((len(angles), cols))
    for x, y, r, mu in disks:
        s = x * np.cos(angles) + y * np.sin(angles)
        d = u[None, :] - s[:, None]
        sino += mu * 2 * np.sqrt(np.clip(r * r - d * d, 0, None))
    return sino


def disk_image(n, pixel_size=1.0, disks=DISKS, supersample=4):
    """Area-averaged image (n, n) of the disks."""
    m = n * supersample
    c = (np.arange(m) - (m - 1) / 2) * pixel_size / supersample
    y, x = np.meshgrid(c, c, indexing="ij")
    img = np.zeros((m, m))
    for cx, cy, r, mu in disks:
        img += mu * ((x - cx) ** 2 + (y - cy) ** 2 < r * r)
    return img.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
