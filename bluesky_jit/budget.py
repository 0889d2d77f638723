"""How many CPU threads each stage may use: decided once, from the cores the process has.

On a small machine the RunEngine, the detector, the worker (numba kernels,
then the denoiser) and the trainer all compete for the same cores. Each of
them, left alone, sizes its thread pool to the whole machine. A
:class:`CpuBudget` decides instead, in one place:

- ``reserved``: cores left to the RunEngine and the detector (1 on 2-7 cores,
  2 on 8 or more, none on a single core);
- ``worker_threads``: numba threads of the reconstruction kernels and torch
  intra-op threads of the denoiser. Both run on the worker thread, one after
  the other, so they share one pool;
- ``train_threads``: torch intra-op threads of the trainer (a third of what
  is left, at most :data:`MAX_TRAIN_THREADS`: batches of 20x20 patches do not
  keep more busy);
- ``interop_threads``: torch inter-op threads of the trainer process (1:
  nothing there runs torch operators side by side; set before its first torch
  work, which only a fresh process allows).

Every stage gets at least one thread, so on one or two cores the plugin's
two threads share what the scan leaves. ``JitConfig.cpu_threads`` sets the
plugin's total instead of deriving it from the cores; ``train_threads`` and
``infer_threads`` still override their stage. The decision and its reasons
are recorded in the derived run's start document (``budget``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

TRAIN_NICE = 19
"""The trainer's CPU priority (Linux nice): the scan and the reconstruction come first."""
MAX_TRAIN_THREADS = 4
"""Most torch threads the trainer gets by default (small patches, small batches)."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CpuBudget:
    """Threads per stage of one pipeline; make one with :meth:`decide`.

    Attributes
    ----------
    cores : int
        Cores available to the process.
    reserved : int
        Cores left to the RunEngine and the detector.
    plugin_threads : int
        Threads for the worker and the trainer together (before the
        one-thread-each minimum).
    worker_threads : int
        numba threads of the reconstruction (the worker thread).
    infer_threads : int
        torch intra-op threads of the denoiser (the worker thread).
    train_threads : int
        torch intra-op threads of the trainer (thread or process).
    interop_threads : int
        torch inter-op threads.
    train_nice : int
        CPU priority (Linux nice) of the trainer's thread.
    reasons : tuple of str
        Why, in words, for the start document and the log.
    """

    cores: int
    reserved: int
    plugin_threads: int
    worker_threads: int
    infer_threads: int
    train_threads: int
    interop_threads: int = 1
    train_nice: int = TRAIN_NICE
    reasons: tuple[str, ...] = ()

    @classmethod
    def decide(cls, config: Any = None, *, cores: int | None = None) -> CpuBudget:
        """The budget of a :class:`~bluesky_jit.config.JitConfig` on ``cores`` cores.

        Parameters
        ----------
        config : JitConfig, optional
            Reads ``cpu_threads``, ``train_threads`` and ``infer_threads``
            (``None`` or missing: decide from the cores).
        cores : int, optional
            Cores available; by default those of the process's CPU affinity.

        Returns
        -------
        CpuBudget

        Raises
        ------
        ConfigError
            If ``cores`` or one of the settings is not a positive integer.
        """
        detected = cores is None
        cores = available_cores() if cores is None else cores
        _check_positive("cores", cores)
        total = getattr(config, "cpu_threads", None)
        train_set = getattr(config, "train_threads", None)
        infer_set = getattr(config, "infer_threads", None)
        for name, value in (
            ("cpu_threads", total),
            ("train_threads", train_set),
            ("infer_threads", infer_set),
        ):
            if value is not None:
                _check_positive(name, value)

        source = "the process's CPU affinity" if detected else "given"
        reasons = [f"{cores} core{'s' if cores != 1 else ''} available ({source})"]
        reserved = 0 if cores == 1 else (1 if cores < 8 else 2)
        if total is None:
            plugin = max(1, cores - reserved)
            if reserved:
                reasons.append(
                    f"{reserved} left to the RunEngine and the detector, {plugin} for the plugin"
                )
            else:
                reasons.append("one core: the scan and the plugin share it")
        else:
            plugin = total
            reserved = max(0, cores - plugin)
            reasons.append(f"cpu_threads={total} set: {plugin} for the plugin")

        train = min(MAX_TRAIN_THREADS, max(1, plugin // 3))
        worker = max(1, plugin - train)
        if plugin < 2:
            reasons.append(
                "worker and trainer get one thread each and share the plugin's core; the "
                "trainer pauses while frames wait"
            )
        else:
            reasons.append(
                f"trainer {train} (a third, at most {MAX_TRAIN_THREADS}), worker {worker} "
                "(numba and the denoiser, in turn)"
            )
        reasons.append(
            f"the trainer runs at nice {TRAIN_NICE}: the scan and the reconstruction get a core "
            "first whenever they want one"
        )
        infer = worker
        if train_set is not None:
            train = train_set
            reasons.append(f"train_threads={train_set} set")
        if infer_set is not None:
            infer = infer_set
            reasons.append(f"infer_threads={infer_set} set")
        return cls(
            cores=cores,
            reserved=reserved,
            plugin_threads=plugin,
            worker_threads=worker,
            infer_threads=infer,
            train_threads=train,
            interop_threads=1,
            reasons=tuple(reasons),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a start document (``reasons`` as a list)."""
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        return data

    @property
    def recon_threads_arg(self) -> int | None:
        """``threads`` for :class:`~bluesky_jit.reconstruction.streaming.StreamingReconstructor`.

        1: serial kernels throughout. Otherwise ``None``, so that small calls
        (patches) stay serial, and :meth:`apply_worker` caps the parallel ones.
        """
        return 1 if self.worker_threads == 1 else None

    def apply_worker(self) -> None:
        """Cap numba's threads for the calling (worker) thread; numba's setting is per thread.

        Does nothing without numba or with one worker thread (serial kernels
        are used then). Call it after the reconstruction backend is made (it
        picks numba's threading layer first).
        """
        if self.worker_threads == 1:
            return
        try:
            import numba
        except ImportError:
            return
        try:
            numba.set_num_threads(max(1, min(self.worker_threads, numba.config.NUMBA_NUM_THREADS)))
        except Exception as error:  # noqa: BLE001 - a cap that cannot be set is not fatal
            logger.warning("Could not set numba's threads to %d: %s", self.worker_threads, error)


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"CpuBudget needs {name} as a positive integer; got {value!r}. Pass e.g. {name}=2, "
            "or None to decide from the cores."
        )
