"""The trainer in a process of its own: :class:`ProcessTrainer`.

It runs the thread trainer (:class:`~bluesky_jit.training.Trainer`, built by
:func:`~bluesky_jit.training.make_trainer`) in a spawned process
(``torch.multiprocessing``), so training does not share the GIL with
reconstruction and inference. Pairs reach it through a queue; its weights
reach the inference side through shared memory without a lock that inference
could wait on (a two-slot sequence lock, see :meth:`ProcessTrainer.snapshot`).
Both trainers follow :class:`~bluesky_jit.training.OnlineTrainer`.

References
----------
.. [1] Graas, Coban, Batenburg, Lucka, "Just-in-time deep learning for
   real-time X-ray computed tomography", Scientific Reports 13 (2023),
   Topic III: online training concurrent with inference.
"""

from __future__ import annotations

import logging
import math
import os
import queue
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .buffers import check_online_strategy
from .errors import ConfigError, TrainerProcessError
from .models import build_model, resolve_config
from .training import Normalizer, TrainerMixin, WeightsSnapshot, make_trainer, resolve_precision

logger = logging.getLogger(__name__)

TRAINER_SETTINGS = frozenset(
    "batch_size learning_rate holdout_size train_precision metrics_every_s checkpoint_dir "
    "checkpoint_every_s max_train_steps_per_s channels_last augment average_weights nice "
    "cores".split()
)
"""The Trainer settings a ProcessTrainer passes on to the Trainer in its process."""


class _RemoteBuffer:
    """Parent-side face of the child's buffer: pushes go through a queue.

    ``send`` puts a message on the child's queue; ``reported`` is the shared
    count of pairs the child's buffer holds (-1 until the child reports).
    """

    def __init__(
        self, send: Callable[[tuple], None], reported: Any, capacity: int, item_ndim: int
    ) -> None:
        self._send = send
        self._reported = reported
        self.capacity = capacity
        self.item_ndim = item_ndim
        self.pushed = 0
        """Pairs pushed from this side."""

    def push(self, u: Any, v: Any) -> None:
        u = np.ascontiguousarray(u, dtype=np.float32)
        v = np.ascontiguousarray(v, dtype=np.float32)
        self._send(("train", u, v))
        self.pushed += u.shape[0] if u.ndim == self.item_ndim + 1 else 1

    def clear(self) -> None:
        self._send(("clear",))
        self.pushed = 0

    def __len__(self) -> int:
        child = self._reported.value
        if child < 0:  # the child is not reporting yet
            return min(self.pushed, self.capacity)
        return int(child)


