"""Callbacks in child processes, so that the RunEngine's process only queues documents.

A :class:`JitCallback` in the RunEngine's process shares the GIL with the
RunEngine: its worker's Python code (routing, flat-fielding, bookkeeping)
and the trainer take turns with the scan, and on a small machine an unpaced
scan runs at half its speed. :class:`JitProcess` subscribes the same way and
runs the same ``JitCallback`` in a child Python process at a lower priority
(``nice``): the RunEngine's thread only puts each document on a queue, a
sender thread writes it down a pipe (msgpack, :mod:`bluesky_jit.codec`,
nothing pickled), and the operating system, not the GIL, shares the cores.

The derived documents come back up a second pipe and go to ``emit`` here,
in the RunEngine's process (a :class:`~bluesky_jit.writer.CatalogWriter`
queues them for its own threads); run summaries, progress and quality
signals come back the same way. The child ends when the pipe closes, so it
never outlives the RunEngine's process.

:class:`WriterProcess` (``tiled_writer(container, process=True)``) does the
same for the raw runs' :class:`~bluesky_jit.writer.CatalogWriter`: its JSON
spooling and HTTP requests then take no turns with the RunEngine either.

Example
-------
>>> jit = JitProcess(config=JitConfig(), emit=writer, directory="data/derived")  # doctest: +SKIP
>>> RE.subscribe(jit)                                                           # doctest: +SKIP
>>> RE(plan); jit.flush(); jit.close()                                          # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .budget import leave_cores_to_the_scan
from .catalog import connect
from .codec import packb, unpackb
from .config import JitConfig
from .errors import BlueskyJitError, ConfigError
from .geometry import ScanGeometry, Slice
from .pipeline import RunSummary
from .writer import CatalogWriter, WriterStats

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<I")
_CONTROL = ("move_slices", "set_sampling", "set_center")
"""The JitCallback methods a JitProcess forwards to its child."""


class _ChildProcess:
    """The parent's end of a child process that takes documents down a pipe.

    Subclasses name their ``kind`` (the child's entry point in :data:`_CHILDREN`)
    and handle what comes back in :meth:`_handle`.
    """

    kind = ""
    label = "child"

    def __init__(self, settings: dict[str, Any], *, nice: int, start_timeout: float) -> None:
        if not isinstance(nice, int) or isinstance(nice, bool) or not 0 <= nice <= 19:
            raise ConfigError(
                f"{type(self).__name__}(nice=...) must be an integer 0..19; got {nice!r}."
            )
        self.lost = 0
        """Documents not processed because the child had died."""
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._flushed: dict[int, threading.Event] = {}
        self._flush_ok: dict[int, bool] = {}
        self._tokens = itertools.count()
        self._closed = False
        self._dead = threading.Event()
        self._ready = threading.Event()
        self._refused = ""
        """What the child said when it refused its settings (a ConfigError's message)."""
        to_child, self._to_child = os.pipe()
        self._from_child, from_child = os.pipe()
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, self.kind, str(to_child), str(from_child)],
            pass_fds=(to_child, from_child),
        )
        os.close(to_child)
        os.close(from_child)
        settings = settings | {
            "nice": nice,
            "log_level": logging.getLogger("bluesky_jit").getEffectiveLevel(),
        }
        self._pipe = os.fdopen(self._to_child, "wb")
        _write(self._pipe, ["init", settings])  # secrets go down the pipe, never in argv
        self._pipe.flush()
        self._reader = threading.Thread(
            target=self._read, name=f"bluesky-jit-{self.kind}-results", daemon=True
        )
        self._reader.start()
        if not self._ready.wait(start_timeout) or self._dead.is_set():
            self._process.kill()
            if self._refused:  # e.g. a device this machine does not have: before the scan
                raise ConfigError(self._refused)
            raise ConfigError(
                f"The bluesky-jit {self.label} process did not start within {start_timeout} s "
                f"(exit code {self._process.poll()}); its messages are above. Check that "
                f"'{sys.executable} -m {__name__} {self.kind}' runs, or use the in-process "
                "version."
            )
        self._sender = threading.Thread(
            target=self._send, name=f"bluesky-jit-{self.kind}-sender", daemon=True
        )
        self._sender.start()

    # -- RunEngine side: one queue put --------------------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        if not self._closed:
            self._outbox.put(("doc", name, doc))

    # -- sender thread ------------------------------------------------------------------
    def _send(self) -> None:
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                # Polled like the JitCallback's worker: a put wakes no thread.
                time.sleep(0.005)
                continue
            if item is None:
                break
            if self._dead.is_set():
                self.lost += item[0] == "doc"
                continue
            try:
                _write(self._pipe, list(item))
                if self._outbox.empty():
                    self._pipe.flush()
            except (BrokenPipeError, OSError, ValueError) as error:
                self.lost += item[0] == "doc"
                self._died(f"the pipe to it broke ({error})")
            except TypeError as error:  # a document with a value msgpack cannot carry
                logger.warning("bluesky_jit could not send a %r document: %s", item[1], error)
        try:
            self._pipe.close()
        except OSError:
            pass

    # -- reader thread: what the child reports --------------------------------------------
    def _read(self) -> None:
        with os.fdopen(self._from_child, "rb") as pipe:
            while True:
                try:
                    message = _read(pipe)
                except (OSError, ValueError) as error:
                    logger.error(
                        "bluesky_jit: unreadable message from the %s: %s", self.label, error
                    )
                    message = None
                if message is None:
                    break
                try:
                    if message[0] == "ready":
                        self._ready.set()
                    elif message[0] == "refused":
                        self._refused = str(message[1])
                    elif message[0] == "flushed":
                        self._flushed_reply(message[1:])
                    else:
                        self._handle(message)
                except Exception:  # noqa: BLE001 - e.g. emit raised; the next message still comes
                    logger.exception(
                        "bluesky_jit could not handle the %s's %r", self.label, message[0]
                    )
        code = self._process.wait()
        if not self._closed or code != 0:
            self._died(f"it exited with code {code}")
        self._ready.set()

    def _handle(self, message: list) -> None:
        """What the child reports besides ready, refused and flushed (nothing by default)."""

    def _flushed_reply(self, reply: list) -> None:
        token, ok = reply[:2]
        self._flush_ok[token] = bool(ok)
        self._flushed.pop(token, threading.Event()).set()

    def _died(self, why: str) -> None:
        if self._dead.is_set():
            return
        self._dead.set()
        if self._refused:  # said once, as the constructor's ConfigError
            return
        logger.error(
            "The bluesky-jit %s process stopped: %s. Documents from now on are not processed "
            "(counted in .lost); the scan and its raw data are not affected.",
            self.label,
            why,
        )
        for event in list(self._flushed.values()):
            event.set()

    @property
    def backlog(self) -> int:
        """Documents not yet sent to the child."""
        return self._outbox.qsize()

    def _flush_child(self, timeout: float | None) -> bool:
        """Wait until the child has handled every document sent so far."""
        token = next(self._tokens)
        done = self._flushed[token] = threading.Event()
        if self._dead.is_set():
            return False
        self._outbox.put(("flush", token, timeout))
        return done.wait(timeout) and self._flush_ok.pop(token, False)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the child has handled every document received so far; False on
        timeout or if the child died."""
        return self._flush_child(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Handle what is queued, then end the child (killed if it does not end in time)."""
        if self._closed:
            return
        if not self._dead.is_set():
            self.flush(timeout)
        self._closed = True
        self._outbox.put(None)
        self._sender.join(timeout)
        try:
            self._process.wait(timeout if timeout is not None else 60)
        except subprocess.TimeoutExpired:
            logger.warning("The bluesky-jit %s process did not end; killing it.", self.label)
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout)


