"""Projections: correct, filter, keep, select subsets.

Each frame is dark/flat corrected and -log'd (:class:`FlatField`), for cone
beam FDK pre-weighted (:func:`fdk_weights`), ramp filtered once along
detector rows (:class:`RampFilter`; both steps: :class:`ProjectionFilter`),
and kept in a ring buffer (:class:`ProjectionBuffer`) together with its angle
and its global index. Any subset of the buffer (the last rotation, even/odd
indices for Noise2Inverse, ``j::K``) is backprojected later without
refiltering.

Intensity scale
---------------
Frames are raw detector counts. :class:`FlatField` gives dimensionless line
integrals ``p = -log(I / I0)``. :class:`RampFilter` returns ``q = (p * h) /
pixel``, with ``h`` the discrete ramp in 1/pixel^2 and ``pixel`` the detector
pixel size at the rotation axis (mm; ``pixel_size * source_origin /
source_detector`` for cone beam), so that backprojection with the weight
``pi / n`` (:func:`bluesky_jit.geometry.window_weight`) gives attenuation
coefficients in 1/mm, for 180 and 360 degree scans alike.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, ScanDataError
from .geometry import ScanGeometry


def _fft_module():
    """scipy.fft (a dependency of scikit-image: faster in float32), else numpy.fft; lazily."""
    try:
        import scipy.fft
    except ImportError:  # pragma: no cover
        return np.fft
    return scipy.fft


FILTERS = ("ram-lak", "shepp-logan", "cosine", "hann")


class FlatField:
    """Dark/flat-field correction followed by the negative logarithm.

    ``p = -log((frame - dark) / (flat - dark))``, with the ratio clipped to a
    small positive value so that dead pixels do not give infinities.

    Parameters
    ----------
    darks : ndarray, shape (n_dark, rows, cols) or (rows, cols)
    flats : ndarray, shape (n_flat, rows, cols) or (rows, cols)
    detector_shape : (rows, cols), optional
        The detector shape the scan metadata gives; fields of another shape are refused.
    """

    min_transmission = 1e-6

    def __init__(
        self, darks: np.ndarray, flats: np.ndarray, *, detector_shape: tuple[int, int] | None = None
    ) -> None:
        dark = _mean_frame(darks, "dark")
        flat = _mean_frame(flats, "flat")
        if dark.shape != flat.shape:
            raise ScanDataError(
                f"Dark fields have shape {dark.shape} but flat fields {flat.shape}; both must "
                "match the detector. Check that darks and flats come from the same detector ROI."
            )
        if detector_shape is not None and dark.shape != tuple(detector_shape):
            raise ScanDataError(
                f"Dark/flat fields have shape {dark.shape}; the scan metadata says the "
                f"detector is {tuple(detector_shape)}. Fix tomo['detector_shape'] or the "
                "detector ROI."
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
        self._inverse_gain = (1.0 / gain).astype(np.float32)
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
        if frame.dtype.kind == "f" and not np.isfinite(frame).all():
            raise ScanDataError(
                f"The frame holds {int(np.count_nonzero(~np.isfinite(frame)))} NaN or infinite "
                "pixels; expected finite detector counts. The frame is skipped."
            )
        # in place, one float32 array: this runs for every frame (a 647 x 768 frame in
        # about 1 ms instead of 2.5 ms with temporaries)
        ratio = np.subtract(frame, self.dark, dtype=np.float32)
        ratio *= self._inverse_gain
        np.maximum(ratio, self.min_transmission, out=ratio)
        np.log(ratio, out=ratio)
        return np.negative(ratio, out=ratio)


def correct(flatfield: FlatField | None, frame: np.ndarray, angle_deg: float, index: int) -> Any:
    """``flatfield(frame)``, once the fields have come and the frame's angle is a number."""
    if flatfield is None:
        raise ScanDataError(
            "A projection arrived before dark and flat fields; expected 'dark' and 'flat' "
            "streams (or a dark_flat run) before the rotation."
        )
    if not math.isfinite(angle_deg):
        raise ScanDataError(f"Projection {index} has angle {angle_deg!r}; expected degrees.")
    return flatfield(frame)


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
    zero padding to at least twice the detector width (:func:`fft_length`),
    which avoids the DC offset of a frequency-sampled ramp; apodisation windows are applied on
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
        self.pad = fft_length(cols)
        self._fft = _fft_module()
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
        self._response_np = (response / pixel_size).astype(np.float32)
        self.filter_name = filter_name

    def __call__(self, projections: torch.Tensor) -> torch.Tensor:
        """Filter along the last axis; shape (..., cols) -> (..., cols).

        CPU tensors are filtered with scipy's (else numpy's) single-threaded
        FFT in float32: on a busy machine torch's intra-op threads make this
        small operation up to 100 times slower (measured on the 2-core
        development machine). A 647 x 768 frame takes about 4 ms of CPU time
        (scipy, length 1536; numpy with the earlier power-of-two length 2048:
        about 8 ms).
        """
        if projections.device.type == "cpu":
            data = projections.detach().numpy()
            spectrum = self._fft.rfft(data, n=self.pad, axis=-1)
            spectrum *= self._response_np
            out = self._fft.irfft(spectrum, n=self.pad, axis=-1)[..., : self.cols]
            return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        spectrum = torch.fft.rfft(projections, n=self.pad, dim=-1)
        return torch.fft.irfft(spectrum * self.response, n=self.pad, dim=-1)[..., : self.cols]


