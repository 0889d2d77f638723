"""Numba CPU kernels (imported lazily by :mod:`.numba_backend`; nothing compiles at import).

Two backprojection kernels and the matched forward projector of the first:

``build_tables`` + ``shear_accumulate`` (axial fast path)
    On a slice perpendicular to the detector rows the detector column is
    linear in both image indices, ``c(i, j) = b0 + i S + j C``. For a
    projection with ``|C| >= |S|`` every image row ``i`` reads the same 1D
    function, sampled with step ``C`` and shifted by ``i S``. So the filtered
    projection row is resampled once per projection onto a fine table (step
    ``C / U``, linear interpolation), and image row ``i`` adds
    ``(1 - w_i) T[r_i, k_i + j] + w_i T[r_i + 1, k_i + j]``: contiguous
    loads, no gather, vectorised by LLVM. ``(k_i, r_i, w_i)`` depend only on
    the geometry and are cached by the caller. Projections with ``|S| > |C|``
    run the same kernel on the transposed image. With ``U = 4`` the result is
    within 0.5 % (relative L2) of direct pixel-driven linear interpolation.

``backproject_planes`` (any geometry, any orientation)
    Pixel-driven: every point of a grid (a slice or a batch of patches) maps
    through the projection's 3x4 matrix to a detector (row, column), gathers
    a bilinear sample and, for cone beam, the FDK distance weight ``1 / w**2``.
    Projections are read in place through an index array (no copy of the
    ring buffer) and may go to different outputs (the Noise2Inverse halves).

``shear_forward``
    The exact transpose of ``shear_accumulate`` followed by the transpose of
    ``build_tables``: a forward projector matched to the fast backprojector,
    used by streaming SIRT.
"""

from __future__ import annotations

import math
import types

import numpy as np
from numba import njit, prange


def _jit(function, options):
    """``njit`` with an on-disk cache, or without one where no cache directory is writable.

    Every kernel releases the GIL (``nogil``): they run on the worker thread,
    and a kernel holding the GIL would stop the RunEngine's thread (in the
    same process) for as long as it runs.
    """
    options = {"nogil": True, **options}
    try:
        return njit(cache=True, **options)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return njit(cache=False, **options)(function)


serial = types.SimpleNamespace()
"""The same kernels compiled without threads (no threading-layer overhead for one thread)."""


def _kernel(**options):
    """A parallel kernel; its serial twin goes to :data:`serial` under the same name.

    The twin is a copy of the function under another qualified name: numba's
    on-disk cache is keyed by that name, and two dispatchers of one function
    would share (and overwrite) one cache entry.
    """

    def wrap(function):
        twin = types.FunctionType(
            function.__code__,
            function.__globals__,
            function.__name__ + "_serial",
            function.__defaults__,
            function.__closure__,
        )
        twin.__qualname__ = function.__qualname__ + "_serial"
        setattr(serial, function.__name__, _jit(twin, {**options, "parallel": False}))
        return _jit(function, options)

    return wrap


@_kernel(parallel=True, fastmath=True)
def build_tables(q, p0, step, upsample, length, tables):  # pragma: no cover - numba
    """``tables[a, r, m] = q_a(p0[a] + (m * upsample + r) * step[a])``, linear, zero outside.

    q : (n, cols) float32; p0, step : (n,) float64; tables : (n, upsample, length) float32.
    """
    n, cols = q.shape
    for a in prange(n):
        qa = q[a]
        for r in range(upsample):
            base = p0[a] + r * step[a]
            stride = upsample * step[a]
            for m in range(length):
                p = base + m * stride
                fk = math.floor(p)
                k = int(fk)
                w = np.float32(p - fk)
                if k >= 0 and k + 1 < cols:
                    v0 = qa[k]
                    tables[a, r, m] = v0 + w * (qa[k + 1] - v0)
                elif k == -1:
                    tables[a, r, m] = w * qa[0]
                elif k == cols - 1:
                    tables[a, r, m] = (np.float32(1.0) - w) * qa[cols - 1]
                else:
                    tables[a, r, m] = 0.0


@_kernel(parallel=True, fastmath=True)
def shear_accumulate(tables, k, r, w, out):  # pragma: no cover - numba
    """``out[i, j] += (1 - w) T[a, r, k + j] + w T[a, r + 1, k + j]`` over projections a.

    tables : (n, U, L) float32; k, r : (n, rows) int64; w : (n, rows) float32;
    out : (rows, cols) float32, accumulated in place.
    """
    n, upsample, _ = tables.shape
    rows, cols = out.shape
    for i in prange(rows):
        acc = out[i]
        for a in range(n):
            ki = k[a, i]
            ri = r[a, i]
            wi = w[a, i]
            t0 = tables[a, ri, ki : ki + cols]
            if ri + 1 < upsample:
                t1 = tables[a, ri + 1, ki : ki + cols]
            else:
                t1 = tables[a, 0, ki + 1 : ki + 1 + cols]
            for j in range(cols):
                acc[j] += t0[j] + wi * (t1[j] - t0[j])


