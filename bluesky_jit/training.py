"""Just-in-time training: the trainer seam, one optimizer step, the loop thread, checkpoints.

:class:`OnlineTrainer` is what the pipeline and the
:class:`~bluesky_jit.inference.Denoiser` need from a trainer; two follow it:
the :class:`Trainer` here (a thread) and
:class:`~bluesky_jit.process_trainer.ProcessTrainer` (a process of its own).
The :class:`Trainer` draws batches from a :class:`~bluesky_jit.buffers.ReplayBuffer`
that the reconstruction keeps filling, takes Adam steps on the
Noise2Noise / Noise2Inverse loss ``||A(u) - v||^2`` (Graas et al. 2023,
eq. 1), and after every step publishes a versioned copy of the weights that
the Denoiser picks up. Training continues from the latest weights for as
long as the scan runs (Graas et al. 2023, Topic III). :func:`make_trainer`
builds one for an online strategy (the capacity queue, no buffer, or a
frozen pretrained network; Graas et al. 2023, Fig. 10).

Accuracy is the alpha of Graas et al. (2023) (eq. 3, 4), measured on
hold-out pairs that are never trained on.

References
----------
.. [1] Graas, Coban, Batenburg, Lucka, "Just-in-time deep learning for
   real-time X-ray computed tomography", Scientific Reports 13 (2023).
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_int, check_positive
from .buffers import ReplayBuffer, check_online_strategy, make_buffer
from .config import PRECISIONS
from .errors import ConfigError, EmptyBufferError
from .models import build_model, describe_model
from .models.checkpoint import save_checkpoint

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
    denoised: np.ndarray | torch.Tensor, u: np.ndarray | torch.Tensor, v: np.ndarray | torch.Tensor
) -> float:
    """Empirical accuracy ``R^alpha`` of Graas et al. (2023) (eq. 3, 4).

    ``alpha(A, u, v) = ||A(u) - v||^2 / ||u - v||^2`` per pair, averaged over
    the pairs. An identity network gives 1; an ideal denoiser on pairs with
    independent, equally strong noise gives about 0.5; below 0.5 happens when
    ``u`` and ``v`` differ by more than noise (Graas et al. 2023, eq. 4 and after).
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


@runtime_checkable
class OnlineTrainer(Protocol):
    """What the pipeline and the Denoiser need from a trainer that learns while the scan runs.

    Followed by :class:`Trainer` (a thread) and
    :class:`~bluesky_jit.process_trainer.ProcessTrainer` (a process of its
    own). ``buffer`` takes the training pairs (``push(u, v)``, ``clear()``,
    ``len()``, ``pushed``); ``pause`` is an event that holds the loop while set.
    """

    buffer: Any
    pause: Any
    error: BaseException | None

    @property
    def normalizer(self) -> Normalizer | None: ...
    @property
    def running(self) -> bool: ...
    @property
    def steps(self) -> int: ...
    @property
    def steps_per_second(self) -> float: ...
    @property
    def paused_s(self) -> float: ...
    @property
    def latest_quality(self) -> dict[str, float]: ...
    def start(self) -> None: ...
    def stop(self, timeout: float | None = ...) -> None: ...
    def add_holdout(self, u: Any, v: Any) -> None: ...
    def clear_holdout(self) -> None: ...
    def snapshot(self) -> WeightsSnapshot: ...
    def weights(self) -> tuple[int, dict[str, torch.Tensor]]: ...
    def evaluate(self) -> float: ...
    def metrics(self) -> list[dict[str, Any]]: ...
    def pop_metrics(self) -> list[dict[str, Any]]: ...
    def final_row(self, *, elapsed_s: float) -> dict[str, Any]: ...
    def save(self, path: str | os.PathLike[str]) -> Path: ...


