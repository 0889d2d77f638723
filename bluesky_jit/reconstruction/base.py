"""The backend contract: what every backprojection backend does, and its checks.

Every backend has the same methods and the same scale (filtered projections
in, attenuation in 1/unit of length out, weight ``pi / n``); see
:class:`Backend`. The registry (:func:`~.backends.make_backend`) and every
backend import this module, and it imports none of them.

Agreement (stated here, asserted in ``tests/test_recon_backends.py`` and
``tests/test_fdk.py``): on the same filtered projections, torch and numba's
general (bilinear, any orientation, cone and parallel) path agree to 2e-6
absolute (under 1e-4 of the values), and across the detector's border
to 2e-5 of the range; numba's axial fast path (resampled tables) is within
1 % relative L2 of bilinear interpolation; ASTRA's CPU BP within 2 % (strip
projector) or 3 % (linear) of numba; cupy within 1e-5 absolute of numba
(CUDA only, not run without a GPU); against ASTRA's own CPU FBP (its filter)
within 5 % relative L2 inside the object, at equal or better PSNR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import ScanDataError
from ..geometry import Slice, window_weight


class Backend(Protocol):
    """A backprojection backend; implementations subclass it to inherit the defaults.

    Attributes
    ----------
    name : str
        The registry name (``"numba"``, ``"torch"``, ``"astra"``, ``"cupy"``).
    split_in_place : bool
        True when :meth:`backproject_split` reads stored frames through
        ``slots`` without copying them (numba): running sums over a sliding
        window then pay off (:mod:`.streaming`). False: the default
        :meth:`backproject_split` copies every subset's frames.
    """

    name: ClassVar[str]
    split_in_place: ClassVar[bool] = False

    def backproject(
        self, filtered: Any, geometry: Any, slice_: Slice, *, row_offset: int = 0
    ) -> np.ndarray:
        """FBP/FDK of one slice (any position and orientation) from the given projections.

        Parameters
        ----------
        filtered : ndarray or Tensor, shape (n, det_rows, cols)
            Filtered projections of detector rows ``row_offset ...``.
        geometry : ProjectionGeometry or VectorGeometry with n projections
        slice_ : Slice

        Returns
        -------
        ndarray, shape slice_.shape, float32

        Raises
        ------
        ScanDataError
            If the projections do not fit the geometry (count, columns, rows):
            :func:`check_projections`.
        """
        ...

    def backproject_grids(
        self, filtered: Any, geometry: Any, origins: np.ndarray, like: Slice, *, row_offset: int = 0
    ) -> np.ndarray:
        """FBP/FDK on many small grids (training patches) shaped and oriented like ``like``.

        ``origins`` (g, 3) is the world position of pixel (0, 0) of every grid;
        returns ndarray (g, rows, cols), float32.
        """
        ...

    def backproject_split(
        self,
        filtered: Any,
        geometry: Any,
        slices: Sequence[Slice],
        *,
        slots: Any = None,
        groups: Any = None,
        normalize: bool = True,
        num_groups: int | None = None,
    ) -> list[np.ndarray]:
        """Per slice, the FBP/FDK of every subset of stored projections -> list of (k, rows, cols).

        Parameters
        ----------
        filtered : ndarray, shape (m, det_rows, cols)
            Whole filtered frames, e.g. the storage of a
            :class:`~bluesky_jit.projections.ProjectionBuffer`.
        geometry : ProjectionGeometry or VectorGeometry with n projections
        slices : sequence of Slice
        slots : (n,) int, optional
            Projection ``a`` of the geometry is ``filtered[slots[a]]`` (default ``arange(n)``).
        groups : (n,) int, optional
            Subset of every projection, ``0 .. k-1`` (default: one subset); e.g.
            ``indices % 2`` for the Noise2Inverse halves.
        normalize : bool
            False: plain sums over every subset, no ``pi / n_j`` weight (for
            running sums; subsets may then be empty).
        num_groups : int, optional
            k, when some subsets may be empty (``normalize=False``).

        Returns
        -------
        list of ndarray, shape (k, rows, cols), float32
            Per slice, the FBP of every subset (weight ``pi / n_j`` for the
            ``n_j`` projections of subset ``j``); the subsets' mean weighted by
            ``n_j / n`` is the FBP of all ``n``.

        Notes
        -----
        This default reconstructs each subset with :meth:`backproject`,
        copying its frames; ``NumbaBackend`` reads them in place.
        """
        shape = tuple(filtered.shape)
        slots, groups, counts = check_split(
            shape, geometry, slots, groups, normalize=normalize, num_groups=num_groups
        )
        results = []
        for slice_ in slices:
            planes = []
            for j, count in enumerate(counts):
                member = np.flatnonzero(groups == j)
                if count == 0:
                    planes.append(np.zeros(slice_.shape, dtype=np.float32))
                    continue
                image = self.backproject(filtered[slots[member]], geometry[member], slice_)
                planes.append(image if normalize else image / np.float32(window_weight(count)))
            results.append(np.stack(planes))
        return results


def check_projections(shape: tuple[int, ...], geometry: Any, *, row_offset: int = 0) -> None:
    """Raise ScanDataError unless projections of ``shape`` (n, rows, cols) fit ``geometry``."""
    det_rows, det_cols = geometry.shape
    if len(shape) != 3:
        raise ScanDataError(
            f"Filtered projections must be an array (n, rows, cols); got shape {tuple(shape)}. "
            "Add a rows axis for a single detector row: filtered[:, None, :]."
        )
    n, rows, cols = shape
    if n != len(geometry):
        raise ScanDataError(
            f"Got {n} filtered projections for a geometry of {len(geometry)} projections. Pass "
            "the geometry of exactly these projections, e.g. geometry[0::2] with "
            "filtered[0::2]."
        )
    if cols != det_cols:
        raise ScanDataError(
            f"The filtered projections are {cols} columns wide; the geometry's detector has "
            f"{det_cols} columns (shape {geometry.shape}). Make the geometry's detector shape "
            "match the frames (ROI, binning): tomo['detector_shape'] or the shape= argument."
        )
    if row_offset < 0 or row_offset + rows > det_rows:
        raise ScanDataError(
            f"Detector rows {row_offset}..{row_offset + rows - 1} were passed (row_offset="
            f"{row_offset}, {rows} rows); the geometry's detector has rows 0..{det_rows - 1}. "
            "Make the geometry's detector shape match the frames, or fix row_offset."
        )


def offset_rows(mats: Any, row_offset: int) -> Any:
    """Projective matrices for data that start at detector row ``row_offset``."""
    if not row_offset:
        return mats
    mats = np.array(mats)
    mats[:, 1] -= row_offset * mats[:, 2]
    return mats


def check_split(
    shape: tuple[int, ...],
    geometry: Any,
    slots: Any,
    groups: Any,
    *,
    normalize: bool = True,
    num_groups: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate stored frames (m, rows, cols) and the slot/subset of every projection.

    Returns slots (n,), groups (n,) as int64 and the count of every subset
    (k,). With ``normalize`` every subset ``0 .. k-1`` must have a
    projection; without, subsets may be empty, up to ``num_groups`` (by
    default the highest group + 1).
    """
    n = len(geometry)
    if len(shape) != 3 or tuple(shape[1:]) != tuple(geometry.shape):
        raise ScanDataError(
            f"Stored frames of shape {tuple(shape)[1:]} do not match the geometry's detector "
            f"{geometry.shape}; expected an array (m, {geometry.shape[0]}, {geometry.shape[1]}). "
            "Make the geometry's detector shape match the frames (ROI, binning)."
        )
    slots = np.arange(n) if slots is None else np.asarray(slots, dtype=np.int64).reshape(-1)
    groups = (
        np.zeros(n, dtype=np.int64)
        if groups is None
        else np.asarray(groups, dtype=np.int64).reshape(-1)
    )
    if len(slots) != n or len(groups) != n:
        raise ScanDataError(
            f"slots ({len(slots)}) and groups ({len(groups)}) need one entry per projection of "
            f"the geometry ({n})."
        )
    if n and (slots.min() < 0 or slots.max() >= shape[0]):
        raise ScanDataError(
            f"slots {slots.min()}..{slots.max()} point outside the {shape[0]} stored frames."
        )
    if n and groups.min() < 0:
        raise ScanDataError(f"groups must be 0, 1, ...; got {groups.min()}.")
    if not normalize:
        if num_groups is None:
            num_groups = int(groups.max(initial=0)) + 1
        if n and groups.max() >= num_groups:
            raise ScanDataError(f"groups run up to {groups.max()}; num_groups is {num_groups}.")
        return slots, groups, np.bincount(groups, minlength=num_groups)
    counts = np.bincount(groups)
    if n == 0 or np.any(counts == 0):
        raise ScanDataError(
            f"Subsets {np.flatnonzero(counts == 0).tolist()} have no projection (groups "
            f"{np.unique(groups).tolist()}); number the subsets 0 .. k-1."
        )
    return slots, groups, counts