@_kernel(parallel=True, fastmath=True)
def shear_forward(image, k, r, w, p0, step, upsample, length, cols_det, out):  # pragma: no cover
    """Transpose of ``shear_accumulate`` then of ``build_tables``: image -> detector rows.

    image : (rows, cols) float32; out : (n, cols_det) float32, overwritten.
    """
    n = k.shape[0]
    rows, cols = image.shape
    for a in prange(n):
        tables = np.zeros((upsample, length), dtype=np.float32)
        for i in range(rows):
            ki = k[a, i]
            ri = r[a, i]
            wi = w[a, i]
            row = image[i]
            t0 = tables[ri, ki : ki + cols]
            if ri + 1 < upsample:
                t1 = tables[ri + 1, ki : ki + cols]
            else:
                t1 = tables[0, ki + 1 : ki + 1 + cols]
            for j in range(cols):
                t0[j] += (np.float32(1.0) - wi) * row[j]
                t1[j] += wi * row[j]
        oa = out[a]
        for j in range(cols_det):
            oa[j] = 0.0
        for rr in range(upsample):
            base = p0[a] + rr * step[a]
            stride = upsample * step[a]
            for m in range(length):
                value = tables[rr, m]
                if value == 0.0:
                    continue
                p = base + m * stride
                fk = math.floor(p)
                kk = int(fk)
                ww = np.float32(p - fk)
                if kk >= 0 and kk < cols_det:
                    oa[kk] += (np.float32(1.0) - ww) * value
                if kk + 1 >= 0 and kk + 1 < cols_det:
                    oa[kk + 1] += ww * value


@njit(fastmath=True, inline="always")
def _bilinear(da, r, c, det_rows, det_cols):  # pragma: no cover - numba
    """Bilinear sample of one projection at (row r, column c); zero outside."""
    fr = math.floor(r)
    fc = math.floor(c)
    ir = int(fr)
    ic = int(fc)
    wr = np.float32(r - fr)
    wc = np.float32(c - fc)
    if ir >= 0 and ic >= 0 and ir + 1 < det_rows and ic + 1 < det_cols:
        v00 = da[ir, ic]
        v01 = da[ir, ic + 1]
        v10 = da[ir + 1, ic]
        v11 = da[ir + 1, ic + 1]
    else:
        if ir < -1 or ic < -1 or ir >= det_rows or ic >= det_cols:
            return np.float32(0.0)
        top = ir >= 0
        bottom = ir + 1 < det_rows
        left = ic >= 0
        right = ic + 1 < det_cols
        v00 = da[ir, ic] if top and left else np.float32(0.0)
        v01 = da[ir, ic + 1] if top and right else np.float32(0.0)
        v10 = da[ir + 1, ic] if bottom and left else np.float32(0.0)
        v11 = da[ir + 1, ic + 1] if bottom and right else np.float32(0.0)
    upper = v00 + wc * (v01 - v00)
    lower = v10 + wc * (v11 - v10)
    return upper + wr * (lower - upper)


@njit(fastmath=True, inline="always")
def _clip_range(a, b, lo, hi):  # pragma: no cover - numba
    """Intersect the index range [lo, hi) with {j : a + b j >= 0}."""
    if b > 1e-12 or b < -1e-12:
        t = min(max(-a / b, lo - 1.0), hi + 1.0)  # bounded before the int conversion
        if b > 0:
            lo = max(lo, int(math.ceil(t)))
        else:
            hi = min(hi, int(math.floor(t)) + 1)
    elif a < 0:
        hi = lo
    return lo, max(lo, hi)


@njit(fastmath=True, inline="always")
def _weighted_sample(da, hc, hr, hw, dc, dr, dw, j, cone):  # pragma: no cover - numba
    """Bounds-checked bilinear sample at image column j (detector border), FDK-weighted."""
    inv = 1.0 / (hw + j * dw)
    value = _bilinear(da, (hr + j * dr) * inv, (hc + j * dc) * inv, da.shape[0], da.shape[1])
    return value * np.float32(inv * inv) if cone else value