class TrainerMixin:
    """What both trainers build from the rest of :class:`OnlineTrainer`: weights, rows, save."""

    def weights(self: Any) -> tuple[int, dict[str, torch.Tensor]]:
        """The newest published weights and their version (the step count).

        Returns
        -------
        version : int
            Steps taken when the weights were published; 0 for the initial weights.
        state_dict : dict of str to Tensor
            A private copy; treat it as read-only (it is shared by every
            reader of this version).
        """
        snapshot = self.snapshot()
        return snapshot.version, snapshot.state_dict

    def final_row(self: Any, *, elapsed_s: float) -> dict[str, Any]:
        """A metric row of the current state, with the keys of the loop's rows.

        For the last row of a run (after ``stop``): ``loss`` repeats the last
        recorded mean loss, ``alpha`` is :meth:`evaluate`.
        """
        rows = self.metrics()
        loss = rows[-1]["loss"] if rows else math.nan
        return self._row(elapsed_s, loss, self.steps_per_second, self.evaluate())

    def _row(
        self: Any, elapsed_s: float, loss: float, steps_per_second: float, alpha: float
    ) -> dict[str, Any]:
        return {
            "step": self.steps,
            "time": time.time(),
            "elapsed_s": float(elapsed_s),
            "loss": float(loss),
            "steps_per_second": steps_per_second,
            "alpha": alpha,
            "buffer_size": len(self.buffer),
            "pairs_pushed": self.buffer.pushed,
        }

    def save(self: Any, path: str | os.PathLike[str]) -> Path:
        """Write the newest published weights as a checkpoint.

        ``extra`` holds ``step``, ``normalizer`` (or None), ``learning_rate``
        and ``batch_size``.

        Raises
        ------
        ConfigError
            If the model was not made by :func:`bluesky_jit.models.build_model`.
        """
        name, config = self._describe()
        version, state, normalizer = self.snapshot()
        extra = {
            "step": max(version, 0),
            "normalizer": normalizer.to_dict() if normalizer is not None else None,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
        }
        return save_checkpoint(path, name=name, config=config, model=state, extra=extra)


