"""The streaming slice reconstructor: frames in, slices and training pairs out.

Works on arrays only; :mod:`bluesky_jit.ingest` feeds it from documents.
Each frame is corrected, (cone beam) FDK-weighted and ramp filtered once on
arrival (:class:`~bluesky_jit.projections.ProjectionFilter`); every
``refresh_every`` projections the slices are reconstructed from the last full
rotation, as even and odd halves (Noise2Inverse; Graas et al. 2023) whose weighted mean
is the full FBP/FDK. Slices are values (:class:`~bluesky_jit.geometry.Slice`)
at any position and orientation: one axial slice at ``slice_row`` for
:meth:`StreamingReconstructor.reconstruct`, three orthogonal ones (RECAST3D's
default, movable between refreshes) for
:meth:`StreamingReconstructor.reconstruct_slices`.

Refresh modes (RECAST3D's two): ``mode="sliding"`` (default) reconstructs the
last full rotation every ``refresh_every`` projections; ``mode="alternating"``
(double buffer) reconstructs each completed rotation once, from disjoint
consecutive rotations, while the next one fills the other half of the buffer.

Incremental refresh: FBP/FDK is linear in the projections, so with
``incremental=True`` (default; numba backend on the CPU) every slice keeps the
unweighted sums of its even and odd halves, and a sliding refresh adds the
projections that entered the window and subtracts those that left it instead
of backprojecting the whole rotation again: its cost is that of ``2 k``
projections for ``refresh_every=k``, not of a rotation. The sums are float32
(rounding grows like the square root of the number of updates: about 1e-6 of
the values after ten rotations) and are rebuilt from scratch after ten
rotations' worth of updates, for a new or moved slice, and when the window
jumped by a rotation or more. Other backends, and the GPU, backproject the
whole window at every refresh.

Scale: slices are attenuation coefficients in 1/unit of length (1/mm), see
:mod:`bluesky_jit.projections`.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ConfigError, ScanDataError
from ..geometry import ProjectionGeometry, ScanGeometry, Slice, default_slices, window_weight
from ..projections import (
    FlatField,
    ProjectionBuffer,
    ProjectionFilter,
    correct,
    fdk_weights,
    split_subsets,
)
from .backends import make_backend
from .base import Backend
from .plans import PlanCache

MODES = ("sliding", "alternating")


@dataclass(frozen=True)
class SliceSet:
    """One refresh of one slice: the full reconstruction and its Noise2Inverse halves.

    Attributes
    ----------
    full, even, odd : ndarray, shape (rows, cols)
        FBP/FDK from all projections of the window, from even and from odd indices.
    indices : ndarray, shape (m,)
        Global projection indices of the window.
    row : int
        Detector row nearest to the slice centre.
    slice : Slice or None
        The reconstructed plane.
    """

    full: np.ndarray
    even: np.ndarray
    odd: np.ndarray
    indices: np.ndarray
    row: int
    slice: Slice | None = None


class StreamingReconstructor:
    """Keep filtered projections and reconstruct slices and patch pairs from them.

    Parameters
    ----------
    geometry : ScanGeometry
        Parallel beam (FBP) or circular cone beam over 360 degrees (FDK).
    refresh_every : int
        A slice is due every k projections once a rotation is buffered.
    slice_row : int or None
        Detector row of the default axial slice; the middle row by default.
    slice_size : int or None
        Side (pixels) of the slices; None is the detector width.
    slice_center : (float, float)
        Centre (x, y) of the slices, pixels from the rotation axis.
    filter_name : str
    device : str or torch.device
        Where projections are kept and, for the torch backend, reconstructed.
    backend : {"auto", "numba", "torch", "astra", "cupy"}
        See :mod:`bluesky_jit.reconstruction.backends`.
    slices : sequence of Slice or None
        Planes for :meth:`reconstruct_slices`; three orthogonal slices through
        the default axial slice's centre by default.
    threads : int or None
        CPU threads per kernel call (numba backend). ``None``: serial kernels
        for small calls (patches, small slices), all cores for large ones;
        pass 1 to leave the other cores to the trainer and the denoiser.
    mode : {"sliding", "alternating"}
        Sliding window (a refresh every ``refresh_every`` projections from the
        last full rotation) or alternating double buffer (a refresh per
        completed rotation, from disjoint rotations; ``refresh_every`` is not
        used). See the module notes.
    incremental : bool
        Update slices by the projections that entered and left the window
        (module notes); False: backproject the whole window at every refresh.
    capacity : int or None
        Filtered projections kept (default two rotations); more for
        Noise2Inverse T stacks, which reach back over several windows.
    vertical_slices : bool
        Whether the pipeline shows the two vertical slices (``slices[1:3]``)
        at each refresh too; kept as :attr:`vertical_slices`.
    """

    def __init__(
        self,
        geometry: ScanGeometry,
        *,
        refresh_every: int = 10,
        slice_row: int | None = None,
        slice_size: int | None = None,
        slice_center: Sequence[float] = (0.0, 0.0),
        filter_name: str = "ram-lak",
        device: str | torch.device = "cpu",
        backend: str = "auto",
        slices: Sequence[Slice] | None = None,
        threads: int | None = None,
        mode: str = "sliding",
        incremental: bool = True,
        capacity: int | None = None,
        vertical_slices: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(
                f"Unknown refresh mode {mode!r}; expected one of {MODES}: 'sliding' refreshes "
                "every refresh_every projections, 'alternating' once per completed rotation."
            )
        if (
            isinstance(refresh_every, bool)
            or not isinstance(refresh_every, (int, np.integer))
            or refresh_every < 1
        ):
            raise ConfigError(
                f"refresh_every must be a whole number of projections >= 1; got "
                f"{refresh_every!r} (Graas et al. 2023 refresh every 60 of 150 projections)."
            )
        rows, cols = geometry.detector_shape
        row = rows // 2 if slice_row is None else slice_row
        if not 0 <= row < rows:
            raise ConfigError(
                f"slice_row {row} is outside the detector rows 0..{rows - 1}; pick a row inside."
            )
        self.geometry = geometry
        self.row = row
        self.window = geometry.num_angles
        self.refresh_every = refresh_every
        self.vertical_slices = bool(vertical_slices)
        self.device = torch.device(device)
        self.flatfield: FlatField | None = None
        self.prefilter = ProjectionFilter(geometry, filter_name=filter_name, device=self.device)
        self.filter = self.prefilter.ramp
        capacity = 2 * self.window if capacity is None else capacity
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise ConfigError(f"capacity must be a whole number of projections; got {capacity!r}.")
        if capacity < self.window:
            raise ConfigError(
                f"capacity {capacity} cannot hold a rotation of {self.window} projections; "
                f"use capacity >= {self.window} (default {2 * self.window})."
            )
        self.buffer = ProjectionBuffer(int(capacity), (rows, cols), device=self.device)
        self.backend: Backend = make_backend(backend, device=self.device, threads=threads)
        planes = default_slices(
            geometry, slice_row=row, slice_size=slice_size, slice_center=slice_center
        )
        self.n = planes[0].shape[0]
        self.center_xy = planes[0].center[:2]
        self.slices: tuple[Slice, ...] = ()
        self.set_slices(planes if slices is None else slices)
        self.mode = mode
        self.incremental = incremental
        self._since_refresh = 0
        self._completed: np.ndarray | None = None  # alternating: the last whole rotation
        self._geometries = PlanCache(maxsize=32)
        self._checked_windows = PlanCache(maxsize=8)
        self._sums: OrderedDict[Slice, _Sums] = OrderedDict()
        self._lock = threading.RLock()
        self._threads = threads
        self._kept: tuple[int, ProjectionBuffer] | None = None  # unfiltered rows (SIRT)

    # -- frames in -------------------------------------------------------------
    def set_flatfield(self, darks: np.ndarray, flats: np.ndarray) -> None:
        """Dark (n, rows, cols) and flat (m, rows, cols) fields for all later frames."""
        self.flatfield = FlatField(darks, flats, detector_shape=self.geometry.detector_shape)

    def add_frame(self, frame: np.ndarray, *, angle_deg: float, index: int) -> bool:
        """Correct, filter and keep one frame; return True when a refresh is due.

        Raises
        ------
        ScanDataError
            No flat field yet, or a frame of the wrong shape or with NaN values.
        """
        corrected = correct(self.flatfield, frame, angle_deg, index)
        line_integrals = torch.from_numpy(corrected).to(self.device)
        kept = self._kept
        if kept is not None:
            first, buffer = kept
            rows = slice(first, first + buffer.shape[0])
            buffer.append(line_integrals[rows], angle=math.radians(angle_deg), index=index)
        self.buffer.append(
            self.prefilter(line_integrals), angle=math.radians(angle_deg), index=index
        )
        self._since_refresh += 1
        if self.mode == "alternating":
            if self._since_refresh >= self.window:
                self._since_refresh = 0
                self._completed = self.buffer.last(self.window)
                return True
            return False
        if len(self.buffer) >= self.window and self._since_refresh >= self.refresh_every:
            self._since_refresh = 0
            return True
        return False

    @property
    def ready(self) -> bool:
        """True once a full rotation is buffered."""
        return len(self.buffer) >= self.window

    # -- slices ------------------------------------------------------------------
    def set_slices(self, slices: Sequence[Slice]) -> None:
        """Replace the planes of :meth:`reconstruct_slices` (takes effect at the next refresh).

        Raises
        ------
        ConfigError
            If an entry is not a :class:`~bluesky_jit.geometry.Slice`.
        GeometryError
            If a slice lies outside the reconstruction volume
            (:meth:`~bluesky_jit.geometry.ScanGeometry.check_slice`).
        """
        slices = tuple(slices)
        if not slices or not all(isinstance(s, Slice) for s in slices):
            raise ConfigError(
                f"set_slices expects one or more bluesky_jit.geometry.Slice values; got {slices!r}."
            )
        for slice_ in slices:
            self.geometry.check_slice(slice_)
        self.slices = slices

    def move_slice(self, index: int, slice_: Slice) -> None:
        """Replace one plane, e.g. ``rec.move_slice(0, rec.slices[0].moved(center=(0, 0, 5)))``."""
        if not -len(self.slices) <= index < len(self.slices):
            raise ConfigError(f"There are {len(self.slices)} slices; slice {index} does not exist.")
        slices = list(self.slices)
        slices[index] = slice_
        self.set_slices(slices)

    def set_center(self, center_of_rotation: float) -> None:
        """Reconstruct about another rotation axis: the detector column (px) it projects onto.

        Takes effect at the next reconstruction and reuses the projections
        kept (their ramp filter does not depend on the axis). Cone beam: the
        FDK weights of frames already kept stay those of the old centre.

        Raises
        ------
        GeometryError
            If the column lies outside the detector.
        """
        geometry = replace(self.geometry, center_of_rotation=center_of_rotation)
        with self._lock:
            self.geometry = geometry
            self._geometries = PlanCache(maxsize=32)
            self._sums.clear()  # running sums of the old axis
        if geometry.beam == "cone":
            self.prefilter.weights = torch.as_tensor(fdk_weights(geometry), device=self.device)

    def window_indices(self) -> np.ndarray:
        """Global indices of the last full rotation (alternating mode: the last completed one)."""
        if self.mode == "alternating" and self._completed is not None:
            return self._completed.copy()
        return self.buffer.last(self.window)

    def reconstruct(self, row: int | None = None) -> SliceSet:
        """FBP/FDK of the last rotation on the axial slice at a detector row (default slice_row)."""
        row = self.row if row is None else row
        slice_ = self.geometry.axial_slice(row, shape=self.n, center_xy=self.center_xy)
        return replace(self.reconstruct_slice(slice_), row=row, slice=slice_)

    def reconstruct_slices(self) -> tuple[SliceSet, ...]:
        """Every plane in :attr:`slices` (three orthogonal ones by default), in one pass."""
        return self._reconstruct(self.slices)

    def reconstruct_slice(self, slice_: Slice) -> SliceSet:
        """Full, even and odd reconstruction of any plane from the last rotation.

        Raises
        ------
        GeometryError
            If the slice lies outside the reconstruction volume, or the
            window's angles do not cover the geometry's angular range.
        """
        self.geometry.check_slice(slice_)
        return self._reconstruct((slice_,))[0]

    def reconstruct_subsets(
        self, slice_: Slice, subsets: Sequence[Sequence[int] | np.ndarray]
    ) -> np.ndarray:
        """FBP/FDK of one plane from each subset of the buffered, already filtered projections.

        Parameters
        ----------
        slice_ : Slice
        subsets : sequence of index arrays
            Global projection indices, e.g. ``split_subsets(rec.window_indices(), 4)``
            (``j::4``), ``[rec.window_indices()[-60:]]`` (a window) or any lists;
            they may overlap.

        Returns
        -------
        ndarray, shape (len(subsets), rows, cols), float32
            Each with its own weight ``pi / n_j``: every image is an FBP/FDK.

        Raises
        ------
        ScanDataError
            If a subset is empty or an index is no longer buffered.
        """
        self.geometry.check_slice(slice_)
        parts = [np.asarray(subset, dtype=np.int64).reshape(-1) for subset in subsets]
        if not parts or any(part.size == 0 for part in parts):
            raise ScanDataError(
                f"reconstruct_subsets needs one or more non-empty index lists; got sizes "
                f"{[part.size for part in parts]}. Take them from window_indices()."
            )
        indices = np.concatenate(parts)
        groups = np.repeat(np.arange(len(parts)), [part.size for part in parts])
        geometry = self.geometry.projection_geometry(self.buffer.angles_of(indices))
        storage = self.buffer.storage
        if storage is None:  # on a GPU: copy the frames of the subsets
            data, _ = self.buffer.select(indices)
            return self.backend.backproject_split(data, geometry, [slice_], groups=groups)[0]
        with self._lock:
            count = self.buffer.count
            slots = self.buffer.slots_of(indices)
            images = self.backend.backproject_split(
                storage, geometry, [slice_], slots=slots, groups=groups
            )[0]
            written = np.arange(count, self.buffer.count) % self.buffer.capacity
        if np.intersect1d(slots, written).size:  # pragma: no cover - appends from a thread
            data, _ = self.buffer.select(indices)
            return self.backend.backproject_split(data, geometry, [slice_], groups=groups)[0]
        return images

    def _reconstruct(self, planes: Sequence[Slice]) -> tuple[SliceSet, ...]:
        indices = self.window_indices()
        self._check_window(indices)
        storage = self.buffer.storage
        if storage is None or not self.backend.split_in_place:
            return tuple(self._reconstruct_copy(p, indices) for p in planes)
        with self._lock:
            for _ in range(3):
                count = self.buffer.count
                sums, used = self._update_sums(planes, indices, storage)
                # frames appended meanwhile (another thread) overwrote slots count, count + 1, ...
                written = np.arange(count, self.buffer.count) % self.buffer.capacity
                if not np.intersect1d(used, written).size:
                    break
                for p in planes:
                    self._sums.pop(p, None)
            else:  # pragma: no cover - needs a rotation of frames during one refresh
                return tuple(self._reconstruct_copy(p, indices) for p in planes)
        n = len(indices)
        counts = [int(np.count_nonzero(indices % 2 == j)) for j in (0, 1)]
        results = []
        for plane, total in zip(planes, sums, strict=True):
            even = (total[0] * window_weight(counts[0])).astype(np.float32)
            odd = (total[1] * window_weight(counts[1])).astype(np.float32)
            full = ((total[0] + total[1]) * window_weight(n)).astype(np.float32)
            results.append(
                SliceSet(
                    full=full,
                    even=even,
                    odd=odd,
                    indices=indices,
                    row=self._row_of(plane),
                    slice=plane,
                )
            )
        return tuple(results)

    def _update_sums(
        self, planes: Sequence[Slice], indices: np.ndarray, storage: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Unweighted even/odd sums (2, rows, cols) of every plane over ``indices``.

        Returns the sums and the buffer slots read.
        """
        buffer = self.buffer
        # planes whose sums can be moved along share one call per previous window
        plans: OrderedDict[bytes | None, list[tuple[Slice, _Sums | None]]] = OrderedDict()
        for plane in planes:
            state = self._sums.get(plane) if self.incremental else None
            key = None
            if state is not None:
                added = np.setdiff1d(indices, state.indices)
                removed = np.setdiff1d(state.indices, indices)
                if (
                    len(added) + len(removed) < len(indices)
                    and state.fresh + len(added) <= 10 * self.window
                    and _all_held(buffer, removed)
                ):
                    key = state.indices.tobytes()
            plans.setdefault(key, []).append((plane, state if key is not None else None))
        used = [buffer.slots_of(indices)]
        totals: dict[Slice, np.ndarray] = {}
        for key, members in plans.items():
            group_planes = [plane for plane, _ in members]
            if key is None:
                out = self.backend.backproject_split(
                    storage,
                    self._geometry(indices),
                    group_planes,
                    slots=used[0],
                    groups=indices % 2,
                    normalize=False,
                )
                for plane, total in zip(group_planes, out, strict=True):
                    totals[plane] = total
                    self._keep(plane, _Sums(indices.copy(), total, 0))
                continue
            previous = members[0][1].indices
            added = np.setdiff1d(indices, previous)
            removed = np.setdiff1d(previous, indices)
            out = None
            if added.size or removed.size:
                delta = np.concatenate([added, removed])
                slots = buffer.slots_of(delta)
                used.append(slots)
                out = self.backend.backproject_split(
                    storage,
                    self._geometry(delta),
                    group_planes,
                    slots=slots,
                    groups=delta % 2 + 2 * (np.arange(len(delta)) >= len(added)),
                    normalize=False,
                    num_groups=4,
                )
            for q, (plane, state) in enumerate(members):
                total = state.sums.copy()
                if out is not None:
                    total += out[q][0:2] - out[q][2:4]
                totals[plane] = total
                self._keep(plane, _Sums(indices.copy(), total, state.fresh + len(added)))
        return [totals[p] for p in planes], np.concatenate(used)

    def _keep(self, plane: Slice, sums: _Sums) -> None:
        self._sums[plane] = sums
        self._sums.move_to_end(plane)
        while len(self._sums) > 8:
            self._sums.popitem(last=False)

    def _reconstruct_copy(self, slice_: Slice, indices: np.ndarray) -> SliceSet:
        """Backends without in-place subsets: copy each half's detector rows, then backproject."""
        corners = _corners(slice_.origin[None], slice_)
        r0, r1 = self._rows(indices, corners)
        halves = []
        counts = []
        for subset in split_subsets(indices, 2):
            data, _ = self.buffer.select(subset, rows=slice(r0, r1 + 1))
            geom = self._geometry(subset)
            halves.append(self.backend.backproject(data, geom, slice_, row_offset=r0))
            counts.append(len(subset))
        even, odd = halves
        full = (even * counts[0] + odd * counts[1]) / len(indices)
        return SliceSet(
            full=full.astype(np.float32),
            even=even,
            odd=odd,
            indices=indices,
            row=self._row_of(slice_),
            slice=slice_,
        )

    def _row_of(self, slice_: Slice) -> int:
        return int(
            np.clip(round(self.geometry.z_to_row(slice_.center[2])), 0, self.geometry.rows - 1)
        )

    def _check_window(self, indices: np.ndarray) -> None:
        """Once per full window: do its angles cover the geometry's angular range?"""
        if len(indices) >= self.window:  # a window that fails is not kept: it raises again
            angles = self.buffer.angles_of(indices)
            self._checked_windows.get(indices.tobytes(), lambda: self.geometry.check_angles(angles))

    # -- Noise2Inverse splits ----------------------------------------------------
    def subset_slices(self, subsets: Sequence[np.ndarray], row: int) -> np.ndarray:
        """The axial slice at a detector row from each subset: (len(subsets), n, n).

        :meth:`reconstruct_subsets` on ``geometry.axial_slice(row)``: the
        inference inputs of Noise2Inverse with K splits and stacks.
        """
        slice_ = self.geometry.axial_slice(row, shape=self.n, center_xy=self.center_xy)
        return self.reconstruct_subsets(slice_, subsets)

    def subset_patches(
        self, subsets: Sequence[np.ndarray], centers: np.ndarray, rows: np.ndarray, *, size: int
    ) -> np.ndarray:
        """Axial patches reconstructed from each of several subsets of buffered projections.

        The building block of Noise2Inverse pairs with K splits and Z/T stacks
        (:class:`bluesky_jit.pairs.PairMaker`), for any geometry this
        reconstructor handles (parallel and cone beam), on its backend.

        Parameters
        ----------
        subsets : sequence of index arrays
            Global projection indices, e.g. ``split_subsets(window, K)``.
        centers : ndarray, shape (m, 2)
            Patch centres (x, y), mm, in the axial plane.
        rows : ndarray, shape (m,)
            Detector row (height) of each patch.
        size : int
            Patch side, pixels of ``geometry.voxel_size``.

        Returns
        -------
        ndarray, shape (len(subsets), m, size, size), float32
            Each an FBP/FDK with its own weight ``pi / n_j``.
        """
        voxel = self.geometry.voxel_size
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        rows = np.asarray(rows, dtype=np.float64).reshape(-1)
        like = Slice.axial(shape=(size, size), pixel_size=voxel)
        offset = (size - 1) / 2 * voxel
        origins = np.stack(
            [
                centers[:, 0] - offset,
                centers[:, 1] - offset,
                (rows - self.geometry.center_row) * voxel,
            ],
            axis=1,
        )
        out = np.empty((len(subsets), len(origins), size, size), dtype=np.float32)
        everything = np.concatenate([np.asarray(s, dtype=np.int64) for s in subsets])
        r0, r1 = self._rows(np.unique(everything), _corners(origins, like))
        for j, subset in enumerate(subsets):
            data, _ = self.buffer.select(subset, rows=slice(r0, r1 + 1))
            out[j] = self.backend.backproject_grids(
                data, self._geometry(subset), origins, like, row_offset=r0
            )
        return out

    # -- supervised targets: SIRT from unfiltered projections ---------------------------
    def keep_line_integrals(self, first: int, last: int, capacity: int) -> ProjectionBuffer:
        """Keep the unfiltered projections (line integrals) of detector rows first..last too.

        For :meth:`sirt_slice`. A new range starts empty; the same range keeps
        what it holds. Returns the buffer (global indices as :attr:`buffer`).
        """
        first, last = max(0, int(first)), min(self.geometry.rows - 1, int(last))
        kept = self._kept
        if kept is None or kept[0] != first or kept[1].shape[0] != last - first + 1:
            shape = (last - first + 1, self.geometry.cols)
            kept = self._kept = (first, ProjectionBuffer(int(capacity), shape, device=self.device))
        return kept[1]

    def sirt_slice(self, indices: np.ndarray, row: int, *, iterations: int) -> np.ndarray:
        """SIRT (from zero, ``iterations`` updates) of the axial slice at a detector row.

        From the kept line integrals (:meth:`keep_line_integrals`) of the
        projections ``indices``, on the grid of :meth:`reconstruct` (n x n
        around ``center_xy``); parallel beam only
        (:class:`~bluesky_jit.reconstruction.sirt.ShearOperator`).

        Raises
        ------
        ScanDataError
            If the row or a projection is not kept.
        """
        from .sirt import ShearOperator, sirt

        first, buffer = self._kept if self._kept is not None else (0, None)
        if buffer is None or not 0 <= row - first < buffer.shape[0]:
            raise ScanDataError(
                f"Line integrals of detector row {row} are not kept; call "
                "keep_line_integrals() with a range holding it before the frames arrive."
            )
        data, _ = buffer.select(indices, rows=row - first)
        slice_ = self.geometry.axial_slice(row, shape=self.n, center_xy=self.center_xy)
        geometry = self.geometry.projection_geometry(buffer.angles_of(indices))
        operator = ShearOperator(geometry, slice_, threads=self._threads)
        return sirt(operator, data.cpu().numpy(), iterations=iterations)

    # -- internals ---------------------------------------------------------------
    def _geometry(self, indices: np.ndarray) -> ProjectionGeometry:
        """The projection geometry of buffered projections (cached: plans key on it)."""
        key = np.asarray(indices, dtype=np.int64).tobytes()
        angles = self.buffer.angles_of
        return self._geometries.get(key, lambda: self.geometry.projection_geometry(angles(indices)))

    def _rows(self, indices: np.ndarray, points: np.ndarray) -> tuple[int, int]:
        """Detector rows (first, last) that the points need, over the window's projections."""
        det_rows, _, _ = self._geometry(indices).project(points)
        last = self.geometry.rows - 1
        lo = int(np.clip(math.floor(float(det_rows.min())), 0, last))
        hi = int(np.clip(math.ceil(float(det_rows.max())) + 1, 0, last))
        return lo, max(lo, hi)


@dataclass(frozen=True)
class _Sums:
    """Unweighted even/odd sums (2, rows, cols) of one slice over a window of projections."""

    indices: np.ndarray
    sums: np.ndarray
    fresh: int  # projections added since the sums were last computed from scratch


def _all_held(buffer: ProjectionBuffer, indices: np.ndarray) -> bool:
    """True if every global index is still in the buffer."""
    try:
        buffer.slots_of(indices)
    except ScanDataError:
        return False
    return True


def _corners(origins: np.ndarray, like: Slice) -> np.ndarray:
    """The four corner points of grids with pixel (0, 0) at ``origins`` (g, 3) -> (4 g, 3)."""
    rows, cols = like.shape
    du = (cols - 1) * like.step_u
    dv = (rows - 1) * like.step_v
    origins = np.asarray(origins, dtype=np.float64).reshape(-1, 3)
    return np.concatenate([origins, origins + du, origins + dv, origins + du + dv])
