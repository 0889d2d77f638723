"""Windowed streaming SIRT with warm start (Liu et al. 2019: window W, iterations I).

Every ``W`` new projections, ``I`` SIRT iterations run on the last ``W``
projections, starting from the previous estimate; the estimate therefore
keeps what earlier windows taught it while following a changing object
(Z. Liu, T. Bicer, R. Kettimuthu and I. Foster, "Deep learning accelerated light
source experiments", IEEE/ACM Workshop on Deep Learning on Supercomputers (DLS), 2019).

The operator pair is matched: :class:`ShearOperator` applies the fast
axial backprojection of :mod:`._numba_kernels` (``B``) and its exact
transpose; the forward projector is ``A = (pixel_image**2 / pixel_detector)
B^T``, so ``A x`` are line integrals (dimensionless) of an image ``x`` in
1/unit of length, the scale of :class:`~bluesky_jit.projections.FlatField`.

SIRT update (Gregor & Benson 2008): ``x <- x + C A^T R (b - A x)`` with
``R = 1 / (A 1)`` and ``C = 1 / (A^T 1)``, optionally clipped at zero.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np

from ..errors import ConfigError, GeometryError, ScanDataError
from ..geometry import ProjectionGeometry, ScanGeometry, Slice
from ..projections import FlatField, ProjectionBuffer, correct
from .numba_backend import _prefer_workqueue, launch, shear_backproject
from .plans import PlanCache, ShearPlan, axial_lines


class ShearOperator:
    """Forward projection ``A`` and its transpose for one (parallel geometry, axial slice).

    Parameters
    ----------
    geometry : ProjectionGeometry
        Parallel beam; its detector rows are ignored (one row of data).
    slice_ : Slice
        Axial (the detector row must be constant over it).
    upsample : int
        Phases of the resampled tables (see ``_numba_kernels``).
    threads : int or None
    """

    def __init__(
        self,
        geometry: ProjectionGeometry,
        slice_: Slice,
        *,
        upsample: int = 4,
        threads: int | None = None,
    ) -> None:
        _prefer_workqueue()
        from . import _numba_kernels

        self._k = _numba_kernels
        lines = axial_lines(geometry.matrices(), slice_)
        if lines is None:
            raise GeometryError(
                "Streaming SIRT reconstructs axial parallel-beam slices; this geometry/slice "
                "has a varying detector row or cone-beam weights. Use FBP/FDK for it."
            )
        self.plan = ShearPlan.build(lines, slice_.shape, upsample)
        self.shape = slice_.shape
        self.cols = geometry.shape[1]
        self.n = len(geometry)
        self.threads = threads
        self.scale = np.float32(slice_.pixel_size**2 / geometry.pixel_size)

    @cached_property
    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """SIRT's ``R = 1 / (A 1)`` and ``C = 1 / (A^T 1)`` (zero where a sum vanishes)."""
        row_sums = self.forward(np.ones(self.shape, np.float32))
        col_sums = self.back(np.ones((self.n, self.cols), np.float32))
        r = np.where(row_sums > 1e-6, 1.0 / np.maximum(row_sums, 1e-6), 0.0)
        c = np.where(col_sums > 1e-6, 1.0 / np.maximum(col_sums, 1e-6), 0.0)
        return r.astype(np.float32), c.astype(np.float32)

    def back(self, sino: np.ndarray) -> np.ndarray:
        """``A^T y``: (n, cols) -> image."""
        sino = np.ascontiguousarray(sino, dtype=np.float32)
        return shear_backproject(self._k, self.plan, sino, self.threads) * self.scale

    def forward(self, image: np.ndarray) -> np.ndarray:
        """``A x``: image -> (n, cols) line integrals."""
        image = np.ascontiguousarray(image, dtype=np.float32)
        sino = np.zeros((self.n, self.cols), dtype=np.float32)
        with launch(self._k, self.threads) as k:
            for group in self.plan.groups:
                src = np.ascontiguousarray(image.T) if group.transposed else image
                part = np.empty((len(group.index), self.cols), dtype=np.float32)
                k.shear_forward(
                    src,
                    group.k,
                    group.r,
                    group.w,
                    group.p0,
                    group.step,
                    self.plan.upsample,
                    group.length,
                    self.cols,
                    part,
                )
                sino[group.index] = part
        return sino * self.scale