class Trainer(TrainerMixin):
    """Trains a denoiser just in time from a replay buffer, in the foreground or a thread.

    Parameters
    ----------
    model : torch.nn.Module
        The network, trained in place (moved to ``device``). Models from
        :func:`bluesky_jit.models.build_model` can be checkpointed.
    buffer : ReplayBuffer
        Training pairs, filled concurrently by the reconstruction.
    learning_rate : float
        Adam learning rate; 1e-4 as in Graas et al. (2023) ("Software set-up").
    batch_size : int
        Pairs per step; 32 as in Graas et al. (2023).
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
    max_train_steps_per_s : float, optional
        Throttle the loop (leave CPU to reconstruction); ``None`` runs flat out.
    normalizer : Normalizer, optional
        Frozen normalisation, e.g. from a warm-start checkpoint; by default
        fitted on the buffer at the first step.
    loss_fn : callable
        ``loss_fn(A(u), v) -> scalar``; mean squared error (Noise2Noise) by default.
    channels_last : bool, optional
        Keep the weights in channels-last memory format; by default on the
        CPU only, where it trained the U-Net about 20% faster (2 cores).
    train_precision : {"float32", "bfloat16", "auto"}
        ``"auto"``: :func:`resolve_precision` for ``device``. ``"bfloat16"``
        runs forward and backward under ``torch.autocast`` in bfloat16
        (weights, optimizer state and loss stay float32). On a CPU with
        AVX512-BF16 (one thread, batches of 32 20x20 patches) the Standard
        U-Net trained at about 55 steps/s against 45 in float32;
        quality held (``benchmarks/learning.py``).
    num_threads : int, optional
        Intra-op threads of the background loop (set in its own thread, so
        inference and reconstruction keep theirs). One thread trained the
        Standard U-Net as fast as two on 2 cores, and much faster when the
        other core was busy; ``None`` keeps torch's setting.
    nice : int, optional
        CPU priority of the background loop's thread (Linux ``nice``, 0 to
        19; larger yields more): with 19 the operating system runs the scan
        and the reconstruction first whenever they want a core. ``None``
        leaves it as it is.
    cores : sequence of int, optional
        CPU cores the background loop's thread may run on (Linux affinity, per
        thread). The plugin's child processes keep off the cores left to the
        scan; with these the trainer, at nice 19, may also use the time the
        scan leaves them idle. ``None`` keeps the process's cores.
    frozen : bool
        A frozen (pretrained) model, the baseline of Graas et al. (2023), Fig. 10:
        the loop never steps, it only records the hold-out accuracy.
    augment : bool
        Turn and mirror each batch at random (one of the 8 symmetries of the
        square, the same for input and target). The noise of a full-rotation
        reconstruction has no preferred direction, so this is free extra
        data: with pairs reused 10-20 times (Graas et al. 2023: 141 steps/s on 9
        batches/s), training on 20x20 patches otherwise memorised the noise
        within a minute (hold-out alpha rising, PSNR falling).
    average_weights : float, optional
        Publish (and evaluate, and checkpoint) an exponential moving average
        of the weights with this decay per step, e.g. 0.99 (about the last 100
        steps), instead of the newest weights. On Noise2Inverse targets that
        are noisier than the signal the iterates fluctuate; their average
        denoises better (Polyak averaging). The decay is ``min(average_weights,
        (1 + n) / (10 + n))`` after n steps, so early weights fade quickly.
    pause : threading.Event or multiprocessing.Event, optional
        While it is set the loop takes no step (and no metric row) and
        waits for it to clear: training yields the CPU to a worker that fell
        behind the scan. The seconds paused add up in :attr:`paused_s`. By
        default a fresh ``threading.Event``, kept as :attr:`pause`.

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
        max_train_steps_per_s: float | None = None,
        normalizer: Normalizer | None = None,
        loss_fn: LossFn = F.mse_loss,
        channels_last: bool | None = None,
        train_precision: str = "float32",
        num_threads: int | None = None,
        frozen: bool = False,
        augment: bool = False,
        average_weights: float | None = None,
        pause: Any = None,
        nice: int | None = None,
        cores: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(buffer, ReplayBuffer):
            raise ConfigError(
                f"Trainer needs a ReplayBuffer; got {type(buffer).__name__}. "
                "Pass ReplayBuffer(capacity)."
            )
        check_positive("Trainer", "learning_rate", learning_rate)
        check_positive("Trainer", "metrics_every_s", metrics_every_s)
        check_positive("Trainer", "checkpoint_every_s", checkpoint_every_s, none=True)
        check_positive("Trainer", "max_train_steps_per_s", max_train_steps_per_s, none=True)
        check_int("Trainer", "batch_size", batch_size)
        check_int("Trainer", "holdout_size", holdout_size)
        check_int("Trainer", "num_threads", num_threads, none=True)
        check_int("Trainer", "nice", nice, 0, high=19, none=True)
        if cores is not None:
            for core in cores:
                check_int("Trainer", "cores", core, 0)
        if checkpoint_dir is not None:
            describe_model(model)  # fail now, not an hour into the scan
        average = average_weights
        if average is not None and (
            not isinstance(average, (int, float))
            or isinstance(average, bool)
            or not 0 < average < 1
        ):
            raise ConfigError(
                f"Trainer average_weights must be a decay in (0, 1) or None; got {average!r}."
            )
        if pause is not None and not callable(getattr(pause, "is_set", None)):
            raise ConfigError(
                f"Trainer pause must be None or an event with is_set() (threading.Event, "
                f"multiprocessing.Event); got {type(pause).__name__}."
            )
        capacity = getattr(buffer, "capacity", batch_size)
        if capacity < batch_size:
            raise ConfigError(
                f"The buffer holds at most {capacity} pairs (N_buffer) but batch_size is "
                f"{batch_size}; the optimizer could never draw a full batch. Use a buffer of at "
                f"least {batch_size} pairs (Graas et al. 2023: 32 or 320) or a smaller "
                "batch_size."
            )

        self.device = torch.device(device)
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        self.model = model.to(self.device, memory_format=memory_format_for(model, channels_last))
        self.precision = resolve_precision(train_precision, self.device)
        self.num_threads = num_threads
        self.nice = nice
        self.cores = None if cores is None else tuple(cores)
        self.frozen = bool(frozen)
        """Frozen models are evaluated but never trained (the pretrained baseline)."""
        self.augment = bool(augment)
        self.average = None if average is None else float(average)
        self._average_state: dict[str, torch.Tensor] | None = None
        if self.average is not None:  # the average starts at the initial weights
            self._average_state = {
                k: t.detach().clone() for k, t in self.model.state_dict().items()
            }
        self._eval_model: nn.Module | None = None
        self.buffer = buffer
        self.holdout = ReplayBuffer(
            holdout_size, item_ndim=getattr(buffer, "item_ndim", 3), on_shape_change="clear"
        )
        """Most recent hold-out pairs; read in full by :meth:`evaluate`, never trained on."""
        self.batch_size = batch_size
        self.learning_rate = float(learning_rate)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every_s = checkpoint_every_s
        self.metrics_every_s = float(metrics_every_s)
        self.max_steps_per_s = max_train_steps_per_s
        self.loss_fn = loss_fn
        self.normalizer = normalizer
        """Frozen at the first step (or given); ``None`` before."""
        # fused: one kernel for every parameter instead of a loop of small ops (2 ms of a
        # 15 ms CPU step for the U-Net); torch has it on the CPU and on CUDA
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.learning_rate, fused=self.device.type in FUSED_ADAM
        )
        self.error: BaseException | None = None
        """The exception that stopped the background loop, if any."""
        self.warm_start: dict[str, Any] | None = None
        """Where the weights came from (path, step) after :meth:`from_checkpoint`."""
        self._latest_quality: dict[str, float] = {}

        self._rng = np.random.default_rng(seed)
        self._model_lock = threading.RLock()
        self._weights_lock = threading.Lock()
        self._metrics_lock = threading.Lock()
        self._stop = threading.Event()
        self.pause = threading.Event() if pause is None else pause
        """Set it to hold the loop (see the ``pause`` parameter)."""
        self._pause_lock = threading.Lock()
        self._paused_total = 0.0
        self._paused_since: float | None = None
        self.pauses = 0
        """How many times the loop paused."""
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
        if self.frozen:
            raise ConfigError("This Trainer is frozen (a pretrained baseline); it takes no steps.")
        # fit on everything buffered before a sequential buffer hands the batch out
        pending = self.buffer.snapshot() if self.normalizer is None else None
        u, v = self.buffer.sample(self.batch_size, rng=self._rng)
        with self._model_lock:
            if self.normalizer is None and pending is not None:
                self.normalizer = Normalizer.fit(*pending)
                logger.info("Normalising with %s, frozen from now on", self.normalizer)
            norm = self.normalizer
            u = norm(u.to(self.device, non_blocking=True))
            v = norm(v.to(self.device, non_blocking=True))
            if self.augment:
                k = int(self._rng.integers(8))
                u, v = _turn(u, k), _turn(v, k)
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"
            ):
                out = self.model(u)
            loss = self.loss_fn(out.float(), v)
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
            if self.average is not None:
                self._update_average()
            self._publish()
        return value

    def _update_average(self) -> None:
        decay = min(self.average or 0.0, (1 + self._steps) / (10 + self._steps))
        state = self.model.state_dict()
        if self._average_state is None:
            return
        floats, others = [], []
        for key, tensor in state.items():
            avg = self._average_state[key]
            (floats if avg.is_floating_point() else others).append((avg, tensor.detach()))
        with torch.no_grad():
            if floats:  # one multi-tensor op (as torch.optim.swa_utils' EMA does)
                averages, currents = zip(*floats, strict=True)
                torch._foreach_lerp_(list(averages), list(currents), 1.0 - decay)
            for avg, tensor in others:
                avg.copy_(tensor)

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far."""
        return self._steps

    @property
    def paused_s(self) -> float:
        """Seconds the loop has spent paused (:attr:`pause` set), the pause under way included."""
        with self._pause_lock:
            since, total = self._paused_since, self._paused_total
        return total + (time.monotonic() - since if since is not None else 0.0)

    @property
    def steps_per_second(self) -> float:
        """Recent training rate (over the last 64 steps); 0 before two steps."""
        times = list(self._step_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    # -- weight hand-over -----------------------------------------------------------------
    def snapshot(self) -> WeightsSnapshot:
        """The newest published weights together with their normaliser (one atomic read)."""
        with self._weights_lock:
            return self._snapshot

    def _publish(self) -> None:
        source = self._average_state if self._average_state is not None else self.model.state_dict()
        state = {k: t.detach().clone() for k, t in source.items()}
        snapshot = WeightsSnapshot(self._steps, state, self.normalizer)
        with self._weights_lock:
            self._snapshot = snapshot

    # -- hold-out accuracy ----------------------------------------------------------------
    def clear_holdout(self) -> None:
        """Forget the hold-out pairs, e.g. after the slice moved (alpha then rates the new one)."""
        self.holdout.clear()

    def add_holdout(self, u: np.ndarray | torch.Tensor, v: np.ndarray | torch.Tensor) -> None:
        """Keep hold-out pairs (the most recent ``holdout_size``), never trained on.

        Parameters
        ----------
        u, v : ndarray or Tensor, shape (C, p, p) or (n, C, p, p)
        """
        self.holdout.push(u, v)

    def evaluate(self) -> float:
        """Accuracy alpha (Graas et al. 2023, eq. 3, 4) of the current weights on hold-out pairs.

        Returns
        -------
        float
            NaN when there are no hold-out pairs yet.
        """
        return self.evaluate_details()["alpha"]

    def evaluate_details(self) -> dict[str, float]:
        """Hold-out alpha with the mean squares it is made of, in the images' units.

        Returns
        -------
        dict
            ``alpha``; ``mse_input`` = mean ``(u - v)**2`` (noise of input and
            target together) and ``mse_output`` = mean ``(A(u) - v)**2``; all
            NaN without hold-out pairs. For stacks, ``u`` is compared through
            its middle frame. See :func:`bluesky_jit.steering.noise_levels`.
        """
        nan = {"alpha": math.nan, "mse_input": math.nan, "mse_output": math.nan}
        if len(self.holdout) == 0:
            return nan
        u, v = self.holdout.snapshot()
        with self._model_lock:
            norm = self.normalizer or Normalizer.fit(u, v)
            u = norm(u.to(self.device))
            v = norm(v.to(self.device))
            model = self.model
            if self._average_state is not None:  # evaluate what is published
                if self._eval_model is None:
                    import copy

                    self._eval_model = copy.deepcopy(self.model)
                self._eval_model.load_state_dict(self._average_state)
                model = self._eval_model
            model.eval()
            with torch.inference_mode():
                denoised = torch.cat([model(b) for b in u.split(256)]).float()
        centre = middle_frame(u, like=v)
        scale2 = norm.scale**2
        return {
            "alpha": alpha(denoised, centre, v),
            "mse_input": float(((centre - v) ** 2).mean()) * scale2,
            "mse_output": float(((denoised - v) ** 2).mean()) * scale2,
        }

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
        if self.nice is not None:
            lower_priority(self.nice)
        if self.cores:
            run_on_cores(self.cores)
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)  # this thread only (OpenMP is per thread)
        start = last_row = last_checkpoint = time.monotonic()
        losses: list[float] = []
        steps_at_row = self._steps
        try:
            while not self._stop.is_set():
                if self.pause.is_set():
                    self._wait_while_paused()
                    continue
                if self.frozen:
                    if self._stop.wait(self.metrics_every_s):
                        break
                    now = time.monotonic()
                    self._append_row(loss=math.nan, steps_per_second=0.0, elapsed_s=now - start)
                    continue
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

    def _wait_while_paused(self) -> None:
        """Hold the loop until :attr:`pause` clears or :meth:`stop`; count the time."""
        with self._pause_lock:
            self._paused_since = time.monotonic()
            self.pauses += 1
        try:
            while self.pause.is_set() and not self._stop.wait(0.005):
                pass
        finally:
            with self._pause_lock:
                self._paused_total += time.monotonic() - self._paused_since
                self._paused_since = None

    def _append_row(self, *, loss: float, steps_per_second: float, elapsed_s: float) -> None:
        details = self.evaluate_details()
        row = self._row(elapsed_s, loss, steps_per_second, details["alpha"])
        with self._metrics_lock:
            self._metrics.append(row)
            self._latest_quality = {"step": self._steps, "time": row["time"], **details}

    @property
    def latest_quality(self) -> dict[str, float]:
        """Hold-out quality at the newest metric row: ``step``, ``time`` and
        :meth:`evaluate_details` (``alpha``, ``mse_input``, ``mse_output``); empty before."""
        return dict(self._latest_quality)

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
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        buffer: ReplayBuffer | Callable[[nn.Module], ReplayBuffer],
        *,
        expected_name: str | None = None,
        expected_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Trainer:
        """Warm start: a trainer continuing from an earlier run's checkpoint.

        The network, its weights and the frozen normaliser come from the
        checkpoint (so the weights keep their meaning); the optimizer starts
        afresh. With ``frozen=True`` this is the pretrained baseline of Graas et al. (2023).

        Parameters
        ----------
        path : path-like
            A file written by :meth:`save`.
        buffer : ReplayBuffer, or a function of the loaded network returning one
            (to size the buffer's pairs, 2D or stacks, by the network).
        expected_name, expected_config : optional
            Refuse checkpoints of another network (see
            :func:`bluesky_jit.models.checkpoint.load_checkpoint`).
        **kwargs
            Further :class:`Trainer` settings.

        Raises
        ------
        CheckpointError
            If the file is not a usable checkpoint.
        """
        from .errors import CheckpointError
        from .models.checkpoint import load_checkpoint

        device = kwargs.get("device", "cpu")
        model, extra = load_checkpoint(
            path, expected_name=expected_name, expected_config=expected_config, map_location=device
        )
        normalizer = None
        if extra.get("normalizer") is not None:
            try:
                normalizer = Normalizer.from_dict(extra["normalizer"])
            except ConfigError as exc:
                raise CheckpointError(
                    f"Checkpoint {str(path)!r} has an unusable normalizer: {exc}"
                ) from exc
        kwargs.setdefault("normalizer", normalizer)
        if not isinstance(buffer, ReplayBuffer) and callable(buffer):
            buffer = buffer(model)
        trainer = cls(model, buffer, **kwargs)
        trainer.warm_start = {"path": str(path), "step": extra.get("step")}
        return trainer

    def _describe(self) -> tuple[str, dict[str, Any]]:
        return describe_model(self.model)