class JitProcess(_ChildProcess):
    """Live just-in-time denoising in a child process: ``RE.subscribe(JitProcess(...))``.

    Takes the parameters of :class:`~bluesky_jit.callbacks.JitCallback`
    (except ``handler_registry`` and ``run_engine_here``) and offers its
    methods: :meth:`flush`, :meth:`close`, :meth:`progress`,
    :meth:`move_slices`, :meth:`set_sampling`, :attr:`summaries`.

    Parameters
    ----------
    nice : int
        How much lower the child's CPU priority is than this process's
        (``os.nice``; 19, the lowest, by default): the scan wins every core it
        asks for, and the catalog server the one left.
    start_timeout : float
        Seconds to wait for the child to import torch and start.

    Notes
    -----
    ``on_run_finished`` and ``emit`` are called on a reader thread of this
    process, as a JitCallback calls them on its worker thread. If the child
    dies, the documents after it are counted in :attr:`lost`, logged, and
    :meth:`flush` returns False; the RunEngine never sees it.
    """

    kind = "jit"
    label = "worker"

    def __init__(
        self,
        *,
        config: JitConfig | None = None,
        emit: Callable[[str, dict], None] | None = None,
        directory: str | Path = "bluesky_jit_data/derived",
        geometry_overrides: Mapping[str, Any] | None = None,
        root_map: Mapping[str, str] | None = None,
        on_run_finished: Callable[[RunSummary], None] | None = None,
        keep_summaries: int = 20,
        quality: Any = None,
        nice: int = 19,
        start_timeout: float = 120.0,
    ) -> None:
        self.config = config or JitConfig()
        self.emit = emit
        self.directory = Path(directory)
        self.quality = quality
        self.on_run_finished = on_run_finished
        self.summaries: collections.deque[RunSummary] = collections.deque(maxlen=keep_summaries)
        """The most recent runs' summaries, as the child reported them."""
        self._running: dict[str, RunSummary] = {}
        settings = {
            "config": self.config.to_dict(),
            "emit": emit is not None,
            "quality": quality is not None,
            "directory": str(self.directory),
            "geometry_overrides": dict(geometry_overrides or {}),
            "root_map": dict(root_map or {}),
            "keep_summaries": keep_summaries,
        }
        super().__init__(settings, nice=nice, start_timeout=start_timeout)

    def _handle(self, message: list) -> None:
        kind = message[0]
        if kind == "emit" and self.emit is not None:
            self.emit(message[1], message[2])
        elif kind == "progress":  # metric rows come once: keep the earlier ones
            running = {}
            for s in message[1]:
                earlier = self._running.get(s["raw_uid"])
                kept = earlier.metrics[: s["metrics_from"]] if earlier is not None else []
                s["metrics"] = kept + s["metrics"]
                running[s["raw_uid"]] = _summary(s)
            self._running = running
        elif kind == "finished":
            summary = _summary(message[1])
            self._running.pop(summary.raw_uid, None)
            self.summaries.append(summary)
            if self.on_run_finished is not None:
                self.on_run_finished(summary)
        elif kind == "quality" and self.quality is not None:
            details, step, n2i = message[1:]
            self.quality.publish(details, step=step, **n2i)

    def progress(self) -> list[RunSummary]:
        """Summaries of the runs in progress (updated twice a second), oldest first."""
        return list(self._running.values())

    def move_slices(self, *, slice_row: int | None = None, vertical: dict | None = None) -> None:
        """As :meth:`bluesky_jit.callbacks.JitCallback.move_slices`."""
        planes = {
            int(k): v if isinstance(v, (int, float)) else dataclasses.asdict(v)
            for k, v in (vertical or {}).items()
        }
        kwargs = {"slice_row": slice_row, "vertical": planes or None}
        self._outbox.put(("call", "move_slices", kwargs))

    def set_center(self, center_of_rotation: float) -> None:
        """As :meth:`bluesky_jit.callbacks.JitCallback.set_center`."""
        self._outbox.put(("call", "set_center", {"center_of_rotation": float(center_of_rotation)}))

    def set_sampling(self, *, patch_size: int | None = None, region: Any = ...) -> None:
        """As :meth:`bluesky_jit.callbacks.JitCallback.set_sampling` (a region goes by value)."""
        kwargs: dict[str, Any] = {"patch_size": patch_size}
        if region is not ...:
            fields = ("radius", "center", "mask", "pixel_size")
            kwargs["region"] = None if region is None else {k: getattr(region, k) for k in fields}
        self._outbox.put(("call", "set_sampling", kwargs))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the child has processed every document received so far and ``emit``
        has written what came back (when it has a ``flush``); False on timeout or if the
        child died."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._flush_child(timeout):
            return False
        emit_flush = getattr(self.emit, "flush", None)
        if callable(emit_flush):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return bool(emit_flush(left))
        return True