def fft_length(cols: int) -> int:
    """An even FFT length >= 2 cols - 1 that the FFT handles fast (linear convolution, no wrap).

    The ramp kernel is sampled on ``-pad/2 .. pad/2 - 1``; for ``pad >= 2 cols - 2``
    the first ``cols`` outputs of the circular convolution are the linear one.
    """
    n = max(2 * cols - 1, 2)
    fft = _fft_module()
    if fft is np.fft:  # pragma: no cover - scipy comes with scikit-image
        return 1 << math.ceil(math.log2(n))
    length = fft.next_fast_len(n, real=True)
    while length % 2:
        length = fft.next_fast_len(length + 1, real=True)
    return int(length)


def fdk_weights(geometry: ScanGeometry) -> np.ndarray:
    """FDK pre-weights ``D / sqrt(D**2 + a**2 + b**2)`` of every detector pixel, shape (rows, cols).

    ``D`` is the source-detector distance, ``a`` and ``b`` the pixel's column
    and row distance (mm) from the central ray; all ones for parallel beam.
    A detector tilt is ignored here (small tilts only).

    References
    ----------
    L. A. Feldkamp, L. C. Davis and J. W. Kress, "Practical cone-beam
    algorithm", J. Opt. Soc. Am. A 1, 612 (1984); Kak & Slaney, section 3.6.
    """
    rows, cols = geometry.detector_shape
    if geometry.beam != "cone":
        return np.ones((rows, cols), dtype=np.float32)
    distance = geometry.source_origin + geometry.origin_detector
    a = (np.arange(cols) - geometry.center_of_rotation) * geometry.pixel_size
    b = (np.arange(rows) - geometry.center_row) * geometry.pixel_size
    weights = distance / np.sqrt(distance**2 + a[None, :] ** 2 + b[:, None] ** 2)
    return weights.astype(np.float32)


class ProjectionFilter:
    """Everything done once per projection after correction: FDK weights and the ramp filter.

    Parameters
    ----------
    geometry : ScanGeometry
    filter_name : {"ram-lak", "shepp-logan", "cosine", "hann"}
    device : torch.device or str
    """

    def __init__(self, geometry: ScanGeometry, *, filter_name: str = "ram-lak", device="cpu"):
        self.geometry = geometry
        self.ramp = RampFilter(
            geometry.cols, pixel_size=geometry.voxel_size, filter_name=filter_name, device=device
        )
        self.weights = (
            torch.as_tensor(fdk_weights(geometry), device=device)
            if geometry.beam == "cone"
            else None
        )

    def __call__(self, line_integrals: torch.Tensor) -> torch.Tensor:
        """(..., rows, cols) line integrals -> filtered projections of the same shape."""
        if self.weights is not None:
            if line_integrals.device.type == "cpu":
                weighted = line_integrals.detach().numpy() * self.weights.numpy()
                line_integrals = torch.from_numpy(weighted)
            else:
                line_integrals = line_integrals * self.weights
        return self.ramp(line_integrals)


