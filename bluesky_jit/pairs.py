"""Noise2Inverse training pairs and the capacity-queue replay buffer.

The reconstruction thread pushes input-target pairs ``(u, v)`` into a
:class:`ReplayBuffer`; the training thread draws batches uniformly at random
from it while new pairs keep arriving. When the buffer is full the oldest
pairs fall out, so the optimizer always trains on the most recent
``capacity`` pairs: the online-learning capacity queue of seed 000 (Fig. 6,
"Topic III: online learning"). A hold-out set is the same queue, read in full
with :meth:`ReplayBuffer.snapshot` and never sampled for training.

References
----------
.. [1] Graas, Coban, Batenburg, Lucka, "Just-in-time deep learning for
   real-time X-ray computed tomography", Sci. Rep. (2023) (seed 000).
.. [2] Hendriksen, Pelt, Batenburg, "Noise2Inverse: self-supervised deep
   convolutional denoising for tomography", IEEE TCI 6 (2020).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, EmptyBufferError, ScanDataError


class ReplayBuffer:
    """Capacity queue of input-target pairs, sampled uniformly at random.

    Pairs are stored in preallocated float32 tensors (a ring): pushing is a
    copy, sampling an index-select, both under one lock, so the reconstruction
    thread may push while the training thread samples. The item shapes of
    ``u`` and ``v`` are fixed by the first push (they may differ, e.g. several
    input frames and one target frame); :meth:`clear` forgets them.

    Parameters
    ----------
    capacity : int
        ``N_buffer`` of seed 000: the number of most recent pairs kept. Seed
        000 (Fig. 10) finds 320 (about a second of data) better than 32;
        :class:`bluesky_jit.config.JitConfig` defaults to 320.
    rng : numpy.random.Generator, optional
        Source of the random indices; a fresh unseeded one when omitted.
    item_ndim : int
        Dimensions of one pair member: 3 for ``(C, p, p)`` (2D networks),
        4 for ``(C, D, p, p)`` (3D convolutions). An array with one more
        dimension is a batch of pairs.
    device : str or torch.device
        Where the pairs are kept (``"cpu"``, or ``"cuda"`` next to the model).
    on_shape_change : {"raise", "clear"}
        What a push of pairs with another item shape does (e.g. after the
        patch size was changed during the run): raise a ScanDataError
        (default), or forget the pairs kept and start over with the new shape.

    Raises
    ------
    ConfigError
        If ``capacity`` or ``item_ndim`` is not a positive integer, or
        ``on_shape_change`` is not one of the two choices.

    Examples
    --------
    >>> buf = ReplayBuffer(320, rng=np.random.default_rng(0))
    >>> buf.push(np.zeros((64, 1, 20, 20)), np.ones((64, 1, 20, 20)))
    >>> u, v = buf.sample(32)
    >>> tuple(u.shape)
    (32, 1, 20, 20)
    """

    def __init__(
        self,
        capacity: int,
        *,
        rng: np.random.Generator | None = None,
        item_ndim: int = 3,
        device: str | torch.device = "cpu",
        on_shape_change: str = "raise",
    ) -> None:
        if on_shape_change not in ("raise", "clear"):
            raise ConfigError(
                f"ReplayBuffer on_shape_change must be 'raise' or 'clear'; got {on_shape_change!r}."
            )
        for key, value in (("capacity", capacity), ("item_ndim", item_ndim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"ReplayBuffer {key} must be a positive integer; got {value!r}. "
                    "Pass e.g. ReplayBuffer(320) (the buffer size of seed 000, Fig. 10)."
                )
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise ConfigError(
                f"ReplayBuffer rng must be a numpy.random.Generator; got {type(rng).__name__}. "
                "Pass rng=np.random.default_rng(seed)."
            )
        self.capacity = capacity
        self.item_ndim = item_ndim
        self.on_shape_change = on_shape_change
        self.device = torch.device(device)
        self._rng = rng if rng is not None else np.random.default_rng()
        self._lock = threading.Lock()
        self._u: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._size = 0
        self._next = 0  # ring position of the next write
        self._pushed = 0

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(capacity={self.capacity}, len={self._size}, pushed={self._pushed}, "
            f"item_shapes={self.item_shapes})"
        )

    @property
    def pushed(self) -> int:
        """Total number of pairs pushed since creation (or the last :meth:`clear`)."""
        return self._pushed

    @property
    def item_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Shapes of one ``u`` and one ``v``; ``None`` before the first push."""
        if self._u is None or self._v is None:
            return None
        return tuple(self._u.shape[1:]), tuple(self._v.shape[1:])

    def push(self, u: np.ndarray | torch.Tensor, v: np.ndarray | torch.Tensor) -> None:
        """Add one pair or a batch of pairs; the oldest pairs fall out when full.

        Parameters
        ----------
        u, v : ndarray or Tensor, shape (C, p, p) or (n, C, p, p)
            Input and target (with ``item_ndim=4``: (C, D, p, p) or
            (n, C, D, p, p)). Copied; converted to float32.

        Raises
        ------
        ScanDataError
            If the shapes do not fit each other or the pairs already kept, or
            if a value is NaN or infinite.
        """
        ut = self._as_batch(u, "u")
        vt = self._as_batch(v, "v")
        if ut.shape[0] != vt.shape[0]:
            raise ScanDataError(
                f"push() got {ut.shape[0]} inputs u but {vt.shape[0]} targets v; expected one "
                "target per input."
            )
        if not (torch.isfinite(ut).all() and torch.isfinite(vt).all()):
            raise ScanDataError(
                "push() got NaN or infinite values in a pair; expected finite reconstructions. "
                "Such a pair would poison the weights, so none of this batch was kept."
            )
        n = ut.shape[0]
        if n > self.capacity:  # only the newest `capacity` pairs would survive anyway
            ut, vt = ut[-self.capacity :], vt[-self.capacity :]
        with self._lock:
            if self._u is None or self._v is None:
                self._u = torch.empty((self.capacity, *ut.shape[1:]), device=self.device)
                self._v = torch.empty((self.capacity, *vt.shape[1:]), device=self.device)
            elif (
                ut.shape[1:] != self._u.shape[1:] or vt.shape[1:] != self._v.shape[1:]
            ) and self.on_shape_change == "clear":
                self._u = torch.empty((self.capacity, *ut.shape[1:]), device=self.device)
                self._v = torch.empty((self.capacity, *vt.shape[1:]), device=self.device)
                self._size = self._next = 0
            elif ut.shape[1:] != self._u.shape[1:] or vt.shape[1:] != self._v.shape[1:]:
                raise ScanDataError(
                    f"push() got pairs of shapes u {tuple(ut.shape[1:])}, v "
                    f"{tuple(vt.shape[1:])}; the buffer holds u {tuple(self._u.shape[1:])}, "
                    f"v {tuple(self._v.shape[1:])}. Expected every pair to have the same patch "
                    "size; call clear() first when changing it, or make the buffer with "
                    "on_shape_change='clear'."
                )
            index = (self._next + torch.arange(ut.shape[0])) % self.capacity
            index = index.to(self.device)
            self._u[index] = ut.to(self.device)
            self._v[index] = vt.to(self.device)
            self._next = int((self._next + ut.shape[0]) % self.capacity)
            self._size = min(self._size + ut.shape[0], self.capacity)
            self._pushed += n

    def sample(
        self, batch_size: int, *, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a batch uniformly at random from the pairs kept now.

        Within a batch, pairs are drawn without replacement when the buffer
        holds at least ``batch_size`` pairs and with replacement otherwise;
        successive batches are independent, so a pair is drawn on average
        ``n_opt / n_reco`` times during its life in the queue (seed 000,
        Topic III).

        Parameters
        ----------
        batch_size : int
        rng : numpy.random.Generator, optional
            Overrides the buffer's generator (the trainer passes its own).

        Returns
        -------
        u, v : Tensor, shape (batch_size, C, p, p), float32
            New tensors on the buffer's device; later pushes do not change them.

        Raises
        ------
        EmptyBufferError
            If nothing has been pushed yet.
        ConfigError
            If ``batch_size`` is not a positive integer.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(
                f"sample() batch_size must be a positive integer; got {batch_size!r}. "
                "Seed 000 trains with batches of 32."
            )
        gen = rng if rng is not None else self._rng
        with self._lock:
            if self._u is None or self._v is None or self._size == 0:
                raise EmptyBufferError(
                    "sample() was called on an empty ReplayBuffer; expected at least one pushed "
                    "pair. Wait until len(buffer) >= batch_size before training."
                )
            size = self._size
            replace = size < batch_size
            picks = gen.choice(size, size=batch_size, replace=replace)
            index = torch.from_numpy(picks).to(self.device)
            return self._u.index_select(0, index), self._v.index_select(0, index)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All pairs kept now, oldest first (a copy).

        Returns
        -------
        u, v : Tensor, shape (len(self), C, p, p), float32

        Raises
        ------
        EmptyBufferError
            If nothing has been pushed yet.
        """
        with self._lock:
            if self._u is None or self._v is None or self._size == 0:
                raise EmptyBufferError(
                    "snapshot() was called on an empty ReplayBuffer; push pairs first."
                )
            start = (self._next - self._size) % self.capacity
            index = (start + torch.arange(self._size)) % self.capacity
            index = index.to(self.device)
            return self._u.index_select(0, index), self._v.index_select(0, index)

    def clear(self) -> None:
        """Forget every pair and the item shapes; ``pushed`` restarts at 0."""
        with self._lock:
            self._u = self._v = None
            self._size = self._next = self._pushed = 0

    def _as_batch(self, x: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            t = x.detach()
        else:
            a = np.asarray(x, dtype=np.float32)  # also native byte order (HDF5 data)
            t = torch.from_numpy(a if a.flags.writeable else a.copy())
        if t.ndim == self.item_ndim:
            t = t.unsqueeze(0)
        elif t.ndim != self.item_ndim + 1:
            raise ScanDataError(
                f"push() got {what} with shape {tuple(t.shape)}; expected one pair member of "
                f"{self.item_ndim} dimensions (C, p, p) or a batch of them (n, C, p, p). Add a "
                f"channel axis with {what}[None] for a single-channel (p, p) patch."
            )
        return t.to(dtype=torch.float32)


class SequentialBuffer(ReplayBuffer):
    """The no-buffer baseline of seed 000 (Fig. 10, dotted line): every pair is trained on once.

    Pairs wait in arrival order; :meth:`sample` hands out the oldest
    ``batch_size`` waiting pairs and forgets them, so "single-time access per
    sample" (seed 000, Topic III) holds and the optimizer idles until new
    reconstructions arrive. ``len()`` counts the pairs still waiting; beyond
    ``capacity`` waiting pairs the oldest are dropped. Same parameters as
    :class:`ReplayBuffer`.
    """

    def sample(
        self, batch_size: int, *, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The oldest ``batch_size`` waiting pairs, removed from the queue.

        Raises
        ------
        EmptyBufferError
            If fewer than ``batch_size`` pairs are waiting.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(
                f"sample() batch_size must be a positive integer; got {batch_size!r}."
            )
        with self._lock:
            if self._u is None or self._v is None or self._size < batch_size:
                raise EmptyBufferError(
                    f"SequentialBuffer holds {self._size} unused pairs; a batch needs "
                    f"{batch_size}. Wait until len(buffer) >= batch_size."
                )
            start = (self._next - self._size) % self.capacity
            index = ((start + torch.arange(batch_size)) % self.capacity).to(self.device)
            self._size -= batch_size
            return self._u.index_select(0, index), self._v.index_select(0, index)


# ---------------------------------------------------------------------------
# Noise2Inverse pairs from K reconstructions of disjoint projection subsets
# ---------------------------------------------------------------------------
STRATEGIES = ("X:1", "1:X")
"""Noise2Inverse training strategies (Hendriksen et al. 2020, section III-C).

With K splits of the projections and reconstructions ``r_1 .. r_K`` from them:
``"X:1"`` trains on input ``mean(r_i, i != j)`` and target ``r_j``; ``"1:X"``
on input ``r_j`` and target ``mean(r_i, i != j)``. For K = 2 both are the
even/odd pairs of seed 000.
"""


def check_strategy(strategy: str, splits: int) -> None:
    """Raise a ConfigError unless ``strategy`` is in :data:`STRATEGIES` and ``splits >= 2``."""
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"Unknown Noise2Inverse strategy {strategy!r}; expected one of {STRATEGIES} "
            "(X:1 = mean of K-1 splits in, one split out; 1:X the reverse)."
        )
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 2:
        raise ConfigError(
            f"Noise2Inverse needs at least 2 projection splits; got splits={splits!r}."
        )


def combine_splits(
    recons: np.ndarray | torch.Tensor, strategy: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Input-target pairs from K reconstructions of each patch.

    For every pair the target split ``j`` is drawn uniformly; see
    :data:`STRATEGIES`.

    Parameters
    ----------
    recons : ndarray or Tensor, shape (K, m, ...)
        ``recons[i]`` holds the m patches reconstructed from split i.
    strategy : {"X:1", "1:X"}
    rng : numpy.random.Generator

    Returns
    -------
    u, v : ndarray, shape (m, ...), float32
    """
    r = recons.detach().cpu().numpy() if isinstance(recons, torch.Tensor) else np.asarray(recons)
    r = r.astype(np.float32, copy=False)
    k, m = r.shape[:2]
    check_strategy(strategy, k)
    j = rng.integers(k, size=m)
    one = r[j, np.arange(m)]
    rest = (r.sum(axis=0) - one) / (k - 1)
    return (rest, one) if strategy == "X:1" else (one, rest)


def split_inputs(recons: np.ndarray, strategy: str) -> np.ndarray:
    """The K network inputs whose outputs, averaged, are the Noise2Inverse estimate.

    Parameters
    ----------
    recons : ndarray, shape (K, ...)
        Full reconstructions from the K splits.
    strategy : {"X:1", "1:X"}

    Returns
    -------
    ndarray, shape (K, ...)
        For ``"X:1"`` the mean of the other K - 1 splits, for ``"1:X"`` each split.
    """
    r = np.asarray(recons, dtype=np.float32)
    check_strategy(strategy, r.shape[0])
    if strategy == "1:X":
        return r
    return (r.sum(axis=0, keepdims=True) - r) / (r.shape[0] - 1)


class SamplingRegion:
    """Where training patches may lie in the slice: a disc or a mask.

    Seed 000: "The patches are sampled uniformly at random from a slice as well
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