class WriterProcess(_ChildProcess):
    """A :class:`~bluesky_jit.writer.CatalogWriter` in a child process.

    Made by ``tiled_writer(container, process=True)``. The child connects to
    the same catalog node (its URI and API key go down the pipe, never on a
    command line), spools and writes as a CatalogWriter does; here the
    RunEngine's thread only queues, and a sender thread packs documents down
    the pipe. :attr:`stats` are the child's, as of the last :meth:`flush`.
    """

    kind = "writer"
    label = "catalog writer"

    def __init__(
        self,
        container: Any,
        *,
        spool_dir: str | Path | None,
        batch_size: int = 50,
        max_spool_bytes: int = 2 * 1024**3,
        nice: int = 0,
        start_timeout: float = 60.0,
    ) -> None:
        self.stats = WriterStats()
        settings = {
            "uri": container.uri,
            "api_key": container.context.api_key,
            "spool_dir": None if spool_dir is None else str(spool_dir),
            "batch_size": batch_size,
            "max_spool_bytes": max_spool_bytes,
        }
        super().__init__(settings, nice=nice, start_timeout=start_timeout)

    def _flushed_reply(self, reply: list) -> None:
        if len(reply) > 2:
            self.stats = WriterStats(**reply[2])
        super()._flushed_reply(reply)


