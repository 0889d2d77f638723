"""Documents in: turn a tomography run's documents into frames and angles.

:class:`TomoIngest` is an :class:`event_model.DocumentRouter` for one run. It
reads the geometry from the start document, sorts frames into dark, flat and
projection streams, fills frames that detectors wrote to files (old-style
Resource/Datum through an ``event_model.Filler``, new-style
StreamResource/StreamDatum through h5py) and joins each projection frame with
its rotation-stage reading by sequence number, so it works whether the frame
arrives before its event (live ophyd-async) or after it (replay from Tiled).
What comes out goes to a :class:`FrameSink`, which works on arrays only.

Only this module and :mod:`bluesky_jit.emit` know what a document looks like.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import event_model
import h5py
import numpy as np

from .errors import BlueskyJitError, ScanDataError
from .geometry import ScanGeometry, geometry_from_start
from .memory import budget_bytes

logger = logging.getLogger(__name__)

DARK_STREAMS = ("dark", "darks")
FLAT_STREAMS = ("flat", "flats", "white", "bkg")
PROJECTION_STREAMS = ("primary", "tomo", "projections")


class FrameSink(Protocol):
    """What :class:`TomoIngest` feeds: arrays, angles and problems."""

    def begin(self, start: Mapping[str, Any], geometry: ScanGeometry | None) -> None: ...

    def calibration(self, darks: np.ndarray, flats: np.ndarray) -> None: ...

    def projection(self, frame: np.ndarray, *, angle_deg: float, index: int) -> None: ...

    def problem(self, error: Exception) -> None: ...

    def end(self, stop: Mapping[str, Any]) -> None: ...


class CalibrationStore:
    """Dark and flat fields of separate calibration runs (NSLS-II HEX layout).

    Shared by the runs of one callback: a run whose ``tomo.role`` is
    ``"dark_flat"`` stores its mean dark and flat here, keyed by its uid; a
    later scan names it in ``tomo.dark_flat_uid``, or uses the newest one.
    """

    def __init__(self) -> None:
        self._fields: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._latest: str | None = None
        self._lock = threading.Lock()

    def put(self, uid: str, darks: np.ndarray, flats: np.ndarray) -> None:
        with self._lock:
            self._fields[uid] = (darks, flats)
            self._latest = uid

    def get(self, uid: str | None) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            key = uid if uid is not None else self._latest
            return self._fields.get(key) if key is not None else None


class AreaDetectorHDF5Handler:
    """Handler for the ``AD_HDF5`` Resource spec (ophyd v1 area detectors).

    Frames live in ``/entry/data/data`` with shape (N, rows, cols);
    ``frame_per_point`` frames belong to each datum's ``point_number``.
    Frames that would take more than half the default memory budget
    (:func:`bluesky_jit.memory.budget_bytes`) are refused before reading.
    """

    specs = {"AD_HDF5"}

    def __init__(self, filename: str, frame_per_point: int = 1) -> None:
        self._file = h5py.File(filename, "r", swmr=True)
        self._dataset = self._file["/entry/data/data"]
        self._per_point = frame_per_point

    def __call__(self, point_number: int) -> np.ndarray:
        self._dataset.refresh()
        size = self._per_point * math.prod(self._dataset.shape[1:]) * self._dataset.dtype.itemsize
        if size > budget_bytes(None) // 2:
            raise ScanDataError(
                f"{self._file.filename} holds frames of shape {self._dataset.shape[1:]} "
                f"({size / 2**30:.2f} GB a point), more than half the memory budget; not read"
            )
        start = point_number * self._per_point
        return self._dataset[start : start + self._per_point]

    def close(self) -> None:
        self._file.close()


DEFAULT_HANDLERS = {"AD_HDF5": AreaDetectorHDF5Handler}


def uri_to_path(uri: str, root_map: Mapping[str, str] | None = None) -> Path:
    """Local path of a ``file://`` URI, with an optional root map for moved data."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ScanDataError(
            f"Frames are at {uri!r}; only local files (file://) can be read. Copy the data "
            "locally or read the run through a Tiled server."
        )
    path = parsed.path
    for old, new in (root_map or {}).items():
        if path.startswith(old):
            path = new + path[len(old) :]
    return Path(path)


