"""Training patch pairs straight from the projection buffer: K splits, Z and T stacks.

A :class:`PairMaker` reads filtered projections from a
:class:`~bluesky_jit.projections.ProjectionBuffer` (anything with ``last(n)``
and ``select(indices, rows=...)``) and reconstructs small patches from each
of K disjoint projection subsets ``J_j = {i : i mod K == j}`` of a window,
with a row backprojector such as
:meth:`bluesky_jit.reconstruction.TorchBackprojector.backproject`. The splits
become input-target pairs by :func:`bluesky_jit.noise2inverse.pairs` (X:1
or 1:X), with patch centres inside a :class:`SamplingRegion`. Input and
target are made from disjoint subsets, so they never share a projection, also
across the rows of a Z stack and the windows of a T stack (split membership
is by global projection index).

Stacks (Graas et al. 2023, Table 1): ``stack="z"`` makes inputs of ``frames`` nearby
detector rows (clipped at the detector edges) around the target row;
``stack="t"`` makes inputs of ``frames`` consecutive windows, each
``frame_step`` projections after the previous, whose middle window is the
target's (so a Tx network denoises the frame ``(frames // 2) * frame_step``
projections back).

Everything here works on arrays. Patches are reconstructed either by a
parallel-beam row backprojector (one detector row per axial slice) or, with
:meth:`PairMaker.from_reconstructor`, by a
:class:`~bluesky_jit.reconstruction.streaming.StreamingReconstructor` on its
own backend and geometry (parallel or cone beam): the path the live pipeline
takes. Thread-safe: the patch size, the sampling region and the slice row may
be changed from another thread while pairs are made.

References
----------
.. [1] Hendriksen, Pelt, Batenburg, "Noise2Inverse: self-supervised deep
   convolutional denoising for tomography", IEEE Transactions on
   Computational Imaging 6 (2020).
.. [2] Graas, Coban, Batenburg, Lucka, "Just-in-time deep learning for
   real-time X-ray computed tomography", Scientific Reports 13 (2023).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from . import noise2inverse
from ._checks import check_int
from .errors import ConfigError, ScanDataError
from .projections import split_subsets
from .reconstruction import patch_grid

RowBackprojector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``backproject(filtered (n, cols), angles (n,), x, y) -> values at (x, y)``, one detector row."""

SubsetSlices = Callable[[list[np.ndarray], int], np.ndarray]
"""``slices(subsets, row) -> (K, n, n)``: the axial slice at a detector row from each subset,
e.g. :meth:`~bluesky_jit.reconstruction.streaming.StreamingReconstructor.subset_slices`."""

SubsetPatches = Callable[..., np.ndarray]
"""``patches(subsets, centers (m, 2), rows (m,), *, size) -> (K, m, size, size)``: one
FBP per subset of global projection indices, e.g.
:meth:`~bluesky_jit.reconstruction.streaming.StreamingReconstructor.subset_patches`."""