def tiled_writer(
    container: Any,
    *,
    spool_dir: str | Path | None = None,
    batch_size: int = 50,
    max_spool_bytes: int = 2 * 1024**3,
    process: bool = False,
) -> CatalogWriter | WriterProcess:
    """A document callback that writes runs into ``container`` off the caller's thread.

    It returns in about a microsecond (the document is queued); a writer
    thread of its own batches the documents into Tiled and spools them to
    disk first, so a catalog outage loses nothing. Call
    ``writer.flush(timeout)`` before reading a run back, ``writer.close()`` at
    the end.

    Parameters
    ----------
    container, spool_dir, batch_size, max_spool_bytes
        As for :class:`bluesky_jit.writer.CatalogWriter`.
    process : bool
        Write from a child process (:class:`WriterProcess`): the caller's
        process then only queues and packs documents, so the writer's work
        takes no turns with a RunEngine's thread under the GIL.

    Returns
    -------
    CatalogWriter or WriterProcess
        A callback ``writer(name, doc)`` with ``flush``, ``close`` and ``stats``.
    """
    if process:
        return WriterProcess(
            container, spool_dir=spool_dir, batch_size=batch_size, max_spool_bytes=max_spool_bytes
        )
    return CatalogWriter(
        container, spool_dir=spool_dir, batch_size=batch_size, max_spool_bytes=max_spool_bytes
    )


# ------------------------------------------------------------------------------ the pipe
def _write(pipe: BinaryIO, message: Any) -> None:
    data = packb(message)
    pipe.write(_HEADER.pack(len(data)) + data)


def _read(pipe: BinaryIO) -> Any:
    header = pipe.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = pipe.read(size)
    if len(data) < size:
        return None
    return unpackb(data)


_ARRAY_FIELDS = ("last_indices", "last_denoised_indices", "images", "positions")


def _summary_message(summary: RunSummary, metrics_from: int = 0) -> dict[str, Any]:
    """A summary for the pipe; ``metrics_from``: the rows the other side has already."""
    out = summary.to_dict() | {"metrics": summary.metrics[metrics_from:]}
    out["metrics_from"] = metrics_from
    out |= {k: getattr(summary, k) for k in _ARRAY_FIELDS}
    out["geometry"] = None if summary.geometry is None else summary.geometry.to_dict()
    return out


def _summary(message: dict[str, Any]) -> RunSummary:
    message.pop("metrics_from", None)
    geometry = message.pop("geometry", None)
    summary = RunSummary(**message)
    summary.geometry = None if geometry is None else ScanGeometry(**geometry)
    return summary


# ------------------------------------------------------------------------------ the child
class _Results:
    """The child's end of the pipe back: one lock, so threads' messages never interleave."""

    def __init__(self, fd: int) -> None:
        self._pipe = os.fdopen(fd, "wb")
        self._lock = threading.Lock()

    def send(self, *message: Any) -> None:
        with self._lock:
            _write(self._pipe, list(message))
            self._pipe.flush()

    def emit(self, name: str, doc: dict) -> None:
        self.send("emit", name, doc)

    def finished(self, summary: RunSummary) -> None:
        self.send("finished", _summary_message(summary))


