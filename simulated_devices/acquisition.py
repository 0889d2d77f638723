"""Pieces both simulated detectors share: the frame clock and the HDF5 frame file."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np

from bluesky_jit.errors import ConfigError, ScanDataError

__all__ = ["DATASET", "FrameClock", "FrameFile"]

DATASET = "/entry/data/data"
"""Frames dataset, shape (N, rows, cols): the areaDetector HDF5 plugin layout."""


class FrameClock:
    """Numbers frames, gives their virtual time, and paces them.

    The virtual time of frame ``index`` is ``index / frame_rate`` (0 for every
    frame when `frame_rate` is None: a static sample). It does not depend on the
    wall clock, so a phantom scan is the same whether paced or not.

    Pacing (``paced=True``) holds frame ``k`` until the absolute deadline
    ``anchor + (k - k_anchor) / frame_rate``, so time spent writing files does not
    stretch the period. A frame that comes more than one period late (the plan
    paused, the stage moved slowly) re-anchors the schedule instead of releasing
    a burst of catch-up frames.

    Parameters
    ----------
    frame_rate : float, optional
        Frames per second, > 0.
    paced : bool
        Wait for the deadlines; needs `frame_rate`.
    """

    def __init__(self, *, frame_rate: float | None = None, paced: bool = False) -> None:
        if frame_rate is not None and not frame_rate > 0:
            raise ConfigError(f"frame_rate must be > 0 Hz or None; got {frame_rate!r}.")
        if paced and frame_rate is None:
            raise ConfigError("paced=True needs a frame_rate (Hz); pass frame_rate=... too.")
        self.frame_rate = None if frame_rate is None else float(frame_rate)
        self.paced = bool(paced)
        self.index = 0
        self._anchor: tuple[float, int] | None = None

    def time_of(self, index: int) -> float:
        """Virtual time of frame `index`, s."""
        return 0.0 if self.frame_rate is None else index / self.frame_rate

    def wait_time(self, now: float | None = None) -> float:
        """Seconds to wait before taking the next frame (0 when unpaced or late)."""
        if not self.paced or self.frame_rate is None:
            return 0.0
        now = time.monotonic() if now is None else now
        period = 1.0 / self.frame_rate
        if self._anchor is not None:
            t0, k0 = self._anchor
            deadline = t0 + (self.index - k0) * period
            if now <= deadline + period:
                return max(0.0, deadline - now)
        self._anchor = (now, self.index)
        return 0.0

    def tick(self) -> tuple[int, float]:
        """Claim the next frame: its index and virtual time."""
        index = self.index
        self.index += 1
        return index, self.time_of(index)


class FrameFile:
    """An HDF5 file of frames, appended one at a time, readable while written (SWMR).

    Parameters
    ----------
    path : Path
        File to create.
    shape : tuple of int
        ``(rows, cols)`` of a frame.
    dtype : numpy dtype
    """

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype) -> None:
        self.path = Path(path)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._file = h5py.File(self.path, "w", libver="latest")
        self._data = self._file.create_dataset(
            DATASET,
            shape=(0, *self.shape),
            maxshape=(None, *self.shape),
            chunks=(1, *self.shape),
            dtype=self.dtype,
        )
        self._file.swmr_mode = True
        self.count = 0

    def append(self, frame: np.ndarray) -> int:
        """Write one frame; returns the number of frames in the file."""
        if frame.shape != self.shape or frame.dtype != self.dtype:
            raise ScanDataError(
                f"Expected a frame of shape {self.shape} and dtype {self.dtype} from the "
                f"source; got {frame.shape} {frame.dtype}. Fix the source's frame()."
            )
        self._data.resize(self.count + 1, axis=0)
        self._data[self.count] = frame
        self._data.flush()
        self.count += 1
        return self.count

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file.id.valid:
            self._file.close()
