"""Attach out of process: documents over 0MQ or Kafka in, derived runs out to a catalog.

A :class:`Listener` takes ``(name, doc)`` pairs from any transport, routes
them per run to a :class:`~bluesky_jit.callbacks.JitCallback` (and, if asked,
to a writer of the raw runs) and keeps going for hours: one bad run ends as a
failed derived run and the next run is processed as usual; documents of runs
whose start it never saw are dropped with one log line; a run that goes
silent for ``run_timeout_s`` is closed as aborted.

Transports
----------
0MQ (:func:`listen_zmq`)
    bluesky's ``RemoteDispatcher`` on the out-port of a ``bluesky-0MQ-proxy``
    (RunEngine side: ``RE.subscribe(bluesky.callbacks.zmq.Publisher(...))``).
    Fan-out, no persistence: every listener gets every run, and a run that
    started before the listener connected is lost to it.
Kafka (:class:`KafkaSource`)
    A consumer in a consumer group: the members split the topic's
    partitions, and with messages keyed by their run's start uid
    (:class:`RunKeyedPublisher`) each run goes whole to one member. Offsets
    are committed by hand, only below the first message of the oldest run
    whose derived documents are not yet written, so a worker that dies
    mid-run leaves the run to be redone (at least once; runs that already
    have a successful derived run with the same settings are skipped when
    ``skip_done``). Messages use bluesky-kafka's format: the msgpack
    (with msgpack-numpy) encoding of the pair ``(name, doc)``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..callbacks import REQUIRED_FIELDS, is_tomography
from ..config import JitConfig
from ..errors import BrokerError, ConfigError, ScanDataError

if TYPE_CHECKING:
    from tiled.client.container import Container

    from ..pipeline import RunSummary

logger = logging.getLogger(__name__)

__all__ = [
    "BrokerError",
    "KafkaSource",
    "Listener",
    "OffsetTracker",
    "RunKeyedPublisher",
    "check_reachable",
    "kafka_deserializer",
    "kafka_serializer",
    "listen_zmq",
    "zmq_curve",
]

DOCUMENT_NAMES: Final = frozenset(REQUIRED_FIELDS)
"""The names of event-model documents."""


# ------------------------------------------------------------------------- run index
class RunIndex:
    """Which run a document belongs to: start uid from any document of a run."""

    def __init__(self) -> None:
        self._of: dict[str, str] = {}  # descriptor / resource / stream_resource uid -> run
        self._members: dict[str, list[str]] = {}

    def run_of(self, name: str, doc: Mapping[str, Any]) -> str | None:
        """The start uid of the document's run (None if its run is unknown)."""
        if name == "start":
            self._members.setdefault(doc["uid"], [])
            return doc["uid"]
        if name in ("stop", "descriptor", "resource", "stream_resource"):
            run = doc.get("run_start")
            if name != "stop" and run is not None:
                self._of[doc["uid"]] = run
                self._members.setdefault(run, []).append(doc["uid"])
            return run
        if name in ("event", "event_page", "stream_datum"):
            return self._of.get(doc.get("descriptor", ""))
        if name == "datum":
            return self._of.get(doc.get("resource", ""))
        if name == "datum_page":
            resources = doc.get("resource") or [""]
            return self._of.get(resources if isinstance(resources, str) else resources[0])
        return None

    def forget(self, run: str) -> None:
        """Drop what is known about a finished run."""
        for member in self._members.pop(run, []):
            self._of.pop(member, None)