class ProjectionSource(Protocol):
    """What a :class:`PairMaker` needs from a projection buffer."""

    def last(self, n: int) -> np.ndarray: ...

    def select(
        self, indices: np.ndarray, rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __len__(self) -> int: ...


STACKS = (None, "z", "t")
TARGETS = ("noise2inverse", "supervised")


class TargetSource(Protocol):
    """What supervised pairs need: kept line integrals and SIRT slices from them, e.g. a
    :class:`~bluesky_jit.reconstruction.streaming.StreamingReconstructor`."""

    def keep_line_integrals(self, first: int, last: int, capacity: int) -> Any: ...

    def sirt_slice(self, indices: np.ndarray, row: int, *, iterations: int) -> np.ndarray: ...


class SamplingRegion:
    """Where training patches may lie in the slice: a disc or a mask.

    Graas et al. (2023): "The patches are sampled uniformly at random from a slice as well
    as its spatial neighbourhood ... No patches are sampled outside the glass
    container"; "the patch-sampling region is adjustable during the
    experiment". Coordinates are those of
    :func:`bluesky_jit.reconstruction.slice_grid` (x along columns, y along
    rows, mm, origin on the rotation axis). Use :meth:`disc` or :meth:`from_mask`.

    Parameters
    ----------
    radius : float, optional
        Disc radius (mm).
    center : (float, float)
        Disc or mask centre (x, y), mm.
    mask : ndarray of bool, shape (n, n), optional
        Allowed pixels of an n x n slice grid around ``center``.
    pixel_size : float
        Pixel size of ``mask`` (mm).
    """

    def __init__(
        self,
        *,
        radius: float | None = None,
        center: tuple[float, float] = (0.0, 0.0),
        mask: np.ndarray | None = None,
        pixel_size: float = 1.0,
    ) -> None:
        if (radius is None) == (mask is None):
            raise ConfigError(
                "SamplingRegion needs exactly one of radius= (a disc) or mask= (allowed pixels)."
            )
        if not (np.isfinite(pixel_size) and pixel_size > 0):
            raise ConfigError(f"SamplingRegion pixel_size must be > 0; got {pixel_size!r}.")
        if radius is not None and not (np.isfinite(radius) and radius > 0):
            raise ConfigError(f"SamplingRegion radius must be > 0 mm; got {radius!r}.")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.ndim != 2 or not mask.any():
                raise ConfigError(
                    "SamplingRegion mask must be a 2D boolean array with at least one True "
                    f"pixel; got dtype {mask.dtype}, shape {mask.shape}."
                )
        self.radius = None if radius is None else float(radius)
        self.center = (float(center[0]), float(center[1]))
        self.mask = mask
        self.pixel_size = float(pixel_size)

    @classmethod
    def disc(cls, radius: float, *, center: tuple[float, float] = (0.0, 0.0)) -> SamplingRegion:
        """A disc of ``radius`` mm (e.g. the inside of the container)."""
        return cls(radius=radius, center=center)

    @classmethod
    def from_mask(
        cls, mask: np.ndarray, *, pixel_size: float, center: tuple[float, float] = (0.0, 0.0)
    ) -> SamplingRegion:
        """Allowed pixels of a slice grid (e.g. a thresholded reconstruction)."""
        return cls(mask=mask, pixel_size=pixel_size, center=center)

    def __repr__(self) -> str:
        if self.mask is not None:
            return (
                f"SamplingRegion(mask={self.mask.shape}, pixel_size={self.pixel_size}, "
                f"center={self.center})"
            )
        return f"SamplingRegion(radius={self.radius}, center={self.center})"

    def check_fits(self, size: int, pixel_size: float) -> None:
        """Raise :class:`ConfigError` unless a ``size`` x ``size`` patch fits inside."""
        self._room(size, pixel_size)

    def centers(
        self, count: int, *, size: int, pixel_size: float, rng: np.random.Generator
    ) -> np.ndarray:
        """Uniformly random centres of ``size`` x ``size`` patches lying wholly inside.

        Parameters
        ----------
        count : int
        size : int
            Patch side (pixels).
        pixel_size : float
            Patch pixel size (mm).
        rng : numpy.random.Generator

        Returns
        -------
        ndarray, shape (count, 2), float64
            Centres (x, y), mm.

        Raises
        ------
        ConfigError
            If no patch of that size fits inside the region.
        """
        room = self._room(size, pixel_size)
        if self.radius is not None:
            r = room * np.sqrt(rng.uniform(size=count))
            phi = rng.uniform(0, 2 * np.pi, size=count)
            return np.stack(
                [self.center[0] + r * np.cos(phi), self.center[1] + r * np.sin(phi)], axis=1
            )
        n_rows, n_cols = np.shape(self.mask)
        rows, cols = np.nonzero(room)
        pick = rng.integers(rows.size, size=count)
        x = self.center[0] + (cols[pick] - (n_cols - 1) / 2) * self.pixel_size
        y = self.center[1] + (rows[pick] - (n_rows - 1) / 2) * self.pixel_size
        return np.stack([x, y], axis=1)

    def _room(self, size: int, pixel_size: float) -> Any:
        """Where centres may lie: a disc's radius (mm) or the mask's allowed pixels, eroded."""
        half = (size - 1) / 2 * pixel_size
        if self.radius is not None:
            reach = self.radius - half * np.sqrt(2) - pixel_size / 2
            if reach < 0:
                raise ConfigError(
                    f"A {size}x{size} patch ({size * pixel_size:.4g} mm wide) does not fit "
                    f"inside the sampling disc of radius {self.radius:.4g} mm. Use a smaller "
                    "patch_size or a larger sampling region."
                )
            return reach
        from scipy import ndimage

        mask = np.asarray(self.mask)  # set whenever radius is None (see __init__)
        # the patch, in mask pixels, around a mask pixel: erode with a square that wide
        reach = int(np.ceil((half + pixel_size / 2) / self.pixel_size - 0.5))
        inside = ndimage.binary_erosion(
            mask, structure=np.ones((2 * reach + 1, 2 * reach + 1), bool), border_value=0
        )
        if not inside.any():
            raise ConfigError(
                f"A {size}x{size} patch does not fit inside the sampling mask (shape "
                f"{mask.shape}, {int(mask.sum())} allowed pixels). Use a smaller "
                "patch_size or a larger region."
            )
        return inside


class PairMaker:
    """Make Noise2Inverse training pairs (and inference inputs) from buffered projections.

    Parameters
    ----------
    source : ProjectionSource
        Filtered projections with global indices, e.g. a ``ProjectionBuffer``.
    backproject : RowBackprojector, optional
        Parallel-beam backprojection of one detector row onto points (mm).
    patches : SubsetPatches, optional
        Instead of ``backproject``: reconstructs patches from subsets of
        projections in any geometry (see :meth:`from_reconstructor`).
    slices : SubsetSlices, optional
        Full slices for :meth:`slice_splits`; by default one patch of side
        ``slice_size`` from ``patches`` or ``backproject``.
    window : int
        Projections per reconstruction (one rotation).
    rows : int
        Detector rows (stacks and neighbourhoods are clipped to them).
    pixel_size : float
        Pixel size of patches and slices (mm).
    row : int
        Detector row of the slice.
    splits : int
        K, the number of disjoint projection subsets (2: even/odd).
    n2i_strategy : {"X:1", "1:X"}
        See :data:`bluesky_jit.noise2inverse.STRATEGIES`.
    patch_size : int
        Patch side (pixels); 20 in Graas et al. (2023).
    region : SamplingRegion, optional
        Where patch centres may lie; by default the disc inscribed in a
        ``slice_size`` slice, shrunk to 90 %.
    slice_size : int, optional
        Side of full slices (:meth:`slice_splits`); default the number of
        detector columns the source holds.
    neighbourhood_rows : int
        Target rows are drawn up to this many rows from ``row`` (Graas et al.:
        "from a slice as well as its spatial neighbourhood").
    stack : {None, "z", "t"}
    frames : int
        Slices or windows per stack (odd; 1 without a stack).
    frame_step : int, optional
        Projections between the windows of a T stack; default ``window // 2``.
    rng : numpy.random.Generator, optional
    pairs_per_refresh, holdout_per_refresh : int
        Training and hold-out pairs the pipeline asks for at each refresh
        (kept here as :attr:`pairs_per_refresh`, :attr:`holdout_per_refresh`).
    target : {"noise2inverse", "supervised"}
        Supervised (as TomoGAN, Liu et al. 2020): the input is the window's FBP,
        the target ``target_iterations`` of SIRT (``reference.sirt_slice``) over
        the last ``target_windows`` windows; both cut from full slices at the
        patch centres, rounded to the slice's pixels. Needs ``reference`` and
        ``slices`` (:meth:`from_reconstructor`) and no stack.
    target_windows, target_iterations : int
    reference : TargetSource, optional
    center_xy : (float, float)
        Centre (x, y) of the slices, mm (where supervised patches are cut).
    """

    def __init__(
        self,
        source: ProjectionSource,
        backproject: RowBackprojector | None = None,
        *,
        window: int,
        rows: int,
        pixel_size: float,
        row: int,
        splits: int = 2,
        n2i_strategy: str = "X:1",
        patch_size: int = 20,
        region: SamplingRegion | None = None,
        slice_size: int | None = None,
        neighbourhood_rows: int = 0,
        stack: str | None = None,
        frames: int = 1,
        frame_step: int | None = None,
        rng: np.random.Generator | None = None,
        pairs_per_refresh: int = 64,
        holdout_per_refresh: int = 8,
        patches: SubsetPatches | None = None,
        slices: SubsetSlices | None = None,
        target: str = "noise2inverse",
        target_windows: int = 2,
        target_iterations: int = 100,
        reference: TargetSource | None = None,
        center_xy: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        if (backproject is None) == (patches is None):
            raise ConfigError(
                "PairMaker needs exactly one of backproject= (a parallel-beam row "
                "backprojector) or patches= (e.g. StreamingReconstructor.subset_patches)."
            )
        noise2inverse.check_strategy(n2i_strategy, splits)
        check_int("PairMaker", "window", window, 2)
        check_int("PairMaker", "rows", rows)
        check_int("PairMaker", "frames", frames)
        check_int("PairMaker", "neighbourhood_rows", neighbourhood_rows, 0)
        if window < splits:
            raise ConfigError(
                f"A window of {window} projections cannot be split {splits} ways; expected "
                "window >= splits."
            )
        if stack not in STACKS:
            raise ConfigError(f"PairMaker stack must be one of {STACKS}; got {stack!r}.")
        if stack is None and frames != 1:
            raise ConfigError(f"frames={frames} needs stack='z' or 't'; got stack=None.")
        if stack is not None and frames % 2 == 0:
            raise ConfigError(f"Stacks need an odd number of frames (a middle one); got {frames}.")
        if not (np.isfinite(pixel_size) and pixel_size > 0):
            raise ConfigError(f"PairMaker pixel_size must be > 0 mm; got {pixel_size!r}.")
        if target not in TARGETS:
            raise ConfigError(f"PairMaker target must be one of {TARGETS}; got {target!r}.")
        check_int("PairMaker", "target_windows", target_windows)
        check_int("PairMaker", "target_iterations", target_iterations)
        if target == "supervised" and (reference is None or slices is None or stack):
            raise ConfigError(
                'target="supervised" needs a reconstructor (PairMaker.from_reconstructor: its '
                f"SIRT and full slices) and no stack; got stack={stack!r}."
            )
        step = window // 2 if frame_step is None else frame_step
        check_int("PairMaker", "frame_step", step)
        self.source = source
        self.backproject = backproject
        self.subset_patches = patches
        self.subset_slices = slices
        self.window = window
        self.rows = rows
        self.pixel_size = float(pixel_size)
        self.splits = splits
        self.n2i_strategy = n2i_strategy
        self.neighbourhood_rows = neighbourhood_rows
        self.pairs_per_refresh = pairs_per_refresh
        self.holdout_per_refresh = holdout_per_refresh
        self.stack = stack
        self.frames = frames
        self.frame_step = step
        self.slice_size = slice_size
        self.target = target
        self.target_windows = target_windows
        self.target_iterations = target_iterations
        self.reference = reference
        self.center_xy = (float(center_xy[0]), float(center_xy[1]))
        self._line_integrals: Any = None
        self._targets: dict[tuple[int, int], np.ndarray] = {}
        self._rng = rng if rng is not None else np.random.default_rng()
        self._lock = threading.Lock()
        self._row = 0
        self._patch_size = 0
        self._region: SamplingRegion | None = None
        self.set_row(row)
        self.set_patch_size(patch_size)
        if region is not None:
            self.set_region(region)

    @classmethod
    def from_reconstructor(
        cls, reconstructor, *, sampling_radius: float | None = None, **settings
    ) -> PairMaker:
        """Pairs reconstructed by a streaming reconstructor, on its backend and geometry.

        Source, window, detector rows, pixel size, slice size and the slice
        row come from ``reconstructor`` (a
        :class:`~bluesky_jit.reconstruction.streaming.StreamingReconstructor`);
        ``settings`` are the other parameters (``splits``, ``n2i_strategy``,
        ``patch_size``, ``region``, ``neighbourhood_rows``, ``stack``,
        ``frames``, ``frame_step``, ``rng``, ...), so that
        ``from_reconstructor(recon, **cfg.pairs.model_dump(), frames=..., rng=...)``
        takes the :class:`~bluesky_jit.config.Pairs` settings. A
        ``sampling_radius`` (a fraction of the reconstruction circle) stands
        for the ``region`` of that disc, checked to fit a patch. Works for cone
        beam too: patches lie in axial planes at the height of their detector row.
        With ``target="supervised"`` the reconstructor also keeps the unfiltered
        projections of the rows pairs come from (for its SIRT), from then on.
        """
        geometry = reconstructor.geometry
        if sampling_radius is not None:
            voxel = geometry.voxel_size
            region = SamplingRegion.disc(
                sampling_radius * reconstructor.n * voxel / 2, center=tuple(reconstructor.center_xy)
            )
            region.check_fits(settings.get("patch_size", 20), voxel)
            settings["region"] = region
        base = {
            "window": reconstructor.window,
            "rows": geometry.rows,
            "pixel_size": geometry.voxel_size,
            "row": reconstructor.row,
            "slice_size": reconstructor.n,
            "center_xy": tuple(reconstructor.center_xy),
            "reference": reconstructor,
        }
        return cls(
            reconstructor.buffer,
            patches=reconstructor.subset_patches,
            slices=reconstructor.subset_slices,
            **(base | settings),
        )

    # -- settings that may change during the run ------------------------------------
    @property
    def row(self) -> int:
        """Detector row of the slice (target rows are drawn around it)."""
        return self._row

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def region(self) -> SamplingRegion | None:
        """The sampling region; ``None`` is the default disc (see the class docstring)."""
        return self._region

    def set_row(self, row: int) -> None:
        """Move the slice to another detector row (Graas et al. 2023, Fig. 7a: repositioning)."""
        if not isinstance(row, (int, np.integer)) or not 0 <= int(row) < self.rows:
            raise ConfigError(f"Slice row must be an integer in [0, {self.rows}); got {row!r}.")
        with self._lock:
            self._row = int(row)
        if self.target == "supervised":  # SIRT needs the unfiltered rows pairs come from
            reach, span = self.neighbourhood_rows, (self.target_windows + 1) * self.window
            self._line_integrals = self.reference.keep_line_integrals(
                row - reach, row + reach, span
            )

    def set_patch_size(self, size: int) -> None:
        """Change the patch side; pairs made afterwards have the new size."""
        check_int("PairMaker", "patch_size", size)
        n = self._slice_size()
        if n is not None and size > n:
            raise ConfigError(
                f"A {size}x{size} patch is larger than the {n}x{n} slice; use patch_size <= {n}."
            )
        with self._lock:
            self._patch_size = size

    def set_region(self, region: SamplingRegion | None) -> None:
        """Change where patches are drawn (``None``: the default disc)."""
        if region is not None and not isinstance(region, SamplingRegion):
            raise ConfigError(
                f"set_region expects a SamplingRegion or None; got {type(region).__name__}."
            )
        with self._lock:
            self._region = region

    # -- readiness and windows -----------------------------------------------------------
    @property
    def span(self) -> int:
        """Projections one pair needs: a window, plus the steps of a T stack."""
        extra = (self.frames - 1) * self.frame_step if self.stack == "t" else 0
        return self.window + extra

    @property
    def ready(self) -> bool:
        """Whether the source holds enough projections for :meth:`pairs`."""
        if self.target == "supervised" and len(self._line_integrals) < self._target_span:
            return False
        return len(self.source) >= self.span

    @property
    def _target_span(self) -> int:
        return self.target_windows * self.window

    def windows(self, *, end: int | None = None) -> list[np.ndarray]:
        """Global projection indices of the window(s) of the newest pair, oldest first.

        One window, or ``frames`` windows for a T stack.

        Parameters
        ----------
        end : int, optional
            Global index of the last projection to use; the newest by default.

        Raises
        ------
        ScanDataError
            If the source does not hold :attr:`span` projections (up to ``end``).
        """
        # one read of the buffered indices: projections may arrive meanwhile
        held = np.asarray(self.source.last(len(self.source)), dtype=np.int64)
        if end is not None:
            if held.size and int(end) > int(held[-1]):
                raise ScanDataError(
                    f"Projection {end} was requested as the last one; the newest is "
                    f"{int(held[-1])}."
                )
            held = held[held <= int(end)]
        if held.size < self.span:
            raise ScanDataError(
                f"PairMaker needs {self.span} buffered projections"
                + (f" up to projection {end}" if end is not None else "")
                + f"; the buffer holds {held.size}. Wait for a full rotation (and the "
                "frames of a T stack), or enlarge the projection buffer."
            )
        newest = held[-self.span :]
        if self.stack != "t":
            return [newest[-self.window :]]
        return [
            newest[k * self.frame_step : k * self.frame_step + self.window]
            for k in range(self.frames)
        ]

    # -- training pairs --------------------------------------------------------------------
    def pairs(
        self, count: int, *, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``count`` Noise2Inverse pairs from the newest window(s).

        Returns
        -------
        u, v : ndarray, float32
            Without a stack (count, 1, p, p) each; with a stack u is
            (count, 1, frames, p, p) and v (count, 1, 1, p, p).
        """
        check_int("pairs()", "count", count)
        rng = rng if rng is not None else self._rng
        with self._lock:
            row, size, region = self._row, self._patch_size, self._region
        region = region if region is not None else self._default_region()
        centers = region.centers(count, size=size, pixel_size=self.pixel_size, rng=rng)
        reach = self.neighbourhood_rows
        lo, hi = max(0, row - reach), min(self.rows - 1, row + reach)
        target_rows = rng.integers(lo, hi + 1, size=count)
        if self.target == "supervised":
            u, v = self._supervised(centers, target_rows, size)
            return u[:, None], v[:, None]
        windows = self.windows()
        mid = self.frames // 2
        # the target: the middle row / window, (K, count, p, p); one split j per pair
        target_splits = self._patches(*self._frame(windows, mid, target_rows), centers, size)
        j = rng.integers(self.splits, size=count)
        u, v = noise2inverse.pairs(target_splits, j, self.n2i_strategy)
        if self.stack is None:
            return u[:, None], v[:, None]
        # stacks: the input side of every frame uses the same split choice j per pair
        frames = []
        for k in range(self.frames):
            recon = (
                target_splits
                if k == mid
                else self._patches(*self._frame(windows, k, target_rows), centers, size)
            )
            frames.append(noise2inverse.pairs(recon, j, self.n2i_strategy)[0])
        u = np.stack(frames, axis=1)[:, None]  # (count, 1, frames, p, p)
        return u.astype(np.float32), v[:, None, None].astype(np.float32)

    # -- full slices for inference -------------------------------------------------------
    def slice_splits(self, *, row: int | None = None, end: int | None = None) -> np.ndarray:
        """Full slices from each split of the newest window(s), for inference.

        ``end``: the last projection to use (see :meth:`windows`).

        Returns
        -------
        ndarray, float32
            (K, n, n); with a stack (K, frames, n, n), where split j of every
            frame holds the projections ``i mod K == j``.
        """
        return self._slice_splits(self.windows(end=end), row)

    def inference_inputs(
        self, *, row: int | None = None, end: int | None = None, refresh: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The K network inputs whose denoised outputs, averaged, give the slice.

        Parameters
        ----------
        row, end : int, optional
            The detector row and the last projection to use (see :meth:`windows`).
        refresh : SliceSet, optional
            The newest refresh of the slice: with K = 2 and no stack its even
            and odd halves are the two splits, so they are not reconstructed again.

        Returns
        -------
        inputs : ndarray, float32
            (K, n, n), or (K, frames, n, n) with a stack; see
            :func:`bluesky_jit.noise2inverse.inputs`.
        window : ndarray of int
            Global indices of the projections of the denoised frame (a T
            stack denoises its middle window).
        """
        if self.target == "supervised":  # one input: the window's FBP
            if refresh is not None:
                return refresh.full[None].astype(np.float32), refresh.indices
            window = self.windows(end=end)[0]
            row = self._row if row is None else row
            return np.asarray(self.subset_slices([window], row), np.float32), window
        if refresh is not None and self.splits == 2 and self.stack is None:
            splits, window = np.stack([refresh.even, refresh.odd]), refresh.indices
        else:
            windows = self.windows(end=end)
            splits, window = self._slice_splits(windows, row), windows[len(windows) // 2]
        return noise2inverse.inputs(splits, self.n2i_strategy), window

    # -- supervised pairs -----------------------------------------------------------------
    def _supervised(
        self, centers: np.ndarray, rows: np.ndarray, size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Input (the window's FBP) and target (SIRT) patches, (count, p, p) each."""
        window = self.windows()[0]
        out = np.empty((2, len(rows), size, size), dtype=np.float32)
        for row in np.unique(rows):
            sel = np.nonzero(rows == row)[0]
            images = self._supervised_slices(window, int(row))
            n = images.shape[-1]
            offset = (n - size) / 2  # pixel of the slice's centre, less half a patch
            x0 = np.rint((centers[sel, 0] - self.center_xy[0]) / self.pixel_size + offset)
            y0 = np.rint((centers[sel, 1] - self.center_xy[1]) / self.pixel_size + offset)
            corners = np.clip(np.stack([y0, x0], axis=1).astype(int), 0, n - size)
            for k, (i, j) in zip(sel, corners, strict=True):
                out[:, k] = images[:, i : i + size, j : j + size]
        return out[0], out[1]

    def _supervised_slices(self, window: np.ndarray, row: int) -> np.ndarray:
        """(2, n, n): the window's FBP and the SIRT target at ``row``; kept for the window."""
        key = (int(window[-1]), row)
        if key not in self._targets:
            if any(end != key[0] for end, _ in self._targets):
                self._targets.clear()  # a new window: new targets
            held = np.asarray(self._line_integrals.last(len(self._line_integrals)))
            indices = held[held <= key[0]][-self._target_span :]
            if indices.size < self._target_span:
                raise ScanDataError(
                    f"The supervised target needs {self._target_span} projections "
                    f"(target_windows={self.target_windows}); {indices.size} are kept."
                )
            fbp = self.subset_slices([window], row)[0]
            sirt = self.reference.sirt_slice(indices, row, iterations=self.target_iterations)
            self._targets[key] = np.stack([fbp, sirt]).astype(np.float32)
        return self._targets[key]

    # -- internals ---------------------------------------------------------------------------
    def _slice_size(self) -> int | None:
        if self.slice_size is not None:
            return self.slice_size
        shape = getattr(self.source, "shape", None)
        return int(shape[-1]) if shape is not None else None

    def _default_region(self) -> SamplingRegion:
        n = self._slice_size()
        if n is None:
            raise ConfigError("PairMaker needs a region or slice_size to place patches.")
        return SamplingRegion.disc(0.9 * n * self.pixel_size / 2)

    def _frame(self, windows: list[np.ndarray], k: int, rows: Any) -> tuple[np.ndarray, Any]:
        """Window and detector row(s) of frame ``k`` of a stack (the middle one: the target's)."""
        if self.stack == "t":
            return windows[k], rows
        if self.stack == "z":
            return windows[0], np.clip(rows + k - self.frames // 2, 0, self.rows - 1)
        return windows[0], rows

    def _slice_splits(self, windows: list[np.ndarray], row: int | None) -> np.ndarray:
        n = self._slice_size()
        if n is None:
            raise ConfigError("PairMaker needs slice_size (or a source with .shape) for slices.")
        row = self._row if row is None else row
        frames = []
        for k in range(self.frames):
            window, row_k = self._frame(windows, k, row)
            frames.append(self._slices(window, int(row_k), n))
        return frames[0] if self.stack is None else np.stack(frames, axis=1)

    def _slices(self, window: np.ndarray, row: int, n: int) -> np.ndarray:
        """The n x n axial slice at ``row`` from each split of ``window``: (K, n, n)."""
        subsets = split_subsets(window, self.splits)
        if self.subset_slices is not None:
            return np.asarray(self.subset_slices(subsets, row), dtype=np.float32)
        center = np.zeros((1, 2))  # a whole slice is one patch of side n around the axis
        return self._patches(window, np.array([row]), center, n)[:, 0]

    def _patches(
        self, window: np.ndarray, rows: np.ndarray, centers: np.ndarray, size: int
    ) -> np.ndarray:
        """Reconstruct patch i at detector row ``rows[i]`` from each split: (K, m, p, p)."""
        subsets = split_subsets(window, self.splits)
        if self.subset_patches is not None:
            return self.subset_patches(subsets, centers, rows, size=size)
        x, y = patch_grid(
            torch.as_tensor(centers, dtype=torch.float32), size, pixel_size=self.pixel_size
        )
        m = x.shape[0]
        out = np.empty((self.splits, m, *x.shape[1:]), dtype=np.float32)
        r0, r1 = int(rows.min()), int(rows.max())
        for j, subset in enumerate(subsets):
            data, angles = self.source.select(subset, rows=slice(r0, r1 + 1))
            for r in np.unique(rows):
                sel = np.nonzero(rows == r)[0]
                idx = torch.as_tensor(sel)
                values = self.backproject(data[:, r - r0], angles, x[idx], y[idx])
                out[j, sel] = values.detach().to("cpu", torch.float32).numpy()
        return out
