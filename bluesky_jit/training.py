"""Just-in-time training: one optimizer step, the background loop, checkpoints.

The :class:`Trainer` draws batches from a :class:`~bluesky_jit.pairs.ReplayBuffer`
that the reconstruction keeps filling, takes Adam steps on the
Noise2Noise / Noise2Inverse loss ``||A(u) - v||^2`` (seed 000, eq. 1), and
after every step publishes a versioned copy of the weights that the
:class:`~bluesky_jit.inference.Denoiser` picks up. Training continues from the
latest weights for as long as the scan runs (seed 000, Topic III).

Accuracy is seed 000's alpha (eq. 3, 4), measured on hold-out pairs that are
never trained on.

References
----------
.. [1] Graas, Coban, Batenburg, Lucka, "Just-in-time deep learning for
   real-time X-ray computed tomography", Sci. Rep. (2023) (seed 000).
.. [2] Lehtinen et al., "Noise2Noise: learning image restoration without
   clean data", ICML (2018).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .models import describe_model
from .models.checkpoint import save_checkpoint
from .pairs import EmptyBufferError, ReplayBuffer

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class WeightsSnapshot(NamedTuple):
    """Weights published by a :class:`Trainer`, with the normaliser they belong to."""

    version: int
    """Steps taken when published; 0 for the initial weights."""
    state_dict: dict[str, torch.Tensor]
    """A private copy on the training device; read-only by convention."""
    normalizer: Normalizer | None
    """``None`` until fitted (first step) or given (warm start)."""


def alpha(
    denoised: np.ndarray | torch.Tensor,
    u: np.ndarray | torch.Tensor,
    v: np.ndarray | torch.Tensor,
) -> float:
    """Empirical accuracy ``R^alpha`` of seed 000 (eq. 3, 4).

    ``alpha(A, u, v) = ||A(u) - v||^2 / ||u - v||^2`` per pair, averaged over
    the pairs. An identity network gives 1; an ideal denoiser on pairs with
    independent, equally strong noise gives about 0.5; below 0.5 happens when
    ``u`` and ``v`` differ by more than noise (seed 000, eq. 4 and after).
    The ratio does not depend on an affine normalisation of the images.

    Parameters
    ----------
    denoised : ndarray or Tensor, shape (n, ...)
        ``A(u)``; the leading axis indexes pairs.
    u, v : ndarray or Tensor, shape (n, ...)
        Inputs and targets.

    Returns
    -------
    float
        Mean over pairs with ``u != v``; NaN when there are none.

    Raises
    ------
    ConfigError
        If the shapes differ.
    """
    d, uu, vv = (_as_float64(x) for x in (denoised, u, v))
    if not d.shape == uu.shape == vv.shape or d.ndim < 1:
        raise ConfigError(
            f"alpha() needs denoised, u and v of one shape (n, ...); got {tuple(d.shape)}, "
            f"{tuple(uu.shape)}, {tuple(vv.shape)}."
        )
    num = ((d - vv) ** 2).reshape(d.shape[0], -1).sum(axis=1)
    den = ((uu - vv) ** 2).reshape(d.shape[0], -1).sum(axis=1)
    keep = den > 0
    if not np.any(keep):
        return math.nan
    return float(np.mean(num[keep] / den[keep]))


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class Normalizer:
    """Affine normalisation ``(x - offset) / scale`` shared by training and inference.

    Reconstructions are small numbers (attenuation of order 0.01 per mm) on an
    offset; the network trains best on values of order one. The statistics
    are estimated once from the first training pairs and then frozen, so the
    weights keep meaning the same thing for the whole run; they travel in the
    checkpoint's ``extra["normalizer"]``.
    """

    offset: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.offset) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(
                f"Normalizer needs a finite offset and a finite scale > 0; got "
                f"offset={self.offset!r}, scale={self.scale!r}."
            )

    @classmethod
    def fit(cls, *arrays: np.ndarray | torch.Tensor) -> Normalizer:
        """Mean and standard deviation of all values of ``arrays`` pooled.

        A constant input gives ``scale=1`` (nothing to scale).
        """
        if not arrays:
            raise ConfigError("Normalizer.fit() needs at least one array of pairs.")
        values = np.concatenate([_as_float64(a).ravel() for a in arrays])
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise ConfigError(
                "Normalizer.fit() got an empty array or NaN/inf values; expected finite "
                "reconstruction patches."
            )
        std = float(values.std())
        return cls(offset=float(values.mean()), scale=std if std > 0 else 1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise: ``(x - offset) / scale``."""
        return (x - self.offset) / self.scale

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`__call__`: ``y * scale + offset``."""
        return y * self.scale + self.offset

    def to_dict(self) -> dict[str, float]:
        return {"offset": self.offset, "scale": self.scale}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalizer:
        try:
            return cls(offset=float(data["offset"]), scale=float(data["scale"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"A Normalizer needs {{'offset': float, 'scale': float}}; got {data!r}."
            ) from exc


class Trainer:
    """Trains a denoiser just in time from a replay buffer, in the foreground or a thread.

    Parameters
    ----------
    model : torch.nn.Module
        The network, trained in place (moved to ``device``). Models from
        :func:`bluesky_jit.models.build_model` can be checkpointed.
    buffer : ReplayBuffer
        Training pairs, filled concurrently by the reconstruction.
    learning_rate : float
        Adam learning rate; 1e-4 as in seed 000 ("Software set-up").
    batch_size : int
        Pairs per step; 32 as in seed 000.
    device : str or torch.device
    seed : int
        Seeds the trainer's own batch sampling.
    holdout_size : int
        Most recent hold-out pairs kept for :meth:`evaluate`.
    checkpoint_dir : path-like, optional
        Where the loop writes ``latest.pt`` every ``checkpoint_every_s`` and on :meth:`stop`.
    checkpoint_every_s : float, optional
        Checkpoint interval of the background loop; ``None`` writes only on stop.
    metrics_every_s : float
        Interval of metric rows (mean loss, steps/s, hold-out alpha) in the loop.
    max_steps_per_s : float, optional
        Throttle the loop (leave CPU to reconstruction); ``None`` runs flat out.
    normalizer : Normalizer, optional
        Frozen normalisation, e.g. from a warm-start checkpoint; by default
        fitted on the buffer at the first step.
    loss_fn : callable
        ``loss_fn(A(u), v) -> scalar``; mean squared error (Noise2Noise) by default.
    channels_last : bool, optional
        Keep the weights in channels-last memory format; by default on the
        CPU only, where it trained the U-Net about 20% faster (2 cores).

    Notes
    -----
    Threads: :meth:`step` and :meth:`evaluate` hold a model lock, so they may
    be called from any thread, also while the loop runs; :meth:`weights` and
    :meth:`snapshot` only take a lock to read a reference and never wait for a
    step (the weights are cloned once per step, about 0.2 ms for the U-Net).
    """

    def __init__(
        self,
        model: nn.Module,
        buffer: ReplayBuffer,
        *,
        learning_rate: float = 1e-4,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        holdout_size: int = 64,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every_s: float | None = None,
        metrics_every_s: float = 1.0,
        max_steps_per_s: float | None = None,
        normalizer: Normalizer | None = None,
        loss_fn: LossFn = F.mse_loss,
        channels_last: bool | None = None,
    ) -> None:
        if not isinstance(buffer, ReplayBuffer):
            raise ConfigError(
                f"Trainer needs a ReplayBuffer; got {type(buffer).__name__}. "
                "Pass ReplayBuffer(capacity)."
            )
        _positive("learning_rate", learning_rate)
        _positive("metrics_every_s", metrics_every_s)
        for key, value in (
            ("checkpoint_every_s", checkpoint_every_s),
            ("max_steps_per_s", max_steps_per_s),
        ):
            if value is not None:
                _positive(key, value)
        for key, value in (("batch_size", batch_size), ("holdout_size", holdout_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Trainer {key} must be a positive integer; got {value!r}.")
        if checkpoint_dir is not None:
            describe_model(model)  # fail now, not an hour into the scan

        self.device = torch.device(device)
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.buffer = buffer
        self.holdout = ReplayBuffer(holdout_size)
        """Most recent hold-out pairs; read in full by :meth:`evaluate`, never trained on."""
        self.batch_size = batch_size
        self.learning_rate = float(learning_rate)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every_s = checkpoint_every_s
        self.metrics_every_s = float(metrics_every_s)
        self.max_steps_per_s = max_steps_per_s
        self.loss_fn = loss_fn
        self.normalizer = normalizer
        """Frozen at the first step (or given); ``None`` before."""
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)
        self.error: BaseException | None = None
        """The exception that stopped the background loop, if any."""

        self._rng = np.random.default_rng(seed)
        self._model_lock = threading.RLock()
        self._weights_lock = threading.Lock()
        self._metrics_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._step_times: collections.deque[float] = collections.deque(maxlen=64)
        self._metrics: list[dict[str, Any]] = []
        self._metrics_popped = 0
        self._snapshot = WeightsSnapshot(0, {}, normalizer)
        self._publish()

    # -- one step -------------------------------------------------------------------------
    def step(self) -> float:
        """One Adam step on a batch drawn uniformly from the buffer.

        Returns
        -------
        float
            The batch loss before the update (normalised units).

        Raises
        ------
        EmptyBufferError
            If the buffer is empty.
        FloatingPointError
            If the loss is NaN or infinite (the weights are left unchanged).
        """
        u, v = self.buffer.sample(self.batch_size, rng=self._rng)
        with self._model_lock:
            if self.normalizer is None:
                self.normalizer = Normalizer.fit(*self.buffer.snapshot())
                logger.info("Normalising with %s, frozen from now on", self.normalizer)
            norm = self.normalizer
            u = norm(u.to(self.device, non_blocking=True))
            v = norm(v.to(self.device, non_blocking=True))
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(u), v)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Training loss is {loss.item()} at step {self._steps}; expected a finite "
                    "number. The update was skipped. Lower learning_rate or check the pairs."
                )
            loss.backward()
            self.optimizer.step()
            self._steps += 1
            self._step_times.append(time.perf_counter())
            value = float(loss.detach())
            self._publish()
        return value

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far."""
        return self._steps

    @property
    def steps_per_second(self) -> float:
        """Recent training rate (over the last 64 steps); 0 before two steps."""
        times = list(self._step_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    # -- weight hand-over -----------------------------------------------------------------
    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The newest published weights and their version (the step count).

        Returns
        -------
        version : int
            Steps taken when the weights were published; 0 for the initial weights.
        state_dict : dict of str to Tensor
            A private copy, on the training device; treat it as read-only (it
            is shared by every reader of this version).
        """
        snapshot = self.snapshot()
        return snapshot.version, snapshot.state_dict

    def snapshot(self) -> WeightsSnapshot:
        """The newest published weights together with their normaliser (one atomic read)."""
        with self._weights_lock:
            return self._snapshot

    def _publish(self) -> None:
        state = {k: t.detach().clone() for k, t in self.model.state_dict().items()}
        snapshot = WeightsSnapshot(self._steps, state, self.normalizer)
        with self._weights_lock:
            self._snapshot = snapshot

    # -- hold-out accuracy ----------------------------------------------------------------
    def add_holdout(self, u: np.ndarray | torch.Tensor, v: np.ndarray | torch.Tensor) -> None:
        """Keep hold-out pairs (the most recent ``holdout_size``), never trained on.

        Parameters
        ----------
        u, v : ndarray or Tensor, shape (C, p, p) or (n, C, p, p)
        """
        self.holdout.push(u, v)

    def evaluate(self) -> float:
        """Accuracy alpha (seed 000, eq. 3, 4) of the current weights on the hold-out pairs.

        Returns
        -------
        float
            NaN when there are no hold-out pairs yet.
        """
        if len(self.holdout) == 0:
            return math.nan
        u, v = self.holdout.snapshot()
        with self._model_lock:
            norm = self.normalizer or Normalizer.fit(u, v)
            u = norm(u.to(self.device))
            v = norm(v.to(self.device))
            self.model.eval()
            with torch.inference_mode():
                denoised = torch.cat([self.model(b) for b in u.split(256)])
        return alpha(denoised, u, v)

    # -- the background loop --------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the background loop is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Train in a daemon thread until :meth:`stop`, from the latest weights.

        The loop steps while the buffer holds at least ``batch_size`` pairs and
        waits briefly otherwise; every ``metrics_every_s`` it appends a metric
        row. An exception stops the loop, is logged, and is kept in :attr:`error`.
        """
        if self.running:
            return
        self.error = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bluesky-jit-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the loop, wait for it, and write a last checkpoint if configured."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("The training thread did not stop within %s s", timeout)
                return
        if self.checkpoint_dir is not None and self._steps > 0:
            self.save(self.checkpoint_dir / "latest.pt")

    def _run(self) -> None:
        start = last_row = last_checkpoint = time.monotonic()
        losses: list[float] = []
        steps_at_row = self._steps
        try:
            while not self._stop.is_set():
                if len(self.buffer) < self.batch_size:
                    self._stop.wait(0.005)
                    continue
                tic = time.monotonic()
                try:
                    losses.append(self.step())
                except EmptyBufferError:  # the buffer was cleared meanwhile
                    continue
                now = time.monotonic()
                if now - last_row >= self.metrics_every_s:
                    self._append_row(
                        loss=float(np.mean(losses)),
                        steps_per_second=(self._steps - steps_at_row) / (now - last_row),
                        elapsed_s=now - start,
                    )
                    losses.clear()
                    last_row, steps_at_row = time.monotonic(), self._steps
                if (
                    self.checkpoint_dir is not None
                    and self.checkpoint_every_s is not None
                    and now - last_checkpoint >= self.checkpoint_every_s
                ):
                    self.save(self.checkpoint_dir / "latest.pt")
                    last_checkpoint = now
                if self.max_steps_per_s is not None:
                    self._stop.wait(max(0.0, 1.0 / self.max_steps_per_s - (now - tic)))
        except Exception as exc:  # noqa: BLE001 - kept and logged, never lost
            self.error = exc
            logger.exception("The training thread stopped at step %d", self._steps)

    def _append_row(self, *, loss: float, steps_per_second: float, elapsed_s: float) -> None:
        row = {
            "step": self._steps,
            "time": time.time(),
            "elapsed_s": elapsed_s,
            "loss": loss,
            "steps_per_second": steps_per_second,
            "alpha": self.evaluate(),
            "buffer_size": len(self.buffer),
            "pairs_pushed": self.buffer.pushed,
        }
        with self._metrics_lock:
            self._metrics.append(row)

    # -- metrics --------------------------------------------------------------------------
    def metrics(self) -> list[dict[str, Any]]:
        """Every metric row so far (a copy), oldest first.

        Each row has ``step``, ``time`` (Unix), ``elapsed_s``, ``loss`` (mean
        since the previous row, normalised units), ``steps_per_second``,
        ``alpha`` (hold-out; NaN without hold-out pairs), ``buffer_size`` and
        ``pairs_pushed``.
        """
        with self._metrics_lock:
            return [dict(row) for row in self._metrics]

    def pop_metrics(self) -> list[dict[str, Any]]:
        """Rows added since the previous call (for the thread that emits them)."""
        with self._metrics_lock:
            rows = self._metrics[self._metrics_popped :]
            self._metrics_popped = len(self._metrics)
            return [dict(row) for row in rows]

    # -- checkpoints ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the newest published weights as a checkpoint.

        ``extra`` holds ``step``, ``normalizer`` (or None), ``learning_rate``
        and ``batch_size``.

        Raises
        ------
        ConfigError
            If the model was not made by :func:`bluesky_jit.models.build_model`.
        """
        name, config = describe_model(self.model)
        version, state, normalizer = self.snapshot()
        extra = {
            "step": version,
            "normalizer": normalizer.to_dict() if normalizer is not None else None,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
        }
        return save_checkpoint(path, name=name, config=config, model=state, extra=extra)


def _positive(key: str, value: Any) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"Trainer {key} must be a positive number; got {value!r}.")
