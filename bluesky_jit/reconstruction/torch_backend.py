"""Parallel-beam backprojection in torch (CPU and CUDA).

Pixel-driven: every point gathers the linearly interpolated filtered
projection value at its detector position, summed over projections and
weighted by pi/n (:func:`bluesky_jit.geometry.window_weight`). Points that fall
off the detector gather zeros.
"""

from __future__ import annotations

import torch

from ..geometry import window_weight
from .base import Backend, check_projections, offset_rows


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


class TorchBackend(Backend):
    """Backprojection in torch on any device: the portable backend and the CUDA path.

    Same interface and scale as :class:`~bluesky_jit.reconstruction.numba_backend.NumbaBackend`
    (filtered projections in, attenuation in 1/unit out, weight ``pi / n``).
    Axial parallel-beam slices interpolate along one (interpolated) detector
    row; everything else samples bilinearly through the projective matrices,
    with the FDK weight ``1 / w**2`` for cone beam.

    Parameters
    ----------
    device : torch.device or str
    chunk_elements : int
        Projections x points per step; bounds temporary memory.
    """

    name = "torch"

    def __init__(self, *, device="cpu", chunk_elements: int = 1 << 22) -> None:
        self.device = torch.device(device)
        self.chunk_elements = chunk_elements

    def backproject(self, filtered, geometry, slice_, *, row_offset: int = 0):
        """FBP of one slice; see ``NumbaBackend.backproject``. Returns ndarray (rows, cols)."""
        from .plans import axial_lines

        data = torch.as_tensor(filtered, dtype=torch.float32, device=self.device)
        check_projections(tuple(data.shape), geometry, row_offset=row_offset)
        mats = offset_rows(geometry.matrices(), row_offset)
        lines = axial_lines(mats, slice_)
        if lines is not None:
            out = self._lines(data, lines, slice_.shape)
        else:
            pts = torch.as_tensor(slice_.points().reshape(-1, 3), device=self.device)
            out = self._points(data, mats, geometry.beam == "cone", pts).reshape(slice_.shape)
        return (out * window_weight(len(geometry))).cpu().numpy()

    def backproject_grids(self, filtered, geometry, origins, like, *, row_offset: int = 0):
        """FBP on grids shaped like ``like`` with pixel (0, 0) at ``origins`` (g, 3)."""
        import numpy as np

        data = torch.as_tensor(filtered, dtype=torch.float32, device=self.device)
        check_projections(tuple(data.shape), geometry, row_offset=row_offset)
        mats = offset_rows(geometry.matrices(), row_offset)
        local = like.points() - like.origin
        pts = np.asarray(origins, dtype=np.float64).reshape(-1, 1, 1, 3) + local[None]
        flat = torch.as_tensor(pts.reshape(-1, 3), device=self.device)
        out = self._points(data, mats, geometry.beam == "cone", flat)
        out = out.reshape(len(pts), *like.shape) * window_weight(len(geometry))
        return out.cpu().numpy()

    # -- internals ---------------------------------------------------------------------
    def _lines(self, data, lines, shape):
        n, det_rows, cols = data.shape
        rows_t = torch.as_tensor(lines.row, device=self.device)
        base = torch.floor(rows_t)
        frac = (rows_t - base).to(torch.float32)[:, None]
        base = base.long()
        q = torch.zeros((n, cols), dtype=torch.float32, device=self.device)
        arange = torch.arange(n, device=self.device)
        for offset, weight in ((0, 1 - frac), (1, frac)):
            idx = base + offset
            ok = (idx >= 0) & (idx < det_rows)
            if bool(ok.any()):
                q[ok] += weight[ok] * data[arange[ok], idx[ok]]
        rows, cols_img = shape
        i = torch.arange(rows, dtype=torch.float32, device=self.device)
        j = torch.arange(cols_img, dtype=torch.float32, device=self.device)
        # column positions relative to b0 in float32 (|values| < a few thousand pixels)
        b0 = torch.as_tensor(lines.b0 + 1.0, dtype=torch.float32, device=self.device)
        sc = torch.as_tensor(lines.step_col, dtype=torch.float32, device=self.device)
        sr = torch.as_tensor(lines.step_row, dtype=torch.float32, device=self.device)
        padded = torch.nn.functional.pad(q, (1, 2)).reshape(-1)
        width = cols + 3
        m = rows * cols_img
        ii = i[:, None].expand(rows, cols_img).reshape(-1)
        jj = j[None, :].expand(rows, cols_img).reshape(-1)
        out = torch.zeros(m, dtype=torch.float32, device=self.device)
        step = max(1, self.chunk_elements // max(m, 1))
        for k in range(0, n, step):
            sl = slice(k, k + step)
            pos = torch.addcmul(b0[sl, None], ii[None, :], sr[sl, None])
            pos.addcmul_(jj[None, :], sc[sl, None]).clamp_(0.0, cols + 1.0)
            left = pos.floor()
            weight = pos.sub_(left)
            rows_base = torch.arange(k, k + weight.shape[0], device=self.device) * width
            idx = left.long().add_(rows_base[:, None])
            v0 = padded.take(idx)
            v1 = padded.take(idx.add_(1))
            out += torch.lerp(v0, v1, weight).sum(0)
        return out.reshape(shape)

    def _points(self, data, mats, cone, pts):
        import numpy as np

        n, det_rows, cols = data.shape
        m = pts.shape[0]
        mats_t = torch.tensor(np.asarray(mats), device=self.device)
        padded = torch.nn.functional.pad(data, (1, 2, 1, 2))  # zero border
        prow, pcol = det_rows + 3, cols + 3
        flat = padded.reshape(-1)
        homog = torch.cat([pts, torch.ones((m, 1), dtype=pts.dtype, device=self.device)], 1)
        out = torch.zeros(m, dtype=torch.float32, device=self.device)
        step = max(1, self.chunk_elements // max(m, 1))
        for k in range(0, n, step):
            h = torch.einsum("aij,pj->api", mats_t[k : k + step], homog)
            w = h[..., 2]
            valid = w > 0
            w = torch.where(valid, w, torch.ones_like(w))
            c = (h[..., 0] / w + 1.0).clamp_(0.0, cols + 1.0)
            r = (h[..., 1] / w + 1.0).clamp_(0.0, det_rows + 1.0)
            c0, r0 = c.floor(), r.floor()
            wc = (c - c0).to(torch.float32)
            wr = (r - r0).to(torch.float32)
            base = (torch.arange(k, k + h.shape[0], device=self.device) * (prow * pcol))[:, None]
            idx = base + r0.long() * pcol + c0.long()
            v00, v01 = flat.take(idx), flat.take(idx + 1)
            v10, v11 = flat.take(idx + pcol), flat.take(idx + pcol + 1)
            value = torch.lerp(torch.lerp(v00, v01, wc), torch.lerp(v10, v11, wc), wr)
            if cone:
                value = value * (1.0 / (w * w)).to(torch.float32)
            out += torch.where(valid, value, torch.zeros_like(value)).sum(0)
        return out
