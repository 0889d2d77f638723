"""Choose a backprojection backend by name.

Every backend has the same two methods and the same scale (filtered
projections in, attenuation in 1/unit of length out, weight ``pi / n``):

``backproject(filtered, geometry, slice_, *, row_offset=0) -> ndarray (rows, cols)``
    One slice (any position and orientation) from ``n`` filtered projections
    ``(n, det_rows, cols)`` of detector rows ``row_offset ...``, whose
    geometry (``ProjectionGeometry`` or ``VectorGeometry``) has ``n`` entries.
``backproject_grids(filtered, geometry, origins, like, *, row_offset=0)``
    Many small grids (training patches) shaped and oriented like the slice
    ``like``, pixel (0, 0) of grid ``g`` at ``origins[g]`` -> (g, rows, cols).

:func:`backproject_split` reconstructs several slices from subsets of stored
projections (the even and odd halves of the last rotation, ``j::K``, any
index list) in one go; the numba backend does it without copying the ring
buffer (``NumbaBackend.backproject_split``), the others through
``backproject`` on each subset. Projections that do not fit their geometry
(count, detector columns or rows) raise :class:`~bluesky_jit.errors.ScanDataError`
(:func:`check_projections`).

Agreement (stated here, asserted in ``tests/test_recon_backends.py`` and
``tests/test_fdk.py``): on the same filtered projections, torch and numba's
general (bilinear, any orientation, cone and parallel) path agree to 2e-6
absolute (under 1e-4 of the values), and across the detector's border
to 2e-5 of the range; numba's axial fast path (resampled tables) is within
1 % relative L2 of bilinear interpolation; ASTRA's CPU BP within 2 % (strip
projector) or 3 % (linear) of numba; cupy within 1e-5 absolute of numba
(CUDA only, not run without a GPU); against ASTRA's own CPU FBP (its filter)
within 5 % relative L2 inside the object, at equal or better PSNR.

Names: ``"numba"`` (CPU default), ``"torch"`` (any torch device, the CUDA
path), ``"astra"`` (axial parallel-beam slices on the CPU; the numerical
reference), ``"cupy"`` (CUDA kernels), ``"auto"`` (numba on the CPU when
numba imports, torch otherwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError, ScanDataError
from ..geometry import window_weight

BACKENDS = ("auto", "numba", "torch", "astra", "cupy")


def make_backend(name: str = "auto", *, device: Any = "cpu", threads: int | None = None) -> Any:
    """A backend instance; see the module notes for the names."""
    import torch

    device = torch.device(device)
    if name not in BACKENDS:
        raise ConfigError(f"Unknown reconstruction backend {name!r}; expected one of {BACKENDS}.")
    if name == "auto":
        if device.type == "cpu":
            try:
                import numba  # noqa: F401
            except ImportError:
                name = "torch"
            else:
                name = "numba"
        else:
            name = "torch"
    if name in ("numba", "astra") and device.type != "cpu":
        raise ConfigError(
            f"backend={name!r} runs on the CPU but device={str(device)!r} was requested; use "
            "backend='torch' (or 'cupy') on a GPU."
        )
    if name == "numba":
        try:
            from .numba_backend import NumbaBackend
        except ImportError as error:
            raise ConfigError(
                "backend='numba' needs numba (pip install numba); or use backend='torch'."
            ) from error
        return NumbaBackend(threads=threads)
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(device=device)
    if name == "astra":
        try:
            from .astra_backend import AstraBackend

            return AstraBackend()
        except ImportError as error:
            raise ConfigError(
                "backend='astra' needs astra-toolbox (pip install 'bluesky-jit[astra]')."
            ) from error
    if device.type != "cuda":  # name == "cupy"
        raise ConfigError(
            f"backend='cupy' runs on a CUDA device; got device={str(device)!r}. Use "
            "device='cuda' or backend='numba' on the CPU."
        )
    from .cupy_backend import CupyBackend

    return CupyBackend(device=device)


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


def check_split(
    shape: tuple[int, ...],
    geometry: Any,
    slots: Any,
    groups: Any,
    *,
    num_groups: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate stored frames (m, rows, cols) and the slot/subset of every projection.

    Returns slots (n,), groups (n,) as int64 and the count of every subset
    (k,). Without ``num_groups`` every subset ``0 .. k-1`` must have a
    projection; with it, subsets may be empty.
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
    if num_groups is not None:
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


def backproject_split(
    backend: Any,
    filtered: Any,
    geometry: Any,
    slices: Any,
    *,
    slots: Any = None,
    groups: Any = None,
    normalize: bool = True,
    num_groups: int | None = None,
) -> list[np.ndarray]:
    """Per slice, the FBP/FDK of every subset of stored projections -> list of (k, rows, cols).

    ``filtered`` (m, rows, cols) holds whole frames; projection ``a`` of
    ``geometry`` is ``filtered[slots[a]]`` and belongs to subset ``groups[a]``.
    ``normalize=False`` gives plain sums (no ``pi / n_j``; subsets may then be
    empty, up to ``num_groups``). See ``NumbaBackend.backproject_split``;
    other backends reconstruct each subset with ``backproject`` (copying its
    frames).
    """
    method = getattr(backend, "backproject_split", None)
    if method is not None:
        return method(
            filtered,
            geometry,
            slices,
            slots=slots,
            groups=groups,
            normalize=normalize,
            num_groups=num_groups,
        )
    if not normalize and num_groups is None:
        num_groups = int(np.max(groups, initial=0)) + 1 if groups is not None else 1
    slots, groups, counts = check_split(
        tuple(filtered.shape), geometry, slots, groups, num_groups=None if normalize else num_groups
    )
    results = []
    for slice_ in slices:
        planes = []
        for j, count in enumerate(counts):
            member = np.flatnonzero(groups == j)
            if count == 0:
                planes.append(np.zeros(slice_.shape, dtype=np.float32))
                continue
            image = backend.backproject(filtered[slots[member]], geometry[member], slice_)
            planes.append(image if normalize else image / np.float32(window_weight(count)))
        results.append(np.stack(planes))
    return results
