"""CPU backend: numba kernels (the default on CPU).

Axial parallel-beam slices take the contiguous-load fast path
(:class:`~.plans.ShearPlan`, cached per (geometry, slice)); everything else
(vertical and oblique slices, cone beam, patches) the pixel-driven projective
kernel. Kernels compile on first use (and are cached on disk by numba).

Threads: numba's parallel kernels run on its ``workqueue`` threading layer
(selected here unless ``NUMBA_THREADING_LAYER`` says otherwise, and only if
numba has not started threads yet). The default ``omp`` layer's workers
spin-wait between kernels and take the cores that the trainer and the
serial parts need: on the busy 2-core development machine a 512 x 512 slice
took 30 ms with ``omp`` and 9.6 ms with ``workqueue`` (both with 2 threads).
``workqueue`` must not be entered from two threads at once: every kernel
call here holds one lock. One-thread calls use serial twins of the kernels
and never touch the threading layer.

Scale: inputs are ramp-filtered line integrals as made by
:class:`bluesky_jit.projections.ProjectionFilter`; outputs are attenuation
coefficients in 1/unit of length, weighted ``pi / n`` for the ``n``
projections given (:func:`bluesky_jit.geometry.window_weight`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..geometry import Slice, window_weight
from .base import Backend, check_projections, check_split, offset_rows
from .plans import PlanCache, ShearPlan, axial_lines, interpolate_rows, row_lines

# numba's workqueue threading layer must not be entered from two threads at once
_KERNEL_LOCK = threading.Lock()


def _as_numpy(filtered: Any) -> np.ndarray:
    if hasattr(filtered, "detach"):
        filtered = filtered.detach().cpu().numpy()
    return np.ascontiguousarray(filtered, dtype=np.float32)


class NumbaBackend(Backend):
    """Backprojection with numba on the CPU.

    Parameters
    ----------
    threads : int or None
        Threads per kernel call (numba's setting is per calling thread);
        ``None``: numba's default (all cores) for large calls, one thread for
        calls under ``parallel_work`` point-projection updates (a parallel
        region on a busy machine waits for its slowest thread: small patches
        are faster on one).
    parallel_work : int
        See ``threads``.
    upsample : int
        Phases of the resampled projection tables of the axial fast path
        (4: within 0.5 % of direct linear interpolation; 1: fastest, blurrier).
    fast_path : bool
        Use the axial fast path when it applies.
    block : int
        Image rows per task of the general kernel.
    """

    name = "numba"
    split_in_place = True

    def __init__(
        self,
        *,
        threads: int | None = None,
        upsample: int = 4,
        fast_path: bool = True,
        parallel_work: int = 1 << 22,
        block: int = 8,
    ):
        _prefer_workqueue()
        from . import _numba_kernels

        self._k = _numba_kernels
        self.threads = threads
        self.parallel_work = parallel_work
        self.upsample = int(upsample)
        self.fast_path = fast_path
        self.block = int(block)
        self.plans = PlanCache()

    # -- public API --------------------------------------------------------------------
    def backproject(
        self, filtered: Any, geometry: Any, slice_: Slice, *, row_offset: int = 0
    ) -> np.ndarray:
        """FBP/FDK of one slice; see :meth:`.base.Backend.backproject`."""
        data = _as_numpy(filtered)
        check_projections(data.shape, geometry, row_offset=row_offset)
        mats = offset_rows(geometry.matrices(), row_offset)
        weight = np.float32(window_weight(len(geometry)))
        if self.fast_path:
            plan = self.plans.get(
                (geometry, slice_, row_offset, self.upsample), lambda: self._plan(mats, slice_)
            )
            if plan is not None:
                return self._fast(data, plan) * weight
        out = np.zeros((1, *slice_.shape), dtype=np.float32)
        self._run_grids(data, mats, geometry.beam == "cone", slice_.origin[None], slice_, out)
        return out[0] * weight

    def backproject_grids(
        self, filtered: Any, geometry: Any, origins: np.ndarray, like: Slice, *, row_offset: int = 0
    ) -> np.ndarray:
        """FBP on many small grids (patches) shaped and oriented like ``like``.

        origins : (g, 3) world position of pixel (0, 0) of each grid -> (g, rows, cols).
        """
        data = _as_numpy(filtered)
        check_projections(data.shape, geometry, row_offset=row_offset)
        mats = offset_rows(geometry.matrices(), row_offset)
        origins = np.ascontiguousarray(origins, dtype=np.float64).reshape(-1, 3)
        out = np.zeros((len(origins), *like.shape), dtype=np.float32)
        self._run_grids(data, mats, geometry.beam == "cone", origins, like, out)
        return out * np.float32(window_weight(len(geometry)))

    def backproject_split(
        self,
        filtered: Any,
        geometry: Any,
        slices: Sequence[Slice],
        *,
        slots: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        normalize: bool = True,
        num_groups: int | None = None,
    ) -> list[np.ndarray]:
        """Like :meth:`.base.Backend.backproject_split`, reading the frames in place.

        Notes
        -----
        Slices of one shape share one kernel call (one pass over the
        projections; the subsets land in their own outputs), reading the
        frames in place through ``slots``. Axial parallel-beam slices take
        the fast path per subset. The case of Graas et al. 2023 (three 512 x 512 slices,
        150 projections of 647 x 768) costs about 0.4 CPU-seconds: the two
        vertical slices read every detector row of every frame (300 MB) and
        are limited by memory bandwidth more than by arithmetic.
        """
        data = _as_numpy(filtered)
        slots, groups, counts = check_split(
            data.shape, geometry, slots, groups, normalize=normalize, num_groups=num_groups
        )
        weights = np.asarray(
            [window_weight(c) if normalize else 1.0 for c in counts], dtype=np.float32
        )
        results: list[np.ndarray | None] = [None] * len(slices)
        mats = np.ascontiguousarray(geometry.matrices())
        cone = geometry.beam == "cone"
        general: dict[tuple[int, int], list[int]] = {}
        for p, slice_ in enumerate(slices):
            fast = self._split_fast(data, geometry, slice_, slots, groups, len(counts))
            if fast is not None:
                results[p] = fast * weights[:, None, None]
            else:
                general.setdefault(slice_.shape, []).append(p)
        for shape, members in general.items():
            planes = [slices[p] for p in members]
            out = np.zeros((len(counts), len(planes), *shape), dtype=np.float32)
            self._planes(
                data,
                slots,
                groups,
                mats,
                cone,
                np.array([p.origin for p in planes]),
                np.array([p.step_u for p in planes]),
                np.array([p.step_v for p in planes]),
                out,
                grid_chunk=len(planes),
            )
            for q, p in enumerate(members):
                results[p] = out[:, q] * weights[:, None, None]
        return results  # type: ignore[return-value]

    # -- internals ---------------------------------------------------------------------
    def _threads(self, work: int) -> int | None:
        if self.threads is not None:
            return self.threads
        return 1 if work < self.parallel_work else None

    def _plan(self, mats: np.ndarray, slice_: Slice) -> ShearPlan | None:
        lines = axial_lines(mats, slice_)
        if lines is None:
            return None
        return ShearPlan.build(lines, slice_.shape, self.upsample)

    def _fast(
        self, data: np.ndarray, plan: ShearPlan, slots: np.ndarray | None = None
    ) -> np.ndarray:
        q = interpolate_rows(data, plan.row, slots)
        threads = self._threads(plan.shape[0] * plan.shape[1] * len(plan.row))
        return shear_backproject(self._k, plan, q, threads)

    def _split_fast(self, data, geometry, slice_, slots, groups, k) -> np.ndarray | None:
        """Per subset, the axial fast path (unweighted sums, (k, rows, cols)), or None."""
        if not self.fast_path or geometry.beam != "parallel":
            return None
        out = np.zeros((k, *slice_.shape), dtype=np.float32)
        for j in range(k):
            member = np.flatnonzero(groups == j)
            if not member.size:
                continue
            sub = geometry[member]
            plan = self.plans.get(
                (sub, slice_, 0, self.upsample), lambda sub=sub: self._plan(sub.matrices(), slice_)
            )
            if plan is None:
                return None
            out[j] = self._fast(data, plan, slots[member])
        return out

    def _run_grids(self, data, mats, cone, origins, like: Slice, out) -> None:
        """Lines kernel when the detector row is constant along image rows, else the general one."""
        work = out.size * data.shape[0]
        lines = row_lines(mats, like) if self.fast_path else None
        if lines is not None:
            hom = np.concatenate([origins, np.ones((len(origins), 1))], 1)
            b0 = np.ascontiguousarray(hom @ mats[:, 0].T)  # (g, n)
            det_row = np.ascontiguousarray(hom @ mats[:, 1].T)
            with launch(self._k, self._threads(work)) as k:
                k.backproject_lines(
                    data, b0, lines.step_col, lines.step_row, det_row, lines.row_step, out
                )
            return
        n = data.shape[0]
        g = len(origins)
        self._planes(
            data,
            np.arange(n),
            np.zeros(n, dtype=np.int64),
            np.ascontiguousarray(mats),
            cone,
            np.ascontiguousarray(origins, dtype=np.float64),
            np.repeat(like.step_u[None], g, 0),
            np.repeat(like.step_v[None], g, 0),
            out[None],
            grid_chunk=1,
        )

    def _planes(
        self, data, slots, groups, mats, cone, origins, steps_u, steps_v, out, *, grid_chunk
    ) -> None:
        """The general kernel: grids (g, 3) of one shape -> out (k, g, rows, cols), accumulated."""
        work = out[0].size * len(slots)
        with launch(self._k, self._threads(work)) as k:
            k.backproject_planes(
                data,
                np.ascontiguousarray(slots, dtype=np.int64),
                np.ascontiguousarray(groups, dtype=np.int64),
                mats,
                bool(cone),
                origins,
                np.ascontiguousarray(steps_u, dtype=np.float64),
                np.ascontiguousarray(steps_v, dtype=np.float64),
                self.block,
                grid_chunk,
                out,
            )


def shear_backproject(kernels: Any, plan: ShearPlan, q: np.ndarray, threads: int | None) -> Any:
    """The fast path's unweighted backprojection: rows ``q`` (n, cols) of the plan's
    projections -> (rows, cols) float32."""
    rows, cols = plan.shape
    out = np.zeros((rows, cols), dtype=np.float32)
    with launch(kernels, threads) as k:
        for group in plan.groups:
            tables = np.empty((len(group.index), plan.upsample, group.length), np.float32)
            k.build_tables(
                q[group.index], group.p0, group.step, plan.upsample, group.length, tables
            )
            if group.transposed:  # at most one group: image columns as the slow axis
                out_t = np.zeros((cols, rows), dtype=np.float32)
                k.shear_accumulate(tables, group.k, group.r, group.w, out_t)
                out += out_t.T
            else:
                k.shear_accumulate(tables, group.k, group.r, group.w, out)
    return out


def _prefer_workqueue() -> None:
    """Use numba's non-spinning threading layer (see the module notes), if still possible."""
    import os

    import numba
    from numba.np.ufunc import parallel

    if os.environ.get("NUMBA_THREADING_LAYER") or getattr(parallel, "_is_initialized", True):
        return
    numba.config.THREADING_LAYER = "workqueue"


@contextmanager
def launch(kernels: Any, threads: int | None) -> Iterator[Any]:
    """Hold the kernel lock and yield the kernels to call: serial ones for one thread."""
    with _KERNEL_LOCK:
        if threads == 1:
            yield kernels.serial
        else:
            with _Threads(threads):
                yield kernels


class _Threads:
    """Set numba's (per-thread) thread count for a block."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.previous: int | None = None

    def __enter__(self) -> None:
        if self.threads is not None:
            import numba

            self.previous = numba.get_num_threads()
            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            import numba

            numba.set_num_threads(self.previous)