class _Quality:
    """Stands in for the parent's QualitySignals: what is published goes up the pipe."""

    def __init__(self, results: _Results) -> None:
        self._results = results

    def publish(self, details: Mapping[str, Any], *, step: int, **n2i: Any) -> None:
        self._results.send("quality", dict(details), int(step), n2i)


def _child(kind: str, to_child: int, from_child: int) -> int:  # pragma: no cover - the child
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a scan stops
    inbox = os.fdopen(to_child, "rb")
    results = _Results(from_child)
    init = _read(inbox)
    if kind not in _CHILDREN or not init or init[0] != "init":
        return 2
    settings = init[1]
    logging.basicConfig(
        level=settings["log_level"], format=f"bluesky-jit {kind}: %(levelname)s %(message)s"
    )
    os.nice(settings["nice"])
    if settings.get("leave_cores", True):
        leave_cores_to_the_scan()
    try:
        callback, control, flush, end = _CHILDREN[kind](settings, results)
    except BlueskyJitError as error:  # settings this machine cannot run: the parent raises it
        results.send("refused", str(error))
        return 2

    def reply(token: int, timeout: float | None) -> None:
        results.send("flushed", token, *flush(timeout))

    results.send("ready")
    while (message := _read(inbox)) is not None:
        if message[0] == "doc":
            callback(message[1], message[2])
        elif message[0] == "flush":  # answered on a thread: documents keep coming meanwhile
            threading.Thread(target=reply, args=message[1:3], daemon=True).start()
        elif message[0] == "call" and control is not None:
            control(message[1], message[2])
    end()
    return 0


def _jit_child(settings: dict[str, Any], results: _Results) -> tuple:  # pragma: no cover
    from .callbacks import JitCallback
    from .pairs import SamplingRegion

    jit = JitCallback(
        config=JitConfig.from_dict(settings["config"]),
        emit=results.emit if settings["emit"] else None,
        directory=settings["directory"],
        geometry_overrides=settings["geometry_overrides"],
        root_map=settings["root_map"],
        on_run_finished=results.finished,
        keep_summaries=settings["keep_summaries"],
        quality=_Quality(results) if settings["quality"] else None,
    )
    stop = threading.Event()

    sent: dict[str, int] = {}  # run -> metric rows the parent has

    def report_progress() -> None:
        while not stop.wait(0.5):
            running = jit.progress()
            messages = [_summary_message(s, sent.get(s.raw_uid, 0)) for s in running]
            sent.clear()
            sent.update((s.raw_uid, len(s.metrics)) for s in running)
            results.send("progress", messages)

    def control(method: str, kwargs: dict[str, Any]) -> None:
        if method not in _CONTROL:
            return
        if kwargs.get("vertical"):
            kwargs["vertical"] = {
                int(k): Slice(**v) if isinstance(v, dict) else v
                for k, v in kwargs["vertical"].items()
            }
        if isinstance(kwargs.get("region"), dict):
            region = kwargs["region"]
            region["mask"] = None if region["mask"] is None else np.asarray(region["mask"])
            kwargs["region"] = SamplingRegion(**region)
        getattr(jit, method)(**kwargs)

    def end() -> None:
        jit.close()
        stop.set()

    threading.Thread(target=report_progress, daemon=True).start()
    return jit, control, lambda timeout: (jit.flush(timeout),), end


def _writer_child(settings: dict[str, Any], results: _Results) -> tuple:  # pragma: no cover
    writer = CatalogWriter(
        connect(settings["uri"], api_key=settings["api_key"]),
        spool_dir=settings["spool_dir"],
        batch_size=settings["batch_size"],
        max_spool_bytes=settings["max_spool_bytes"],
    )

    def flush(timeout: float | None) -> tuple:
        ok = writer.flush(timeout)
        return ok, writer.stats.to_dict()

    return writer, None, flush, lambda: writer.close(timeout=None)


_CHILDREN: dict[str, Callable[[dict[str, Any], _Results], tuple]] = {
    "jit": _jit_child,
    "writer": _writer_child,
}
"""Child kind -> builder of (callback, control, flush, end) from the init settings."""


if __name__ == "__main__":  # pragma: no cover - the child's entry point
    sys.exit(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
