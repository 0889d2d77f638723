"""CUDA backend: one cupy ``RawKernel``, pixel-driven, any geometry and orientation.

One thread per output point loops over the projections: projective map,
bilinear sample (zero outside the detector) and, for cone beam, the FDK
weight ``1 / w**2``, the same arithmetic as the numba bilinear kernel. Inputs
may be numpy arrays, cupy arrays or CUDA torch tensors (through
``__cuda_array_interface__``, no copy). Same scale as every backend (see
:class:`.base.Backend`). Needs cupy and a GPU (``pip install 'bluesky-jit[cuda]'``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from ..geometry import Slice, window_weight
from .base import Backend, check_projections, offset_rows

_SOURCE = r"""
extern "C" __global__
void backproject(const float* data, const double* mats, const int n, const int det_rows,
                 const int det_cols, const int cone, const double* points, const int m,
                 float* out)
{
    const int p = blockDim.x * blockIdx.x + threadIdx.x;
    if (p >= m) return;
    const double x = points[3 * p], y = points[3 * p + 1], z = points[3 * p + 2];
    float acc = 0.0f;
    for (int a = 0; a < n; ++a) {
        const double* M = mats + 12 * a;
        const double hc = M[0] * x + M[1] * y + M[2] * z + M[3];
        const double hr = M[4] * x + M[5] * y + M[6] * z + M[7];
        const double hw = M[8] * x + M[9] * y + M[10] * z + M[11];
        if (hw <= 1e-9) continue;
        const double inv = 1.0 / hw;
        const double c = hc * inv, r = hr * inv;
        const double fc = floor(c), fr = floor(r);
        const int ic = (int)fc, ir = (int)fr;
        if (ic < -1 || ir < -1 || ic >= det_cols || ir >= det_rows) continue;
        const float wc = (float)(c - fc), wr = (float)(r - fr);
        const float* d = data + (size_t)a * det_rows * det_cols;
        const bool top = ir >= 0, bottom = ir + 1 < det_rows;
        const bool left = ic >= 0, right = ic + 1 < det_cols;
        const float v00 = (top && left) ? d[ir * det_cols + ic] : 0.0f;
        const float v01 = (top && right) ? d[ir * det_cols + ic + 1] : 0.0f;
        const float v10 = (bottom && left) ? d[(ir + 1) * det_cols + ic] : 0.0f;
        const float v11 = (bottom && right) ? d[(ir + 1) * det_cols + ic + 1] : 0.0f;
        const float upper = v00 + wc * (v01 - v00);
        const float lower = v10 + wc * (v11 - v10);
        float v = upper + wr * (lower - upper);
        if (cone) v *= (float)(inv * inv);
        acc += v;
    }
    out[p] = acc;
}
"""


class CupyBackend(Backend):
    """Backprojection with a cupy CUDA kernel.

    Parameters
    ----------
    device : torch.device, str or int
        The CUDA device (index taken from ``cuda:N``).
    block : int
        Threads per block.
    """

    name = "cupy"

    def __init__(self, *, device: Any = "cuda", block: int = 256) -> None:
        try:
            import cupy
        except ImportError as error:
            raise ConfigError(
                "backend='cupy' needs cupy and CUDA (pip install 'bluesky-jit[cuda]'); use "
                "backend='torch' or 'numba' otherwise."
            ) from error
        index = getattr(device, "index", None)
        if isinstance(device, str) and ":" in device:
            index = int(device.split(":")[1])
        elif isinstance(device, int):
            index = device
        self._cp = cupy
        self.device = cupy.cuda.Device(index or 0)
        self.block = block
        with self.device:
            self._kernel = cupy.RawKernel(_SOURCE, "backproject")

    def backproject(self, filtered, geometry, slice_: Slice, *, row_offset: int = 0) -> np.ndarray:
        """FBP/FDK of one slice; see :meth:`.base.Backend.backproject`."""
        out = self._run(filtered, geometry, slice_.points().reshape(-1, 3), row_offset)
        return out.reshape(slice_.shape) * np.float32(window_weight(len(geometry)))

    def backproject_grids(
        self, filtered, geometry, origins, like: Slice, *, row_offset: int = 0
    ) -> np.ndarray:
        """Grids shaped like ``like`` with pixel (0, 0) at ``origins`` (g, 3)."""
        local = like.points() - like.origin
        pts = np.asarray(origins, dtype=np.float64).reshape(-1, 1, 1, 3) + local[None]
        out = self._run(filtered, geometry, pts.reshape(-1, 3), row_offset)
        return out.reshape(len(pts), *like.shape) * np.float32(window_weight(len(geometry)))

    def _run(self, filtered, geometry, points: np.ndarray, row_offset: int) -> np.ndarray:
        cp = self._cp
        mats = np.asarray(offset_rows(geometry.matrices(), row_offset))
        with self.device:
            data = cp.ascontiguousarray(cp.asarray(filtered, dtype=cp.float32))
            check_projections(tuple(data.shape), geometry, row_offset=row_offset)
            n, det_rows, det_cols = data.shape
            m = len(points)
            out = cp.zeros(m, dtype=cp.float32)
            self._kernel(
                ((m + self.block - 1) // self.block,),
                (self.block,),
                (
                    data,
                    cp.asarray(mats.reshape(-1)),
                    np.int32(n),
                    np.int32(det_rows),
                    np.int32(det_cols),
                    np.int32(geometry.beam == "cone"),
                    cp.asarray(np.ascontiguousarray(points, dtype=np.float64).reshape(-1)),
                    np.int32(m),
                    out,
                ),
            )
            return cp.asnumpy(out)
