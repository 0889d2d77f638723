"""The streaming slice reconstructor: frames in, slices and training pairs out.

Works on arrays only; :mod:`bluesky_jit.ingest` feeds it from documents.
Each frame is corrected and filtered once on arrival; every ``refresh_every``
projections the slice is reconstructed from the last full rotation, as even
and odd halves (Noise2Inverse, seed 000) whose weighted mean is the full FBP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, GeometryError, ScanDataError
from ..geometry import ScanGeometry
from ..projections import FlatField, ProjectionBuffer, RampFilter, split_subsets
from .grids import patch_grid, slice_grid
from .torch_backend import TorchBackprojector


@dataclass(frozen=True)
class SliceSet:
    """One refresh: the full FBP and its Noise2Inverse halves.

    Attributes
    ----------
    full, even, odd : ndarray, shape (n, n)
        FBP from all projections of the window, from even and from odd indices.
    indices : ndarray, shape (m,)
        Global projection indices of the window.
    row : int
        Detector row of the slice.
    """

    full: np.ndarray
    even: np.ndarray
    odd: np.ndarray
    indices: np.ndarray
    row: int


class StreamingReconstructor:
    """Keep filtered projections and reconstruct slices and patch pairs from them.

    Parameters
    ----------
    geometry : ScanGeometry
        Parallel beam (cone beam is not supported by this reconstructor yet).
    refresh_every : int
        A slice is due every k projections once a rotation is buffered.
    slice_row : int or None
        Detector row of the axial slice; the middle row by default.
    filter_name : str
    device : str or torch.device
    """

    def __init__(
        self,
        geometry: ScanGeometry,
        *,
        refresh_every: int = 10,
        slice_row: int | None = None,
        filter_name: str = "ram-lak",
        device: str | torch.device = "cpu",
    ) -> None:
        if geometry.beam != "parallel":
            raise GeometryError(
                f"The streaming reconstructor handles parallel beam; got beam={geometry.beam!r}. "
                "Cone-beam FDK is not available in this version; use a parallel-beam scan."
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
        self.device = torch.device(device)
        self.flatfield: FlatField | None = None
        self.filter = RampFilter(
            cols, pixel_size=geometry.pixel_size, filter_name=filter_name, device=self.device
        )
        self.buffer = ProjectionBuffer(2 * self.window, (rows, cols), device=self.device)
        self.backprojector = TorchBackprojector(
            cols=cols,
            center_of_rotation=geometry.center_of_rotation,
            pixel_size=geometry.pixel_size,
        )
        self.n = geometry.slice_size
        self._grid = slice_grid(self.n, pixel_size=geometry.pixel_size, device=self.device)
        self._since_refresh = 0

    # -- frames in -------------------------------------------------------------
    def set_flatfield(self, darks: np.ndarray, flats: np.ndarray) -> None:
        """Dark (n, rows, cols) and flat (m, rows, cols) fields for all later frames."""
        flatfield = FlatField(darks, flats)
        if flatfield.shape != self.geometry.detector_shape:
            raise ScanDataError(
                f"Dark/flat fields have shape {flatfield.shape}; the scan metadata says the "
                f"detector is {self.geometry.detector_shape}. Fix tomo['detector_shape'] or the "
                "detector ROI."
            )
        self.flatfield = flatfield

    def add_frame(self, frame: np.ndarray, *, angle_deg: float, index: int) -> bool:
        """Correct, filter and keep one frame; return True when a refresh is due.

        Raises
        ------
        ScanDataError
            No flat field yet, or a frame of the wrong shape or with NaN values.
        """
        if self.flatfield is None:
            raise ScanDataError(
                "A projection arrived before dark and flat fields; expected 'dark' and 'flat' "
                "streams (or a dark_flat run) before the rotation."
            )
        if not math.isfinite(angle_deg):
            raise ScanDataError(f"Projection {index} has angle {angle_deg!r}; expected degrees.")
        line_integrals = torch.from_numpy(self.flatfield(frame)).to(self.device)
        self.buffer.append(self.filter(line_integrals), angle=math.radians(angle_deg), index=index)
        self._since_refresh += 1
        if len(self.buffer) >= self.window and self._since_refresh >= self.refresh_every:
            self._since_refresh = 0
            return True
        return False

    @property
    def ready(self) -> bool:
        """True once a full rotation is buffered."""
        return len(self.buffer) >= self.window

    # -- slices and pairs out ----------------------------------------------------
    def window_indices(self) -> np.ndarray:
        """Global indices of the last full rotation."""
        return self.buffer.last(self.window)

    def reconstruct(self, row: int | None = None) -> SliceSet:
        """FBP of the last rotation at a detector row (the slice row by default)."""
        row = self.row if row is None else row
        indices = self.window_indices()
        even_idx, odd_idx = split_subsets(indices, 2)
        x, y = self._grid
        halves = []
        for subset in (even_idx, odd_idx):
            data, angles = self.buffer.select(subset, rows=row)
            halves.append(self.backprojector.backproject(data, angles, x, y))
        even, odd = halves
        full = (even * len(even_idx) + odd * len(odd_idx)) / len(indices)
        return SliceSet(
            full=full.cpu().numpy(),
            even=even.cpu().numpy(),
            odd=odd.cpu().numpy(),
            indices=indices,
            row=row,
        )

    def patch_pairs(
        self,
        count: int,
        *,
        size: int,
        rng: np.random.Generator,
        radius: float = 0.9,
        neighbourhood: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noise2Inverse training pairs as patches reconstructed directly from the buffer.

        Patch centres are uniform in a disc of ``radius`` times the
        reconstruction circle (the sampling region), on the slice row and up
        to ``neighbourhood`` rows around it (seed 000, "Training data
        generation"). For every patch, ``u`` comes from one of the even/odd
        subsets and ``v`` from the other, chosen at random, so input and target
        never share a projection.

        Returns
        -------
        u, v : ndarray, shape (count, 1, size, size), float32
        """
        half = self.n * self.geometry.pixel_size / 2
        max_r = radius * half - size * self.geometry.pixel_size / math.sqrt(2)
        if max_r <= 0:
            raise ConfigError(
                f"A {size}x{size} patch does not fit inside the sampling region (radius "
                f"{radius} of a {self.n}-pixel slice). Use a smaller patch_size or a larger "
                "sampling_radius."
            )
        r = max_r * np.sqrt(rng.uniform(size=count))
        phi = rng.uniform(0, 2 * np.pi, size=count)
        centres = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
        rows = np.clip(
            self.row + rng.integers(-neighbourhood, neighbourhood + 1, size=count),
            0,
            self.geometry.rows - 1,
        )
        swap = rng.uniform(size=count) < 0.5
        subsets = split_subsets(self.window_indices(), 2)
        u = np.empty((count, 1, size, size), dtype=np.float32)
        v = np.empty_like(u)
        centres_t = torch.as_tensor(centres, dtype=torch.float32, device=self.device)
        for row in np.unique(rows):
            sel = np.flatnonzero(rows == row)
            x, y = patch_grid(centres_t[sel], size, pixel_size=self.geometry.pixel_size)
            recon = []
            for subset in subsets:
                data, angles = self.buffer.select(subset, rows=int(row))
                recon.append(self.backprojector.backproject(data, angles, x, y).cpu().numpy())
            a, b = recon
            s = swap[sel][:, None, None]
            u[sel, 0] = np.where(s, b, a)
            v[sel, 0] = np.where(s, a, b)
        return u, v
