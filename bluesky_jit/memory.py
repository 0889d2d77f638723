"""The memory budget: what a run keeps in memory, planned before anything is allocated.

A run keeps two rotations of filtered frames (float32) for its slices. The
metadata announces their size, so the plan is made from the start document,
before a frame arrives, and the frames are allocated only once the first
frame has confirmed the detector shape. When whole frames do not fit the
budget (``runtime.memory_budget_gb``; default a quarter of the machine's
memory), a run keeps only what its slices need: the detector rows that the
axial slice and its training patches read, and, for the two vertical
slices, frames binned ``b x b``. What cannot fit even so is refused with a
message that says what to change. The derived run's start document records
the plan (``memory``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, ScanDataError
from .geometry import ScanGeometry

GB = 2**30
FLOAT = 4  # bytes of one float32 pixel
FRAME_COPIES = 6
"""Whole frames in flight at once (the frame, its float32 copy, the dark and gain fields)."""
BINNINGS = (2, 4, 8, 16, 32)


def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(memory_budget_gb: float | None) -> int:
    """The budget in bytes: the setting, or a quarter of the machine's memory."""
    if memory_budget_gb is None:
        return machine_memory() // 4
    return int(memory_budget_gb * GB)


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 2**20:.2f} MB"


@dataclass(frozen=True)
class MemoryPlan:
    """What one run keeps, and what it needs.

    Attributes
    ----------
    budget, needed, full : int
        Bytes: the budget, what this plan needs, what whole frames would need.
    rows : (int, int) or None
        Detector rows kept for the axial slice (first, stop); None: every row.
    binning : int
        Vertical slices from ``binning x binning`` binned frames (1: the
        frames of the axial slice; 0: no vertical slices).
    """

    budget: int
    needed: int
    full: int
    detector_shape: tuple[int, int]
    rows: tuple[int, int] | None = None
    binning: int = 1

    @property
    def reduced(self) -> str:
        """In words, what was kept short of whole frames ('' for nothing)."""
        if self.rows is None:
            return ""
        what = f"kept detector rows {self.rows[0]}..{self.rows[1] - 1} for the axial slice"
        if self.binning > 1:
            what += f" and {self.binning}x{self.binning} binned frames for the vertical slices"
        elif self.binning == 0:
            what += " and no vertical slices"
        return (
            f"{what}: whole frames would need {_gb(self.full)}, more than the memory budget "
            f"of {_gb(self.budget)} (runtime.memory_budget_gb)"
        )

    def to_dict(self) -> dict:
        """JSON-able form, for the derived run's start document."""
        return {
            "budget_bytes": self.budget,
            "needed_bytes": self.needed,
            "whole_frames_bytes": self.full,
            "rows": list(self.rows) if self.rows else None,
            "vertical_binning": self.binning,
            "reduced": self.reduced,
        }

    def check(self, frames: np.ndarray, what: str) -> None:
        """Raise ScanDataError unless ``frames`` (..., rows, cols) have the announced shape."""
        if tuple(np.shape(frames)[-2:]) != self.detector_shape:
            raise ScanDataError(
                f"{what} of shape {tuple(np.shape(frames)[-2:])} arrived; the scan metadata says "
                f"the detector is {self.detector_shape}. Fix tomo['detector_shape'] (or the "
                "detector's ROI/binning) so the two agree."
            )

    def crop(self, frames: np.ndarray) -> np.ndarray:
        """The rows kept for the axial slice of frames (..., rows, cols)."""
        return frames if self.rows is None else frames[..., self.rows[0] : self.rows[1], :]

    def bin(self, frames: np.ndarray) -> np.ndarray:
        """Frames (..., rows, cols) binned ``binning x binning`` (mean; edges cut)."""
        b = self.binning
        rows, cols = (n // b * b for n in np.shape(frames)[-2:])
        frames = np.asarray(frames)[..., :rows, :cols]
        shape = (*frames.shape[:-2], rows // b, b, cols // b, b)
        return frames.reshape(shape).mean(axis=(-3, -1), dtype=np.float32)


def cropped(geometry: ScanGeometry, rows: tuple[int, int]) -> ScanGeometry:
    """The geometry of detector rows ``rows[0] .. rows[1] - 1`` alone."""
    return geometry.replace(
        detector_shape=(rows[1] - rows[0], geometry.cols), center_row=geometry.center_row - rows[0]
    )


def binned(geometry: ScanGeometry, b: int) -> ScanGeometry:
    """The geometry of frames binned ``b x b`` (:meth:`MemoryPlan.bin`)."""
    return geometry.replace(
        detector_shape=(geometry.rows // b, geometry.cols // b),
        pixel_size=geometry.pixel_size * b,
        center_row=(geometry.center_row - (b - 1) / 2) / b,
        center_of_rotation=(geometry.center_of_rotation - (b - 1) / 2) / b,
    )


def plan_memory(
    geometry: ScanGeometry,
    *,
    capacity: int,
    extra: int,
    row: int,
    reach: int,
    vertical: bool,
    budget: int,
) -> MemoryPlan:
    """Whole frames if they fit the budget, else the rows the axial slice needs.

    Parameters
    ----------
    geometry : ScanGeometry
    capacity : int
        Filtered projections kept (two rotations, or more for T stacks).
    extra : int
        Projections the vertical slices keep beyond a rotation.
    row : int
        Detector row of the axial slice.
    reach : int
        Rows beyond ``row`` that training patches read (neighbourhood, Z stacks).
    vertical : bool
        Whether the vertical slices are shown.
    budget : int
        Bytes.

    Raises
    ------
    ConfigError
        If even the reduced plan does not fit, saying what to change.
    """
    rows, cols = geometry.detector_shape
    n = geometry.slice_size
    fixed = FRAME_COPIES * rows * cols * FLOAT + 16 * n * n * FLOAT  # frames in flight, slices
    full = fixed + capacity * rows * cols * FLOAT
    if full <= budget:
        return MemoryPlan(budget, full, full, (rows, cols))
    band = (max(0, row - reach), min(rows, row + reach + 1))
    if fixed + capacity * (band[1] - band[0]) * cols * FLOAT <= budget:
        band = _rows_needed(geometry, row, reach)
    needed = fixed + capacity * (band[1] - band[0]) * cols * FLOAT
    if needed > budget:
        raise ConfigError(
            f"The scan metadata announces a {rows} x {cols} detector at {geometry.num_angles} "
            f"projections per rotation: even keeping only rows {band[0]}..{band[1] - 1} for the "
            f"axial slice, the run needs {_gb(needed)} and the memory budget is {_gb(budget)}. "
            "If the metadata is wrong, fix tomo['detector_shape'] and tomo['num_angles']; else "
            "raise runtime.memory_budget_gb (JitConfig(memory_budget_gb=...)), bin the "
            "detector, or take fewer projections per rotation."
        )
    binning = 0
    for b in BINNINGS if vertical else ():
        more = (geometry.num_angles + extra) * (rows // b) * (cols // b) * FLOAT
        if needed + more <= budget:
            binning, needed = b, needed + more
            break
    return MemoryPlan(budget, needed, full, (rows, cols), band, binning)


def _rows_needed(geometry: ScanGeometry, row: int, reach: int) -> tuple[int, int]:
    """Detector rows (first, stop) that axial slices at ``row +- reach`` project onto."""
    from .reconstruction.streaming import _corners

    lo, hi = max(0, row - reach), min(geometry.rows - 1, row + reach)
    like = geometry.axial_slice(lo, shape=geometry.slice_size)
    origins = np.array([like.origin, geometry.axial_slice(hi, shape=geometry.slice_size).origin])
    angles = np.radians(np.linspace(*geometry.angular_range, 360, endpoint=False))
    det_rows, _, _ = geometry.projection_geometry(angles).project(_corners(origins, like))
    first = int(np.clip(np.floor(det_rows.min()) - 1, 0, geometry.rows - 1))
    stop = int(np.clip(np.ceil(det_rows.max()) + 2, first + 1, geometry.rows))
    return first, stop