def make_trainer(
    online_strategy: str = "queue",
    *,
    model: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    buffer_capacity: int = 320,
    warm_start: str | os.PathLike[str] | None = None,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> Trainer:
    """A :class:`Trainer` following an online strategy (Graas et al. 2023, Fig. 10).

    The strategies differ only in the buffer the Trainer gets
    (:func:`~bluesky_jit.buffers.make_buffer`) or in ``frozen``. The
    parameters are the :class:`~bluesky_jit.config.Training` settings, by the
    same names: ``make_trainer(**cfg.training.model_dump(), seed=..., device=...)``.

    Parameters
    ----------
    online_strategy : {"queue", "sequential", "frozen"}
        See :data:`bluesky_jit.config.OnlineStrategy`.
    model, model_config : optional
        Registry name (default ``"unet"``) and config of a fresh network.
        With a ``warm_start``: the network it must hold (``None``: any).
    buffer_capacity : int
        N_buffer (Graas et al. 2023: 32 or 320).
    warm_start : path-like, optional
        Start from an earlier run's checkpoint; required for ``"frozen"``.
    seed : int
        Seeds the weights of a fresh network and the sampling.
    **trainer_kwargs
        Further Trainer settings (batch_size, learning_rate, train_precision, ...).

    Raises
    ------
    ConfigError
        For an unknown strategy, ``"frozen"`` without a checkpoint, or a
        capacity below the batch size.
    CheckpointError
        If the checkpoint cannot be loaded or holds another network.
    """
    check_online_strategy(online_strategy, has_checkpoint=warm_start is not None)

    def buffer_for(network: nn.Module) -> ReplayBuffer:  # pairs sized by the network
        item_ndim = 4 if getattr(network, "spatial_dims", 2) == 3 else 3
        rng = np.random.default_rng(seed + 1)
        return make_buffer(online_strategy, buffer_capacity, rng=rng, item_ndim=item_ndim)

    frozen = online_strategy == "frozen"
    if warm_start is not None:
        return Trainer.from_checkpoint(
            warm_start, buffer_for, expected_name=model, expected_config=model_config,
            seed=seed, frozen=frozen, **trainer_kwargs,
        )  # fmt: skip
    network = build_model(model or "unet", model_config, seed=seed)
    return Trainer(network, buffer_for(network), seed=seed, **trainer_kwargs)


FUSED_ADAM = ("cpu", "cuda")
"""Devices with torch's fused Adam (one kernel per step instead of a loop over parameters)."""


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"auto"``: bfloat16 on a CPU with native bfloat16 (AVX512-BF16 or AMX), else float32.

    Without native support bfloat16 is emulated and slower than float32; on
    CUDA float32 is kept (bfloat16 there is unmeasured). Other values pass
    through after a check.
    """
    if precision == "auto":
        native = native_bfloat16_cpu()
        return "bfloat16" if torch.device(device).type == "cpu" and native else "float32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be 'auto' or one of {PRECISIONS}; got {precision!r}.")
    return precision


def lower_priority(nice: int) -> None:
    """Set the calling thread's CPU priority (Linux ``nice``; a no-op where it cannot be set).

    On Linux the priority is per thread, so only the caller yields: the
    operating system runs other threads of the process first when they are
    runnable, and this one with the cores they leave.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as error:
        logger.debug("Could not lower the trainer's priority: %s", error)


def run_on_cores(cores: Sequence[int]) -> None:
    """Let the calling thread run on ``cores`` (Linux affinity is per thread; a no-op
    where it cannot be set). Threads it starts later inherit the cores."""
    try:
        os.sched_setaffinity(0, cores)
    except (AttributeError, OSError) as error:
        logger.debug("Could not set the trainer's cores to %s: %s", list(cores), error)


def native_bfloat16_cpu(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX; Arm BF16).

    Read from the CPU flags Linux lists; ``False`` where they cannot be read
    (then ``"auto"`` keeps float32, which is never slower than emulated bfloat16).
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(value.split()))
    return False


