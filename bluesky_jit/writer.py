"""Documents into Tiled off the RunEngine's thread, through a spool that survives outages.

:class:`CatalogWriter` is the callback to subscribe (``RE.subscribe(writer)``,
or a ``JitCallback``'s ``emit``). On the caller's thread it only puts the
document on a queue (about a microsecond). Two threads do the rest:

1. the **spool thread** appends each document to ``<spool_dir>/<run uid>.jsonl``
   (JSON lines; arrays as base64 with dtype and shape; never pickle) and hands
   it on;
2. the **sender thread** feeds it to a ``bluesky_tiled_plugins.TiledWriter``
   of that run, which batches events and stream datums (``batch_size``).

When a write fails because the catalog is unreachable or answers a server
error, the run is marked *pending*: its documents keep going to the spool,
nothing reaches the caller, and the sender checks the catalog with a backoff
(0.5 s doubling up to ``retry_max_s``). When the catalog answers again, any
partial copy of the run is deleted from the catalog and the run is written
again from its spool file, in order, so each document is in the catalog exactly
once (idempotent on the run's uid). A run's spool file is deleted once its stop
document is written; files left by a process that died are written back by
the next :class:`CatalogWriter` on the same spool directory (or
``bluesky-jit spool``). A file lock keeps two processes off one run.

The spool is bounded (``max_spool_bytes``); documents that would exceed it are
counted as lost and logged, never silently dropped.
"""

from __future__ import annotations

import base64
import collections
import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from .errors import CatalogError

logger = logging.getLogger(__name__)

__all__ = [
    "CatalogWriter",
    "WriterStats",
    "decode_line",
    "encode_line",
    "flush_spool",
    "read_spool",
]

DEFAULT_SPOOL_DIR: Final = Path("bluesky_jit_data") / "spool"
SUFFIX: Final = ".jsonl"
FAILED_SUFFIX: Final = ".failed.jsonl"
_STOP: Final = object()
POLL_S: Final = 0.01
"""How often the spool thread looks for new documents when it has none."""
_PERMANENT_TRIES: Final = 3
"""Writes failing for another reason than the catalog being away are tried this often."""