# -------------------------------------------------------------------------- listener
class Listener:
    """Route documents from a transport to the just-in-time callback; survive bad runs.

    Parameters
    ----------
    derived_runs : CatalogOfBlueskyRuns, optional
        Where derived runs are written (a ``TiledWriter``). Required for
        ``skip_done``.
    emit : callable, optional
        Instead of ``derived_runs``: any ``emit(name, doc)``.
    directory : path
        Where derived HDF5 files go (readable by the catalog's server).
    config : JitConfig, optional
    raw_runs : CatalogOfBlueskyRuns, optional
        Also store the raw runs there (when no other service does).
    run_timeout_s : float
        A run with no document for this long is closed as aborted, the raw run too
        (the callback's own ``JitConfig.runtime.run_timeout_s`` closes only the
        derived run; keep this one at or below it).
    max_runs : int, optional
        Set :attr:`stopped` after this many derived runs.
    skip_done : bool
        Skip runs that already have a successful derived run made with the
        same settings (Kafka re-delivery after a restart).
    on_run_finished : callable, optional
        Called with each :class:`~bluesky_jit.pipeline.RunSummary`.
    geometry_overrides, root_map : mapping, optional
        Passed to the callback.
    keep_summaries : int
        How many recent summaries :attr:`summaries` keeps (it runs for hours).

    Attributes
    ----------
    summaries : deque of RunSummary
        The most recent runs'.
    derived_count, failed_count : int
        Derived runs written, and how many of them did not succeed.
    stopped : threading.Event
        Set when ``max_runs`` derived runs are done; transports then return.
    """

    def __init__(
        self,
        *,
        derived_runs: Container | None = None,
        emit: Callable[[str, dict], None] | None = None,
        directory: str | Path = "bluesky_jit_data/derived",
        config: JitConfig | None = None,
        raw_runs: Container | None = None,
        run_timeout_s: float = 600.0,
        max_runs: int | None = None,
        skip_done: bool = False,
        on_run_finished: Callable[[RunSummary], None] | None = None,
        geometry_overrides: Mapping[str, Any] | None = None,
        root_map: Mapping[str, str] | None = None,
        keep_summaries: int = 100,
    ) -> None:
        from ..callbacks import JitCallback
        from ..worker_process import tiled_writer

        if skip_done and derived_runs is None:
            raise ConfigError("Listener(skip_done=True) needs derived_runs to look runs up in.")
        if max_runs is not None and max_runs < 1:
            raise ConfigError(f"max_runs must be a positive integer; got {max_runs!r}.")
        self.derived_runs = derived_runs
        spool = Path(directory).parent / "spool"  # beside the derived files' directory
        writer = emit
        if derived_runs is not None:
            writer = tiled_writer(derived_runs, spool_dir=spool / "derived")
        self.jit = JitCallback(
            config=config,
            run_engine_here=False,  # no scan in this process for training to yield to
            emit=writer,
            directory=directory,
            geometry_overrides=geometry_overrides,
            root_map=root_map,
            on_run_finished=self._finished,
        )
        self.raw_runs = raw_runs
        self.raw_writer = None
        if raw_runs is not None:
            self.raw_writer = tiled_writer(raw_runs, spool_dir=spool / "raw")
        self.run_timeout_s = float(run_timeout_s)
        self.max_runs = max_runs
        self.skip_done = skip_done
        self.on_run_finished = on_run_finished
        self.summaries: collections.deque[RunSummary] = collections.deque(maxlen=keep_summaries)
        self.derived_count = 0
        self.failed_count = 0
        self.stopped = threading.Event()
        self.settled_hooks: list[Callable[[str], None]] = []
        self._index = RunIndex()
        self._last_seen: dict[str, float] = {}  # open runs -> monotonic time of last document
        self._tomo: set[str] = set()  # open runs the callback processes
        self._skipped: set[str] = set()
        self._stopped_at: dict[str, float] = {}  # stop routed, waiting for the callback
        self._ignored: set[str] = set()  # runs aborted here: later documents are dropped
        self._warned: set[str] = set()
        self._raw_stored: set[str] = set()  # runs already in raw_runs (re-delivered)
        self._lock = threading.RLock()

    # -- documents in ------------------------------------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        """Route one document; never raises."""
        try:
            with self._lock:
                self._route(name, doc)
        except Exception:  # noqa: BLE001 - one bad document must not stop the listener
            logger.exception("bluesky-jit listener: could not route a %r document", name)

    def _route(self, name: str, doc: dict) -> None:
        if name not in DOCUMENT_NAMES or not isinstance(doc, Mapping):
            logger.warning("Ignoring a message that is not a Bluesky document: %r", name)
            return
        run = self._index.run_of(name, doc)
        if name == "start":
            if run in self._last_seen:
                logger.warning("A second start document for run %s; ignored.", run)
                return
            self._last_seen[run] = time.monotonic()
            if self.raw_writer is not None and self._raw_exists(run):
                self._raw_stored.add(run)
            if self.skip_done and is_tomography(doc) and self._already_done(run):
                self._skipped.add(run)
            elif is_tomography(doc):
                self._tomo.add(run)
            else:
                logger.info("Run %s is not a tomography scan; no derived run.", run)
        elif run is None or run not in self._last_seen:
            if run in self._ignored:
                return
            key = run or "?"
            if key not in self._warned:
                _bounded_add(self._warned, key)
                logger.warning(
                    "Dropping documents of run %s: its start document never reached this "
                    "listener (it connected mid-run, or the run was closed for silence). "
                    "0MQ does not replay; replay the run from the catalog instead "
                    "(bluesky-jit replay).",
                    key,
                )
            return
        self._last_seen[run] = time.monotonic()
        if run in self._skipped:
            if name == "stop":
                self._close(run)
                self._settle(run)
            return
        self._deliver(name, doc, run)
        if name == "stop":
            tomo = run in self._tomo
            self._close(run)
            if tomo:
                self._stopped_at[run] = time.monotonic()
            else:
                self._settle(run)

    def _deliver(self, name: str, doc: dict, run: str) -> None:
        if self.raw_writer is not None and run not in self._raw_stored:
            try:
                self.raw_writer(name, doc)
            except Exception:  # noqa: BLE001 - the derived run still goes on
                logger.exception("Could not store the raw %r document", name)
        self.jit(name, doc)

    def _close(self, run: str) -> None:
        self._raw_stored.discard(run)
        self._last_seen.pop(run, None)
        self._tomo.discard(run)
        self._skipped.discard(run)
        self._index.forget(run)

    def _raw_exists(self, run: str) -> bool:
        try:
            return run in self.raw_runs
        except Exception:  # noqa: BLE001 - then try to write it
            return False

    def _already_done(self, run: str) -> bool:
        from .session import find_derived

        try:
            done = find_derived(self.derived_runs, raw_uid=run, exit_status="success")
        except Exception:  # noqa: BLE001 - then process it again
            logger.exception("Could not look up earlier derived runs of %s", run)
            return False
        mine = json.loads(json.dumps(self.jit.config.to_dict()))  # as stored in the start
        for derived in done:
            if derived.metadata["start"].get("config") == mine:
                logger.info(
                    "Run %s already has derived run %s with these settings; skipped.",
                    run,
                    derived.metadata["start"]["uid"],
                )
                return True
        return False

    # -- run ends ----------------------------------------------------------------------
    def _finished(self, summary: RunSummary) -> None:  # the callback's worker thread
        with self._lock:
            self.summaries.append(summary)
            self._stopped_at.pop(summary.raw_uid, None)
            if summary.derived_uid is not None:
                self.derived_count += 1
                self.failed_count += summary.exit_status != "success"
        if summary.derived_uid is not None:
            logger.info(
                "run %s -> derived run %s (%s)",
                summary.raw_uid,
                summary.derived_uid,
                summary.exit_status,
            )
        if self.on_run_finished is not None:
            try:
                self.on_run_finished(summary)
            except Exception:  # noqa: BLE001
                logger.exception("on_run_finished raised")
        # Settled (Kafka offsets committed) only once the derived run is in the catalog:
        # the writer says so from its thread. A run kept in this machine's spool through
        # an outage stays unsettled, so the group redoes it if this worker dies.
        when_written = getattr(self.jit.emit, "when_written", None)
        if callable(when_written) and summary.derived_uid is not None:
            when_written(summary.derived_uid, lambda: self._settle(summary.raw_uid))
        else:
            self._settle(summary.raw_uid)
        if self.max_runs is not None and self.derived_count >= self.max_runs:
            self.stopped.set()

    def _settle(self, run: str) -> None:
        """The run's derived documents are written (or there are none)."""
        for hook in list(self.settled_hooks):
            try:
                hook(run)
            except Exception:  # noqa: BLE001
                logger.exception("A settled hook raised")

    def abort(self, run: str, reason: str) -> None:
        """Close an open run as aborted (its stop never came); drop its later documents."""
        with self._lock:
            if run not in self._last_seen:
                return
            from ..callbacks import abort_stop  # the callback closes its silent runs alike

            logger.warning("Closing run %s: %s", run, reason)
            self._route("stop", abort_stop(run, reason))
            _bounded_add(self._ignored, run)

    def housekeeping(self) -> None:
        """Close runs silent for ``run_timeout_s``; settle runs the callback never finished."""
        now = time.monotonic()
        with self._lock:
            silent = [r for r, t in self._last_seen.items() if now - t > self.run_timeout_s]
            lost = [r for r, t in self._stopped_at.items() if now - t > self.run_timeout_s]
        for run in silent:
            self.abort(run, f"no document for {self.run_timeout_s:g} s")
        for run in lost:
            logger.error("The callback never finished run %s; giving up on it.", run)
            with self._lock:
                self._stopped_at.pop(run, None)
            self._settle(run)

    @property
    def open_runs(self) -> list[str]:
        """Runs started and not yet stopped."""
        with self._lock:
            return list(self._last_seen)

    def close(self, timeout: float | None = 60.0) -> None:
        """Abort open runs, finish what is queued, stop the callback."""
        for run in self.open_runs:
            self.abort(run, "the listener was stopped")
        self.jit.close(timeout)


