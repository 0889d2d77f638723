"""Projections: correct, filter, keep, select subsets.

Each frame is dark/flat corrected and -log'd (:class:`FlatField`), ramp
filtered once along detector rows (:class:`RampFilter`), and kept in a ring
buffer (:class:`ProjectionBuffer`) together with its angle and its global
index. Any subset of the buffer (the last rotation, even/odd indices for
Noise2Inverse, ``j::K``) is backprojected later without refiltering.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from .errors import ConfigError, ScanDataError

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hann")


class FlatField:
    """Dark/flat-field correction followed by the negative logarithm.

    ``p = -log((frame - dark) / (flat - dark))``, with the ratio clipped to a
    small positive value so that dead pixels do not give infinities.

    Parameters
    ----------
    darks : ndarray, shape (n_dark, rows, cols) or (rows, cols)
    flats : ndarray, shape (n_flat, rows, cols) or (rows, cols)
    """

    min_transmission = 1e-6

    def __init__(self, darks: np.ndarray, flats: np.ndarray) -> None:
        dark = _mean_frame(darks, "dark")
        flat = _mean_frame(flats, "flat")
        if dark.shape != flat.shape:
            raise ScanDataError(
                f"Dark fields have shape {dark.shape} but flat fields {flat.shape}; both must "
                "match the detector. Check that darks and flats come from the same detector ROI."
            )
        gain = flat - dark
        if np.any(gain <= 0):
            bad = int(np.count_nonzero(gain <= 0))
            raise ScanDataError(
                f"{bad} detector pixels are not brighter in the flat fields than in the darks "
                "(flat - dark <= 0). Expected open-beam flats and closed-shutter darks; were the "
                "two streams swapped, or was the beam off during the flats?"
            )
        self.dark = dark
        self.gain = gain
        self.shape: tuple[int, int] = dark.shape  # type: ignore[assignment]

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Corrected line integrals, shape (rows, cols), float32."""
        frame = np.asarray(frame)
        if frame.shape != self.shape:
            raise ScanDataError(
                f"A frame of shape {frame.shape} arrived; the dark and flat fields are "
                f"{self.shape}. Expected every frame to have the detector shape {self.shape}: "
                "was the detector ROI or binning changed during the scan?"
            )
        frame = frame.astype(np.float32)
        if not np.all(np.isfinite(frame)):
            raise ScanDataError(
                f"The frame holds {int(np.count_nonzero(~np.isfinite(frame)))} NaN or infinite "
                "pixels; expected finite detector counts. The frame is skipped."
            )
        ratio = (frame - self.dark) / self.gain
        np.maximum(ratio, self.min_transmission, out=ratio)
        return -np.log(ratio)


def _mean_frame(frames: np.ndarray, what: str) -> np.ndarray:
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or frames.shape[0] == 0:
        raise ScanDataError(
            f"Expected {what} fields as an array (n, rows, cols) with n >= 1; got shape "
            f"{frames.shape}."
        )
    if not np.all(np.isfinite(frames)):
        raise ScanDataError(f"The {what} fields hold NaN or infinite values; retake them.")
    return frames.mean(axis=0)


