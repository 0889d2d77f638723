"""Tomography plans: one-run scans (NSLS-II FXI layout) and a dark/flat run (HEX layout).

Layouts
-------
`tomo_scan` / `tomo_continuous` make ONE run with three streams::

    dark     shutter closed                       [det]
    flat     shutter open, sample out             [det]             (before or after primary)
    primary  shutter open, sample in, per angle   [det, rot_stage]

`recorded_scan` replays a recording (`RecordingSource`) as it was taken: the
recorded angles, in order, and as many darks and flats as were recorded.

`dark_flat_run` makes a separate calibration run with streams ``dark`` and
``flat``; a scan given ``dark_flat_uid=<its uid>`` takes no darks or flats and
records the uid. The detector is staged and unstaged around every stream, so an
ophyd-async detector writes one file (one StreamResource) per stream.

Start document
--------------
Standard keys: ``plan_name``, ``plan_args``, ``detectors``, ``motors``,
``num_points`` and ``num_angles`` (projections in ``primary``, all rotations),
``num_dark_images``, ``num_bkg_images``, ``sample``, ``hints``; and the binding
``tomo`` block the ingest code reads::

    beam               "parallel" | "cone"
    detector_shape     [rows, cols]
    pixel_size         float, mm
    center_of_rotation float, detector column (px) of the rotation axis
    angular_range      [start_deg, stop_deg] of one rotation (None in a dark/flat run)
    num_angles         int, angles per rotation (0 in a dark/flat run)
    rotations          int (0 in a dark/flat run)
    angle_key          data key of the angle reading in primary (None in a dark/flat run)
    detector_key       data key of the frames
    frame_rate         float (Hz) or None
    role               "scan" | "dark_flat"
    dark_flat_uid      uid of the dark/flat run used, or None
    source_origin      float (mm) or None; cone beam only
    origin_detector    float (mm) or None; cone beam only

plus whatever else the geometry carries (``phantom`` for phantom sources: see
`BubbleColumn.describe`; ``recording`` for replays). The primary angles are
``start + (stop - start) * k / num_angles`` for ``k < rotations * num_angles``:
the end point of each rotation is excluded. Angles are read back in
``primary`` under ``angle_key``; the geometry follows the convention of
`simulated_devices.phantoms`.

``md`` entries are added last and win over the keys above.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np

from bluesky_jit.errors import ConfigError

from .motion import SamplePosition, ShutterState

__all__ = [
    "TOMO_KEYS",
    "dark_flat_run",
    "recorded_scan",
    "scan_angles",
    "tomo_continuous",
    "tomo_scan",
]

TOMO_KEYS = (
    "beam",
    "detector_shape",
    "pixel_size",
    "center_of_rotation",
    "angular_range",
    "num_angles",
    "rotations",
    "angle_key",
    "detector_key",
    "frame_rate",
    "role",
    "dark_flat_uid",
    "source_origin",
    "origin_detector",
)
"""Keys every ``tomo`` start-document block has."""

_GEOMETRY_REQUIRED = ("beam", "detector_shape", "pixel_size", "center_of_rotation")

Plan = Generator[Any, Any, Any]


def scan_angles(
    *, num_angles: int, angular_range: tuple[float, float] = (0.0, 180.0), rotations: int = 1
) -> np.ndarray:
    """Stage angles of the primary stream.

    Parameters
    ----------
    num_angles : int
        Angles per rotation.
    angular_range : tuple of float
        ``(start, stop)`` of one rotation, degrees; `stop` is excluded.
    rotations : int
        Number of rotations; angles keep increasing.

    Returns
    -------
    ndarray, shape (rotations * num_angles,), float64
        ``start + (stop - start) * k / num_angles``.
    """
    num_angles, rotations, (start, stop) = _check_angles(num_angles, rotations, angular_range)
    k = np.arange(rotations * num_angles)
    return start + (stop - start) * k / num_angles


def tomo_scan(
    det: Any,
    rot_stage: Any,
    shutter: Any,
    sample_stage: Any,
    *,
    num_angles: int,
    angular_range: tuple[float, float] = (0.0, 180.0),
    num_darks: int = 10,
    num_flats: int = 10,
    flats_at_end: bool = False,
    dark_flat_uid: str | None = None,
    geometry: Mapping[str, Any] | None = None,
    sample: str | None = None,
    md: Mapping[str, Any] | None = None,
) -> Plan:
    """One rotation, with darks and flats in the same run (FXI layout).

    Parameters
    ----------
    det : detector
        `TomoDetector`, `TomoDetectorV1`, or any detector if `geometry` is given.
    rot_stage : movable
        Rotation stage, degrees; its name is the ``angle_key``.
    shutter : movable
        Takes ``ShutterState.OPEN`` / ``ShutterState.CLOSED``.
    sample_stage : movable
        Takes ``SamplePosition.IN`` / ``SamplePosition.OUT``.
    num_angles : int
        Projections.
    angular_range : tuple of float
        ``(start, stop)`` degrees, `stop` excluded.
    num_darks, num_flats : int
        Frames in the ``dark`` and ``flat`` streams (ignored with `dark_flat_uid`).
    flats_at_end : bool
        Take the flats after the projections instead of before.
    dark_flat_uid : str, optional
        uid of a `dark_flat_run` to use instead of taking darks and flats.
    geometry : mapping, optional
        Geometry keys of the ``tomo`` block (module docstring); default
        ``det.source.metadata()``.
    sample : str, optional
        Sample name; default ``det.source.sample_name``.
    md : mapping, optional
        Extra start-document metadata; wins over the generated keys.

    Returns
    -------
    str
        The run uid (as the plan's return value).
    """
    return (
        yield from _scan(
            det,
            rot_stage,
            shutter,
            sample_stage,
            plan_name="tomo_scan",
            num_angles=num_angles,
            rotations=1,
            angular_range=angular_range,
            num_darks=num_darks,
            num_flats=num_flats,
            flats_at_end=flats_at_end,
            dark_flat_uid=dark_flat_uid,
            geometry=geometry,
            sample=sample,
            md=md,
        )
    )


def tomo_continuous(
    det: Any,
    rot_stage: Any,
    shutter: Any,
    sample_stage: Any,
    *,
    num_angles: int,
    rotations: int,
    angular_range: tuple[float, float] = (0.0, 180.0),
    num_darks: int = 10,
    num_flats: int = 10,
    flats_at_end: bool = False,
    dark_flat_uid: str | None = None,
    geometry: Mapping[str, Any] | None = None,
    sample: str | None = None,
    md: Mapping[str, Any] | None = None,
) -> Plan:
    """Several rotations in one run, angles increasing throughout (dynamic samples).

    The primary angles are ``0 .. rotations * (stop - start)`` (end excluded) from
    `start`, `num_angles` per rotation; see `tomo_scan` for the other parameters.

    Returns
    -------
    str
        The run uid.
    """
    return (
        yield from _scan(
            det,
            rot_stage,
            shutter,
            sample_stage,
            plan_name="tomo_continuous",
            num_angles=num_angles,
            rotations=rotations,
            angular_range=angular_range,
            num_darks=num_darks,
            num_flats=num_flats,
            flats_at_end=flats_at_end,
            dark_flat_uid=dark_flat_uid,
            geometry=geometry,
            sample=sample,
            md=md,
        )
    )


def dark_flat_run(
    det: Any,
    shutter: Any,
    sample_stage: Any,
    *,
    num_darks: int = 10,
    num_flats: int = 10,
    geometry: Mapping[str, Any] | None = None,
    sample: str | None = None,
    md: Mapping[str, Any] | None = None,
) -> Plan:
    """A calibration run with streams ``dark`` and ``flat`` (HEX layout).

    Its ``tomo.role`` is ``"dark_flat"``. Pass its uid to `tomo_scan` or
    `tomo_continuous` as ``dark_flat_uid``. Parameters as in `tomo_scan`.

    Returns
    -------
    str
        The run uid.
    """
    num_darks, num_flats = _check_counts(num_darks, num_flats)
    geo = _geometry(det, geometry)
    tomo = _tomo_block(
        det,
        geo,
        angle_key=None,
        angular_range=None,
        num_angles=0,
        rotations=0,
        role="dark_flat",
        dark_flat_uid=None,
    )
    start_md = {
        "plan_name": "dark_flat_run",
        "plan_args": {
            "det": repr(det),
            "shutter": repr(shutter),
            "sample_stage": repr(sample_stage),
            "num_darks": num_darks,
            "num_flats": num_flats,
        },
        "detectors": [det.name],
        "motors": [],
        "num_points": 0,
        "num_angles": 0,
        "num_dark_images": num_darks,
        "num_bkg_images": num_flats,
        "sample": _sample(det, sample),
        "tomo": tomo,
        **dict(md or {}),
    }

    def body() -> Plan:
        yield from _darks(det, shutter, num_darks)
        yield from _flats(det, shutter, sample_stage, num_flats)
        yield from bps.mv(sample_stage, SamplePosition.IN, shutter, ShutterState.CLOSED)

    return (yield from bpp.run_wrapper(body(), md=start_md))


def recorded_scan(
    det: Any,
    rot_stage: Any,
    shutter: Any,
    sample_stage: Any,
    *,
    num_darks: int | None = None,
    num_flats: int | None = None,
    flats_at_end: bool = False,
    sample: str | None = None,
    md: Mapping[str, Any] | None = None,
) -> Plan:
    """Replay the recording ``det.source`` holds, as it was taken (one run, FXI layout).

    The stage moves to every recorded angle in order, and the ``tomo`` block
    says what the recording holds: ``num_angles`` per rotation,
    ``angular_range`` and ``rotations`` (`simulated_devices.recordings.scan_layout`).

    Parameters
    ----------
    det : detector
        A simulated detector whose ``source`` is a `RecordingSource`.
    rot_stage, shutter, sample_stage : movables
        As in `tomo_scan`.
    num_darks, num_flats : int, optional
        Frames in the ``dark`` and ``flat`` streams; default: as many as recorded.
    flats_at_end, sample, md
        As in `tomo_scan`.

    Returns
    -------
    str
        The run uid.
    """
    from .sources import RecordingSource

    source = getattr(det, "source", None)
    if not isinstance(source, RecordingSource):
        raise ConfigError(
            f"recorded_scan replays a recording; detector {getattr(det, 'name', det)!r} images "
            f"{source!r}. Make the devices with hw(..., source=RecordingSource("
            "DXchangeRecording.open(path))), or use tomo_scan for other sources."
        )
    rec, layout = source.recording, source.layout
    return (
        yield from _scan(
            det,
            rot_stage,
            shutter,
            sample_stage,
            plan_name="recorded_scan",
            num_angles=layout["num_angles"],
            rotations=layout["rotations"],
            angular_range=layout["angular_range"],
            num_darks=rec.darks.shape[0] if num_darks is None else num_darks,
            num_flats=rec.flats.shape[0] if num_flats is None else num_flats,
            flats_at_end=flats_at_end,
            dark_flat_uid=None,
            geometry=None,
            sample=sample,
            md=md,
            angles=rec.theta,
        )
    )


# ---------------------------------------------------------------------- internals
def _scan(
    det: Any,
    rot_stage: Any,
    shutter: Any,
    sample_stage: Any,
    *,
    plan_name: str,
    num_angles: int,
    rotations: int,
    angular_range: tuple[float, float],
    num_darks: int,
    num_flats: int,
    flats_at_end: bool,
    dark_flat_uid: str | None,
    geometry: Mapping[str, Any] | None,
    sample: str | None,
    md: Mapping[str, Any] | None,
    angles: np.ndarray | None = None,
) -> Plan:
    if angles is None:
        angles = scan_angles(
            num_angles=num_angles, angular_range=angular_range, rotations=rotations
        )
    _ready_source(det, angles, plan_name)
    start, stop = (float(a) for a in angular_range)
    if dark_flat_uid is not None:
        if not isinstance(dark_flat_uid, str) or not dark_flat_uid:
            raise ConfigError(f"dark_flat_uid must be a run uid (str); got {dark_flat_uid!r}.")
        num_darks = num_flats = 0
    num_darks, num_flats = _check_counts(num_darks, num_flats)
    geo = _geometry(det, geometry)
    tomo = _tomo_block(
        det,
        geo,
        angle_key=rot_stage.name,
        angular_range=[start, stop],
        num_angles=int(num_angles),
        rotations=int(rotations),
        role="scan",
        dark_flat_uid=dark_flat_uid,
    )
    start_md = {
        "plan_name": plan_name,
        "plan_args": {
            "det": repr(det),
            "rot_stage": repr(rot_stage),
            "shutter": repr(shutter),
            "sample_stage": repr(sample_stage),
            "num_angles": int(num_angles),
            "rotations": int(rotations),
            "angular_range": [start, stop],
            "num_darks": num_darks,
            "num_flats": num_flats,
            "flats_at_end": bool(flats_at_end),
            "dark_flat_uid": dark_flat_uid,
        },
        "detectors": [det.name],
        "motors": [rot_stage.name],
        "num_points": int(angles.size),
        "num_angles": int(angles.size),
        "num_dark_images": num_darks,
        "num_bkg_images": num_flats,
        "sample": _sample(det, sample),
        "hints": {"dimensions": [([rot_stage.name], "primary")]},
        "tomo": tomo,
        **dict(md or {}),
    }

    def body() -> Plan:
        yield from _darks(det, shutter, num_darks)
        if not flats_at_end:
            yield from _flats(det, shutter, sample_stage, num_flats)
        yield from bps.mv(sample_stage, SamplePosition.IN, shutter, ShutterState.OPEN)
        yield from _stream(det, "primary", angles, rot_stage)
        if flats_at_end:
            yield from _flats(det, shutter, sample_stage, num_flats)
            yield from bps.mv(sample_stage, SamplePosition.IN)
        yield from bps.mv(shutter, ShutterState.CLOSED)

    return (yield from bpp.run_wrapper(body(), md=start_md))


def _ready_source(det: Any, angles: np.ndarray, plan_name: str) -> None:
    """A recording source checks the plan's angles (before the run opens) and rewinds."""
    source = getattr(det, "source", None)
    if hasattr(source, "check_angles"):
        source.check_angles(angles, plan=plan_name)
        source.rewind()


def _darks(det: Any, shutter: Any, num: int) -> Plan:
    if num:
        yield from bps.mv(shutter, ShutterState.CLOSED)
        yield from _stream(det, "dark", [None] * num)


def _flats(det: Any, shutter: Any, sample_stage: Any, num: int) -> Plan:
    if num:
        yield from bps.mv(sample_stage, SamplePosition.OUT, shutter, ShutterState.OPEN)
        yield from _stream(det, "flat", [None] * num)


def _stream(det: Any, name: str, positions: Any, motor: Any = None) -> Plan:
    """Stage `det`, take one event per position (moving `motor` there first), unstage."""

    def body() -> Plan:
        for pos in positions:
            if motor is None:
                yield from bps.trigger_and_read([det], name=name)
            else:
                yield from bps.mv(motor, float(pos))
                yield from bps.trigger_and_read([det, motor], name=name)

    yield from bps.stage(det, wait=True)
    yield from bpp.finalize_wrapper(body(), bps.unstage(det, wait=True))


def _geometry(det: Any, geometry: Mapping[str, Any] | None) -> dict[str, Any]:
    if geometry is None:
        source = getattr(det, "source", None)
        if source is None or not hasattr(source, "metadata"):
            raise ConfigError(
                f"Detector {getattr(det, 'name', det)!r} has no simulated source to take the "
                "geometry from. Pass geometry={'beam': 'parallel', 'detector_shape': [rows, "
                "cols], 'pixel_size': mm, 'center_of_rotation': px}."
            )
        geometry = source.metadata()
    geo = dict(geometry)
    missing = [k for k in _GEOMETRY_REQUIRED if k not in geo]
    if missing:
        raise ConfigError(
            f"geometry must have keys {list(_GEOMETRY_REQUIRED)}; missing {missing} in "
            f"{sorted(geo)}."
        )
    if geo["beam"] not in ("parallel", "cone"):
        raise ConfigError(f"geometry['beam'] must be 'parallel' or 'cone'; got {geo['beam']!r}.")
    if geo["beam"] == "cone" and (
        geo.get("source_origin") is None or geo.get("origin_detector") is None
    ):
        raise ConfigError(
            "A cone-beam geometry needs source_origin and origin_detector (mm); got "
            f"{geo.get('source_origin')!r} and {geo.get('origin_detector')!r}."
        )
    return geo


def _tomo_block(
    det: Any,
    geo: dict[str, Any],
    *,
    angle_key: str | None,
    angular_range: list[float] | None,
    num_angles: int,
    rotations: int,
    role: str,
    dark_flat_uid: str | None,
) -> dict[str, Any]:
    rows, cols = (int(v) for v in geo["detector_shape"])
    frame_rate = getattr(det, "frame_rate", None)
    tomo = {
        "beam": geo["beam"],
        "detector_shape": [rows, cols],
        "pixel_size": float(geo["pixel_size"]),
        "center_of_rotation": float(geo["center_of_rotation"]),
        "angular_range": angular_range,
        "num_angles": num_angles,
        "rotations": rotations,
        "angle_key": angle_key,
        "detector_key": det.name,
        "frame_rate": None if frame_rate is None else float(frame_rate),
        "role": role,
        "dark_flat_uid": dark_flat_uid,
        "source_origin": _opt_float(geo.get("source_origin")),
        "origin_detector": _opt_float(geo.get("origin_detector")),
    }
    tomo.update({k: v for k, v in geo.items() if k not in tomo})
    return tomo


def _sample(det: Any, sample: str | None) -> str | None:
    if sample is not None:
        return sample
    return getattr(getattr(det, "source", None), "sample_name", None)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_angles(
    num_angles: Any, rotations: Any, angular_range: Any
) -> tuple[int, int, tuple[float, float]]:
    if isinstance(num_angles, bool) or not isinstance(num_angles, int | np.integer):
        raise ConfigError(f"num_angles must be an int >= 1; got {num_angles!r}.")
    if isinstance(rotations, bool) or not isinstance(rotations, int | np.integer):
        raise ConfigError(f"rotations must be an int >= 1; got {rotations!r}.")
    if num_angles < 1 or rotations < 1:
        raise ConfigError(
            f"num_angles and rotations must be >= 1; got {num_angles} and {rotations}."
        )
    try:
        start, stop = (float(a) for a in angular_range)
    except (TypeError, ValueError):
        raise ConfigError(
            f"angular_range must be (start_deg, stop_deg); got {angular_range!r}."
        ) from None
    if start == stop:
        raise ConfigError(f"angular_range must span a non-zero range; got {angular_range!r}.")
    return int(num_angles), int(rotations), (start, stop)


def _check_counts(num_darks: Any, num_flats: Any) -> tuple[int, int]:
    for label, n in (("num_darks", num_darks), ("num_flats", num_flats)):
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ConfigError(f"{label} must be an int >= 0; got {n!r}.")
    return int(num_darks), int(num_flats)
