"""The pair buffers: the capacity queue (a replay buffer) and the sequential baseline.

The reconstruction pushes input-target pairs ``(u, v)`` into a
:class:`ReplayBuffer`; the trainer draws batches uniformly at random from it
while new pairs keep arriving. When the buffer is full the oldest pairs fall
out, so the optimizer always trains on the most recent ``capacity`` pairs: the
online-learning capacity queue of Graas et al. (2023) (Fig. 6, "Topic III:
online learning"). A hold-out set is the same queue, read in full with
:meth:`ReplayBuffer.snapshot` and never sampled for training.
:class:`SequentialBuffer` is their baseline without a buffer.

References
----------
.. [1] Graas, Coban, Batenburg, Lucka, "Just-in-time deep learning for
   real-time X-ray computed tomography", Scientific Reports 13 (2023).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ._checks import check_int
from .config import ONLINE_STRATEGIES
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
        ``N_buffer`` of Graas et al. (2023): the number of most recent pairs kept.
        They find 320 (about a second of data) better than 32 (Fig. 10);
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
        check_int("ReplayBuffer", "capacity", capacity)
        check_int("ReplayBuffer", "item_ndim", item_ndim)
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
            held = self.item_shapes
            if held is not None and held != (tuple(ut.shape[1:]), tuple(vt.shape[1:])):
                if self.on_shape_change != "clear":
                    raise ScanDataError(
                        f"push() got pairs of shapes u {tuple(ut.shape[1:])}, v "
                        f"{tuple(vt.shape[1:])}; the buffer holds u {held[0]}, v {held[1]}. "
                        "Expected every pair to have the same patch size; call clear() first "
                        "when changing it, or make the buffer with on_shape_change='clear'."
                    )
                held = None
            if held is None:  # the first push, or pairs of a new shape: start over
                self._u = torch.empty((self.capacity, *ut.shape[1:]), device=self.device)
                self._v = torch.empty((self.capacity, *vt.shape[1:]), device=self.device)
                self._size = self._next = 0
            index = ((self._next + torch.arange(ut.shape[0])) % self.capacity).to(self.device)
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
        ``n_opt / n_reco`` times during its life in the queue (Graas et al. 2023,
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
        check_int("sample()", "batch_size", batch_size)
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
            index = self._oldest(self._size)
            return self._u.index_select(0, index), self._v.index_select(0, index)

    def clear(self) -> None:
        """Forget every pair and the item shapes; ``pushed`` restarts at 0."""
        with self._lock:
            self._u = self._v = None
            self._size = self._next = self._pushed = 0

    def _oldest(self, n: int) -> torch.Tensor:
        """Ring positions of the ``n`` oldest pairs kept, oldest first (under the lock)."""
        start = (self._next - self._size) % self.capacity
        return ((start + torch.arange(n)) % self.capacity).to(self.device)

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
    """The no-buffer baseline of Graas et al. (2023), Fig. 10: every pair is trained on once.

    Pairs wait in arrival order; :meth:`sample` hands out the oldest
    ``batch_size`` waiting pairs and forgets them, so "single-time access per
    sample" (Graas et al. 2023, Topic III) holds and the optimizer idles until new
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
        check_int("sample()", "batch_size", batch_size)
        with self._lock:
            if self._u is None or self._v is None or self._size < batch_size:
                raise EmptyBufferError(
                    f"SequentialBuffer holds {self._size} unused pairs; a batch needs "
                    f"{batch_size}. Wait until len(buffer) >= batch_size."
                )
            index = self._oldest(batch_size)
            self._size -= batch_size
            return self._u.index_select(0, index), self._v.index_select(0, index)


def check_online_strategy(online_strategy: str, *, has_checkpoint: bool = True) -> None:
    """Raise a ConfigError for an unknown strategy, or ``"frozen"`` without a checkpoint."""
    if online_strategy not in ONLINE_STRATEGIES:
        raise ConfigError(
            f"Unknown online-learning strategy {online_strategy!r}; expected one of "
            f"{ONLINE_STRATEGIES}."
        )
    if online_strategy == "frozen" and not has_checkpoint:
        raise ConfigError(
            "The 'frozen' online strategy is a pretrained model: pass the checkpoint of an "
            "earlier run (warm_start=)."
        )


def make_buffer(
    online_strategy: str,
    capacity: int,
    *,
    rng: np.random.Generator | None = None,
    item_ndim: int = 3,
) -> ReplayBuffer:
    """The pair buffer of an online strategy (see :data:`ONLINE_STRATEGIES`).

    Raises
    ------
    ConfigError
        For an unknown strategy or a bad capacity.
    """
    check_online_strategy(online_strategy)
    cls = SequentialBuffer if online_strategy == "sequential" else ReplayBuffer
    return cls(capacity, rng=rng, item_ndim=item_ndim, on_shape_change="clear")