class ProjectionBuffer:
    """Ring buffer of filtered projections with their angles and global indices.

    Frames are kept in arrival order; a global index (the scan's projection
    number) finds its slot through a map, so frames that were skipped (a NaN
    frame, a frame of the wrong shape) leave gaps in the indices, not a shift
    of every later one.

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
        self.device = torch.device(device)
        self.data: torch.Tensor | None = None  # allocated by the first frame, which confirms
        self._view: np.ndarray | None = None  # the shape; on the CPU copies go through a numpy
        # view (torch's intra-op threads slow small copies down badly on a busy machine)
        self.angles = np.zeros(capacity)  # radians
        self.indices = np.full(capacity, -1, dtype=np.int64)
        self.count = 0
        self._slot_of: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    @property
    def oldest(self) -> int:
        """Arrival position of the oldest frame still held (slot ``oldest % capacity``)."""
        return self.count - len(self)

    @property
    def storage(self) -> np.ndarray | None:
        """The whole ring, (capacity, rows, cols) float32, as a numpy view (CPU only, else None).

        The frame that arrived ``i``-th is in slot ``i % capacity``;
        :meth:`slots_of` maps global indices to slots. Reading the ring in
        place races with appends: check afterwards that no slot read was
        written meanwhile (:attr:`count` before and after); :meth:`select`
        copies under the lock instead.
        """
        return self._view

    def append(self, filtered: torch.Tensor, *, angle: float, index: int) -> None:
        """Keep one filtered projection (rows, cols) taken at ``angle`` (radians)."""
        index = int(index)
        if tuple(filtered.shape) != self.shape:
            raise ScanDataError(
                f"A filtered projection of shape {tuple(filtered.shape)} arrived; the buffer "
                f"keeps {self.shape}. Expected every frame to have the detector shape."
            )
        with self._lock:
            if self.data is None:
                self.data = torch.zeros((self.capacity, *self.shape), device=self.device)
                self._view = self.data.numpy() if self.device.type == "cpu" else None
            slot = self.count % self.capacity
            previous = int(self.indices[slot])
            if self.count >= self.capacity and self._slot_of.get(previous) == slot:
                del self._slot_of[previous]
            if self._view is not None:
                self._view[slot] = np.asarray(filtered)
            else:
                self.data[slot] = filtered
            self.angles[slot] = angle
            self.indices[slot] = index
            self._slot_of[index] = slot
            self.count += 1

    def last(self, n: int) -> np.ndarray:
        """Global indices of the newest ``n`` projections, oldest first."""
        with self._lock:
            n = min(n, len(self))
            slots = (np.arange(self.count - n, self.count)) % self.capacity
            return self.indices[slots].copy()

    def slots_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Slots (int64) of buffered projections given by global index.

        Raises
        ------
        ScanDataError
            If a projection is not (or no longer) in the buffer.
        """
        with self._lock:
            return self._slots(indices)

    def _slots(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        slot_of = self._slot_of
        slots = np.fromiter((slot_of.get(int(i), -1) for i in indices), np.int64, len(indices))
        if np.any(slots < 0):
            missing = indices[slots < 0]
            held = self.indices[np.arange(self.oldest, self.count) % self.capacity]
            span = f"{held.min()}..{held.max()}" if held.size else "nothing"
            raise ScanDataError(
                f"Projections {missing.min()}..{missing.max()} were requested; the buffer "
                f"holds {span}. Increase the buffer capacity."
            )
        return slots

    def select(
        self, indices: Sequence[int] | np.ndarray, rows: Sequence[int] | slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Filtered projections and angles for the given global indices.

        Returns
        -------
        data : Tensor, shape (n, len(rows), cols)
        angles : Tensor, shape (n,), radians
        """
        with self._lock:
            slots = self._slots(indices)
            if self._view is not None:
                view = self._view if rows is None else self._view[:, rows]
                data = torch.from_numpy(np.ascontiguousarray(view[slots]))
            else:
                index = torch.as_tensor(slots, device=self.device)
                source = self.data if rows is None else self.data[:, rows]
                data = source.index_select(0, index)
            angles = self.angles[slots].copy()
        return data, torch.as_tensor(angles, dtype=torch.float32, device=self.device)

    def angles_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Angles (radians, float64) of buffered projections given by global index."""
        with self._lock:
            return self.angles[self._slots(indices)].copy()


def split_subsets(indices: np.ndarray, k: int = 2) -> list[np.ndarray]:
    """Noise2Inverse splits ``J_j = {i : i mod k == j}`` of global projection indices.

    The splits are disjoint and together cover ``indices`` (Graas et al. 2023; Hendriksen
    et al., Noise2Inverse, IEEE TCI 2020).
    """
    if k < 2:
        raise ConfigError(f"Noise2Inverse needs at least 2 splits; got k={k}.")
    indices = np.asarray(indices)
    return [indices[indices % k == j] for j in range(k)]