def _bounded_add(items: set[str], item: str, limit: int = 10_000) -> None:
    """Remember ``item``; forget everything once ``limit`` is reached (hours of runs)."""
    if len(items) >= limit:
        items.clear()
    items.add(item)


# ------------------------------------------------------------------------------ 0MQ
def parse_address(address: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` -> (host, port)."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"A {what} must look like HOST:PORT (e.g. 127.0.0.1:5578); got {address!r}."
        )
    return host.strip("[]"), int(port)


ZMQ_FORMATS = ("msgpack", "pickle")
"""How 0MQ messages are encoded: msgpack (safe, the default) or pickle (asked for only)."""


def zmq_serializer() -> Callable[[Any], bytes]:
    """The RunEngine side of a 0MQ bus that bluesky-jit listens to: msgpack, numpy arrays kept.

    ``RE.subscribe(Publisher("beamline:5577", serializer=zmq_serializer()))``
    (``bluesky.callbacks.zmq.Publisher`` pickles by default, which a listener
    must refuse: unpickling runs code from whoever can reach the proxy).
    """
    from ..codec import packb

    return packb


def zmq_deserializer() -> Callable[[bytes], Any]:
    """The inverse of :func:`zmq_serializer`; refuses (and logs) anything else, pickle included.

    Decoding builds only plain values and numpy arrays of numbers: no code runs.
    """
    from ..codec import unpackb

    def loads(data: bytes) -> Any:
        try:
            return unpackb(data)
        except Exception as error:
            guess = "a pickle" if data[:1] == b"\x80" else "not msgpack"
            logger.warning(
                "Refused a 0MQ message of %d bytes (%s): expected msgpack from "
                "Publisher(..., serializer=bluesky_jit.apps.listen.zmq_serializer()); pickled "
                "messages are never unpickled unless the listener runs with --zmq-format pickle.",
                len(data),
                guess,
            )
            raise ScanDataError(f"undecodable 0MQ message ({guess}): {error}") from None

    return loads


def check_reachable(host: str, port: int, what: str, timeout: float = 3.0) -> None:
    """Raise :class:`BrokerError` unless something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise BrokerError(
            f"Cannot reach the {what} at {host}:{port}: {err.strerror or err}. Expected it to "
            "listen there; start it (e.g. bluesky-0MQ-proxy --in-address 5577 --out-address "
            "5578) or fix the address."
        ) from err


def zmq_curve(secret_key: str | Path | None, server_key: str | Path | None) -> Any:
    """bluesky's ``ClientCurve`` of two certificate files (``zmq.auth``), or None for neither.

    ``secret_key``: this listener's certificate with its secret key
    (``zmq.auth.create_certificates`` writes ``NAME.key_secret``);
    ``server_key``: the proxy's public certificate (``NAME.key``). Keys are
    read from files only, never from the command line.

    Raises
    ------
    ConfigError
        If only one is given, or a file is not a certificate (with a secret key).
    """
    import zmq.auth
    from bluesky.callbacks.zmq import ClientCurve

    if secret_key is None and server_key is None:
        return None
    if secret_key is None or server_key is None:
        raise ConfigError(
            "CURVE needs both certificate files: this listener's secret one "
            "(--curve-secret-key NAME.key_secret) and the proxy's public one "
            "(--curve-server-key SERVER.key); make them with zmq.auth.create_certificates."
        )
    for path, what in ((secret_key, "secret"), (server_key, "server's public")):
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"Cannot read the CURVE {what} certificate {path}: {error}. Expected a "
                "certificate file written by zmq.auth.create_certificates."
            ) from error
        if what == "secret" and secret is None:
            raise ConfigError(
                f"{path} holds no secret key: pass this listener's NAME.key_secret file as "
                "--curve-secret-key (the NAME.key file is its public half)."
            )
    return ClientCurve(secret_path=Path(secret_key), server_public_key=Path(server_key))


def listen_zmq(
    address: str,
    listener: Listener,
    *,
    stop: threading.Event | None = None,
    on_ready: Callable[[], None] | None = None,
    tick_s: float = 0.5,
    check: bool = True,
    zmq_format: str = "msgpack",
    curve_secret_key: str | Path | None = None,
    curve_server_key: str | Path | None = None,
) -> None:
    """Consume documents from a 0MQ proxy's out-port until ``stop`` or ``listener.stopped``.

    Uses bluesky's ``RemoteDispatcher`` with :func:`zmq_deserializer`: a
    message that is not msgpack (a pickle, say) is refused, logged and dropped.
    If the dispatcher fails (e.g. on an unknown document name) a new one is
    connected after a second.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` of the proxy's out-port (``--out-address``).
    listener : Listener
    stop : threading.Event, optional
        Set it (e.g. from a signal handler) to return within ``tick_s``.
    on_ready : callable, optional
        Called once the socket is connected.
    check : bool
        First check that the proxy accepts connections (:class:`BrokerError`).
    zmq_format : {"msgpack", "pickle"}
        How the RunEngine side encodes (:func:`zmq_serializer`). ``"pickle"``
        (bluesky's default) lets anyone who can send to the proxy run code in
        this process: only on a bus nobody else can reach.
    curve_secret_key, curve_server_key : path, optional
        CURVE encryption and authentication on a network bus (:func:`zmq_curve`): this
        listener's certificate file (with its secret key) and the proxy's public one.
    """
    import pickle

    from bluesky.callbacks.zmq import RemoteDispatcher

    if zmq_format not in ZMQ_FORMATS:
        raise ConfigError(
            f"zmq_format must be one of {ZMQ_FORMATS}; got {zmq_format!r}. Publish with "
            "Publisher(..., serializer=bluesky_jit.apps.listen.zmq_serializer()) and keep msgpack."
        )
    if zmq_format == "pickle":
        logger.warning(
            "0MQ messages will be unpickled (--zmq-format pickle): anyone who can send to the "
            "proxy can run code in this process. Use it only on a bus nobody else can reach."
        )
    deserializer = pickle.loads if zmq_format == "pickle" else zmq_deserializer()
    curve = zmq_curve(curve_secret_key, curve_server_key)
    host, port = parse_address(address, "0MQ proxy address")
    if check:
        check_reachable(host, port, "0MQ proxy (out-port)")
    stop = stop or threading.Event()
    ready = on_ready
    while not (stop.is_set() or listener.stopped.is_set()):
        dispatcher = RemoteDispatcher(
            f"{host}:{port}", deserializer=deserializer, curve_config=curve
        )
        dispatcher.subscribe(listener)
        loop = dispatcher.loop

        def tick(loop: asyncio.AbstractEventLoop = loop) -> None:
            listener.housekeeping()
            if stop.is_set() or listener.stopped.is_set():
                for task in asyncio.all_tasks(loop):
                    task.cancel()
            else:
                loop.call_later(tick_s, tick)

        loop.call_later(tick_s, tick)
        if ready is not None:
            loop.call_soon(ready)
            ready = None
        try:
            dispatcher.start()
        except asyncio.CancelledError:
            break
        except Exception:  # noqa: BLE001 - reconnect and go on
            logger.exception("The 0MQ dispatcher failed; reconnecting in 1 s")
            stop.wait(1.0)


# ----------------------------------------------------------------------------- Kafka
def kafka_serializer() -> Callable[[Any], bytes]:
    """bluesky-kafka's message encoding: msgpack with numpy support (msgpack-numpy)."""
    import bluesky_kafka.produce  # noqa: F401 - patches msgpack for numpy, as bluesky-kafka does
    import msgpack

    return msgpack.dumps


def kafka_deserializer() -> Callable[[bytes], Any]:
    """bluesky-kafka's message decoding (the inverse of :func:`kafka_serializer`)."""
    import bluesky_kafka.consume  # noqa: F401 - patches msgpack for numpy
    import msgpack

    return msgpack.loads


class RunKeyedPublisher:
    """Publish a RunEngine's documents to Kafka, each message keyed by its run's start uid.

    bluesky-kafka's ``Publisher`` sends every message with one fixed key, so
    a consumer group gives every run to the same member. Keyed by start uid,
    each run stays in one partition (in order) and different runs spread
    over the group. Same message format as bluesky-kafka.

    Parameters
    ----------
    topic : str
        e.g. ``"bl.bluesky.runengine.documents"``.
    bootstrap_servers : str, optional
        ``"broker1:9092,broker2:9092"``.
    producer_config : dict, optional
        More ``confluent_kafka.Producer`` settings (e.g. ``{"enable.idempotence": True}``
        and SASL/TLS settings).
    producer : object, optional
        Instead of the above: an object with ``produce(topic=, key=, value=,
        on_delivery=)``, ``poll`` and ``flush`` (a ``confluent_kafka.Producer``).
    flush_on_stop : bool
        Wait for delivery at each stop document.

    Examples
    --------
    >>> RE.subscribe(RunKeyedPublisher("bl.bluesky.runengine.documents", "broker:9092",
    ...                                producer_config={"enable.idempotence": True}))
    """

    def __init__(
        self,
        topic: str,
        bootstrap_servers: str | None = None,
        *,
        producer_config: Mapping[str, Any] | None = None,
        producer: Any = None,
        flush_on_stop: bool = True,
    ) -> None:
        if producer is None:
            if not bootstrap_servers:
                raise ConfigError("RunKeyedPublisher needs bootstrap_servers or a producer.")
            from confluent_kafka import Producer

            producer = Producer({"bootstrap.servers": bootstrap_servers, **(producer_config or {})})
        self.topic = topic
        self.producer = producer
        self.flush_on_stop = flush_on_stop
        self._serialize = kafka_serializer()
        self._index = RunIndex()

    def __call__(self, name: str, doc: dict) -> None:
        run = self._index.run_of(name, doc) or ""
        self.producer.produce(
            topic=self.topic,
            key=run.encode(),
            value=self._serialize((name, doc)),
            on_delivery=_delivery_report,
        )
        self.producer.poll(0)
        if name == "stop":
            self._index.forget(run)
            if self.flush_on_stop:
                self.producer.flush()


def _delivery_report(err: Any, msg: Any) -> None:
    if err is not None:
        logger.error("Kafka delivery failed: %s", err)


class OffsetTracker:
    """Offsets safe to commit: below the first message of each partition's oldest unsettled run."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}
        self._first: dict[str, tuple[tuple[str, int], int]] = {}  # run -> (tp, start offset)
        self._committed: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def seen(self, tp: tuple[str, int], offset: int, start_of: str | None = None) -> None:
        """A message was handed on; ``start_of`` names the run it starts."""
        with self._lock:
            self._next[tp] = max(self._next.get(tp, 0), offset + 1)
            if start_of is not None:
                self._first.setdefault(start_of, (tp, offset))

    def settled(self, run: str) -> None:
        """The run's derived documents are written (or it has none)."""
        with self._lock:
            self._first.pop(run, None)

    def runs_in(self, tps: Iterable[tuple[str, int]]) -> list[str]:
        """Unsettled runs that started in these partitions."""
        tps = set(tps)
        with self._lock:
            return [run for run, (tp, _) in self._first.items() if tp in tps]

    def pending(self, tps: Iterable[tuple[str, int]] | None = None) -> dict[tuple[str, int], int]:
        """Partition -> offset to commit, where it moved since the last commit."""
        with self._lock:
            out = {}
            for tp, nxt in self._next.items():
                if tps is not None and tp not in tps:
                    continue
                firsts = [o for t, o in self._first.values() if t == tp]
                safe = min([nxt, *firsts])
                if safe > self._committed.get(tp, -1):
                    out[tp] = safe
            return out

    def committed(self, offsets: Mapping[tuple[str, int], int]) -> None:
        with self._lock:
            self._committed.update(offsets)

    def forget(self, tps: Iterable[tuple[str, int]]) -> None:
        """Partitions moved to another consumer."""
        tps = set(tps)
        with self._lock:
            for tp in tps:
                self._next.pop(tp, None)
                self._committed.pop(tp, None)
            for run in [r for r, (tp, _) in self._first.items() if tp in tps]:
                self._first.pop(run)


KAFKA_ENV_PREFIX = "BLUESKY_JIT_KAFKA_"
"""Environment variables that set Kafka client settings: ``BLUESKY_JIT_KAFKA_SASL_PASSWORD``
is ``sasl.password`` (the rest of the name lower-cased, ``_`` read as ``.``)."""
_SASL_NEEDS_SECRET = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def kafka_consumer_config(
    file_config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The Kafka client settings: the settings file's ``consumer_config``, then the environment.

    Secrets (``sasl.password``) belong in the environment or in a settings
    file only its owner reads, never on the command line. A SASL mechanism
    that needs a user name and password without both is a :class:`ConfigError`
    that names the variables to set.
    """
    import os

    environ = os.environ if environ is None else environ
    config = dict(file_config or {})
    for name, value in environ.items():
        if name.startswith(KAFKA_ENV_PREFIX) and len(name) > len(KAFKA_ENV_PREFIX):
            config[name[len(KAFKA_ENV_PREFIX) :].lower().replace("_", ".")] = value
    mechanism = str(config.get("sasl.mechanism", config.get("sasl.mechanisms", ""))).upper()
    if "SASL" in str(config.get("security.protocol", "")).upper() or mechanism:
        missing = [k for k in ("sasl.username", "sasl.password") if not config.get(k)]
        if (mechanism or "PLAIN") in _SASL_NEEDS_SECRET and missing:
            names = ", ".join(KAFKA_ENV_PREFIX + k.replace(".", "_").upper() for k in missing)
            raise ConfigError(
                f"Kafka SASL ({mechanism or 'PLAIN'}) needs {' and '.join(missing)}; they are "
                f"not set. Set {names} in the environment (or put them under consumer_config in "
                "a settings file only you can read)."
            )
    return config


def check_kafka(
    bootstrap_servers: str,
    topics: Sequence[str],
    *,
    consumer_config: Mapping[str, Any] | None = None,
    timeout: float = 5.0,
) -> None:
    """Check that a Kafka broker answers and has the topics (:class:`BrokerError`, ConfigError)."""
    consumer = _consumer(bootstrap_servers, "bluesky-jit-check", consumer_config, log_level=0)
    try:
        metadata = consumer.list_topics(timeout=timeout)
    except Exception as err:  # confluent_kafka.KafkaException
        raise BrokerError(
            f"Cannot reach the Kafka broker(s) {bootstrap_servers}: {err}. Expected a broker "
            f"answering there within {timeout:g} s; check the address, the network and the "
            "security settings (consumer_config in the [listen] section of the settings file)."
        ) from err
    finally:
        consumer.close()
    missing = [t for t in topics if t not in metadata.topics]
    if missing:
        raise ConfigError(
            f"Topic(s) {missing} do not exist on {bootstrap_servers}; it has "
            f"{sorted(metadata.topics)[:20]}. Use the RunEngine's topic, e.g. "
            "'<beamline>.bluesky.runengine.documents'."
        )


def _consumer(
    bootstrap_servers: str, group_id: str, consumer_config: Mapping[str, Any] | None, **fixed: Any
) -> Any:
    """A ``confluent_kafka.Consumer`` of the group, auto commit off, new groups start earliest."""
    from confluent_kafka import Consumer

    return Consumer(
        {
            "auto.offset.reset": "earliest",
            **(consumer_config or {}),
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "enable.auto.commit": False,
            **fixed,
        }
    )


class KafkaSource:
    """Consume bluesky-kafka messages as a member of a consumer group; commit per finished run.

    Parameters
    ----------
    listener : Listener
    bootstrap_servers : str
        ``"broker1:9092,broker2:9092"``.
    topics : sequence of str
    group_id : str
        Workers with the same group id share the runs.
    consumer_config : dict, optional
        More ``confluent_kafka.Consumer`` settings (security, timeouts). Auto
        commit is always off; ``auto.offset.reset`` defaults to
        ``"earliest"`` (a new group starts at the oldest kept message).
    consumer : object, optional
        Instead of a ``confluent_kafka.Consumer``: anything with its
        ``subscribe``, ``poll``, ``commit``, ``assignment``, ``pause``, ``resume``,
        ``list_topics`` and ``close``.
    poll_s : float
        Longest wait for a message before housekeeping and commits.
    max_backlog : int
        Documents the callback may have waiting; beyond, fetching pauses (so a
        worker catching up on a backlog never drops frames).
    """

    def __init__(
        self,
        listener: Listener,
        *,
        bootstrap_servers: str,
        topics: Sequence[str],
        group_id: str,
        consumer_config: Mapping[str, Any] | None = None,
        consumer: Any = None,
        poll_s: float = 0.2,
        max_backlog: int = 256,
    ) -> None:
        if not topics or not group_id:
            raise ConfigError(
                "Kafka needs at least one topic (--topic) and a consumer group (--group); "
                f"got topics={list(topics)!r}, group={group_id!r}."
            )
        self.listener = listener
        self.topics = list(topics)
        self.group_id = group_id
        self.poll_s = poll_s
        self.max_backlog = max_backlog
        self._paused = False
        self.tracker = OffsetTracker()
        self._deserialize = kafka_deserializer()
        listener.settled_hooks.append(self.tracker.settled)
        if consumer is None:
            consumer = _consumer(bootstrap_servers, group_id, consumer_config)
        self.consumer = consumer

    def run(
        self, stop: threading.Event | None = None, on_ready: Callable[[], None] | None = None
    ) -> None:
        """Poll until ``stop`` or ``listener.stopped``; commit; close the consumer."""
        stop = stop or threading.Event()
        self.consumer.subscribe(self.topics, on_assign=self._assigned, on_revoke=self._revoked)
        if on_ready is not None:
            on_ready()
        try:
            while not (stop.is_set() or self.listener.stopped.is_set()):
                self._flow_control()
                message = self.consumer.poll(self.poll_s)
                if message is not None:
                    self.handle(message)
                self.listener.housekeeping()
                self.commit()
        finally:
            self.listener.jit.flush(30)
            self.commit()
            self.consumer.close()

    def _flow_control(self) -> None:
        """Pause fetching while the callback is behind, instead of letting it drop frames.

        Paused partitions still take part in the group (poll keeps being called).
        """
        behind = self.listener.jit.backlog > self.max_backlog
        if behind != self._paused:
            partitions = self.consumer.assignment()
            if partitions:
                (self.consumer.pause if behind else self.consumer.resume)(partitions)
            self._paused = behind

    def handle(self, message: Any) -> None:
        """Decode one message and hand it to the listener."""
        error = message.error()
        if error is not None:
            if getattr(error, "fatal", lambda: False)():
                raise BrokerError(f"Fatal Kafka error: {error}")
            logger.warning("Kafka: %s", error)
            return
        tp = (message.topic(), message.partition())
        start_of = None
        try:
            decoded = self._deserialize(message.value())
            name, doc = decoded
            if not isinstance(name, str) or not isinstance(doc, dict):
                raise TypeError(f"expected (name, doc), got ({type(name).__name__}, ...)")
        except Exception as err:  # noqa: BLE001 - skip what cannot be decoded
            logger.warning(
                "Skipping Kafka message %s[%d]@%d: not a bluesky-kafka document (%s)",
                tp[0],
                tp[1],
                message.offset(),
                err,
            )
            self.tracker.seen(tp, message.offset())
            return
        if name == "start" and isinstance(doc.get("uid"), str):
            start_of = doc["uid"]
        self.tracker.seen(tp, message.offset(), start_of)
        self.listener(name, doc)
        if start_of is not None and start_of not in self.listener.open_runs:
            self.tracker.settled(start_of)  # a duplicate start: nothing to wait for

    def commit(self, tps: Iterable[tuple[str, int]] | None = None) -> None:
        """Commit what is safe: everything before the oldest run still being processed."""
        from confluent_kafka import TopicPartition

        offsets = self.tracker.pending(tps)
        if not offsets:
            return
        try:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except Exception as err:  # noqa: BLE001 - retried at the next poll
            logger.warning("Kafka commit failed (%s); will retry", err)
            return
        self.tracker.committed(offsets)
        logger.debug("Committed %s", offsets)

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        logger.info("Kafka: assigned %s", [(p.topic, p.partition) for p in partitions])

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        logger.info("Kafka: revoked %s", tps)
        self.commit(tps)
        for run in self.tracker.runs_in(tps):
            self.listener.abort(
                run, "its partition moved to another worker of the group, which redoes the run"
            )
        self.tracker.forget(tps)