class ProcessTrainer(TrainerMixin):
    """The :class:`~bluesky_jit.training.Trainer` in a spawned process of its own.

    An :class:`~bluesky_jit.training.OnlineTrainer`, like the Trainer. Pairs
    travel to the child through a queue (pickled arrays); weights come back
    through shared memory.

    Parameters
    ----------
    model : str, optional
        Registry name (default ``"unet"``); the child builds the network, or
        loads ``warm_start``, which must then hold this network (``None``: any).
    model_config : mapping, optional
    buffer_capacity : int
        N_buffer.
    online_strategy : {"queue", "sequential", "frozen"}
        See :data:`bluesky_jit.config.OnlineStrategy`.
    warm_start : path-like, optional
        Checkpoint to continue from (required for ``"frozen"``).
    num_threads : int
        Intra-op threads of the training process (1 is as fast as 2 for
        20x20 patches on 2 cores, and leaves a core to the pipeline).
    interop_threads : int, optional
        Inter-op threads of the training process (set before its first torch
        work; nothing there runs operators side by side, so 1); ``None``
        keeps torch's default (one per core).
    seed : int
    **trainer_kwargs
        batch_size, learning_rate, holdout_size, train_precision ("auto":
        for the CPU), metrics_every_s, checkpoint_dir, checkpoint_every_s,
        max_train_steps_per_s, channels_last, augment, average_weights.
        With ``**cfg.training.model_dump()`` these are the Training settings.

    Notes
    -----
    :attr:`pause` is a ``multiprocessing`` event shared with the child: while
    it is set the child's loop takes no step (see ``Trainer(pause=...)``);
    :attr:`paused_s` is the time it spent so.

    :meth:`evaluate` returns the newest hold-out alpha the child reported (in
    its metric rows), not a fresh evaluation. Call :meth:`stop` (or use the
    object as a context manager) to end the process.
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        *,
        buffer_capacity: int = 320,
        online_strategy: str = "queue",
        warm_start: str | os.PathLike[str] | None = None,
        num_threads: int = 1,
        interop_threads: int | None = 1,
        seed: int = 0,
        **trainer_kwargs: Any,
    ) -> None:
        check_online_strategy(online_strategy, has_checkpoint=warm_start is not None)
        unknown = sorted(set(trainer_kwargs) - TRAINER_SETTINGS)
        if unknown:
            raise ConfigError(
                f"ProcessTrainer got unknown setting(s) {unknown}; known: "
                f"{sorted(TRAINER_SETTINGS)}."
            )
        precision = trainer_kwargs.get("train_precision", "float32")
        trainer_kwargs["train_precision"] = resolve_precision(precision, "cpu")
        batch_size = trainer_kwargs.get("batch_size", 32)
        capacity = buffer_capacity
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < batch_size:
            raise ConfigError(
                f"ProcessTrainer buffer_capacity (N_buffer) must be an integer >= batch_size "
                f"({batch_size}); got {capacity!r}."
            )
        if "checkpoint_dir" in trainer_kwargs and trainer_kwargs["checkpoint_dir"] is not None:
            trainer_kwargs["checkpoint_dir"] = str(trainer_kwargs["checkpoint_dir"])
        # the parent's copy of the architecture: shapes of the shared weights, save()
        if warm_start is not None:
            from .models.checkpoint import load_checkpoint

            template, extra = load_checkpoint(
                warm_start, expected_name=model, expected_config=model_config
            )
            model, model_config = template.model_name, dict(template.model_config)
        else:
            model = model or "unet"
            model_config = resolve_config(model, model_config)
            template = build_model(model, model_config, seed=seed)
        self.model_name = model
        self.model_config = dict(model_config)
        self.batch_size = int(batch_size)
        self.learning_rate = float(trainer_kwargs.get("learning_rate", 1e-4))
        self.error: BaseException | None = None
        self._spec = {
            "model": model,
            "model_config": self.model_config,
            "capacity": capacity,
            "online_strategy": online_strategy,
            "warm_start": None if warm_start is None else str(warm_start),
            "num_threads": int(num_threads),
            "interop_threads": None if interop_threads is None else int(interop_threads),
            "seed": int(seed),
            "trainer": dict(trainer_kwargs),
        }
        self._ctx = torch.multiprocessing.get_context("spawn")  # safe with the parent's threads
        state = template.state_dict()
        self._slots = [
            {k: t.detach().to("cpu", copy=True).share_memory_() for k, t in state.items()}
            for _ in range(2)
        ]
        ctx = self._ctx
        self._shared = {
            "slot_version": ctx.Array("q", [0, -1], lock=False),
            "current": ctx.Value("i", 0, lock=False),
            "normalizer": ctx.Array("d", [math.nan, math.nan], lock=False),
            "steps": ctx.Value("q", 0, lock=False),
            "steps_per_second": ctx.Value("d", 0.0, lock=False),
            "buffer_len": ctx.Value("q", -1, lock=False),
            "paused_s": ctx.Value("d", 0.0, lock=False),
        }
        self.pause = ctx.Event()
        """Set it to hold the child's training loop (the worker fell behind the scan)."""
        if warm_start is not None and extra.get("normalizer") is not None:
            norm = Normalizer.from_dict(extra["normalizer"])
            self._shared["normalizer"][0] = norm.offset
            self._shared["normalizer"][1] = norm.scale
        self._inbox = ctx.Queue()
        self._outbox = ctx.Queue()
        self._process: Any = None
        self._cache = WeightsSnapshot(-1, {}, None)
        self._metrics: list[dict[str, Any]] = []
        self._quality: dict[str, float] = {}
        self._popped = 0
        self._stopped = False
        item_ndim = 4 if getattr(template, "spatial_dims", 2) == 3 else 3
        self.buffer = _RemoteBuffer(self._send, self._shared["buffer_len"], capacity, item_ndim)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the training process (once); it trains whenever a full batch is buffered."""
        if self._process is not None or self._stopped:
            return
        self._process = self._ctx.Process(
            target=_child_main,
            args=(self._spec, self._slots, self._shared, self._inbox, self._outbox, self.pause),
            name="bluesky-jit-trainer",
            daemon=True,
        )
        self._process.start()

    @property
    def running(self) -> bool:
        """Whether the training process is alive."""
        return self._process is not None and self._process.is_alive()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the process (it writes its last checkpoint if configured) and wait for it."""
        if self._process is None:
            self._stopped = True
            return
        if self._process.is_alive():
            self._send(("stop",))
            self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("The training process did not stop within %s s; terminating", timeout)
            self._process.terminate()
            self._process.join(5)
        self._drain()
        if self._process.exitcode not in (0, None) and self.error is None:
            self.error = TrainerProcessError(
                f"The training process exited with code {self._process.exitcode}."
            )
        self._stopped = True

    def __enter__(self) -> ProcessTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _send(self, message: tuple) -> None:
        if self._stopped:
            return
        self._inbox.put(message)

    # -- pairs ---------------------------------------------------------------------------------
    def add_holdout(self, u: Any, v: Any) -> None:
        """Hold-out pairs for the child's alpha (never trained on)."""
        self._send(
            ("holdout", np.ascontiguousarray(u, np.float32), np.ascontiguousarray(v, np.float32))
        )

    def clear_holdout(self) -> None:
        """Forget the child's hold-out pairs (e.g. after the slice moved)."""
        self._send(("clear_holdout",))

    # -- weights -------------------------------------------------------------------------------
    def snapshot(self) -> WeightsSnapshot:
        """The newest published weights, read without waiting on the training process.

        The child writes into the slot that readers are not pointed at, then
        flips the pointer; a read copies the current slot and accepts the copy
        if the slot's version did not change meanwhile (a sequence lock). A
        reader never blocks: after three unlucky tries it keeps the previous
        weights. Unchanged weights are not copied again.
        """
        shared = self._shared
        for _ in range(3):
            s = shared["current"].value
            version = shared["slot_version"][s]
            if version < 0:
                continue
            if version == self._cache.version:
                break
            state = {k: t.clone() for k, t in self._slots[s].items()}
            if shared["slot_version"][s] == version:
                self._cache = WeightsSnapshot(version, state, self.normalizer)
                break
        if self._cache.normalizer is None and self.normalizer is not None:
            self._cache = self._cache._replace(normalizer=self.normalizer)
        return self._cache

    @property
    def normalizer(self) -> Normalizer | None:
        """The child's frozen normaliser; None before its first step (or warm start)."""
        offset, scale = self._shared["normalizer"][0], self._shared["normalizer"][1]
        if math.isnan(offset) or math.isnan(scale):
            return None
        return Normalizer(offset=offset, scale=scale)

    # -- progress --------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return int(self._shared["steps"].value)

    @property
    def steps_per_second(self) -> float:
        return float(self._shared["steps_per_second"].value)

    @property
    def paused_s(self) -> float:
        """Seconds the child's loop spent paused (:attr:`pause` set), as last reported."""
        return float(self._shared["paused_s"].value)

    def _drain(self) -> None:
        while True:
            try:
                kind, payload = self._outbox.get_nowait()
            except (queue.Empty, EOFError, OSError):
                return
            if kind == "metrics":
                self._metrics.append(payload)
            elif kind == "quality":
                self._quality = payload
            elif kind == "error":
                self.error = TrainerProcessError(payload)
                logger.error("The training process failed:\n%s", payload)

    def metrics(self) -> list[dict[str, Any]]:
        """Every metric row the child reported so far (copies), oldest first."""
        self._drain()
        return [dict(r) for r in self._metrics]

    def pop_metrics(self) -> list[dict[str, Any]]:
        """Rows reported since the previous call."""
        self._drain()
        rows = self._metrics[self._popped :]
        self._popped = len(self._metrics)
        return [dict(r) for r in rows]

    @property
    def latest_quality(self) -> dict[str, float]:
        """The child's ``Trainer.latest_quality`` at its newest metric row (empty before)."""
        self._drain()
        return dict(self._quality)

    def evaluate(self) -> float:
        """The newest hold-out alpha reported by the child (NaN before the first row)."""
        self._drain()
        for row in reversed(self._metrics):
            if math.isfinite(row.get("alpha", math.nan)):
                return float(row["alpha"])
        return math.nan

    def _describe(self) -> tuple[str, dict[str, Any]]:
        return self.model_name, self.model_config


