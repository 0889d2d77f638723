"""How many CPU threads each stage may use: decided once, from the cores the process has.

On a small machine the RunEngine, the detector, the worker (numba kernels,
then the denoiser) and the trainer all compete for the same cores. Each of
them, left alone, sizes its thread pool to the whole machine. A
:class:`CpuBudget` decides instead, in one place:

- ``reserved``: cores left to the RunEngine and the detector (1 on 2-7 cores,
  2 on 8 or more, none on a single core). The plugin's child processes (the
  worker and writer processes, the embedded catalog server) keep off them
  (:func:`leave_cores_to_the_scan`), except the trainer's thread: at nice 19
  it may also run on them while the scan leaves them idle (``train_cores``;
  ``JitConfig.borrow_idle_cores``);
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
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from ._checks import check_int

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


def reserved_cores(cores: int) -> int:
    """Cores left to the RunEngine and the detector: 1 on 2-7 cores, 2 on 8 or more."""
    return 0 if cores <= 1 else (1 if cores < 8 else 2)


_left_to_the_scan: tuple[int, ...] = ()


def leave_cores_to_the_scan() -> list[int]:
    """Keep this process off the cores reserved for the RunEngine; return those it keeps.

    For the plugin's child processes (the worker, the writer, the embedded
    catalog server): of the cores this process may use, the lowest-numbered
    :func:`reserved_cores` are left out, so the scan's threads, which may run
    anywhere, always find them free. A process with one core keeps it.
    :func:`cores_left_to_the_scan` says which were left.

    The affinity is per thread, so every thread the process has moves (e.g.
    the BLAS pool that importing numpy starts); threads started later inherit it.
    """
    global _left_to_the_scan
    try:
        cores = sorted(os.sched_getaffinity(0))
        keep = cores[reserved_cores(len(cores)) :] or cores
        if keep != cores:
            for thread in _threads():
                try:
                    os.sched_setaffinity(thread, keep)
                except OSError:  # the thread has ended
                    pass
            _left_to_the_scan = tuple(c for c in cores if c not in keep)
        return keep
    except (AttributeError, OSError):  # not on Linux
        return []


def _threads() -> list[int]:
    """The native ids of this process's threads (the calling one alone without /proc)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def cores_left_to_the_scan() -> tuple[int, ...]:
    """The cores :func:`leave_cores_to_the_scan` took this process off (none if not called)."""
    return _left_to_the_scan


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
    train_cores : tuple of int, optional
        Cores the trainer's thread may run on: the process's and those it left
        to the scan (:func:`leave_cores_to_the_scan`), whose idle time the
        trainer, at nice 19, takes; ``None``: the process's cores.
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
    train_cores: tuple[int, ...] | None = None
    reasons: tuple[str, ...] = ()

    @classmethod
    def decide(cls, config: Any = None, *, cores: int | None = None, left: Any = None) -> CpuBudget:
        """The budget of a :class:`~bluesky_jit.config.JitConfig` on ``cores`` cores.

        Parameters
        ----------
        config : JitConfig, optional
            Reads ``runtime.cpu_threads``, ``runtime.train_threads``,
            ``runtime.infer_threads`` (``None``: decide from the cores) and
            ``runtime.borrow_idle_cores``.
        cores : int, optional
            Cores available; by default those of the process's CPU affinity.
        left : sequence of int, optional
            Cores the process left to the scan; by default
            :func:`cores_left_to_the_scan`.

        Raises
        ------
        ConfigError
            If ``cores`` or one of the settings is not a positive integer.
        """
        detected = cores is None
        cores = available_cores() if cores is None else cores
        check_int("CpuBudget", "cores", cores)
        run = getattr(config, "runtime", None)
        total = getattr(run, "cpu_threads", None)
        train_set = getattr(run, "train_threads", None)
        infer_set = getattr(run, "infer_threads", None)

        source = "the process's CPU affinity" if detected else "given"
        reasons = [f"{cores} core{'s' if cores != 1 else ''} available ({source})"]
        left = tuple(cores_left_to_the_scan() if left is None else left)
        reserved = 0 if left else reserved_cores(cores)  # a child process left them already
        if total is None:
            plugin = max(1, cores - reserved)
            if left:
                reasons.append(
                    f"{len(left)} left to the RunEngine and the detector by this process, "
                    f"{plugin} for the plugin"
                )
            elif reserved:
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
        train_cores = None
        if left and getattr(run, "borrow_idle_cores", True):  # left: Linux, affinity exists
            train_cores = tuple(sorted({*os.sched_getaffinity(0), *left}))
            reasons.append(
                f"the trainer may also run on the cores left to the scan {list(left)} "
                "while the scan leaves them idle"
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
            train_cores=train_cores,
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


class PaceGuard:
    """Training yields when it slows the scan: the scan's own frame rate decides.

    Nothing tells a callback the pace a scan should keep, but the scan shows
    it: every ``probe_every_s`` the guard pauses training for ``probe_s`` and
    compares the rate at which frames reached the RunEngine's thread while
    training was paused with the rate just before, while it ran. If training
    slowed the scan by more than ``tolerance``, the share of time training may
    run (``duty``, a square wave of ``period_s``) is halved, down to nothing;
    otherwise it grows back by an eighth, up to all the time (it settles where
    training costs the scan about ``tolerance``). It starts at a half, with a
    first probe as soon as a window of frames has arrived. Once training runs
    all the time and a probe finds it costs the scan nothing, the time to the
    next probe doubles, up to ``max_probe_every_s``; a slow-down, or a pause
    in the scan, brings it back to ``probe_every_s``. Without frames for
    ``idle_s`` (no scan, or one paused) training runs freely.

    Parameters
    ----------
    arrivals : collections.deque of float, or a tuple of them
        ``time.monotonic()`` of each frame document, appended on the
        RunEngine's thread (bounded deques: appending is cheap and safe); one
        deque per kind of frame document (events, stream datums).
    pause : callable
        ``pause(bool)``: ask the trainer to pause (True) or let it run (False).
    period_s, probe_every_s, probe_s, tolerance, idle_s : float
        The square wave's period, the time between probes, a probe's length,
        the slow-down that counts, and the gap that means "no scan".
    max_probe_every_s : float
        The longest time between probes while training costs the scan
        nothing. A probe pauses training for ``probe_s``: every 2 s that was
        30 % of the training a scan never missed (the dynamic benchmark's
        trainer took 29-31 steps/s with it, 49 without the guard).

    Notes
    -----
    On a 2-core machine a trainer in the RunEngine's process takes CPU and
    the interpreter's lock from the scan even at the lowest CPU priority:
    training at full speed slowed a 100 frames/s scan by 12-26 %
    (``benchmarks/overhead.py``). The guard keeps it to what the scan can spare.
    """

    def __init__(
        self,
        arrivals: Any,
        pause: Any,
        *,
        period_s: float = 0.5,
        probe_every_s: float = 2.0,
        probe_s: float = 0.6,
        tolerance: float = 0.04,
        idle_s: float = 1.0,
        min_frames: int = 10,
        max_probe_every_s: float = 16.0,
    ) -> None:
        self.arrivals = arrivals
        self._pause = pause
        self.period_s = period_s
        self.probe_every_s = probe_every_s
        self.probe_s = probe_s
        self.tolerance = tolerance
        self.idle_s = idle_s
        self.min_frames = min_frames
        self.max_probe_every_s = max(max_probe_every_s, probe_every_s)
        self.interval = probe_every_s
        """Seconds to the next probe: ``probe_every_s``, doubled after each probe that
        found a scan undisturbed by full-time training."""
        self.duty = 0.5  # cautious until the first probe has measured the scan
        self.probes = 0
        self.slowdowns = 0
        self.history: list[float] = []
        """The duty after each probe."""
        self._paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bluesky-jit-pace", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and let training run."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._set(False)

    def rate(self, start: float, stop: float) -> float | None:
        """Frames per second that arrived in ``[start, stop)``; None with too few to tell."""
        times = [t for t in list(self._frames()) if start <= t < stop]
        if len(times) < self.min_frames or times[-1] <= times[0]:
            return None
        return (len(times) - 1) / (times[-1] - times[0])

    def _frames(self) -> Any:
        """The arrivals of one kind of frame document (a step scan sends an event and a
        stream datum per frame, a fly scan only the datums): the busier deque."""
        if isinstance(self.arrivals, tuple):
            return max(self.arrivals, key=lambda d: d[-1] if d else -math.inf)
        return self.arrivals

    def _set(self, paused: bool) -> None:
        if paused != self._paused:
            self._paused = paused
            self._pause(paused)

    def _run(self) -> None:
        next_probe = time.monotonic() + self.probe_s  # measure the scan early
        while not self._stop.wait(0.02):
            now = time.monotonic()
            frames = self._frames()
            last = frames[-1] if frames else -math.inf
            if now - last > self.idle_s:  # no scan to disturb; the next one is measured anew
                self._set(False)
                self.interval = self.probe_every_s
                next_probe = now + self.interval
                continue
            if now >= next_probe:
                self._probe(now)
                next_probe = time.monotonic() + self.interval
                continue
            self._set((now % self.period_s) >= self.duty * self.period_s)

    def _probe(self, start: float) -> None:
        """Pause training until ``min_frames`` frames came (``probe_s`` at least, 2 s at
        most); compare the scan's rate then with its rate before."""
        before = self.rate(start - self.probe_every_s / 2, start)
        self._set(True)
        settle = min(0.2, self.probe_s / 3)  # a training step in flight finishes first
        deadline = start + max(self.probe_s, 2.0)
        free = None
        while not self._stop.wait(0.05):
            now = time.monotonic()
            if now >= start + self.probe_s:
                free = self.rate(start + settle, now)
                if free is not None or now >= deadline:
                    break
        if before is None or free is None:
            return
        self.probes += 1
        if before < free * (1 - self.tolerance):
            self.slowdowns += 1
            self.duty = 0.0 if self.duty < 0.1 else self.duty / 2
            self.interval = self.probe_every_s
        elif self.duty >= 1.0:  # full-time training cost the scan nothing: probe less often
            self.interval = min(2 * self.interval, self.max_probe_every_s)
        else:
            self.duty = min(1.0, self.duty + 0.125)
        self.history.append(self.duty)
        logger.debug(
            "pace probe: %.1f frames/s training, %.1f paused: duty %.2f", before, free, self.duty
        )
