"""What a user gets end to end: the scan's time with the README's wiring attached.

    python benchmarks/overhead.py --outage --json benchmarks/results/overhead.json
    python benchmarks/overhead.py --cases 'paced15/*' unpaced/bare unpaced/both
    python benchmarks/overhead.py --quick --cases paced50/both      # a smoke run, seconds

The wiring is the README's ("Use it from Python"), against an embedded
``LocalCatalog``::

    RE.subscribe(tiled_writer(runs_container(client, "raw"), process=True))
    RE.subscribe(JitProcess(config=JitConfig(refresh_every=10, model="unet"),
                            emit=tiled_writer(runs_container(client, "derived")),
                            directory=...))

``--in-process`` measures the earlier wiring instead: ``tiled_writer(...)``
and ``JitCallback(...)``, whose threads run in the RunEngine's process.

Every case is a fresh RunEngine with the simulated ophyd-async detector
(``simulated_devices.hw``) running ``tomo_continuous`` for two rotations (10
darks, 10 flats). A case is ``<scan>/<subscriptions>``:

- scans: ``unpaced`` (32 x 128 frames, 180 projections per rotation, as fast
  as the simulated detector goes); ``paced15``, ``paced50``, ``paced100``
  (128 x 128 frames, 180 per rotation, held to 15, 50, 100 frames/s in
  wall-clock time); ``graas2023`` (the 647 x 768 detector of Graas et al.
  2023 at 83 frames/s, cone beam, 150 projections per 360-degree rotation,
  replayed from a few pre-computed frames so that making a frame is one copy);
- subscriptions: ``bare`` (nothing), ``raw`` (the raw writer), ``jit``
  (JitProcess, publishing its derived run) and ``both``.

``--outage`` adds the case ``outage``: both subscriptions, a paced scan of
about ``--outage-scan-s`` seconds, and the catalog (a ``tiled serve``
subprocess on a fixed port) killed ``--outage-at`` seconds into the scan and
started again on the same directory, port and API key ``--outage-s`` seconds
later. The server's start-up time comes on top: the real outage (kill to
first answer) is recorded as ``timeline.down_s``.

Measured per case:

- the scan's wall time (``RE(plan)``), its ratio to the nominal time (frames
  taken / frame rate; paced scans) and to the bare scan of the same kind (where
  that case ran: the nominal time leaves out what the plan itself costs, e.g.
  staging the detector for each stream); frames/s achieved;
- the RunEngine-thread time of each subscribed callback per document
  (``time.perf_counter_ns`` around the call): median, p99 and max in
  microseconds, also by document name; the derived writer's time per document
  on JitCallback's worker thread, the same way;
- from ``JitCallback.summaries``: projections processed, frame documents
  dropped, slices made against the refreshes due (one after the first full
  rotation, then every ``refresh_every`` projections), training steps/s;
- after the scan: the time until JitCallback has processed everything, and
  until the raw and the derived run are complete in the catalog (their stop
  documents stored), after ``flush(timeout)`` on each writer that has one;
  then the runs are replayed from the catalog and their documents counted
  against those emitted (start, descriptors, events per stream, stop);
- for the outage: the raw run's exit status, documents spooled, written back
  and lost (the writers' ``stats`` dicts where they have them, else counted:
  emitted minus stored), and whether the derived run is complete once the
  catalog is back.

A ``targets`` block says whether each goal holds (None where its cases were
not run): paced scans with both attached within 1.05x nominal time with a
slice at every refresh; the unpaced scan with both within 1.3x the bare one;
every subscribed callback at most 20 us median and 1 ms p99 per document on
the RunEngine's thread; through a 30 s outage the raw run succeeds, no
document is lost and the derived run is complete after the catalog returns.

Before the cases a short unrecorded scan per detector kind warms up imports,
numba kernels and the catalog (``--no-warmup`` skips it). ``--quick`` shrinks
every scan (24 projections per rotation, 2 darks and flats, a 14 s outage
scan) for smoke runs. Writers that spool (``tiled_writer(..., spool_dir=)``)
spool under each case's own directory. Results go to ``--json`` with the
machine's description; a table and the targets are printed at the end.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fnmatch
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import machine  # noqa: E402  (the sibling benchmark's helper)
from live_learning import parse_value  # noqa: E402

SUBSCRIPTIONS = {"bare": (), "raw": ("raw",), "jit": ("jit",), "both": ("raw", "jit")}
"""Case suffix -> what is subscribed to the RunEngine."""

GRAAS2023 = {
    "detector_shape": (647, 768),
    "pixel_size": 0.1496,
    "source_origin": 400.0,
    "origin_detector": 400.0,
}
"""The detector and distances of Graas et al. 2023, as ``benchmarks/reconstruction.py`` has them."""

DROPPED = re.compile(r"(\d+) frame documents were dropped")


@dataclasses.dataclass(frozen=True)
class Scan:
    """One kind of scan: detector, projections, pacing and where frames come from."""

    name: str
    rows: int
    cols: int
    angles: int
    rotations: int = 2
    fps: float = 30.0
    paced: bool = True
    source: str = "phantom"  # or "graas2023"
    darks: int = 10
    flats: int = 10

    @property
    def frames(self) -> int:
        """Frames the detector takes: darks, flats and projections."""
        return self.darks + self.flats + self.angles * self.rotations


def scans(quick: bool, outage_fps: float, outage_scan_s: float) -> dict[str, Scan]:
    """The scan kinds by name (``--quick``: 24 projections per rotation, 2 darks and flats)."""
    out = {
        "unpaced": Scan("unpaced", 32, 128, 180, fps=30.0, paced=False),
        "paced15": Scan("paced15", 128, 128, 180, fps=15.0),
        "paced50": Scan("paced50", 128, 128, 180, fps=50.0),
        "paced100": Scan("paced100", 128, 128, 180, fps=100.0),
        "graas2023": Scan(
            "graas2023", *GRAAS2023["detector_shape"], 150, fps=83.0, source="graas2023"
        ),
    }
    frames = outage_scan_s * outage_fps
    out["outage"] = Scan(
        "outage", 128, 128, 180, rotations=max(2, math.ceil(frames / 180)), fps=outage_fps
    )
    if quick:
        out = {k: dataclasses.replace(s, angles=24, darks=2, flats=2) for k, s in out.items()}
        rotations = max(2, math.ceil(frames / 24))
        out["outage"] = dataclasses.replace(out["outage"], rotations=rotations)
    return out


# ----------------------------------------------------------------------------- sources
_GRAAS2023_RECORDING: list[Any] = []


def graas2023_source(frames: int = 16, photons: float = 1000.0) -> Any:
    """A ``RecordingSource`` of Graas et al. 2023's detector: ``frames`` projections over 360 deg.

    The frames (Poisson counts of the ball phantom, ``benchmarks/reconstruction.py``'s
    scale) are made once and kept in memory; the source then only copies the
    recorded frame nearest the stage angle (``mirror=False``).
    """
    from simulated_devices.cone import ball_phantom, cone_projection
    from simulated_devices.recordings import DXchangeRecording
    from simulated_devices.sources import RecordingSource

    if not _GRAAS2023_RECORDING:
        rng = np.random.default_rng(0)
        rows, cols = GRAAS2023["detector_shape"]
        theta = 360.0 * np.arange(frames) / frames
        geometry = {k: v for k, v in GRAAS2023.items()}
        data = np.stack(
            [
                cone_projection(ball_phantom(scale=0.8), angle=math.radians(a), **geometry)
                for a in theta
            ]
        )
        dark = 100.0
        data = (rng.poisson(photons * np.exp(-data)) + dark).astype(np.uint16)
        flats = (rng.poisson(photons, size=(2, rows, cols)) + dark).astype(np.uint16)
        darks = np.full((2, rows, cols), dark, dtype=np.uint16)
        recording = DXchangeRecording(
            data=data, flats=flats, darks=darks, theta=theta, sample_name="balls (cone beam)"
        )
        _GRAAS2023_RECORDING.append(recording)
    return RecordingSource(
        _GRAAS2023_RECORDING[0],
        pixel_size=GRAAS2023["pixel_size"],
        center_of_rotation=(GRAAS2023["detector_shape"][1] - 1) / 2,
        replay="nearest_angle",
        mirror=False,
    )


def source_and_geometry(scan: Scan) -> tuple[Any, dict[str, Any] | None, tuple[float, float]]:
    """The frame source, a geometry override for the plan, and the angular range."""
    if scan.source == "graas2023":
        source = graas2023_source()
        geometry = source.metadata() | {
            "beam": "cone",
            "source_origin": GRAAS2023["source_origin"],
            "origin_detector": GRAAS2023["origin_detector"],
        }
        return source, geometry, (0.0, 360.0)
    from simulated_devices.phantoms import BubbleColumn
    from simulated_devices.sources import PhantomSource

    phantom = BubbleColumn(detector_shape=(scan.rows, scan.cols))
    return PhantomSource(phantom, photons=1000), None, (0.0, 180.0)


# ----------------------------------------------------------------------------- timing
class Timed:
    """Calls ``callback(name, doc)`` and keeps the time of each call; counts what passes.

    The counting happens outside the timed interval. Exceptions pass through
    (a user's RunEngine sees them too).
    """

    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.ns: list[int] = []
        self.names: list[str] = []
        self.counts = Counts()
        self.errors = 0

    def __call__(self, name: str, doc: dict) -> Any:
        self.counts.add(name, doc)
        t0 = time.perf_counter_ns()
        try:
            return self.callback(name, doc)
        except Exception:
            self.errors += 1
            raise
        finally:
            self.ns.append(time.perf_counter_ns() - t0)
            self.names.append(name)

    def stats(self) -> dict[str, Any]:
        """Median, p99 and max per document in microseconds, overall and by name."""
        out = _spread(self.ns)
        out["errors"] = self.errors
        by_name: dict[str, list[int]] = collections.defaultdict(list)
        for name, ns in zip(self.names, self.ns, strict=True):
            by_name[name].append(ns)
        out["by_name"] = {name: _spread(v, total=False) for name, v in sorted(by_name.items())}
        return out


def _spread(ns: list[int], total: bool = True) -> dict[str, Any]:
    if not ns:
        return {"documents": 0}
    us = np.asarray(ns, dtype=np.float64) / 1000.0
    out = {
        "documents": int(us.size),
        "median_us": float(np.median(us)),
        "p99_us": float(np.percentile(us, 99)),
        "max_us": float(us.max()),
    }
    if total:
        out["total_s"] = float(us.sum() / 1e6)
    return out


class Counts:
    """Documents by name, events by stream, and the start and stop documents."""

    def __init__(self) -> None:
        self.documents: collections.Counter[str] = collections.Counter()
        self.events: collections.Counter[str] = collections.Counter()
        self.streams: dict[str, str] = {}
        self.start: dict | None = None
        self.stop: dict | None = None

    def add(self, name: str, doc: dict) -> None:
        if name == "event_page":
            n = len(doc.get("seq_num", ()))
            self.documents["event"] += n
            self.events[self.streams.get(doc.get("descriptor"), "?")] += n
            return
        self.documents[name] += 1
        if name == "start":
            self.start = doc
        elif name == "stop":
            self.stop = doc
        elif name == "descriptor":
            self.streams[doc["uid"]] = doc.get("name", "primary")
        elif name == "event":
            self.events[self.streams.get(doc.get("descriptor"), "?")] += 1

    def to_dict(self) -> dict[str, Any]:
        keys = ("start", "descriptor", "event", "stop")
        return {
            "documents": {k: self.documents.get(k, 0) for k in keys},
            "events": dict(sorted(self.events.items())),
            "exit_status": None if self.stop is None else self.stop.get("exit_status"),
        }


# ----------------------------------------------------------------------------- catalog
def wait_for_stop(container: Any, uid: str, timeout: float) -> float | None:
    """Seconds until run ``uid`` has its stop document in ``container``; None on timeout."""
    t0 = time.monotonic()
    while True:
        try:
            if uid in container and container[uid].metadata.get("stop"):
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - the catalog may be restarting
            pass
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.05)


def stored(container: Any, uid: str, emitted: Counts) -> dict[str, Any]:
    """Replay run ``uid`` from the catalog and compare its documents with those emitted."""
    from bluesky_jit.catalog import documents

    counts = Counts()
    try:
        for name, doc in documents(container[uid]):
            counts.add(name, doc)
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        return {"error": f"{type(error).__name__}: {error}", "complete": False, "lost": None}
    got, want = counts.to_dict(), emitted.to_dict()
    lost = sum(max(0, want["documents"][k] - got["documents"][k]) for k in want["documents"])
    return {
        "stored": got,
        "emitted": want,
        "lost": lost,
        "complete": got["documents"] == want["documents"]
        and got["events"] == want["events"]
        and counts.stop is not None,
    }


def _writer_calls(writer: Any, method: str, timeout: float) -> Any:
    """``writer.flush(timeout)`` or ``writer.close()`` where the writer has it."""
    call = getattr(writer, method, None)
    if call is None:
        return None
    try:
        return call(timeout) if method == "flush" else call()
    except Exception as error:  # noqa: BLE001 - reported
        return f"{type(error).__name__}: {error}"


def make_writer(container: Any, spool: Path, process: bool = False) -> Any:
    """``tiled_writer(container, process=...)``, spooling under ``spool``.

    Each case gets a spool directory of its own, so that no case (and no
    other process using the default one) finds another's runs there.
    """
    from bluesky_jit.worker_process import tiled_writer

    if not process:
        return tiled_writer(container, spool_dir=spool)
    return tiled_writer(container, spool_dir=spool, process=True)


def _writer_stats(writer: Any) -> dict[str, Any] | None:
    """The writer's ``stats`` as a dict (a mapping, or an object with ``to_dict``)."""
    stats = getattr(writer, "stats", None)
    if stats is None:
        return None
    try:
        if hasattr(stats, "to_dict"):
            stats = stats.to_dict()
        elif dataclasses.is_dataclass(stats):
            stats = dataclasses.asdict(stats)
        return {k: _jsonable(v) for k, v in dict(stats).items()}
    except Exception:  # noqa: BLE001
        return {"unreadable": repr(stats)}


def _first(stats: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if stats and key in stats:
            return stats[key]
    return None


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by each thread of this process (by Python thread name,
    numbered native threads as ``native-<tid>``), by the catalog server's process and by
    the JitProcess's worker process."""
    import threading as _threading

    names = {t.native_id: t.name for t in _threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tid = int(task.name)
        name = names.get(tid, f"native-{tid}")
        name = "RunEngine (main)" if tid == os.getpid() else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    for child in Path("/proc").iterdir():  # the catalog server: a child process of ours
        if not child.name.isdigit():
            continue
        try:
            fields = (child / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            try:
                worker = b"bluesky_jit.worker_process" in (child / "cmdline").read_bytes()
            except OSError:
                continue
            name = "jit worker (process)" if worker else "catalog server (process)"
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- one case
@dataclasses.dataclass
class Context:
    """What the cases share: the catalog, the work directory, the settings."""

    catalog: Any
    workdir: Path
    config: Any
    settle_s: float
    keep: bool
    in_process: bool = False


def run_case(
    scan: Scan, subscriptions: tuple[str, ...], ctx: Context, *, during: Any = None
) -> dict[str, Any]:
    """Run one scan with ``subscriptions`` attached; return what was measured.

    ``during(scan_started)`` runs on a thread of its own while the scan runs
    (the outage); ``scan_started`` is a ``threading.Event`` set at the raw
    start document.
    """
    from bluesky import RunEngine

    from bluesky_jit.callbacks import JitCallback
    from bluesky_jit.catalog import runs_container
    from bluesky_jit.worker_process import JitProcess
    from simulated_devices import hw
    from simulated_devices.plans import tomo_continuous

    label = f"{scan.name}/{'+'.join(subscriptions) or 'bare'}"
    files = ctx.workdir / "files" / label.replace("/", "_").replace("+", "_")
    RE = RunEngine({})
    source, geometry, angular_range = source_and_geometry(scan)
    beamline = hw(files / "raw", source=source, frame_rate=scan.fps, paced=scan.paced)
    client = ctx.catalog.client() if subscriptions else None
    timed: dict[str, Timed] = {}
    writers: dict[str, Any] = {}
    jit = None
    derived_emit = None
    started = threading.Event()
    if "raw" in subscriptions:
        raw_runs = runs_container(client, "raw")
        writers["raw"] = make_writer(raw_runs, files / "spool" / "raw", not ctx.in_process)
        timed["raw_writer"] = Timed(writers["raw"])
        RE.subscribe(timed["raw_writer"])
    if "jit" in subscriptions:
        spool = files / "spool" / "derived"
        writers["derived"] = make_writer(runs_container(client, "derived"), spool)
        derived_emit = Timed(writers["derived"])
        kind = JitCallback if ctx.in_process else JitProcess
        jit = kind(config=ctx.config, emit=derived_emit, directory=files / "derived")
        timed["jit_callback"] = Timed(jit)
        RE.subscribe(timed["jit_callback"])
    hook = None
    if during is not None:
        RE.subscribe(lambda name, doc: started.set(), "start")
        hook = threading.Thread(target=during, args=(started,), name="outage", daemon=True)
        hook.start()
    plan = tomo_continuous(
        *beamline.plan_devices,
        num_angles=scan.angles,
        rotations=scan.rotations,
        angular_range=angular_range,
        num_darks=scan.darks,
        num_flats=scan.flats,
        geometry=geometry,
    )
    error = None
    cpu0 = thread_cpu_s()
    t0 = time.perf_counter()
    try:
        RE(plan)
    except Exception as exc:  # noqa: BLE001 - e.g. a writer that raised into the RunEngine
        error = f"{type(exc).__name__}: {exc}"[:2000]
    scan_s = time.perf_counter() - t0
    cpu1 = thread_cpu_s()
    cpu_during_scan = {
        name: round(cpu1[name] - cpu0.get(name, 0.0), 3)
        for name in cpu1
        if cpu1[name] - cpu0.get(name, 0.0) > 0.005
    }
    started.set()  # a scan that failed before its start document still lets the hook end
    frames = beamline.det.clock.index
    out: dict[str, Any] = {
        "case": label,
        "scan": {k: v for k, v in vars(scan).items()},
        "subscriptions": list(subscriptions),
        "error": error,
        "scan_s": scan_s,
        "cpu_s_during_scan": cpu_during_scan,
        "frames": frames,
        "frames_per_s": frames / scan_s,
    }
    if scan.paced:
        out["nominal_s"] = frames / scan.fps
        out["ratio_to_nominal"] = scan_s / out["nominal_s"]
    if hook is not None:
        hook.join()
    out["re_thread"] = {name: t.stats() for name, t in timed.items()}

    # after the scan: processing, publishing, completeness
    after: dict[str, Any] = {}
    t_end = time.monotonic()
    if jit is not None:
        after["jit_flushed"] = jit.flush(timeout=ctx.settle_s)
        after["jit_flush_s"] = time.monotonic() - t_end
    for key, writer in writers.items():
        after[f"{key}_writer_flush"] = _writer_calls(writer, "flush", ctx.settle_s)
    after["writers_flush_s"] = time.monotonic() - t_end
    catalog: dict[str, Any] = {}
    if "raw" in writers:
        counts = timed["raw_writer"].counts
        raw_uid = counts.start["uid"] if counts.start else None
        raw_runs = runs_container(ctx.catalog.client(), "raw")
        waited = wait_for_stop(raw_runs, raw_uid, ctx.settle_s) if raw_uid else None
        after["raw_complete_s"] = None if waited is None else time.monotonic() - t_end
        catalog["raw"] = {"uid": raw_uid, **stored(raw_runs, raw_uid, counts)} if raw_uid else {}
    if jit is not None:
        counts = derived_emit.counts
        derived_uid = counts.start["uid"] if counts.start else None
        derived_runs = runs_container(ctx.catalog.client(), "derived")
        waited = wait_for_stop(derived_runs, derived_uid, ctx.settle_s) if derived_uid else None
        after["derived_complete_s"] = None if waited is None else time.monotonic() - t_end
        catalog["derived"] = (
            {"uid": derived_uid, **stored(derived_runs, derived_uid, counts)} if derived_uid else {}
        )
        out["derived_writer_worker_thread"] = derived_emit.stats()
    out["after_scan"] = after
    out["catalog"] = catalog
    out["writer_stats"] = {key: _writer_stats(w) for key, w in writers.items()}
    if jit is not None:
        jit.close(timeout=ctx.settle_s)
        out["jit"] = jit_summary(jit, scan)
    for writer in writers.values():
        _writer_calls(writer, "close", ctx.settle_s)
    if not ctx.keep:
        shutil.rmtree(files, ignore_errors=True)
    return out


def jit_summary(jit: Any, scan: Scan) -> dict[str, Any]:
    """Projections, dropped frames, slices against refreshes due, training rate."""
    if not jit.summaries:
        return {"error": "JitCallback finished no run"}
    s = jit.summaries[-1]
    projections = scan.angles * scan.rotations
    window, every = scan.angles, jit.config.reconstruction.refresh_every
    due = 1 + (projections - window) // every if projections >= window else 0
    dropped = sum(int(m.group(1)) for p in s.problems for m in DROPPED.finditer(p))
    return {
        "exit_status": s.exit_status,
        "projections": s.projections,
        "projections_emitted": projections,
        "frames_dropped": dropped,
        "slices": s.slices,
        "refreshes_due": due,
        "slice_every_refresh": s.slices >= due and dropped == 0,
        "denoised": s.denoised,
        "train_steps": s.train_steps,
        "train_steps_per_s": s.train_steps_per_s,
        "projections_per_s": s.projections_per_s,
        "problems": s.problems[:5],
    }


# ----------------------------------------------------------------------------- outage
def run_outage(scan: Scan, args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """Both subscriptions, the catalog killed and restarted (same directory, port, key)."""
    from bluesky_jit.catalog import LocalCatalog

    workdir = args.workdir / "outage"
    directory = workdir / "catalog"
    port = _free_port()
    holder = {"catalog": LocalCatalog(directory, port=port, readable_storage=[workdir])}
    key = holder["catalog"].api_key
    timeline: dict[str, Any] = {"port": port}
    at, down = (args.outage_at, args.outage_s)

    class Proxy:
        """The context's catalog: whichever server is up now."""

        def client(self) -> Any:
            return holder["catalog"].client()

    def outage(started: threading.Event) -> None:
        started.wait()
        t0 = time.monotonic()
        time.sleep(at)
        holder["catalog"].close()
        timeline["killed_at_s"] = time.monotonic() - t0
        time.sleep(max(0.0, down - (time.monotonic() - t0 - timeline["killed_at_s"])))
        timeline["restart_at_s"] = time.monotonic() - t0
        try:
            holder["catalog"] = LocalCatalog(
                directory, port=port, api_key=key, readable_storage=[workdir]
            )
            timeline["back_at_s"] = time.monotonic() - t0
        except Exception as error:  # noqa: BLE001
            timeline["restart_error"] = f"{type(error).__name__}: {error}"
        timeline["down_s"] = timeline.get("back_at_s", math.nan) - timeline["killed_at_s"]

    ctx = Context(Proxy(), workdir, config, args.settle_s, args.keep, args.in_process)
    try:
        out = run_case(scan, ("raw", "jit"), ctx, during=outage)
    finally:
        holder["catalog"].close()
    out["case"] = "outage"
    out["timeline"] = timeline
    raw_stats = out["writer_stats"].get("raw")
    derived_stats = out["writer_stats"].get("derived")
    raw = out["catalog"].get("raw", {})
    derived = out["catalog"].get("derived", {})
    emitted = out["re_thread"]["raw_writer"]
    lost_stats = [
        _first(s, "lost", "documents_lost", "dropped") for s in (raw_stats, derived_stats)
    ]
    lost_counted = [raw.get("lost"), derived.get("lost")]
    lost = lost_stats if all(v is not None for v in lost_stats) else lost_counted
    out["outage"] = {
        "raw_exit_status": (raw.get("emitted") or {}).get("exit_status"),
        "raw_documents_emitted": emitted.get("documents"),
        "spooled": [_first(s, "spooled", "documents_spooled") for s in (raw_stats, derived_stats)],
        "written_back": [
            _first(s, "written_back", "replayed", "unspooled") for s in (raw_stats, derived_stats)
        ],
        "lost": lost,
        "lost_from": "writer stats" if lost is lost_stats else "catalog count",
        "lost_total": None if None in lost else sum(lost),
        "raw_complete": bool(raw.get("complete")),
        "derived_complete": bool(derived.get("complete")),
        "note": "spooled / written back / lost: [raw writer, derived writer]",
    }
    if out["outage"]["raw_exit_status"] is None and out.get("error"):
        out["outage"]["raw_exit_status"] = "exception: " + out["error"][:200]
    return out


# ----------------------------------------------------------------------------- targets
def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The goals as booleans; None where none of their cases ran."""

    def paced_ok(r: dict[str, Any]) -> bool:
        ratio = r.get("ratio_to_nominal", math.inf)
        return ratio <= 1.05 and bool(r.get("jit", {}).get("slice_every_refresh"))

    paced = {
        k: paced_ok(r) for k, r in results.items() if k.endswith("/both") and r["scan"]["paced"]
    }
    unpaced = None
    bare, both = results.get("unpaced/bare"), results.get("unpaced/both")
    if bare and both:
        unpaced = both["scan_s"] <= 1.3 * bare["scan_s"]
    per_doc: dict[str, bool] = {}
    for key, r in results.items():
        if key == "outage":
            continue
        for name, s in r.get("re_thread", {}).items():
            if s.get("documents"):
                per_doc[f"{key}:{name}"] = s["median_us"] <= 20 and s["p99_us"] <= 1000
    outage = results.get("outage")
    out: dict[str, Any] = {
        "paced <= 1.05x nominal with both, a slice at every refresh": (
            all(paced.values()) if paced else None
        ),
        "unpaced <= 1.3x bare with both": unpaced,
        "RE thread per document: median <= 20 us, p99 <= 1 ms": (
            all(per_doc.values()) if per_doc else None
        ),
        "30 s outage: raw run success, 0 lost, derived run complete": None,
        "failing": sorted(
            [k for k, v in paced.items() if not v] + [k for k, v in per_doc.items() if not v]
        ),
    }
    if outage is not None:
        o = outage["outage"]
        out["30 s outage: raw run success, 0 lost, derived run complete"] = (
            o["raw_exit_status"] == "success" and o["lost_total"] == 0 and o["derived_complete"]
        )
    return out


def add_bare_ratios(results: dict[str, dict[str, Any]]) -> None:
    """The ratio of each scan's time to the bare scan of the same kind, where that ran."""
    for key, r in results.items():
        bare = results.get(key.split("/")[0] + "/bare")
        if bare is not None:
            r["ratio_to_bare"] = r["scan_s"] / bare["scan_s"]


# ----------------------------------------------------------------------------- table
def table(results: dict[str, dict[str, Any]]) -> str:
    """One line per case."""

    def us(r: dict[str, Any], name: str) -> str:
        s = r.get("re_thread", {}).get(name)
        if not s or not s.get("documents"):
            return "-"
        return f"{s['median_us']:.0f}/{s['p99_us']:.0f}/{s['max_us']:.0f}"

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    head = (
        f"{'case':<16} {'scan s':>7} {'/nom':>6} {'/bare':>6} {'fps':>6}  {'raw writer us':>18} "
        f"{'JitCallback us':>18} {'drop':>4} {'slices':>7} {'steps/s':>7} "
        f"{'derived s':>9} {'catalog':>7}"
    )
    lines = [head, " " * 50 + "(RE thread, median/p99/max)", "-" * len(head)]
    for key, r in results.items():
        j = r.get("jit", {})
        slices = f"{j['slices']}/{j['refreshes_due']}" if "slices" in j else "-"
        cat = r.get("catalog", {})
        ok = "-" if not cat else ("ok" if all(v.get("complete") for v in cat.values()) else "NO")
        lines.append(
            f"{key:<16} {r['scan_s']:>7.2f} {num(r.get('ratio_to_nominal'), '.3f'):>6} "
            f"{num(r.get('ratio_to_bare'), '.3f'):>6} {r['frames_per_s']:>6.1f}  "
            f"{us(r, 'raw_writer'):>18} {us(r, 'jit_callback'):>18} "
            f"{num(j.get('frames_dropped'), 'd'):>4} {slices:>7} "
            f"{num(j.get('train_steps_per_s'), '.1f'):>7} "
            f"{num(r.get('after_scan', {}).get('derived_complete_s'), '.2f'):>9} {ok:>7}"
        )
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool, type(None), list, dict, tuple)):
        return value
    return repr(value)


# ----------------------------------------------------------------------------- main
def select(names: list[str], patterns: list[str] | None) -> list[str]:
    """Case names matching any of the shell-style ``patterns`` (all when None)."""
    if not patterns:
        return names
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise SystemExit(f"--cases {unknown} match no case; cases are: {', '.join(names)}")
    return chosen


def warm_up(kinds: set[str], ctx: Context, all_scans: dict[str, Scan]) -> None:
    """A short unrecorded scan with both subscriptions per detector kind."""
    for kind in sorted(kinds):
        base = all_scans["graas2023" if kind == "graas2023" else "unpaced"]
        scan = dataclasses.replace(
            base, name=f"warmup_{kind}", angles=24, darks=2, flats=2, paced=False
        )
        if kind == "phantom":
            scan = dataclasses.replace(scan, rows=32, cols=128)
        t0 = time.perf_counter()
        run_case(scan, ("raw", "jit"), ctx)
        print(f"warm-up ({kind}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="case names or shell patterns, e.g. 'paced15/*' unpaced/both outage "
        "(default: every scan case, plus outage with --outage)",
    )
    parser.add_argument("--outage", action="store_true", help="add the catalog-outage case")
    parser.add_argument("--outage-at", type=float, default=15.0, help="s into the scan")
    parser.add_argument("--outage-s", type=float, default=30.0, help="s the catalog is down")
    parser.add_argument("--outage-scan-s", type=float, default=60.0, help="nominal scan length")
    parser.add_argument("--outage-fps", type=float, default=15.0)
    parser.add_argument("--quick", action="store_true", help="tiny scans, for a smoke run")
    parser.add_argument(
        "--rotations", type=int, default=None, help="rotations of every scan but the outage's (2)"
    )
    parser.add_argument("--set", action="append", default=[], help="JitConfig key=value")
    parser.add_argument(
        "--settle-s", type=float, default=300.0, help="longest wait after a scan (s)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="the earlier wiring: a JitCallback and a raw CatalogWriter with their threads in "
        "the RunEngine's process, instead of the README's JitProcess and "
        "tiled_writer(..., process=True) (each in a child process)",
    )
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep detector and derived files")
    args = parser.parse_args(argv)
    if args.quick:
        args.outage_scan_s = min(args.outage_scan_s, 14.0)
        args.outage_at = min(args.outage_at, 3.0)
        args.outage_s = min(args.outage_s, 6.0)

    from bluesky_jit.catalog import LocalCatalog
    from bluesky_jit.config import JitConfig

    settings = {"refresh_every": 10, "model": "unet", "device": "cpu"}
    settings |= {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    config = JitConfig(**settings)
    all_scans = scans(args.quick, args.outage_fps, args.outage_scan_s)
    if args.rotations is not None:
        all_scans = {
            k: scan if k == "outage" else dataclasses.replace(scan, rotations=args.rotations)
            for k, scan in all_scans.items()
        }
    names = [f"{s}/{sub}" for s in all_scans if s != "outage" for sub in SUBSCRIPTIONS]
    chosen = select([*names, "outage"], args.cases or names)
    if args.outage and "outage" not in chosen:
        chosen.append("outage")

    temporary = None
    if args.workdir is None:
        temporary = tempfile.TemporaryDirectory(prefix="overhead_")
        args.workdir = Path(temporary.name)
    args.workdir = args.workdir.resolve()
    results: dict[str, dict[str, Any]] = {}
    try:
        scan_cases = [c for c in chosen if c != "outage"]
        if scan_cases:
            with LocalCatalog(args.workdir / "catalog", readable_storage=[args.workdir]) as cat:
                ctx = Context(cat, args.workdir, config, args.settle_s, args.keep, args.in_process)
                if not args.no_warmup:
                    kinds = {all_scans[c.split("/")[0]].source for c in scan_cases}
                    warm_up(kinds, ctx, all_scans)
                for case in scan_cases:
                    kind, sub = case.split("/")
                    print(f"{case} ...", file=sys.stderr, flush=True)
                    results[case] = run_case(all_scans[kind], SUBSCRIPTIONS[sub], ctx)
                    r = results[case]
                    print(
                        f"{case}: {r['scan_s']:.2f} s, {r['frames_per_s']:.1f} frames/s",
                        file=sys.stderr,
                        flush=True,
                    )
        if "outage" in chosen:
            print("outage ...", file=sys.stderr, flush=True)
            results["outage"] = run_outage(all_scans["outage"], args, config)
    finally:
        if temporary is not None:
            temporary.cleanup()
    add_bare_ratios(results)
    out = {
        "machine": machine(),
        "settings": {k: _jsonable(v) for k, v in vars(args).items()} | {"json": None},
        "jit_config": config.to_dict(),
        "targets": targets(results),
        "cases": results,
    }
    text = json.dumps(out, indent=1, default=_jsonable)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(table(results))
    if "outage" in results:
        print("outage:", json.dumps(results["outage"]["outage"], default=_jsonable))
        print("timeline:", json.dumps(results["outage"]["timeline"], default=_jsonable))
    print("targets:", json.dumps(out["targets"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