class RampFilter:
    """Ramp filter along detector rows, applied once per projection.

    The spatial Ram-Lak kernel (Kak & Slaney, eq. 3.61) is transformed with
    zero padding to at least twice the detector width, which avoids the DC
    offset of a frequency-sampled ramp; apodisation windows are applied on
    top. The output is scaled by the pixel size so that backprojection with
    weight pi/n gives attenuation in 1/unit.

    Parameters
    ----------
    cols : int
        Detector width (pixels).
    pixel_size : float
    filter_name : {"ram-lak", "shepp-logan", "cosine", "hann"}
    device : torch.device or str

    References
    ----------
    A. C. Kak and M. Slaney, *Principles of Computerized Tomographic Imaging*,
    IEEE Press, 1988, chapter 3.
    """

    def __init__(
        self, cols: int, *, pixel_size: float = 1.0, filter_name: str = "ram-lak", device="cpu"
    ) -> None:
        if filter_name not in FILTERS:
            raise ConfigError(f"Unknown filter {filter_name!r}; expected one of {FILTERS}.")
        self.cols = cols
        self.pad = 1 << math.ceil(math.log2(2 * cols))
        n = np.arange(-(self.pad // 2), self.pad // 2)
        kernel = np.zeros(self.pad)
        kernel[n == 0] = 0.25
        odd = n % 2 == 1
        kernel[odd] = -1.0 / (np.pi * n[odd]) ** 2
        response = np.real(np.fft.rfft(np.fft.ifftshift(kernel)))  # ramp, 1/pixel^2 units
        freq = np.fft.rfftfreq(self.pad)  # cycles per pixel, 0 .. 0.5
        with np.errstate(divide="ignore", invalid="ignore"):
            if filter_name == "shepp-logan":
                arg = np.pi * freq
                response *= np.where(freq == 0, 1.0, np.sin(arg) / arg)
            elif filter_name == "cosine":
                response *= np.cos(np.pi * freq)
            elif filter_name == "hann":
                response *= 0.5 * (1 + np.cos(2 * np.pi * freq))
        # kernel is in 1/pixel^2; with p dimensionless, q = pixel * (p * h) / pixel^2
        self.response = torch.as_tensor(response / pixel_size, dtype=torch.float32, device=device)
        self.filter_name = filter_name

    def __call__(self, projections: torch.Tensor) -> torch.Tensor:
        """Filter along the last axis; shape (..., cols) -> (..., cols)."""
        spectrum = torch.fft.rfft(projections, n=self.pad, dim=-1)
        return torch.fft.irfft(spectrum * self.response, n=self.pad, dim=-1)[..., : self.cols]


class ProjectionBuffer:
    """Ring buffer of filtered projections with their angles and global indices.

    Parameters
    ----------
    capacity : int
        Projections kept (at least one rotation).
    shape : (int, int)
        Detector (rows, cols) of each filtered projection.
    device : torch.device or str

    Notes
    -----
    Appends and reads may come from different threads; a lock guards the
    bookkeeping, and selections return copies.
    """

    def __init__(self, capacity: int, shape: tuple[int, int], *, device="cpu") -> None:
        if capacity < 2:
            raise ConfigError(f"ProjectionBuffer capacity must be >= 2; got {capacity}.")
        self.capacity = capacity
        self.shape = tuple(shape)
        self.data = torch.zeros((capacity, *shape), dtype=torch.float32, device=device)
        self.angles = np.zeros(capacity)  # radians
        self.indices = np.full(capacity, -1, dtype=np.int64)
        self.count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def append(self, filtered: torch.Tensor, *, angle: float, index: int) -> None:
        """Keep one filtered projection (rows, cols) taken at ``angle`` (radians)."""
        slot = self.count % self.capacity
        with self._lock:
            self.data[slot] = filtered
            self.angles[slot] = angle
            self.indices[slot] = index
            self.count += 1

    def last(self, n: int) -> np.ndarray:
        """Global indices of the newest ``n`` projections, oldest first."""
        with self._lock:
            n = min(n, len(self))
            slots = (np.arange(self.count - n, self.count)) % self.capacity
            return self.indices[slots].copy()

    def select(
        self, indices: Sequence[int] | np.ndarray, rows: Sequence[int] | slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Filtered projections and angles for the given global indices.

        Returns
        -------
        data : Tensor, shape (n, len(rows), cols)
        angles : Tensor, shape (n,), radians
        """
        indices = np.asarray(indices, dtype=np.int64)
        with self._lock:
            oldest = self.count - len(self)
            if indices.size and (indices.min() < oldest or indices.max() >= self.count):
                raise ScanDataError(
                    f"Projections {indices.min()}..{indices.max()} were requested; the buffer "
                    f"holds {oldest}..{self.count - 1}. Increase the buffer capacity."
                )
            slots = torch.as_tensor(indices % self.capacity, device=self.data.device)
            data = self.data.index_select(0, slots)
            angles = self.angles[indices % self.capacity].copy()
        if rows is not None:
            data = data[:, rows]
        return data, torch.as_tensor(angles, dtype=torch.float32, device=self.data.device)


def split_subsets(indices: np.ndarray, k: int = 2) -> list[np.ndarray]:
    """Noise2Inverse splits ``J_j = {i : i mod k == j}`` of global projection indices.

    The splits are disjoint and together cover ``indices`` (seed 000; Hendriksen
    et al., Noise2Inverse, IEEE TCI 2020).
    """
    if k < 2:
        raise ConfigError(f"Noise2Inverse needs at least 2 splits; got k={k}.")
    indices = np.asarray(indices)
    return [indices[indices % k == j] for j in range(k)]