def _child_main(spec, slots, shared, inbox, outbox, pause) -> None:  # pragma: no cover
    """The training process: a Trainer thread, this thread moving pairs, weights and rows."""
    import traceback

    try:
        if spec["interop_threads"] is not None:
            try:  # before any torch work of this process; refused once it started
                torch.set_num_interop_threads(spec["interop_threads"])
            except RuntimeError as error:
                logger.debug("torch inter-op threads left as they are: %s", error)
        torch.set_num_threads(spec["num_threads"])
        kwargs = dict(spec["trainer"])
        kwargs["num_threads"] = spec["num_threads"]
        kwargs["pause"] = pause
        trainer = make_trainer(
            spec["online_strategy"],
            model=spec["model"],
            model_config=spec["model_config"],
            buffer_capacity=spec["capacity"],
            warm_start=spec["warm_start"],
            seed=spec["seed"],
            **kwargs,
        )
        if trainer.normalizer is None and not math.isnan(shared["normalizer"][0]):
            trainer.normalizer = Normalizer(shared["normalizer"][0], shared["normalizer"][1])
    except Exception:  # noqa: BLE001 - reported to the parent
        outbox.put(("error", traceback.format_exc()))
        return

    published = -1

    def publish() -> None:
        nonlocal published
        version, state, normalizer = trainer.snapshot()
        if version == published:
            return
        if normalizer is not None:
            shared["normalizer"][0] = normalizer.offset
            shared["normalizer"][1] = normalizer.scale
        s = 1 - shared["current"].value
        shared["slot_version"][s] = -1  # being written
        for key, tensor in slots[s].items():
            tensor.copy_(state[key])
        shared["slot_version"][s] = version
        shared["current"].value = s
        published = version

    started = False
    try:
        while True:
            try:
                message = inbox.get(timeout=0.005)
            except queue.Empty:
                message = None
            if message is not None:
                kind = message[0]
                if kind == "stop":
                    break
                if kind == "train":
                    trainer.buffer.push(message[1], message[2])
                elif kind == "holdout":
                    trainer.add_holdout(message[1], message[2])
                elif kind == "clear":
                    trainer.buffer.clear()
                elif kind == "clear_holdout":
                    trainer.clear_holdout()
            if not started:
                trainer.start()
                started = True
            shared["buffer_len"].value = len(trainer.buffer)
            shared["steps"].value = trainer.steps
            shared["steps_per_second"].value = trainer.steps_per_second
            shared["paused_s"].value = trainer.paused_s
            publish()
            rows = trainer.pop_metrics()
            for row in rows:
                outbox.put(("metrics", row))
            if rows:
                outbox.put(("quality", trainer.latest_quality))
            if trainer.error is not None:
                break  # reported below
    except Exception:  # noqa: BLE001 - reported to the parent
        outbox.put(("error", traceback.format_exc()))
    finally:
        trainer.stop()
        publish()
        shared["steps"].value = trainer.steps
        shared["paused_s"].value = trainer.paused_s
        for row in trainer.pop_metrics():
            outbox.put(("metrics", row))
        if trainer.error is not None:
            outbox.put(("error", repr(trainer.error)))
        outbox.close()
        outbox.join_thread()