def sirt(
    operator: ShearOperator,
    sinogram: np.ndarray,
    x0: np.ndarray | None = None,
    *,
    iterations: int = 10,
    nonnegative: bool = True,
) -> np.ndarray:
    """``iterations`` SIRT updates of ``x0`` (zeros by default) towards ``A x = sinogram``."""
    x = np.zeros(operator.shape, np.float32) if x0 is None else np.array(x0, np.float32)
    r, c = operator.weights
    b = np.asarray(sinogram, dtype=np.float32)
    for _ in range(iterations):
        x += c * operator.back(r * (b - operator.forward(x)))
        if nonnegative:
            np.maximum(x, 0.0, out=x)
    return x


class StreamingSIRT:
    """Windowed SIRT on one axial slice, warm-started from the previous window.

    Parameters
    ----------
    geometry : ScanGeometry
        Parallel beam.
    window : int
        W: projections per update (and refresh interval).
    iterations : int
        I: SIRT iterations per window.
    slice_row : int or None
        Detector row of the slice (middle by default).
    shape : int or None
        Slice side in pixels (the detector width by default).
    nonnegative : bool
    threads : int or None
    """

    def __init__(
        self,
        geometry: ScanGeometry,
        *,
        window: int = 32,
        iterations: int = 1,
        slice_row: int | None = None,
        shape: int | None = None,
        nonnegative: bool = True,
        threads: int | None = None,
    ) -> None:
        if geometry.beam != "parallel":
            raise GeometryError(
                f"Streaming SIRT handles parallel beam; got beam={geometry.beam!r}. Use the "
                "StreamingReconstructor (FDK) for cone beam."
            )
        if window < 1 or iterations < 1:
            raise ConfigError(
                f"SIRT needs window >= 1 and iterations >= 1; got window={window}, "
                f"iterations={iterations} (Liu et al. 2019 use W in 16..256, I in 1..10)."
            )
        rows = geometry.rows
        self.row = rows // 2 if slice_row is None else int(slice_row)
        if not 0 <= self.row < rows:
            raise ConfigError(
                f"slice_row {self.row} is outside the detector rows 0..{rows - 1}; "
                "pick a row inside."
            )
        self.geometry = geometry
        self.window = window
        self.iterations = iterations
        self.nonnegative = nonnegative
        self.threads = threads
        self.slice = geometry.axial_slice(
            self.row, shape=geometry.slice_size if shape is None else shape
        )
        self.buffer = ProjectionBuffer(max(window, 2), (1, geometry.cols))
        self.flatfield: FlatField | None = None
        self.image = np.zeros(self.slice.shape, dtype=np.float32)
        self.updates = 0
        self._since = 0
        self._operators = PlanCache(maxsize=4)

    def set_flatfield(self, darks: np.ndarray, flats: np.ndarray) -> None:
        """Dark (n, rows, cols) and flat (m, rows, cols) fields for all later frames.

        Raises
        ------
        ScanDataError
            If the fields do not have the geometry's detector shape.
        """
        self.flatfield = FlatField(darks, flats, detector_shape=self.geometry.detector_shape)

    def add_frame(self, frame: np.ndarray, *, angle_deg: float, index: int) -> bool:
        """Correct and keep one frame's slice row; True when a window is complete."""
        p = correct(self.flatfield, frame, angle_deg, index)[self.row : self.row + 1]
        self.buffer.append(p, angle=math.radians(angle_deg), index=index)
        self._since += 1
        if self._since >= self.window:
            self._since = 0
            return True
        return False

    def reconstruct(self) -> np.ndarray:
        """Run I iterations on the last W projections from the current estimate; a copy of it."""
        indices = self.buffer.last(self.window)
        if len(indices) == 0:
            raise ScanDataError("No projection buffered yet; add frames before reconstruct().")
        data, _ = self.buffer.select(indices, rows=0)
        geom = self.geometry.projection_geometry(self.buffer.angles_of(indices))
        op = self._operators.get(
            (geom, self.slice), lambda: ShearOperator(geom, self.slice, threads=self.threads)
        )
        self.image = sirt(
            op, data.numpy(), self.image, iterations=self.iterations, nonnegative=self.nonnegative
        )
        self.updates += 1
        return self.image.copy()