def memory_format_for(model: nn.Module, channels_last: bool) -> torch.memory_format:
    """Channels-last format of a model's weights (2D or 3D convolutions), or contiguous."""
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if getattr(model, "spatial_dims", 2) == 3 else torch.channels_last


def middle_frame(u: torch.Tensor, *, like: torch.Tensor) -> torch.Tensor:
    """``u`` itself, or its middle frame when ``u`` is a stack (n, C, D, ...) and ``like`` is not.

    The input counterpart of a Z or T stack's target, for alpha's denominator.
    """
    if u.shape == like.shape:
        return u
    if u.ndim == like.ndim and u.ndim >= 3 and u.shape[:2] == like.shape[:2] and like.shape[2] == 1:
        mid = u.shape[2] // 2
        return u[:, :, mid : mid + 1]
    raise ConfigError(
        f"Cannot compare inputs of shape {tuple(u.shape)} with targets {tuple(like.shape)}; "
        "expected equal shapes, or a stack (n, C, D, ...) and its middle frame (n, C, 1, ...)."
    )


def _turn(t: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry k (0..7) of the square on the last two axes: k // 4 flips, k % 4 quarter turns."""
    if k >= 4:
        t = t.flip(-1)
    return torch.rot90(t, k % 4, dims=(-2, -1)) if k % 4 else t


def _undo(t: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`_turn`."""
    if k % 4:
        t = torch.rot90(t, -(k % 4), dims=(-2, -1))
    return t.flip(-1) if k >= 4 else t
