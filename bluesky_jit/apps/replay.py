"""Replay stored runs through the just-in-time callback, as if they were live.

:func:`replay` reads each raw run's documents from a Tiled server (its
``application/json-seq`` export, :func:`bluesky_jit.catalog.documents`) and
feeds them to a :class:`~bluesky_jit.callbacks.JitCallback` whose derived runs
go to a catalog, linked to the raw run by ``start.raw_uid`` and marked with a
``replay`` block (source catalog, pace). With the same settings and seed the
reconstructions equal the live ones: the callback's ingest accepts the stored
order (all events of a stream before its ``stream_resource`` and
``stream_datum``) as well as the live one.

Frames: a stored run points at the detector's HDF5 files. Where this machine
can read them (directly or through ``root_map``) they are read in place;
otherwise the frames are fetched through the Tiled server
(``run[stream][data_key]``) into a cache file first. If neither works,
:class:`~bluesky_jit.errors.ScanDataError` says which files are missing
before anything is written.

Paces: ``"fast"`` feeds documents in their stored order as fast as the
callback takes them (it waits when the callback falls behind, so no frame is
dropped); ``"realtime"`` rebuilds the live order (each frame right after its
event) and keeps the original time between documents (divided by ``speed``,
gaps longer than ``max_gap_s`` shortened), so just-in-time training sees the
same pace as during the scan.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..callbacks import is_tomography
from ..config import JitConfig
from ..errors import ConfigError, NotTomographyError, RunNotFoundError, ScanDataError

if TYPE_CHECKING:
    from tiled.client.container import Container

    from ..callbacks import JitCallback
    from ..pipeline import RunSummary

logger = logging.getLogger(__name__)

__all__ = [
    "PACES",
    "NotTomographyError",
    "RunNotFoundError",
    "is_tomography",
    "live_order",
    "lookup_run",
    "replay",
    "replay_documents",
]

PACES: Final = ("fast", "realtime")
MAX_BACKLOG: Final = 64
"""Documents the callback may have waiting before a fast replay waits for it."""


def lookup_run(container: Container, uid: str) -> Container:
    """The run ``uid`` (full or partial uid, or scan id) of a runs container.

    Raises
    ------
    RunNotFoundError
        With the catalog's address and the newest uids as a hint.
    """
    keys: list[str | int] = [uid]
    if isinstance(uid, str) and uid.isdigit() and len(uid) < 9:
        keys.insert(0, int(uid))  # a scan id, else the start of a uid
    problem = ""
    for key in keys:
        try:
            return container[key]
        except KeyError:
            pass
        except ValueError as err:  # e.g. a partial uid shorter than 5 characters
            problem = f" ({err})"
    try:
        newest = list(container.keys().tail(3))
    except Exception:  # noqa: BLE001 - only a hint
        newest = None
    hint = f" Newest runs there: {', '.join(newest)}." if newest else ""
    if newest == []:
        hint = " It holds no runs."
    raise RunNotFoundError(
        f"No run {uid!r} in {getattr(container, 'uri', container)}{problem}: expected the uid "
        f"(or its first characters, or a scan id) of a run stored there.{hint}"
    )


def replay(
    raw_runs: Container,
    uids: Sequence[str],
    *,
    derived_runs: Container | None = None,
    emit: Callable[[str, dict], None] | None = None,
    directory: str | Path = "bluesky_jit_data/derived",
    config: JitConfig | None = None,
    pace: str = "fast",
    speed: float = 1.0,
    max_gap_s: float = 5.0,
    root_map: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
    geometry_overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    timeout: float | None = None,
    on_callback: Callable[[JitCallback], None] | None = None,
) -> list[RunSummary]:
    """Replay stored runs through a fresh :class:`JitCallback`; return their summaries.

    Parameters
    ----------
    raw_runs : CatalogOfBlueskyRuns
        Where the raw runs are (e.g. ``session.runs("raw")``); its server must
        export runs as documents (``application/json-seq``).
    uids : sequence of str
        Full or partial uids, or scan ids. A scan that names a separate
        dark/flat run (``tomo.dark_flat_uid``) gets that run replayed first.
    derived_runs : CatalogOfBlueskyRuns, optional
        Where derived runs are written (with a ``TiledWriter``).
    emit : callable, optional
        Instead of ``derived_runs``: any ``emit(name, doc)``. With neither,
        results are computed but not stored.
    directory : path
        Where derived HDF5 files go (readable by the derived catalog's server).
    config : JitConfig, optional
        Settings; for results equal to a live run, pass the same settings and
        seed (e.g. ``JitConfig.from_dict(derived.metadata["start"]["config"])``).
    pace : {"fast", "realtime"}
    speed : float
        ``realtime`` only: 2 replays twice as fast as recorded.
    max_gap_s : float
        ``realtime`` only: longer pauses between documents are cut to this.
    root_map : mapping, optional
        ``{old_root: new_root}`` for detector files that moved.
    cache_dir : path, optional
        Where frames fetched through Tiled are kept (default ``directory/../replay_cache``).
    geometry_overrides : mapping, optional
        Passed to the callback.
    progress : bool
        A progress bar per run (tqdm, on stderr).
    timeout : float, optional
        Seconds to wait for the callback to finish each run (None: no limit).
    on_callback : callable, optional
        Called with the new :class:`JitCallback` before the first document
        (e.g. to attach a :class:`~bluesky_jit.apps.live.LiveView`).

    Returns
    -------
    list of RunSummary
        One per replayed scan (dark/flat runs left out), in order; each has
        ``derived_uid``, ``exit_status`` and ``reason``.

    Raises
    ------
    RunNotFoundError, NotTomographyError, ScanDataError, CatalogError
        Checked for every run before anything is replayed.
    """
    from ..callbacks import JitCallback

    if pace not in PACES:
        raise ConfigError(f"pace must be one of {PACES}; got {pace!r}.")
    if not speed > 0:
        raise ConfigError(f"speed must be a positive number; got {speed!r}.")
    directory = Path(directory)
    cache = Path(cache_dir) if cache_dir is not None else directory.parent / "replay_cache"
    source = getattr(raw_runs, "uri", str(raw_runs))

    # Look everything up first: a wrong uid fails before any derived run is written.
    plan: list[tuple[Container, bool]] = []  # (run, is a calibration run)
    seen: set[str] = set()
    for uid in uids:
        run = lookup_run(raw_runs, uid)
        start = run.metadata["start"]
        if not is_tomography(start):
            raise NotTomographyError(
                f"Run {start['uid']} (plan {start.get('plan_name')!r}) is not a tomography "
                "scan: its start document has no 'tomo' block (nor the FXI keys num_angles "
                "and num_bkg_images). Replay the scan's uid, not e.g. a count or alignment run."
            )
        calibration = (start.get("tomo") or {}).get("dark_flat_uid")
        if calibration and calibration not in seen:
            plan.append((lookup_run(raw_runs, calibration), True))
            seen.add(calibration)
        if start["uid"] not in seen:
            plan.append((run, False))
            seen.add(start["uid"])

    writer = emit
    if writer is None and derived_runs is not None:
        from ..worker_process import tiled_writer

        writer = tiled_writer(derived_runs, spool_dir=directory.parent / "spool" / "derived")
    marker = _ReplayMarker(writer, {"source": source, "pace": pace}) if writer else None
    finished: dict[str, RunSummary] = {}
    jit = JitCallback(
        config=config,
        run_engine_here=False,  # no scan in this process for training to yield to
        emit=marker,
        directory=directory,
        geometry_overrides=geometry_overrides,
        on_run_finished=lambda summary: finished.__setitem__(summary.raw_uid, summary),
    )
    if on_callback is not None:
        on_callback(jit)
    scans: list[str] = []
    try:
        for run, calibration in plan:
            start = run.metadata["start"]
            docs = localize_frames(run, list(_documents(run)), root_map=root_map, cache_dir=cache)
            if pace == "realtime":
                docs = list(live_order(docs))
            label = f"{'dark/flat' if calibration else 'replay'} {start['uid'][:8]}"
            logger.info("Replaying run %s from %s (%d documents)", start["uid"], source, len(docs))
            replay_documents(
                docs,
                jit,
                pace=pace,
                speed=speed,
                max_gap_s=max_gap_s,
                progress=progress,
                label=label,
                timeout=timeout,
            )
            if not calibration:
                scans.append(start["uid"])
    finally:
        jit.close(timeout)
    missing = [uid for uid in scans if uid not in finished]
    if missing:
        raise ScanDataError(
            f"The callback did not finish run(s) {missing} within {timeout} s; raise timeout."
        )
    return [finished[uid] for uid in scans]


def _documents(run: Container) -> Iterator[tuple[str, dict]]:
    from ..catalog import documents

    yield from documents(run)


def replay_documents(
    docs: Iterable[tuple[str, dict]],
    callback: JitCallback | Callable[[str, dict], None],
    *,
    pace: str = "fast",
    speed: float = 1.0,
    max_gap_s: float = 5.0,
    progress: bool = False,
    label: str = "replay",
    timeout: float | None = None,
) -> None:
    """Feed ``(name, doc)`` pairs to a callback, paced; wait until a JitCallback is done.

    With a :class:`JitCallback` a fast replay waits whenever more than
    :data:`MAX_BACKLOG` documents are waiting, so its frame-dropping guard
    never fires.
    """
    from tqdm import tqdm

    docs = list(docs)
    backlog = getattr(callback, "backlog", None)
    progress_of = getattr(callback, "progress", None)
    clock = _Clock(speed, max_gap_s) if pace == "realtime" else None
    with tqdm(total=len(docs), unit="doc", desc=label, disable=not progress, leave=True) as bar:
        for name, doc in docs:
            if clock is not None:
                clock.wait(doc)
            elif backlog is not None:
                while callback.backlog > MAX_BACKLOG:
                    time.sleep(0.002)
            callback(name, doc)
            bar.update(1)
            if progress_of is not None and (name == "stop" or bar.n % 100 == 0):
                running = progress_of()
                if running:
                    bar.set_postfix(slices=running[-1].slices, refresh=False)
        if hasattr(callback, "flush") and not callback.flush(timeout):
            logger.warning("The callback had not finished after %s s", timeout)
        finished = list(getattr(callback, "summaries", []))
        if finished:
            bar.set_postfix(slices=finished[-1].slices, refresh=True)


class _Clock:
    """Sleeps so documents keep their recorded spacing (``time`` keys), sped up by ``speed``."""

    def __init__(self, speed: float, max_gap_s: float) -> None:
        self.speed = speed
        self.max_gap_s = max_gap_s
        self.origin: float | None = None  # recorded time that maps to self.wall
        self.wall = 0.0
        self.last: float | None = None

    def wait(self, doc: Mapping[str, Any]) -> None:
        t = doc.get("time")
        if isinstance(t, list):
            t = t[0] if t else None
        if not isinstance(t, (int, float)):
            return
        if self.origin is None:
            self.origin, self.wall, self.last = t, time.monotonic(), t
            return
        if t - self.last > self.max_gap_s:  # a long pause: shift the origin
            self.origin += t - self.last - self.max_gap_s
        self.last = max(self.last, t)
        delay = self.wall + (t - self.origin) / self.speed - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _ReplayMarker:
    """Passes derived documents on, adding a ``replay`` block to each start document."""

    def __init__(self, emit: Callable[[str, dict], None], info: Mapping[str, Any]) -> None:
        self.emit = emit
        self.info = dict(info)

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            doc = {**doc, "replay": self.info}
        self.emit(name, doc)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the wrapped writer has written what it received (if it can say)."""
        flush = getattr(self.emit, "flush", None)
        return bool(flush(timeout)) if callable(flush) else True


# --------------------------------------------------------------------------- frames
def localize_frames(
    run: Container,
    docs: list[tuple[str, dict]],
    *,
    root_map: Mapping[str, str] | None = None,
    cache_dir: Path,
) -> list[tuple[str, dict]]:
    """Point every ``stream_resource`` at a file this machine can read.

    A file that exists (after ``root_map``) is used in place. Otherwise the
    frames are read through Tiled (``run[stream][data_key]``) and written to
    ``cache_dir/<resource uid>.h5`` under the same dataset name and indices.

    Raises
    ------
    ScanDataError
        A file is missing here and the server cannot read it either.
    """
    from ..ingest import uri_to_path

    resources = {doc["uid"]: doc for name, doc in docs if name == "stream_resource"}
    if not resources:
        return docs
    paths = {uid: uri_to_path(doc["uri"], root_map) for uid, doc in resources.items()}
    missing = {uid for uid, path in paths.items() if not path.exists()}
    rewritten: dict[str, dict] = {
        uid: {**doc, "uri": paths[uid].resolve().as_uri()}
        for uid, doc in resources.items()
        if uid not in missing
    }
    if missing:
        rewritten.update(_fetch_through_tiled(run, docs, resources, missing, paths, cache_dir))
    return [
        (name, rewritten[doc["uid"]] if name == "stream_resource" else doc) for name, doc in docs
    ]


def _fetch_through_tiled(
    run: Container,
    docs: list[tuple[str, dict]],
    resources: Mapping[str, dict],
    missing: set[str],
    paths: Mapping[str, Path],
    cache_dir: Path,
) -> dict[str, dict]:
    import h5py
    import numpy as np

    streams = {doc["uid"]: doc.get("name", "primary") for name, doc in docs if name == "descriptor"}
    # Tiled serves a data key of a stream as all its stream datums' frames, in order.
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for name, doc in docs:
        if name == "stream_datum" and doc["stream_resource"] in resources:
            key = resources[doc["stream_resource"]]["data_key"]
            groups[(doc["descriptor"], key)].append(doc)
    start_uid = run.metadata["start"]["uid"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, dict[tuple[int, int], Any]] = defaultdict(dict)  # resource -> rows
    for (descriptor, key), datums in groups.items():
        if not any(d["stream_resource"] in missing for d in datums):
            continue
        stream = streams.get(descriptor, "primary")
        try:
            node = run[stream][key]
            _probe(node)
            frames = node.read()
        except Exception as err:
            files = sorted({str(paths[d["stream_resource"]]) for d in datums})
            raise ScanDataError(
                f"The frames of run {start_uid} (stream {stream!r}, {key!r}) are in {files}, "
                f"which this machine cannot read, and the Tiled server could not serve them "
                f"either ({type(err).__name__}: {str(err)[:300]}). Expected the detector files "
                "to exist here or under the server's readable_storage. Mount or copy them, "
                "pass a root map (--root-map OLD=NEW), or point the server at them."
            ) from err
        row = 0
        for datum in datums:
            n = datum["indices"]["stop"] - datum["indices"]["start"]
            if datum["stream_resource"] in missing:
                block = (datum["indices"]["start"], datum["indices"]["stop"])
                arrays[datum["stream_resource"]][block] = np.asarray(frames[row : row + n])
            row += n
    rewritten = {}
    for uid in missing:
        doc = resources[uid]
        path = cache_dir / f"{uid}.h5"
        blocks = arrays.get(uid, {})
        dataset = doc.get("parameters", {}).get("dataset", "/entry/data/data")
        if blocks:
            stop = max(b[1] for b in blocks)
            first = next(iter(blocks.values()))
            with h5py.File(path, "w") as f:
                out = f.create_dataset(dataset, shape=(stop, *first.shape[1:]), dtype=first.dtype)
                for (a, b), values in blocks.items():
                    out[a:b] = values
        logger.info("Frames of %s fetched through Tiled into %s", paths[uid], path)
        rewritten[uid] = {**doc, "uri": path.resolve().as_uri()}
    return rewritten


def _probe(node: Container) -> None:
    """Ask for one frame without tiled's retries (a server that cannot read the file
    answers 500, which the client would retry for up to 45 s)."""
    url = node.item["links"]["full"]
    response = node.context.http_client.get(
        url, params={"slice": "0:1"}, headers={"Accept": "application/octet-stream"}
    )
    if response.status_code >= 400:
        raise OSError(f"the server answered {response.status_code}: {response.text[:200]}")


# ------------------------------------------------------------------------ live order
def live_order(docs: Iterable[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
    """Rebuild the live order of a stored run: each frame right after its event.

    Stored runs list all events of a stream, then its ``stream_resource`` and
    one ``stream_datum`` per data key covering every frame. Here each stream
    datum is split into one per event (``seq_num``), yielded right after that
    event, with its resource just before the first. Stream datums without
    sequence numbers (fly scans) stay whole and keep their place.
    """
    docs = list(docs)
    resources = {doc["uid"]: doc for name, doc in docs if name == "stream_resource"}
    pending: dict[tuple[str, int], list[dict]] = defaultdict(list)  # (descriptor, seq) -> datums
    whole: set[str] = set()
    for name, doc in docs:
        if name != "stream_datum":
            continue
        seq, idx = doc["seq_nums"], doc["indices"]
        n_seq, n_idx = seq["stop"] - seq["start"], idx["stop"] - idx["start"]
        if n_seq <= 0 or n_idx % n_seq:
            whole.add(doc["uid"])
            continue
        per = n_idx // n_seq
        for i in range(n_seq):
            part = {
                **doc,
                "uid": f"{doc['uid']}/{i}",
                "indices": {"start": idx["start"] + i * per, "stop": idx["start"] + (i + 1) * per},
                "seq_nums": {"start": seq["start"] + i, "stop": seq["start"] + i + 1},
            }
            pending[(doc["descriptor"], seq["start"] + i)].append(part)
    sent: set[str] = set()

    def with_resource(part: dict) -> Iterator[tuple[str, dict]]:
        uid = part["stream_resource"]
        if uid not in sent and uid in resources:
            sent.add(uid)
            yield "stream_resource", resources[uid]
        yield "stream_datum", part

    def leftovers() -> Iterator[tuple[str, dict]]:
        for parts in pending.values():  # frames without an event: keep them
            for part in parts:
                yield from with_resource(part)
        pending.clear()
        for uid, doc in resources.items():  # resources without datums
            if uid not in sent:
                sent.add(uid)
                yield "stream_resource", doc

    for name, doc in docs:
        if name == "stream_resource":
            continue  # sent just before its first datum
        if name == "stream_datum":
            if doc["uid"] in whole:
                yield from with_resource(doc)
            continue
        if name == "stop":
            yield from leftovers()
        yield name, doc
        if name in ("event", "event_page"):
            seqs = doc["seq_num"] if name == "event_page" else [doc["seq_num"]]
            for seq in seqs:
                for part in pending.pop((doc["descriptor"], seq), []):
                    yield from with_resource(part)
    yield from leftovers()