@_kernel(parallel=True, fastmath=True, error_model="numpy")
def backproject_planes(
    data, slots, groups, mats, cone, origins, steps_u, steps_v, block, grid_chunk, out
):  # pragma: no cover - numba
    """Pixel-driven FBP/FDK on grids of any orientation, reading projections in place.

    data : (m, det_rows, det_cols) float32 filtered projections (e.g. a whole
    ring buffer); projection ``a`` is ``data[slots[a]]`` and is added to
    ``out[groups[a]]`` (one call gives the even and the odd half);
    mats : (n, 3, 4) float64 projective maps; cone : bool, FDK weight ``1 / w**2``;
    origins, steps_u, steps_v : (g, 3) float64 world position of pixel (0, 0),
    column step and row step of grid ``b``;
    block : image rows per task; grid_chunk : grids per task (grids of one
    task share the detector rows they read: the two vertical slices);
    out : (k, g, rows, cols) float32, accumulated in place.

    Along an image row the detector position is a ratio of linear functions of
    the column index (a homography), monotonic on the row. The part of the row
    whose bilinear footprint lies inside the detector is found in closed form;
    there one loop computes indices and weights in float32 (vectorised) and a
    second gathers, without bounds tests. The few points on the detector's
    border take the bounds-checked path, points off the detector are skipped.
    """
    m_data, det_rows, det_cols = data.shape
    n = slots.shape[0]
    _, g, rows, cols = out.shape
    flat = data.reshape(m_data, det_rows * det_cols)
    margin = 1e-3
    top_c = det_cols - 1 - margin
    top_r = det_rows - 1 - margin
    n_blocks = (rows + block - 1) // block
    n_chunks = (g + grid_chunk - 1) // grid_chunk
    for task in prange(n_blocks * n_chunks):
        b0 = (task // n_blocks) * grid_chunk
        b1 = min(b0 + grid_chunk, g)
        i0 = (task % n_blocks) * block
        i1 = min(i0 + block, rows)
        idx = np.empty(cols, np.int32)
        wcs = np.empty(cols, np.float32)
        wrs = np.empty(cols, np.float32)
        gws = np.empty(cols, np.float32)
        for a in range(n):
            mt = mats[a]
            da = data[slots[a]]
            fa = flat[slots[a]]
            plane = out[groups[a]]
            for i in range(i0, i1):
                for b in range(b0, b1):
                    px = origins[b, 0] + i * steps_v[b, 0]
                    py = origins[b, 1] + i * steps_v[b, 1]
                    pz = origins[b, 2] + i * steps_v[b, 2]
                    ux, uy, uz = steps_u[b, 0], steps_u[b, 1], steps_u[b, 2]
                    hc = mt[0, 0] * px + mt[0, 1] * py + mt[0, 2] * pz + mt[0, 3]
                    hr = mt[1, 0] * px + mt[1, 1] * py + mt[1, 2] * pz + mt[1, 3]
                    hw = mt[2, 0] * px + mt[2, 1] * py + mt[2, 2] * pz + mt[2, 3]
                    dc = mt[0, 0] * ux + mt[0, 1] * uy + mt[0, 2] * uz
                    dr = mt[1, 0] * ux + mt[1, 1] * uy + mt[1, 2] * uz
                    dw = mt[2, 0] * ux + mt[2, 1] * uy + mt[2, 2] * uz
                    # points whose footprint touches the detector: -1 < c < cols, -1 < r < rows
                    lo, hi = _clip_range(hw - 1e-6, dw, 0, cols)
                    lo, hi = _clip_range(hc + hw, dc + dw, lo, hi)
                    lo, hi = _clip_range(det_cols * hw - hc, det_cols * dw - dc, lo, hi)
                    lo, hi = _clip_range(hr + hw, dr + dw, lo, hi)
                    lo, hi = _clip_range(det_rows * hw - hr, det_rows * dw - dr, lo, hi)
                    # ... and whose four neighbours are all on it
                    ilo, ihi = _clip_range(hc - margin * hw, dc - margin * dw, lo, hi)
                    ilo, ihi = _clip_range(top_c * hw - hc, top_c * dw - dc, ilo, ihi)
                    ilo, ihi = _clip_range(hr - margin * hw, dr - margin * dw, ilo, ihi)
                    ilo, ihi = _clip_range(top_r * hw - hr, top_r * dw - dr, ilo, ihi)
                    acc = plane[b, i]
                    count = ihi - ilo
                    if count > 0:
                        fc = np.float32(hc + ilo * dc)
                        fr = np.float32(hr + ilo * dr)
                        fw = np.float32(hw + ilo * dw)
                        sc, sr, sw = np.float32(dc), np.float32(dr), np.float32(dw)
                        for jj in range(count):
                            fj = np.float32(jj)
                            inv = np.float32(1.0) / (fw + fj * sw)
                            c = (fc + fj * sc) * inv
                            r = (fr + fj * sr) * inv
                            ic = min(max(np.int32(c), np.int32(0)), np.int32(det_cols - 2))
                            ir = min(max(np.int32(r), np.int32(0)), np.int32(det_rows - 2))
                            idx[jj] = ir * np.int32(det_cols) + ic
                            wcs[jj] = c - np.float32(ic)
                            wrs[jj] = r - np.float32(ir)
                            gws[jj] = inv * inv if cone else np.float32(1.0)
                        inner = acc[ilo:ihi]
                        for jj in range(count):
                            k = idx[jj]
                            wc = wcs[jj]
                            v00 = fa[k]
                            v01 = fa[k + 1]
                            v10 = fa[k + det_cols]
                            v11 = fa[k + det_cols + 1]
                            upper = v00 + wc * (v01 - v00)
                            lower = v10 + wc * (v11 - v10)
                            inner[jj] += (upper + wrs[jj] * (lower - upper)) * gws[jj]
                    else:
                        ilo = ihi = lo
                    for j in range(lo, ilo):
                        acc[j] += _weighted_sample(da, hc, hr, hw, dc, dr, dw, j, cone)
                    for j in range(ihi, hi):
                        acc[j] += _weighted_sample(da, hc, hr, hw, dc, dr, dw, j, cone)


@njit(fastmath=True, inline="always")
def _interior(start, step, n, cols):  # pragma: no cover - numba
    """Index range [lo, hi) of j in [0, n) with 0 <= start + j * step <= cols - 1 - 1e-6."""
    top = cols - 1 - 1e-6
    if step > 1e-12:
        lo = math.ceil(-start / step)
        hi = math.floor((top - start) / step) + 1
    elif step < -1e-12:
        lo = math.ceil((top - start) / step)
        hi = math.floor(-start / step) + 1
    elif 0.0 <= start <= top:
        return 0, n
    else:
        return 0, 0
    lo = min(max(lo, 0), n)
    hi = min(max(hi, lo), n)
    return int(lo), int(hi)


@njit(fastmath=True, inline="always")
def _lerp_edge(qa, p, cols):  # pragma: no cover - numba
    """Linear sample at p with zeros outside the detector (for the few edge points)."""
    fk = math.floor(p)
    k = int(fk)
    if k < -1 or k >= cols:
        return np.float32(0.0)
    w = np.float32(p - fk)
    v0 = qa[k] if k >= 0 else np.float32(0.0)
    v1 = qa[k + 1] if k + 1 < cols else np.float32(0.0)
    return v0 + w * (v1 - v0)


@_kernel(parallel=True, fastmath=True)
def backproject_lines(data, b0, step_col, step_row, det_row, det_row_step, out):  # pragma: no cover
    """Parallel-beam grids on which the detector row does not change along image rows.

    Axial slices and patches (constant detector row) and vertical slices with
    horizontal columns (detector row changes with the image row only).
    data : (n, det_rows, cols) float32; b0, det_row : (g, n) float64 detector
    column and row of pixel (0, 0) of grid g in projection a; step_col,
    step_row : (n,) float64 column change per image column / row;
    det_row_step : (n,) float64 detector row change per image row;
    out : (g, rows, cols) float32, accumulated in place.
    """
    n, det_rows, det_cols = data.shape
    g, rows, cols = out.shape
    for gi in prange(g * rows):
        b = gi // rows
        i = gi % rows
        acc = np.zeros(cols, dtype=np.float32)
        for a in range(n):
            rr = det_row[b, a] + i * det_row_step[a]
            fr = math.floor(rr)
            ir = int(fr)
            wr = np.float32(rr - fr)
            start = b0[b, a] + i * step_row[a]
            sc = step_col[a]
            lo, hi = _interior(start, sc, cols, det_cols)
            for half in range(2):
                row = ir + half
                weight = (np.float32(1.0) - wr) if half == 0 else wr
                if row < 0 or row >= det_rows or weight == 0.0:
                    continue
                qa = data[a, row]
                for j in range(lo, hi):
                    p = start + j * sc
                    k = int(p)
                    w = np.float32(p - k)
                    v0 = qa[k]
                    acc[j] += weight * (v0 + w * (qa[k + 1] - v0))
                for j in range(0, lo):
                    acc[j] += weight * _lerp_edge(qa, start + j * sc, det_cols)
                for j in range(hi, cols):
                    acc[j] += weight * _lerp_edge(qa, start + j * sc, det_cols)
        row_out = out[b, i]
        for j in range(cols):
            row_out[j] += acc[j]