@dataclass
class WriterStats:
    """What a :class:`CatalogWriter` did so far (all counts are documents unless named runs)."""

    received: int = 0
    spooled: int = 0
    written: int = 0
    written_back: int = 0
    """Documents written from the spool after an outage or by a later process."""
    lost: int = 0
    """Documents refused because the spool was full or the run could not be found."""
    runs_written: int = 0
    runs_pending: int = 0
    runs_written_back: int = 0
    runs_recovered: int = 0
    """Runs left in the spool by an earlier process, found at start."""
    runs_failed: int = 0
    outages: int = 0
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class _Run:
    uid: str
    path: Path
    handle: Any = None
    """Append handle of the spool file; holds the run's file lock while open."""
    spooled: int = 0
    fed: int = 0
    """Documents fed to ``writer`` (the first ``fed`` lines of the spool file)."""
    writer: Any = None
    pending: bool = False
    stopped: bool = False
    recovered: bool = False
    created: bool = False
    """Its start was sent: a copy in the catalog is ours to replace."""
    failed: bool = False
    tries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class CatalogWriter:
    """A document callback that writes runs into a Tiled container from threads of its own.

    Parameters
    ----------
    container : CatalogOfBlueskyRuns
        From :func:`bluesky_jit.catalog.runs_container`; each run becomes a
        child keyed by its uid.
    spool_dir : path, optional
        Where documents are spooled (one JSON-lines file per run). Default
        ``bluesky_jit_data/spool/<container name>``. Use a directory on a
        local disk that this process alone writes to.
    batch_size : int
        Events and stream-datum frames TiledWriter gathers per request.
        Rows reach the catalog in batches of this size, and at each stop.
    max_spool_bytes : int
        Upper bound of the spool directory's size.
    retry_max_s : float
        Longest wait between two checks of an unreachable catalog.

    Examples
    --------
    >>> raw = CatalogWriter(runs_container(client, "raw"), spool_dir="data/spool/raw")
    >>> RE.subscribe(raw)
    >>> RE(plan())
    >>> raw.flush(timeout=60)      # everything received is in the catalog
    True
    """

    def __init__(
        self,
        container: Any,
        *,
        spool_dir: str | Path | None = None,
        batch_size: int = 50,
        max_spool_bytes: int = 2 * 1024**3,
        retry_max_s: float = 10.0,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise CatalogError(
                f"CatalogWriter batch_size must be a positive integer; got {batch_size!r}."
            )
        if not isinstance(max_spool_bytes, int) or max_spool_bytes < 1:
            raise CatalogError(
                "CatalogWriter max_spool_bytes must be a positive integer (bytes); got "
                f"{max_spool_bytes!r}."
            )
        self.container = container
        name = str(getattr(container, "item", {}).get("id", "runs"))
        self.spool_dir = Path(spool_dir) if spool_dir is not None else DEFAULT_SPOOL_DIR / name
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CatalogError(
                f"Cannot create the spool directory {self.spool_dir}: {error}. Pass "
                "spool_dir= a directory this process may write."
            ) from error
        self.batch_size = batch_size
        self.max_spool_bytes = max_spool_bytes
        self.retry_max_s = float(retry_max_s)
        self.stats = WriterStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._runs: dict[str, _Run] = {}
        self._owner: dict[str, str] = {}
        """descriptor / resource / stream_resource uid -> run uid."""
        self._open: list[str] = []
        self._spool_bytes = _directory_size(self.spool_dir)
        self._settled = 0
        self._idle = threading.Condition()
        self._written: collections.deque[str] = collections.deque(maxlen=1000)
        """Uids of the runs written lately (for :meth:`when_written`)."""
        self._waiting: dict[str, list[Any]] = {}
        self._retry_at = 0.0
        self._retry_wait = 0.5
        self._closed = False
        self._adopt_leftovers()  # runs an earlier process left in spool_dir
        self._spooler = threading.Thread(target=self._spool_loop, name="bluesky-jit-spool")
        self._sender = threading.Thread(target=self._send_loop, name="bluesky-jit-writer")
        self._spooler.daemon = self._sender.daemon = True
        self._spooler.start()
        self._sender.start()

    # -- the caller's thread: never blocks, never raises ---------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        if self._closed:
            logger.error("CatalogWriter is closed; a %r document was not written", name)
            return
        self.stats.received += 1
        self._inbox.put((name, doc))

    # -- control ---------------------------------------------------------------------------
    @property
    def pending_runs(self) -> list[str]:
        """Uids of runs waiting in the spool for the catalog."""
        return [run.uid for run in list(self._runs.values()) if run.pending]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document received so far is written.

        Written means: handed to the run's ``TiledWriter`` without error. For a
        run that has stopped, that is everything in the catalog; a run still
        open may have up to ``batch_size`` events held back for its next
        request (they go at the latest with its stop).

        Returns
        -------
        bool
            True when everything is written; False at ``timeout`` (runs may be
            waiting in the spool for the catalog: see :attr:`pending_runs`).
        """
        return self._wait(self._done, timeout, 0.1)

    def when_written(self, uid: str, callback: Any) -> None:
        """Call ``callback()`` once run ``uid``'s stop document is in the catalog.

        On the writer's thread (or at once, here, if it is already written).
        A run that never reaches the catalog (it stays in the spool, or fails)
        never calls it.
        """
        with self._idle:
            if uid in self._written:
                done = True
            else:
                self._waiting.setdefault(uid, []).append(callback)
                done = False
        if done:
            callback()

    def wait_spooled(self, timeout: float | None = None) -> bool:
        """Wait until every document received so far is on disk in the spool (durable);
        False at ``timeout``. Cheaper than :meth:`flush`: the catalog may be away."""
        target = self.stats.received
        return self._wait(lambda: self.stats.spooled + self.stats.lost >= target, timeout, 0.05)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush (up to ``timeout``), then stop the threads. Safe to call twice.

        Runs still pending stay in the spool and are written back by the next
        writer on the same directory. Returns what :meth:`flush` returned.
        """
        if self._closed:
            return not self.pending_runs
        flushed = self.flush(timeout)
        self._closed = True
        self._inbox.put(_STOP)
        self._spooler.join(5.0)
        self._sender.join(5.0)
        for run in list(self._runs.values()):
            if run.pending or not run.stopped:
                logger.warning(
                    "Run %s stays in the spool (%s, %d documents): it is written back by the "
                    "next writer on %s or by `bluesky-jit spool`.",
                    run.uid,
                    "catalog unreachable" if run.pending else "no stop document yet",
                    run.spooled,
                    self.spool_dir,
                )
            _close_handle(run)
        return flushed

    def __enter__(self) -> CatalogWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _wait(self, done: Any, timeout: float | None, poll: float) -> bool:
        """Wait until ``done()`` (checked at least every ``poll`` s); False at ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while not done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(poll if left is None else min(left, poll))
        return True

    def _done(self) -> bool:
        busy = self._settled < self.stats.received
        return not busy and not any(run.pending for run in list(self._runs.values()))

    # -- spool thread ------------------------------------------------------------------------
    def _spool_loop(self) -> None:
        # Polls instead of blocking in get(): a put() on the caller's thread then never
        # has a thread to wake, so it costs the RunEngine nothing but an append.
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                time.sleep(POLL_S)
                continue
            if item is _STOP:
                self._outbox.put(_STOP)
                return
            name, doc = item
            try:
                run, seq = self._spool(name, doc)
            except Exception as error:  # noqa: BLE001 - counted, logged, never raised
                self.stats.lost += 1
                self.stats.last_error = f"spool: {error}"
                logger.error("Document %r was not spooled and is lost: %s", name, error)
                self._settle()
                continue
            self._outbox.put((run, seq, name, doc))

    def _spool(self, name: str, doc: dict) -> tuple[_Run, int]:
        uid = self._route(name, doc)
        if name == "start":
            run = self._runs.get(uid) or self._new_run(uid)
        else:
            run = self._runs.get(uid)
            if run is None:
                raise CatalogError(
                    f"a {name!r} document of run {uid!r}, whose start this writer never "
                    "received; subscribe the writer before the run starts"
                )
        line = encode_line(name, doc)
        if self._spool_bytes + len(line) > self.max_spool_bytes:
            raise CatalogError(
                f"the spool {self.spool_dir} is full ({self._spool_bytes} of "
                f"{self.max_spool_bytes} bytes); free disk space or raise max_spool_bytes"
            )
        with run.lock:
            run.handle.write(line)
            run.handle.flush()
            if name == "stop":
                os.fsync(run.handle.fileno())
                run.stopped = True
            seq = run.spooled
            run.spooled += 1
        self._spool_bytes += len(line)
        self.stats.spooled += 1
        return run, seq

    def _route(self, name: str, doc: dict) -> str:
        """The uid of the run a document belongs to (as event_model's RunRouter finds it)."""
        if name == "start":
            self._open.append(doc["uid"])
            return doc["uid"]
        if name == "stop":
            uid = doc["run_start"]
            self._open = [u for u in self._open if u != uid]
            self._owner = {k: v for k, v in self._owner.items() if v != uid}
            return uid
        owner = doc.get("run_start")
        if owner is None:
            link = {
                "event": "descriptor",
                "event_page": "descriptor",
                "stream_datum": "descriptor",
                "datum": "resource",
                "datum_page": "resource",
            }.get(name)
            owner = self._owner.get(doc.get(link, "")) if link else None
            if owner is None and name == "stream_datum":
                owner = self._owner.get(doc.get("stream_resource", ""))
            if owner is None and len(self._open) == 1:
                owner = self._open[0]
        if owner is None:
            raise CatalogError(f"cannot tell which run a {name!r} document belongs to")
        if name in ("descriptor", "resource", "stream_resource"):
            self._owner[doc["uid"]] = owner
        return owner

    def _new_run(self, uid: str) -> _Run:
        path = self.spool_dir / f"{uid}{SUFFIX}"
        run = _Run(uid=uid, path=path)
        run.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed at the run's end
        fcntl.flock(run.handle.fileno(), fcntl.LOCK_EX)
        self._runs[uid] = run
        return run

    # -- sender thread -----------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            waiting = [run for run in list(self._runs.values()) if run.pending]
            timeout = None
            if waiting:
                timeout = max(0.0, self._retry_at - time.monotonic())
            try:
                item = self._outbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None:
                self._send(*item)
            if waiting and time.monotonic() >= self._retry_at:
                self._write_back(waiting)
            with self._idle:
                self._idle.notify_all()

    def _send(self, run: _Run, seq: int, name: str, doc: dict) -> None:
        try:
            if run.failed:
                if name == "stop":
                    self._forget(run)
                return
            if run.pending or seq < run.fed:
                return  # in the spool, written back later / already written back
            if run.writer is None:
                run.writer = self._tiled_writer()
            run.created = run.created or name == "start"
            run.writer(name, doc)
            run.fed = seq + 1
            self.stats.written += 1
            if name == "stop":
                self._finish(run)
        except Exception as error:  # noqa: BLE001 - spooled; written back later
            self._failed(run, error)
        finally:
            self._settle()

    def _write_back(self, runs: list[_Run]) -> None:
        if not self._reachable():
            self._backoff()
            return
        for run in runs:
            try:
                if run.uid in self.container:
                    if not (run.created or run.recovered):
                        raise CatalogError(
                            f"a run with uid {run.uid} is already in {self.container.uri}, "
                            "written by someone else; this writer does not replace it"
                        )
                    # A partial copy from before the outage: written again whole, so every
                    # document is there exactly once. Detector files are not touched.
                    self.container.delete_contents(run.uid, recursive=True, external_only=False)
                run.created = True
                writer = self._tiled_writer()
                count = 0
                for name, doc in read_spool(run.path):
                    writer(name, doc)
                    count += 1
                with run.lock:
                    run.writer, run.fed, run.pending = writer, count, False
                    spooled_all = run.spooled == count or run.recovered
                self.stats.written_back += count
                self.stats.runs_pending -= 1
                logger.warning(
                    "The catalog is back: run %s written from the spool (%d documents).",
                    run.uid,
                    count,
                )
                if run.stopped and spooled_all:
                    self.stats.runs_written_back += 1
                    self._finish(run)
            except Exception as error:  # noqa: BLE001
                self._failed(run, error)
                return
        self._retry_wait = 0.5

    def _failed(self, run: _Run, error: Exception) -> None:
        """A write failed: keep the run in the spool and retry it later (or give up)."""
        outage = _is_outage(error)
        run.tries += 0 if outage else 1
        self.stats.last_error = f"{type(error).__name__}: {error}"
        if not outage and run.tries >= _PERMANENT_TRIES:
            self.stats.runs_failed += 1
            if run.pending:
                run.pending = False
                self.stats.runs_pending -= 1
            failed = run.path.with_name(f"{run.uid}{FAILED_SUFFIX}")
            logger.error(
                "Run %s could not be written to the catalog (%s). Its documents are kept in "
                "%s; fix the cause and write them with `bluesky-jit spool`.",
                run.uid,
                self.stats.last_error,
                failed,
            )
            if run.path.exists():
                run.path.rename(failed)  # the open handle follows: later documents go there too
            run.path, run.failed, run.writer = failed, True, None
            if run.stopped:
                self._forget(run)
            return
        if not run.pending:
            run.pending = True
            self.stats.runs_pending += 1
            self.stats.outages += 1
            logger.warning(
                "Cannot write run %s to the catalog (%s); its documents go to the spool %s and "
                "are written when the catalog answers again.",
                run.uid,
                self.stats.last_error,
                run.path,
            )
        run.writer = None
        self._backoff()

    def _finish(self, run: _Run) -> None:
        """The stop document is in the catalog: the spool file is no longer needed."""
        self.stats.runs_written += 1
        with self._idle:
            self._written.append(run.uid)
            callbacks = self._waiting.pop(run.uid, [])
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - the writer goes on
                logger.exception("A callback waiting for run %s raised", run.uid)
        try:
            size = run.path.stat().st_size
            run.path.unlink()
            self._spool_bytes -= size
        except OSError:
            pass
        self._forget(run)

    def _forget(self, run: _Run) -> None:
        _close_handle(run)
        self._runs.pop(run.uid, None)

    def _backoff(self) -> None:
        self._retry_at = time.monotonic() + self._retry_wait
        self._retry_wait = min(2 * self._retry_wait, self.retry_max_s)

    def _settle(self) -> None:
        with self._idle:
            self._settled += 1
            self._idle.notify_all()

    def _tiled_writer(self) -> Any:
        from bluesky_tiled_plugins import TiledWriter

        return TiledWriter(self.container, batch_size=self.batch_size)

    def _reachable(self) -> bool:
        """Whether the catalog answers now (one request, no retries)."""
        try:
            response = self.container.context.http_client.get(self.container.uri, timeout=2.0)
        except Exception:  # noqa: BLE001
            return False
        return response.status_code < 500

    def _adopt_leftovers(self) -> None:
        """Runs an earlier process left in the spool: written back like an outage's."""
        for path in sorted(self.spool_dir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
            if path.name.endswith(FAILED_SUFFIX) or path.stem in self._runs:
                continue
            handle = _try_lock(path)
            if handle is None:
                continue  # another live writer holds it
            stopped = any(name == "stop" for name, _ in read_spool(path))
            run = _Run(uid=path.stem, path=path, handle=handle, pending=True)
            run.stopped = True  # nothing more will come for it: write it and let it go
            run.recovered = True
            self._runs[run.uid] = run
            self.stats.runs_recovered += 1
            self.stats.runs_pending += 1
            logger.warning(
                "Found run %s in the spool %s, left by an earlier process%s; writing it back.",
                run.uid,
                self.spool_dir,
                "" if stopped else " without a stop document (the run was cut short)",
            )


# ------------------------------------------------------------------------------ spool files
def encode_line(name: str, doc: dict) -> str:
    """One spool line: ``{"name": ..., "doc": ...}``; arrays keep their dtype and shape."""
    return json.dumps({"name": name, "doc": doc}, default=_encode, separators=(",", ":")) + "\n"


def decode_line(line: str) -> tuple[str, dict]:
    """Inverse of :func:`encode_line`."""
    item = json.loads(line, object_hook=_decode)
    return item["name"], item["doc"]


def read_spool(path: str | Path) -> Iterator[tuple[str, dict]]:
    """The complete documents of a spool file, in order (a torn last line is skipped)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                logger.warning("Skipping a torn last line in %s", path)
                return
            yield decode_line(line)


def flush_spool(
    container: Any, spool_dir: str | Path, *, timeout: float | None = None
) -> WriterStats:
    """Write back the runs left in ``spool_dir``; return what was done.

    Raises
    ------
    CatalogError
        Runs are still waiting after ``timeout`` seconds (the catalog is away).
    """
    writer = CatalogWriter(container, spool_dir=spool_dir)
    if not writer.close(timeout):
        raise CatalogError(
            f"{len(writer.pending_runs)} run(s) are still in the spool {spool_dir}: the catalog "
            f"did not take them within {timeout} s ({writer.stats.last_error}). Check that it "
            "is up and try again."
        )
    return writer.stats


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return {
            "__ndarray__": base64.b64encode(data.tobytes()).decode("ascii"),
            "dtype": data.dtype.str,
            "shape": list(data.shape),
        }
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot spool a {type(value).__name__} value")


def _decode(obj: dict) -> Any:
    if "__ndarray__" in obj and "dtype" in obj and len(obj) == 3:
        raw = base64.b64decode(obj["__ndarray__"])
        return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    return obj


def _try_lock(path: Path) -> Any:
    """Open ``path`` for appending with an exclusive lock, or None if another process holds it."""
    try:
        handle = open(path, "a", encoding="utf-8")  # noqa: SIM115
    except OSError:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The owner may have finished and deleted the file between our open and lock.
        if os.fstat(handle.fileno()).st_ino != os.stat(path).st_ino:
            raise OSError("replaced")
    except OSError:
        handle.close()
        return None
    return handle


def _close_handle(run: _Run) -> None:
    with run.lock:
        if run.handle is not None:
            run.handle.close()
            run.handle = None


def _is_outage(error: BaseException) -> bool:
    """Whether a failed write means "the catalog is away" (retry) rather than a bad document."""
    import httpx

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError)):
            return True
        if isinstance(error, httpx.HTTPStatusError):
            code = error.response.status_code
            return code >= 500 or code == 429
        error = error.__cause__ or error.__context__
    return False


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*") if p.is_file())
