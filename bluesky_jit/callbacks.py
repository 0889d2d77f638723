"""Wiring: the callback you subscribe to the RunEngine.

``RE.subscribe(JitCallback(...))`` is all a user writes. On the RunEngine's
thread the callback only puts ``(name, doc)`` on a queue and returns; one
worker thread takes documents off the queue and routes them per run (an
``event_model.RunRouter``) to a :class:`~bluesky_jit.ingest.TomoIngest`, which
feeds a :class:`RunPipeline`: streaming reconstruction, Noise2Inverse pairs,
the trainer (its own thread), inference with the newest weights, and the
derived run. Threads live here and nowhere else but in the trainer, the
catalog writer and the pace guard. Training yields to the scan beside it (its
thread at nice 19, pauses while frames wait, :class:`~bluesky_jit.budget.PaceGuard`).

Failure policy: the RunEngine never sees an exception from here, and its
thread spends microseconds per document here (a queue put; the worker polls,
so no thread is woken: ``benchmarks/overhead.py``). Frame documents beyond
``JitConfig.runtime.queue_size`` waiting are dropped (counted and reported in the
derived run); run boundaries, descriptors and
asset documents are never dropped. A run's problems are logged and recorded
in its derived run's stop document (``exit_status``, ``reason``). A document
the worker cannot route (not a dict, an unknown name, a required field missing
or of the wrong type, an event before its descriptor, a ``stream_datum`` naming
an unknown ``stream_resource``, a document of a run whose start never came or
that already stopped) is never dropped silently: it is a problem of its run
when the run can be told, else counted in :attr:`JitCallback.unroutable`, and
logged once per kind. A run with no document for ``JitConfig.runtime.run_timeout_s``,
and every run still open at :meth:`JitCallback.close`, is closed with an
``abort`` stop (:func:`abort_stop`).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import event_model

from .config import JitConfig
from .ingest import CalibrationStore, TomoIngest
from .memory import budget_bytes
from .pipeline import _KEEP, RunPipeline, RunSummary, _in_context

logger = logging.getLogger(__name__)

FRAME_DOCUMENTS = frozenset({"event", "event_page", "stream_datum"})
_NUMBER = (int, float)
REQUIRED_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "start": {"uid": str, "time": _NUMBER},
    "stop": {"uid": str, "run_start": str},
    "descriptor": {"uid": str, "run_start": str, "data_keys": dict},
    "event": {
        "uid": str, "descriptor": str, "seq_num": int, "time": _NUMBER,
        "data": dict, "timestamps": dict,
    },
    "event_page": {
        "uid": list, "descriptor": str, "seq_num": list, "time": list,
        "data": dict, "timestamps": dict,
    },
    "resource": {"uid": str},
    "datum": {"datum_id": str, "resource": str},
    "datum_page": {"datum_id": list, "resource": str},
    "stream_resource": {"uid": str, "run_start": str, "data_key": str, "uri": str},
    "stream_datum": {
        "uid": str, "stream_resource": str, "descriptor": str, "indices": dict, "seq_nums": dict,
    },
}  # fmt: skip
"""What the worker needs of each document to route it (event-model's names and types)."""
CLOSED_REASON = "the callback was closed before the run's stop document came"


def abort_stop(run_start: str, reason: str) -> dict[str, Any]:
    """A stop document that closes a run whose own stop never came (``abort``, ``reason``)."""
    return {
        "uid": str(uuid.uuid4()),
        "time": time.time(),
        "run_start": run_start,
        "exit_status": "abort",
        "reason": reason,
        "num_events": {},
    }


def is_tomography(start: Mapping[str, Any]) -> bool:
    """Whether a run's start document describes a tomography scan.

    True with a ``tomo`` block, or with the NSLS-II FXI keys ``num_angles``
    and ``num_bkg_images``; other runs are left alone.
    """
    return start.get("tomo") is not None or ("num_angles" in start and "num_bkg_images" in start)


def _warm_up() -> None:
    """Import the learning stage before the first run (torch.optim alone took 2 s here)."""
    try:
        import torch.optim  # noqa: F401

        from . import inference, pairs, process_trainer, training  # noqa: F401
        from .reconstruction import streaming  # noqa: F401
    except Exception:  # noqa: BLE001 - the run itself will report it
        logger.exception("bluesky_jit could not import its learning stage")


def _frames_in(name: str, doc: Mapping[str, Any]) -> int:
    """Frames (event rows, stream-datum indices) of one frame document; 1 if unclear."""
    try:
        if name == "event_page":
            return len(doc["seq_num"])
        if name == "stream_datum":
            return max(1, int(doc["seq_nums"]["stop"]) - int(doc["seq_nums"]["start"]))
    except (KeyError, TypeError, ValueError):
        pass
    return 1


_EARLY = "an event before its descriptor"
_CLOSING = object()  # on the queue: close the runs still open


def _a(name: Any) -> str:
    """``an 'event'``, ``a 'stop'``: the article and the quoted name."""
    return f"{'an' if str(name)[:1] in 'aeiou' else 'a'} {name!r}"


def _malformed(name: Any, doc: Any) -> str | None:
    """Why a document cannot be routed at all (not a dict, unknown name, fields), or None."""
    if not isinstance(doc, dict):
        return f"{_a(name)} message that is not a document ({type(doc).__name__})"
    fields = REQUIRED_FIELDS.get(name) if isinstance(name, str) else None
    if fields is None:
        return f"a document with the unknown name {name!r}"
    bad = [k for k, kind in fields.items() if not isinstance(doc.get(k), kind)]
    if bad:
        return f"{_a(name)} document without {', '.join(map(repr, bad))} (or of the wrong type)"
    return None


def _which_frames(name: str, doc: Any) -> str:
    """``event seq_num 12`` / ``stream_datum frames 10-19``: which frames a document held."""
    if not isinstance(doc, dict):
        return f"{_a(name)} document"
    if name == "stream_datum":
        indices = doc.get("indices") or {}
        return f"stream_datum frames {indices.get('start')}-{indices.get('stop')}"
    seq = doc.get("seq_num")
    if isinstance(seq, list):  # an event page (the router hands events on as pages)
        seq = seq[0] if len(seq) == 1 else f"{seq[0]}-{seq[-1]}" if seq else None
    return f"event seq_num {seq}"


class _Guard:
    """Feed one run's documents to its ingest; no exception escapes, the run always ends."""

    def __init__(self, ingest: TomoIngest, pipeline: RunPipeline, finished: Callable) -> None:
        self.ingest = ingest
        self.pipeline = pipeline
        self.finished = finished
        self.frame_errors = 0

    def __call__(self, name: str, doc: dict) -> None:
        try:
            self.ingest(name, doc)
        except Exception as error:  # noqa: BLE001 - recorded in the derived run
            if name in FRAME_DOCUMENTS:
                # one bad frame (a complex array, strings for angles, a MemoryError) costs
                # that frame only: say which, go on with the next
                self.frame_errors += 1
                if self.frame_errors <= 5:
                    logger.exception("bluesky_jit rejected %s", _which_frames(name, doc))
                self.pipeline.problem(_in_context(f"{_which_frames(name, doc)} rejected", error))
                return
            logger.exception("bluesky_jit failed on a %r document", name)
            self.ingest.dead = True
            self.pipeline.problem(_in_context(f"{_a(name)} document", error))
            if name == "stop":
                try:
                    self.pipeline.end(doc)
                except Exception:  # noqa: BLE001
                    logger.exception("bluesky_jit could not close the derived run")
        if name == "stop":
            self.finished(self.pipeline.summary)


class JitCallback:
    """Live just-in-time denoising of tomography runs: ``RE.subscribe(JitCallback(...))``.

    Parameters
    ----------
    config : JitConfig, optional
    emit : callable, optional
        Receives the derived runs' ``(name, doc)`` pairs, e.g. a
        ``bluesky_tiled_plugins.TiledWriter``. ``None`` computes without publishing.
    directory : path
        Where derived runs' HDF5 files are written.
    geometry_overrides : mapping, optional
        Geometry values that win over the start document.
    handler_registry : mapping, optional
        Extra Resource spec -> handler classes (``AD_HDF5`` is built in).
    root_map : mapping, optional
        Rewrites detector file paths (``{old_root: new_root}``).
    on_run_finished : callable, optional
        Called on the worker thread with each run's :class:`RunSummary`.
    keep_summaries : int
        How many recent :class:`RunSummary` objects :attr:`summaries` keeps.
    quality : bluesky_jit.steering.QualitySignals, optional
        Ophyd signals that get alpha and the noise estimates after every
        metric row, for plans that stop or adapt a scan
        (:func:`bluesky_jit.steering.until_quality`).
    run_engine_here : bool
        The documents come from a RunEngine in this process, whose pace
        training must not take (``JitConfig.runtime.pace_guard``). False for replays
        and listeners, where nothing runs beside the callback.

    Notes
    -----
    Runs without a ``tomo`` start-document block (nor the FXI keys
    ``num_angles`` and ``num_bkg_images``) are not tomography scans and are
    ignored. Call :meth:`flush` to wait until every document received so far is
    processed, and :meth:`close` at the end.
    """

    def __init__(
        self,
        *,
        config: JitConfig | None = None,
        emit: Callable[[str, dict], None] | None = None,
        directory: str | Path = "bluesky_jit_data/derived",
        geometry_overrides: Mapping[str, Any] | None = None,
        handler_registry: Mapping[str, Any] | None = None,
        root_map: Mapping[str, str] | None = None,
        on_run_finished: Callable[[RunSummary], None] | None = None,
        keep_summaries: int = 20,
        quality: Any = None,
        run_engine_here: bool = True,
    ) -> None:
        self.quality = quality
        self.run_engine_here = run_engine_here
        self.config = config or JitConfig()
        self.config.check_here()  # before any scan: a device or a checkpoint not here is refused
        self.emit = emit
        self.directory = Path(directory)
        self.geometry_overrides = dict(geometry_overrides or {})
        self.handler_registry = dict(handler_registry or {})
        self.root_map = dict(root_map or {})
        self.on_run_finished = on_run_finished
        self.calibrations = CalibrationStore()
        self.summaries: collections.deque[RunSummary] = collections.deque(maxlen=keep_summaries)
        """The most recent runs' summaries (a listener runs for hours: old ones go)."""
        self.pipelines: dict[str, RunPipeline] = {}
        self._router = event_model.RunRouter([self._factory], handler_registry={})
        self._queue: queue.Queue = queue.Queue()
        self._frames_waiting = 0
        self._behind = [0, 0]  # frames waiting: in events (rows), in stream datums
        self._arrivals = (collections.deque(maxlen=2048), collections.deque(maxlen=2048))
        """When frame documents reached the RunEngine's thread (for the PaceGuard)."""
        self._count_lock = threading.Lock()
        self._run_of_descriptor: dict[str, str] = {}
        self._dropped: collections.Counter[str] = collections.Counter()
        self._duplicates: collections.Counter[str] = collections.Counter()
        self._seen: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self._run_of_descriptor_seen: dict[str, str] = {}
        self.unroutable: collections.Counter[str] = collections.Counter()
        """Documents that could not be routed and whose run could not be told, by reason."""
        self._open: dict[str, float] = {}  # runs started, not stopped -> time of last document
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._run_of_ref: dict[str, str | None] = {}  # descriptor / (stream) resource -> run
        self._early: dict[str, collections.Counter[str]] = {}  # descriptor -> reasons -> count
        self._kinds_logged: set[str] = set()
        self._next_timeout_check = 0.0
        self._worker = threading.Thread(target=self._work, name="bluesky-jit-worker", daemon=True)
        self._closed = False
        self._worker.start()

    # -- RunEngine side: never blocks, never raises -------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        try:
            if self._closed:
                return
            if not isinstance(doc, dict):  # the worker counts it
                self._queue.put_nowait((name, doc))
                return
            if name == "descriptor":
                self._run_of_descriptor[doc.get("uid")] = doc.get("run_start")
            elif name == "stop":
                run = doc.get("run_start")
                for uid in [d for d, r in self._run_of_descriptor.items() if r == run]:
                    del self._run_of_descriptor[uid]
            if name in FRAME_DOCUMENTS:
                with self._count_lock:
                    if self._frames_waiting >= self.config.runtime.queue_size:
                        run = self._run_of_descriptor.get(str(doc.get("descriptor")), "")
                        self._dropped[run] += 1
                        return
                    self._frames_waiting += 1
                    self._behind[name == "stream_datum"] += _frames_in(name, doc)
                self._arrivals[name == "stream_datum"].append(time.monotonic())
            self._queue.put_nowait((name, doc))
        except Exception:  # noqa: BLE001 - the RunEngine must not see our failures
            logger.exception("bluesky_jit could not queue a %r document", name)

    def _frames_behind(self) -> int:
        """Frames queued and not yet taken by the worker (two reads, no lock).

        Counted in event rows and in stream-datum frames: ophyd-async step
        scans send both for one frame, ophyd v1 only events, fly scans only
        stream datums, so the larger of the two is the frames waiting.
        """
        return max(self._behind)

    # -- worker side -----------------------------------------------------------------
    def _work(self) -> None:
        _warm_up()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                # Polled, not a blocking get(): the RunEngine's put() then has no thread
                # to wake, which would cost it a context switch on a busy machine.
                self._close_silent_runs()
                time.sleep(0.005)
                continue
            try:
                if item is None:
                    return
                name, doc = item
                if name is _CLOSING:
                    for run in list(self._open):
                        self._abort(run, CLOSED_REASON)
                    continue
                if name in FRAME_DOCUMENTS and isinstance(doc, dict):
                    with self._count_lock:
                        self._frames_waiting -= 1
                        self._behind[name == "stream_datum"] -= _frames_in(name, doc)
                self._take(name, doc)
            except Exception as error:  # noqa: BLE001 - counted, never lost
                logger.exception("bluesky_jit worker failed on a document")
                self.unroutable[f"the worker failed: {type(error).__name__}"] += 1
            finally:
                self._queue.task_done()

    def _take(self, name: str, doc: Any) -> None:
        """Route one document, or count why not (on its run if it can be told)."""
        why = _malformed(name, doc)
        if why is not None:
            self._unroutable(self._run_hint(doc), why, doc=doc)
            return
        if self._duplicate(name, doc):
            return
        run, why = self._run_of(name, doc)
        if why is not None:
            self._unroutable(run, why, doc=doc)
            return
        if run is not None:
            self._open[run] = time.monotonic()
        try:
            self._router(name, doc)
        except Exception as error:  # noqa: BLE001 - a problem of its run
            logger.debug("bluesky_jit could not route a %r document", name, exc_info=True)
            self._unroutable(run, f"{_a(name)} document could not be routed", error)
        if name == "descriptor":
            # counted on the callback until the run could be told: move them to the run
            for early, n in self._early.pop(doc["uid"], {}).items():
                self._uncount(early, n)
                for _ in range(n):  # the reason says "(xN)"
                    self._unroutable(run, early, log=False)
        elif name == "stop":
            self._open.pop(run, None)
            self._ended[run] = None
            while len(self._ended) > 10_000:
                self._ended.popitem(last=False)

    def _run_hint(self, doc: Any) -> str | None:
        """The run a document belongs to, if it says (``run_start``) or refers to a known one."""
        if not isinstance(doc, dict):
            return None
        if isinstance(doc.get("run_start"), str):
            return doc["run_start"]
        for key in ("descriptor", "stream_resource", "resource"):
            ref = doc.get(key)
            if isinstance(ref, str) and self._run_of_ref.get(ref):
                return self._run_of_ref[ref]
        return None

    def _run_of(self, name: str, doc: dict) -> tuple[str | None, str | None]:
        """``(run, None)`` for a document that can be routed, else ``(run or None, why)``."""
        if name == "start":
            return doc["uid"], None
        run = self._run_hint(doc)
        if name in ("event", "event_page") and doc["descriptor"] not in self._run_of_ref:
            return None, _EARLY
        if name == "stream_datum" and doc["stream_resource"] not in self._run_of_ref:
            return run, "a stream_datum naming an unknown stream_resource"
        if name in ("datum", "datum_page") and doc["resource"] not in self._run_of_ref:
            return run, f"{_a(name)} naming an unknown resource"
        if name == "resource" and run is None:
            self._run_of_ref[doc["uid"]] = None  # old style: the router fans it out
            return None, None
        if run is None:
            return None, f"{_a(name)} document of a run whose start never came"
        if run not in self._open:
            if run in self._ended:
                return run, f"{_a(name)} document after its run's stop"
            return run, f"{_a(name)} document of a run whose start never came"
        if name in ("descriptor", "resource", "stream_resource"):
            if len(self._run_of_ref) > 100_000:  # hours of runs: forget them all
                self._run_of_ref.clear()
            self._run_of_ref[doc["uid"]] = run
        return run, None

    def _unroutable(
        self,
        run: str | None,
        why: str,
        error: Exception | None = None,
        *,
        log: bool = True,
        doc: Any = None,
    ) -> None:
        """A document not processed: a problem of its run if open here, else counted here
        (and, if it names a descriptor still to come, moved to that run when it comes)."""
        descriptor = doc.get("descriptor") if isinstance(doc, dict) else None
        if run is None and isinstance(descriptor, str):
            if len(self._early) > 10_000:  # descriptors that never come: forget them
                self._early.clear()
            self._early.setdefault(descriptor, collections.Counter())[why] += 1
        pipeline = self.pipelines.get(run) if run is not None and run in self._open else None
        message = why if error is None else _in_context(why, error)
        if pipeline is not None:
            pipeline.problem(RuntimeError(f"{message}: not processed"))
        elif run is None or run not in self._open:
            self.unroutable[why] += 1
        if log and why not in self._kinds_logged:  # once per kind: a stream can repeat it
            self._kinds_logged.add(why)
            logger.warning("bluesky_jit could not process %s (run %s)", message, run or "unknown")

    def _uncount(self, why: str, n: int) -> None:
        self.unroutable[why] -= n
        if self.unroutable[why] <= 0:
            del self.unroutable[why]

    def _close_silent_runs(self) -> None:
        """Abort runs with no document for ``run_timeout_s`` (checked once a second)."""
        timeout = self.config.runtime.run_timeout_s
        now = time.monotonic()
        if timeout is None or now < self._next_timeout_check:
            return
        self._next_timeout_check = now + min(1.0, timeout / 4)
        for run, last in list(self._open.items()):
            if now - last > timeout:
                self._abort(run, f"no document came for {timeout:g} s (run_timeout_s)")

    def _abort(self, run: str, reason: str) -> None:
        """Close an open run whose stop never came: an ``abort`` stop through the router."""
        logger.warning("bluesky_jit closes run %s: %s", run, reason)
        self._take("stop", abort_stop(run, reason))

    def _duplicate(self, name: str, doc: Any) -> bool:
        """Whether this document came before (same uid): then it is counted and ignored.

        A bus that delivers twice (a replayed Kafka partition, a doubled
        subscription) would otherwise feed every frame twice.
        """
        if not isinstance(doc, dict):
            return False
        key = doc.get("uid", doc.get("datum_id"))
        if isinstance(key, list):  # a page: a duplicate only if all of it came before
            key = tuple(key) if key else None
        if not isinstance(key, (str, tuple)):
            return False
        if name == "descriptor":
            self._run_of_descriptor_seen[doc["uid"]] = doc.get("run_start", "")
        if (name, key) not in self._seen:
            self._seen[(name, key)] = None
            if len(self._seen) > 100_000:  # hours of runs: forget the oldest
                self._seen.popitem(last=False)
            return False
        run = doc.get("run_start") or self._run_of_descriptor_seen.get(doc.get("descriptor", ""))
        run = doc["uid"] if name == "start" else run
        if name != "stop":  # a second stop comes after its run's summary: only logged
            self._duplicates[run or ""] += 1
        if name == "stop" or self._duplicates[run or ""] == 1:
            logger.warning("bluesky_jit ignores a second %r document with uid %s", name, key)
        return True

    def _factory(self, name: str, start: dict) -> tuple[list, list]:
        if not is_tomography(start):
            logger.info(
                "Run %s is not a tomography scan (no 'tomo' block in its start document); "
                "bluesky_jit ignores it.",
                start.get("uid"),
            )
            return [], []
        uid = start["uid"]
        pipeline = RunPipeline(
            config=self.config,
            emit=self.emit,
            directory=self.directory,
            dropped=lambda: self._dropped.pop(uid, 0),
            duplicates=lambda: self._duplicates.pop(uid, 0),
            quality=self.quality,
            backlog=self._frames_behind,
            arrivals=self._arrivals,
            beside_scan=self.run_engine_here,
        )
        ingest = TomoIngest(
            pipeline,
            calibrations=self.calibrations,
            geometry_overrides=self.geometry_overrides,
            handler_registry=self.handler_registry,
            root_map=self.root_map,
            memory_budget=budget_bytes(self.config.runtime.memory_budget_gb),
        )
        self.pipelines[uid] = pipeline
        return [_Guard(ingest, pipeline, self._finished)], []

    def _finished(self, summary: RunSummary | None) -> None:
        if summary is None:
            return
        self.pipelines.pop(summary.raw_uid, None)
        self.summaries.append(summary)
        level = logging.INFO if summary.exit_status == "success" else logging.WARNING
        logger.log(
            level,
            "bluesky_jit finished run %s -> derived run %s (%s%s): %d projections, %d slices, "
            "%d training steps, alpha %.3f",
            summary.raw_uid,
            summary.derived_uid,
            summary.exit_status,
            f": {summary.reason}" if summary.reason else "",
            summary.projections,
            summary.slices,
            summary.train_steps,
            summary.final_alpha,
        )
        if self.on_run_finished is not None:
            try:
                self.on_run_finished(summary)
            except Exception:  # noqa: BLE001
                logger.exception("on_run_finished raised")

    # -- control ---------------------------------------------------------------------
    def move_slices(self, *, slice_row: int | None = None, vertical: dict | None = None) -> None:
        """Move the slices of the runs in progress from their next refresh on.

        ``slice_row`` moves the axial (denoised) slice to another detector row
        (Graas et al. 2023, Fig. 7a: the network then meets new data and recovers);
        ``vertical`` maps 1 (xz) or 2 (yz) to a new
        :class:`~bluesky_jit.geometry.Slice` of the same shape, or to the y
        (xz) or x (yz) in mm to move it to. Later runs use
        ``JitConfig.reconstruction.slice_row``.
        """
        for pipeline in list(self.pipelines.values()):
            pipeline.move(slice_row=slice_row, vertical=vertical)

    def set_center(self, center_of_rotation: float) -> None:
        """Reconstruct the runs in progress about another axis from their next refresh on.

        ``center_of_rotation``: the detector column (px) the rotation axis
        projects onto (the metadata's ``center_of_rotation``); the summaries'
        ``geometry`` shows it once applied. Later runs use their metadata.
        """
        for pipeline in list(self.pipelines.values()):
            pipeline.set_center(center_of_rotation)

    def set_sampling(self, *, patch_size: int | None = None, region: Any = _KEEP) -> None:
        """Change the training patches of the runs in progress (Graas et al. 2023:
        "the patch-sampling region is adjustable during the experiment").

        ``patch_size`` in pixels; ``region`` a
        :class:`~bluesky_jit.pairs.SamplingRegion` (e.g. a disc inside the
        container, or a mask), ``None`` for the whole reconstruction circle.
        A bad value is recorded in the run's derived stop document.
        """
        for pipeline in list(self.pipelines.values()):
            pipeline.set_sampling(patch_size=patch_size, region=region)

    def progress(self) -> list[RunSummary]:
        """Snapshots of the runs in progress, oldest first (safe to read from any thread)."""
        snapshots = (pipeline.snapshot() for pipeline in list(self.pipelines.values()))
        return [s for s in snapshots if s is not None]

    @property
    def backlog(self) -> int:
        """Documents waiting for the worker."""
        return self._queue.qsize()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document received so far is processed and its derived
        documents are written (when ``emit`` has a ``flush``, as
        :class:`~bluesky_jit.writer.CatalogWriter` does); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        emit_flush = getattr(self.emit, "flush", None)
        if callable(emit_flush):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return bool(emit_flush(left))
        return True

    def close(self, timeout: float | None = None) -> None:
        """Process what is queued, close runs still open (``abort``), then stop the worker
        (and any trainer still running)."""
        if self._closed:
            return
        self._queue.put((_CLOSING, None))
        self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)
        for pipeline in list(self.pipelines.values()):
            pipeline._stop_yielding()
            if pipeline.trainer is not None:
                pipeline.trainer.stop()