class TomoIngest(event_model.DocumentRouter):
    """Route one run's documents to a :class:`FrameSink`.

    Parameters
    ----------
    sink : FrameSink
    calibrations : CalibrationStore, optional
        Shared store for dark/flat fields of separate calibration runs.
    geometry_overrides : mapping, optional
        Values that win over the start document (see :func:`geometry_from_start`).
    handler_registry : mapping, optional
        Resource spec -> handler class; ``AD_HDF5`` is built in.
    root_map : mapping, optional
        Rewrites file paths of moved data (``{old_root: new_root}``).
    memory_budget : int, optional
        Bytes (:func:`bluesky_jit.memory.budget_bytes`; default a quarter of
        the machine's memory): frames read at once, and projections waiting
        for dark and flat fields, stay within half of it.

    Notes
    -----
    Errors about one frame are reported to ``sink.problem`` and the frame is
    skipped; errors that make the run unusable (bad geometry) are reported and
    the rest of the run is ignored. Nothing is raised to the caller.
    """

    def __init__(
        self,
        sink: FrameSink,
        *,
        calibrations: CalibrationStore | None = None,
        geometry_overrides: Mapping[str, Any] | None = None,
        handler_registry: Mapping[str, Any] | None = None,
        root_map: Mapping[str, str] | None = None,
        memory_budget: int | None = None,
    ) -> None:
        super().__init__()
        self.memory_budget = budget_bytes(None) if memory_budget is None else memory_budget
        self.sink = sink
        self.calibrations = calibrations if calibrations is not None else CalibrationStore()
        self.overrides = dict(geometry_overrides or {})
        self.root_map = dict(root_map or {})
        self._filler = event_model.Filler(
            {**DEFAULT_HANDLERS, **(handler_registry or {})}, inplace=False, root_map=self.root_map
        )
        self.start_doc: dict[str, Any] = {}
        self.geometry: ScanGeometry | None = None
        self.role = "scan"
        self.dead = False
        self.detector_key: str | None = None
        self.angle_key = "rot_stage"
        self._streams: dict[str, str] = {}  # descriptor uid -> stream name
        self._resources: dict[str, dict] = {}  # stream resource uid -> doc
        self._files: dict[str, h5py.File] = {}
        self._darks: list[np.ndarray] = []
        self._flats: list[np.ndarray] = []
        self._calibrated = False
        self._angles: dict[int, float] = {}  # primary seq_num -> angle (deg)
        self._angle_less: set[str] = set()  # projection descriptors without angle readings
        self._md_angles: list[float] = []  # tomo['angles'], one per frame (fly scans)
        self._frames: dict[int, np.ndarray] = {}  # primary seq_num -> frame
        self._waiting: list[tuple[np.ndarray, float, int]] = []  # before calibration
        self._waiting_bytes = 0
        self._events_seen: dict[str, int] = {}  # stream -> events that reached the ingest
        self.projections = 0

    # -- run boundaries ------------------------------------------------------------
    def start(self, doc):
        # Every tomography start yields a derived run: metadata that cannot be read
        # ends it at once, its stop saying what was wrong.
        self.start_doc = dict(doc)
        tomo = doc.get("tomo") or {}
        try:
            if not isinstance(tomo, Mapping):
                raise ScanDataError(
                    f"The start document's 'tomo' must be a mapping of scan metadata "
                    f"(num_angles, angular_range, ...); got the {type(tomo).__name__} {tomo!r}."
                )
            self.role = tomo.get("role", "scan")
            self.detector_key = tomo.get("detector_key")
            self.angle_key = tomo.get("angle_key", "rot_stage")
            self._md_angles = list(tomo.get("angles") or [])
            if self.role == "dark_flat":  # calibration frames only: no rotation, no geometry
                self.sink.begin(self.start_doc, None)
                return
            self.geometry = geometry_from_start(doc, self.overrides)
        except Exception as error:  # noqa: BLE001 - recorded in the derived run's stop
            if not isinstance(error, BlueskyJitError):
                error = ScanDataError(
                    f"The start document's scan metadata could not be read ({type(error).__name__}:"
                    f" {error}); expected numbers for num_angles, angular_range, pixel_size, ... "
                    "in its 'tomo' block (see the README, 'Scan metadata')."
                )
            self.sink.begin(self.start_doc, None)
            self._fatal(error)
            return
        self.sink.begin(self.start_doc, self.geometry)

    def stop(self, doc):
        self._count_missing(doc)
        if not self.dead:
            try:
                self._finish_run()
            except BlueskyJitError as error:
                self._fatal(error)
        for f in self._files.values():
            f.close()
        self._files.clear()
        self.sink.end(doc)

    def _count_missing(self, stop: Mapping[str, Any]) -> None:
        """Events the stop document counts that never came: a problem, never silent.

        Only streams of which some events came are compared (fly scans send
        frames as stream datums, which ``num_events`` need not count).
        """
        counted = stop.get("num_events") if isinstance(stop, Mapping) else None
        for stream, seen in self._events_seen.items():
            expected = counted.get(stream) if isinstance(counted, Mapping) else None
            if isinstance(expected, int) and seen < expected:
                self._problem(
                    ScanDataError(
                        f"{expected - seen} of the {expected} '{stream}' events the raw stop "
                        f"document counts did not reach bluesky_jit ({seen} came): dropped "
                        "under overload or lost on the way (a bus that lost messages)."
                    )
                )

    def _finish_run(self) -> None:
        if self.role == "dark_flat":
            if self._darks and self._flats:
                self.calibrations.put(
                    self.start_doc["uid"], np.stack(self._darks), np.stack(self._flats)
                )
            return
        if not self._calibrated and (self._waiting or self._frames):
            self._calibrate()  # flats after the rotation (FXI): correct what waited
        leftovers = sorted(set(self._frames) - set(self._angles))
        if leftovers:
            raise ScanDataError(
                f"{len(leftovers)} projection frame(s) (seq_num {leftovers[:5]}...) never got a "
                f"rotation angle; expected a '{self.angle_key}' reading in every primary event."
            )

    # -- documents -----------------------------------------------------------------
    def descriptor(self, doc):
        self._filler("descriptor", doc)
        stream = self._streams[doc["uid"]] = doc.get("name", "primary")
        if stream in PROJECTION_STREAMS and self.angle_key not in doc["data_keys"]:
            self._angle_less.add(doc["uid"])  # a fly scan: angles from tomo['angles']
        if self.detector_key is None:
            images = [k for k, v in doc["data_keys"].items() if len(v.get("shape") or []) >= 2]
            if images:
                self.detector_key = images[0]
        elif stream in PROJECTION_STREAMS and self.detector_key not in doc["data_keys"]:
            self._fatal(
                ScanDataError(
                    f"tomo['detector_key'] names {self.detector_key!r}, but the {stream!r} stream "
                    f"has the data keys {sorted(doc['data_keys'])}. Set tomo['detector_key'] to "
                    "the detector's image key (or leave it out: the first image key is used)."
                )
            )

    def resource(self, doc):
        self._filler("resource", doc)

    def datum(self, doc):
        self._filler("datum", doc)

    def datum_page(self, doc):
        self._filler("datum_page", doc)

    def stream_resource(self, doc):
        self._resources[doc["uid"]] = doc

    def event_page(self, doc):
        stream = self._streams.get(doc["descriptor"], "primary")
        self._events_seen[stream] = self._events_seen.get(stream, 0) + len(doc["seq_num"])
        if self.dead:
            return
        try:
            doc = self._filler.event_page(doc)
        except Exception as error:  # a handler could not read the file
            self._problem(
                ScanDataError(
                    f"Could not read the frames of {stream} events {doc['seq_num']}: {error}. "
                    "Check that the detector files are readable from this machine (root_map)."
                )
            )
            return
        data = doc["data"]
        for row, seq_num in enumerate(doc["seq_num"]):
            frame = None
            if self.detector_key in data:
                frame = np.asarray(data[self.detector_key][row])
            if stream in PROJECTION_STREAMS:
                if self.angle_key in data:
                    self._angles[seq_num] = float(data[self.angle_key][row])
                else:
                    self._problem(
                        ScanDataError(
                            f"Projection event {seq_num} has no '{self.angle_key}' reading "
                            f"(it has {sorted(data)}); expected the rotation stage in every "
                            "primary event. Read the stage with the detector, or set "
                            "tomo['angle_key'] to the right data key. The frame is skipped."
                        )
                    )
                    self._frames.pop(seq_num, None)
                    continue
            if frame is not None:
                self._frame(stream, seq_num, _single_frame(frame))
            elif stream in PROJECTION_STREAMS:
                self._try_join(seq_num)

    def stream_datum(self, doc):
        if self.dead:
            return
        resource = self._resources.get(doc["stream_resource"])
        stream = self._streams.get(doc["descriptor"], "primary")
        if resource is None or resource["data_key"] != self.detector_key:
            return
        try:
            frames = self._read_stream(resource, doc["indices"]["start"], doc["indices"]["stop"])
        except (OSError, KeyError, ScanDataError) as error:
            self._problem(
                ScanDataError(
                    f"Could not read frames {doc['indices']} of {resource['uri']}: {error}. "
                    "Check that the detector files are reachable from this machine."
                )
            )
            return
        first, stop = doc["indices"]["start"], doc["indices"]["stop"]
        if doc["seq_nums"]["stop"] > doc["seq_nums"]["start"]:
            first, stop = doc["seq_nums"]["start"] - 1, doc["seq_nums"]["stop"] - 1
        seq_nums = range(first + 1, stop + 1)  # no seq_nums (fly scans): frame order
        if len(frames) != len(seq_nums):
            frames = frames.reshape(len(seq_nums), -1, *frames.shape[-2:])
        for seq_num, frame in zip(seq_nums, frames, strict=True):
            if doc["descriptor"] in self._angle_less and stream in PROJECTION_STREAMS:
                self._angle_from_metadata(seq_num)
            self._frame(stream, seq_num, _single_frame(frame))

    # -- internals -----------------------------------------------------------------
    def _read_stream(self, resource: Mapping[str, Any], start: int, stop: int) -> np.ndarray:
        uid = resource["uid"]
        if uid not in self._files:
            path = uri_to_path(resource["uri"], self.root_map)
            self._files[uid] = h5py.File(path, "r", swmr=True)
        dataset = self._files[uid][resource["parameters"].get("dataset", "/entry/data/data")]
        dataset.refresh()
        if dataset.shape[0] < stop:
            raise ScanDataError(
                f"the file holds {dataset.shape[0]} frames but frames up to {stop} were announced"
            )
        shape = tuple(dataset.shape[-2:])  # checked before a byte is read
        expected = self.geometry.detector_shape if self.geometry is not None else shape
        size = (stop - start) * math.prod(dataset.shape[1:]) * dataset.dtype.itemsize
        if shape != expected or size > self.memory_budget // 2:
            raise ScanDataError(
                f"the file holds frames of shape {shape} ({dataset.dtype}, {size / 2**30:.2f} GB "
                f"for these {stop - start}); the scan metadata says the detector is {expected} "
                f"and half the memory budget is {self.memory_budget / 2**31:.2f} GB. Fix "
                "tomo['detector_shape'] or the detector's ROI/binning; none of them was read"
            )
        return np.asarray(dataset[start:stop])

    def _angle_from_metadata(self, seq_num: int) -> None:
        if seq_num - 1 < len(self._md_angles):
            self._angles[seq_num] = float(self._md_angles[seq_num - 1])
        else:
            self._problem(
                ScanDataError(
                    f"Projection frame {seq_num} has no rotation angle: the primary stream "
                    f"has no '{self.angle_key}' reading and tomo['angles'] lists "
                    f"{len(self._md_angles)} angles. Read the rotation stage with the "
                    "detector, or list every frame's angle in tomo['angles']."
                )
            )

    def _frame(self, stream: str, seq_num: int, frame: np.ndarray) -> None:
        if stream in DARK_STREAMS:
            self._darks.append(frame)
        elif stream in FLAT_STREAMS:
            self._flats.append(frame)
        elif stream in PROJECTION_STREAMS:
            self._frames[seq_num] = frame
            self._try_join(seq_num)

    def _try_join(self, seq_num: int) -> None:
        if seq_num in self._frames and seq_num in self._angles:
            frame = self._frames.pop(seq_num)
            angle = self._angles.pop(seq_num)
            self._projection(frame, angle, seq_num - 1)

    def _projection(self, frame: np.ndarray, angle: float, index: int) -> None:
        if not self._calibrated:
            have_own = bool(self._darks and self._flats)
            stored = self.start_doc.get("tomo", {}).get("dark_flat_uid")
            if not have_own and self.calibrations.get(stored) is None:
                self._wait(frame, angle, index)  # flats may come at the end
                return
            try:
                self._calibrate()
            except BlueskyJitError as error:
                self._fatal(error)
                return
        self._deliver(frame, angle, index)

    def _wait(self, frame: np.ndarray, angle: float, index: int) -> None:
        """Keep a projection until the dark and flat fields come, within half the budget."""
        self._waiting_bytes += frame.nbytes
        if self._waiting_bytes > self.memory_budget // 2:
            self._fatal(
                ScanDataError(
                    f"{len(self._waiting) + 1} projections ({self._waiting_bytes / 2**30:.2f} GB) "
                    "waited for dark and flat fields, more than half the memory budget "
                    f"({self.memory_budget / 2**30:.2f} GB, runtime.memory_budget_gb). Take the "
                    "darks and flats before the projections, or a dark/flat run first "
                    "(tomo.role='dark_flat'), or raise memory_budget_gb."
                )
            )
            return
        self._waiting.append((frame, angle, index))

    def _calibrate(self) -> None:
        if self._darks and self._flats:
            darks, flats = np.stack(self._darks), np.stack(self._flats)
        else:
            uid = self.start_doc.get("tomo", {}).get("dark_flat_uid")
            stored = self.calibrations.get(uid)
            if stored is None:
                missing = [n for n, f in (("dark", self._darks), ("flat", self._flats)) if not f]
                raise ScanDataError(
                    f"The scan has no {' and no '.join(missing)} fields: expected 'dark' and "
                    "'flat' streams in the run, or a separate dark/flat run "
                    f"(tomo.role='dark_flat'){' with uid ' + uid if uid else ''} seen earlier "
                    "by this callback. Take darks and flats (e.g. tomo_scan(num_darks=10, "
                    "num_flats=10)) or replay the dark/flat run first."
                )
            darks, flats = stored
        self.sink.calibration(darks, flats)  # raises ScanDataError on unusable fields
        self._calibrated = True
        waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
        for frame, angle, index in waiting:
            self._deliver(frame, angle, index)

    def _deliver(self, frame: np.ndarray, angle: float, index: int) -> None:
        try:
            self.sink.projection(frame, angle_deg=angle, index=index)
        except BlueskyJitError as error:
            self._problem(ScanDataError(f"Projection {index} (angle {angle:g} deg): {error}"))
        else:
            self.projections += 1

    def _problem(self, error: Exception) -> None:
        logger.warning("%s", error)
        self.sink.problem(error)

    def _fatal(self, error: Exception) -> None:
        self.dead = True
        self._waiting.clear()
        self._waiting_bytes = 0
        self._problem(error)


def _single_frame(frame: np.ndarray) -> np.ndarray:
    """Drop a leading axis of length one (frames per point)."""
    while frame.ndim > 2 and frame.shape[0] == 1:
        frame = frame[0]
    return frame
