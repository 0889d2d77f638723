"""Geometry-only precomputation shared by the backends (computed once, cached).

:func:`axial_lines` recognises the fast case (parallel beam, a slice on which
the detector row is constant: axial slices without detector tilt) and gives,
per projection, the detector row and the linear map from image indices to
the detector column; :func:`row_lines` does the same where the row changes
only from image row to image row (vertical slices). :class:`ShearPlan` turns
the first into the index/weight tables of the contiguous-load kernel (see
``_numba_kernels``), and :class:`PlanCache` keeps a few of them keyed by
(geometry, slice) values.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..geometry import Slice


@dataclass(frozen=True)
class AxialLines:
    """Detector column ``b0 + i S + j C`` and row ``row`` of image pixel (i, j), per projection.

    All arrays have shape (n,), float64.
    """

    b0: np.ndarray
    step_col: np.ndarray
    step_row: np.ndarray
    row: np.ndarray


def _flat(mats: np.ndarray, slice_: Slice, tol: float, fixed_row: bool) -> tuple | None:
    """``(mats, o, du, dv)`` when the weight is 1 over the slice and the detector row does not
    vary along its columns (nor, with ``fixed_row``, its rows); else None."""
    mats = np.asarray(mats)
    o = np.append(slice_.origin, 1.0)
    du, dv = slice_.step_u, slice_.step_v
    w_var = np.abs(mats[:, 2, :3] @ du) * slice_.cols + np.abs(mats[:, 2, :3] @ dv) * slice_.rows
    w_at = mats[:, 2] @ o
    r_var = np.abs(mats[:, 1, :3] @ du) * slice_.cols
    if fixed_row:
        r_var = r_var + np.abs(mats[:, 1, :3] @ dv) * slice_.rows
    if np.any(w_var > tol) or np.any(np.abs(w_at - 1.0) > tol) or np.any(r_var > 1e-6):
        return None
    return mats, o, du, dv


def axial_lines(mats: np.ndarray, slice_: Slice, *, tol: float = 1e-7) -> AxialLines | None:
    """The fast-path description of a slice, or None when the detector row or weight varies."""
    flat = _flat(mats, slice_, tol, fixed_row=True)
    if flat is None:
        return None
    mats, o, du, dv = flat
    return AxialLines(
        b0=mats[:, 0] @ o,
        step_col=mats[:, 0, :3] @ du,
        step_row=mats[:, 0, :3] @ dv,
        row=mats[:, 1] @ o,
    )


@dataclass(frozen=True)
class RowLines:
    """Parallel beam, detector row constant along image rows: column ``b0 + i S + j C``, row
    ``row0 + i R``, per projection (arrays of shape (n,), float64)."""

    b0: np.ndarray
    step_col: np.ndarray
    step_row: np.ndarray
    row0: np.ndarray
    row_step: np.ndarray


def row_lines(mats: np.ndarray, slice_: Slice, *, tol: float = 1e-7) -> RowLines | None:
    """Lines description (axial slices, vertical slices with horizontal columns), or None."""
    flat = _flat(mats, slice_, tol, fixed_row=False)
    if flat is None:
        return None
    mats, o, du, dv = flat
    return RowLines(
        b0=mats[:, 0] @ o,
        step_col=mats[:, 0, :3] @ du,
        step_row=mats[:, 0, :3] @ dv,
        row0=mats[:, 1] @ o,
        row_step=mats[:, 1, :3] @ dv,
    )


@dataclass(frozen=True)
class ShearGroup:
    """Projections handled with image rows as the slow axis (or columns, ``transposed``).

    ``k, r, w`` have shape (n_group, slow); ``p0, step`` (n_group,); the table of
    projection a holds ``upsample`` phases of ``length`` samples at
    ``p0[a] + (m * upsample + r) * step[a]``.
    """

    index: np.ndarray
    transposed: bool
    k: np.ndarray
    r: np.ndarray
    w: np.ndarray
    p0: np.ndarray
    step: np.ndarray
    length: int


@dataclass(frozen=True)
class ShearPlan:
    """Index/weight tables of the contiguous-load backprojection of one (geometry, slice)."""

    shape: tuple[int, int]
    upsample: int
    groups: tuple[ShearGroup, ...]
    row: np.ndarray

    @classmethod
    def build(cls, lines: AxialLines, shape: tuple[int, int], upsample: int = 4) -> ShearPlan:
        rows, cols = shape
        c_step, r_step = lines.step_col, lines.step_row
        along_rows = np.abs(c_step) >= np.abs(r_step)
        groups = []
        for transposed, sel in ((False, along_rows), (True, ~along_rows)):
            index = np.flatnonzero(sel)
            if index.size == 0:
                continue
            fast = (r_step if transposed else c_step)[index]
            slow = (c_step if transposed else r_step)[index]
            n_slow, n_fast = (cols, rows) if transposed else (rows, cols)
            b = lines.b0[index, None] + np.arange(n_slow)[None, :] * slow[:, None]
            u = b / fast[:, None]
            umin = u.min(axis=1)
            fine = (u - umin[:, None]) * upsample
            whole = np.floor(fine)
            w = (fine - whole).astype(np.float32)
            whole = whole.astype(np.int64)
            groups.append(
                ShearGroup(
                    index=index,
                    transposed=transposed,
                    k=whole // upsample,
                    r=whole % upsample,
                    w=w,
                    p0=umin * fast,
                    step=fast / upsample,
                    length=int((whole // upsample).max()) + n_fast + 2,
                )
            )
        return cls(shape=tuple(shape), upsample=upsample, groups=tuple(groups), row=lines.row)


class PlanCache:
    """A small LRU cache (geometry-only plans, geometries), safe to share between threads."""

    def __init__(self, maxsize: int = 16) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = make()
        with self._lock:
            self.misses += 1
            self._items[key] = value
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value


def interpolate_rows(
    data: np.ndarray, rows: np.ndarray, slots: np.ndarray | None = None
) -> np.ndarray:
    """Per projection a, the detector row ``rows[a]`` of ``data[a]`` (linear, zero outside).

    data : (m, det_rows, cols); rows : (n,); slots : (n,) optional, projection a
    is ``data[slots[a]]`` (default: ``n == m``, projection a is ``data[a]``) -> (n, cols)
    float32.
    """
    _, det_rows, cols = data.shape
    n = len(rows)
    base = np.floor(rows).astype(np.int64)
    frac = (rows - base).astype(np.float32)[:, None]
    out = np.zeros((n, cols), dtype=np.float32)
    a = np.arange(n) if slots is None else np.asarray(slots, dtype=np.int64)
    for offset, weight in ((0, 1.0 - frac), (1, frac)):
        idx = base + offset
        ok = (idx >= 0) & (idx < det_rows)
        if np.any(ok):
            out[ok] += weight[ok] * data[a[ok], idx[ok]]
    return out
