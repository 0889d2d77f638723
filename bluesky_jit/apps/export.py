"""Export runs for the tools tomography users already use.

A raw run (the scan's frames, rotation angles, darks and flats; read through
the catalog and the same document ingest the callback uses):

``nxtomo``
    NeXus NXtomo (the application definition, written by the ``nxtomo``
    package; read by nabu, tomwer, tomoscan): ``/entry/instrument/detector/data``
    holds darks, flats and projections, ``image_key`` tells them apart (2, 1, 0),
    ``/entry/sample/rotation_angle`` is in degrees.
``dxchange``
    DXchange HDF5 (``/exchange/data``, ``data_white``, ``data_dark``, ``theta``
    in degrees, as the DXchange schema and ``dxchange.read_aps_32id`` want;
    that reader hands tomopy radians).

A derived run (reconstructed and denoised slices, linear attenuation in 1/mm):

``tiff``
    float32 TIFF, one page per slice: series 0 the reconstructions, series 1
    the denoised slices; resolution in pixels per cm, a description, and JSON
    metadata per series (stream, units, voxel size, projection index of each
    page; ``tifffile.TiffFile(path).shaped_metadata``).
``hdf5``
    NeXus NXdata HDF5: ``/entry/reconstruction`` and ``/entry/denoised``, each
    with the signal ``data`` (1/mm), axes ``projection_index``, ``y`` and ``x``
    (mm), ``pixel_size`` and the scan geometry as attributes.
``png``, ``gif``
    A contact sheet or an animation for a report.

The format comes from ``format`` or the file's suffix (:data:`SUFFIXES`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from ..errors import ConfigError, NotDerivedError, RunNotFoundError, ScanDataError
from .live import DerivedData, _metric_rows, _title, _to_uint8, _window, read_derived

if TYPE_CHECKING:
    from tiled.client.container import Container

    from ..geometry import ScanGeometry

__all__ = [
    "DERIVED_FORMATS",
    "RAW_FORMATS",
    "SUFFIXES",
    "RawScan",
    "export",
    "export_uid",
    "format_of",
    "read_raw",
]

RAW_FORMATS: Final = ("nxtomo", "dxchange")
DERIVED_FORMATS: Final = ("tiff", "hdf5", "png", "gif")
SUFFIXES: Final = {
    ".nxs": "nxtomo",
    ".nx": "nxtomo",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".png": "png",
    ".gif": "gif",
}
"""Suffix -> format; ``.h5`` needs ``format`` (``dxchange`` or ``hdf5``)."""


@dataclass
class RawScan:
    """A raw tomography run's frames, read back from the catalog.

    Attributes
    ----------
    uid : str
    projections : ndarray, shape (N, rows, cols)
        Detector counts, in acquisition order.
    angles : ndarray, shape (N,)
        Rotation angle of each projection (degrees).
    darks, flats : ndarray, shape (n, rows, cols)
        Dark and flat fields (the run's own, or those of its dark/flat run).
    geometry : ScanGeometry
    start, stop : dict
        The run's start and stop documents.
    """

    uid: str
    projections: np.ndarray
    angles: np.ndarray
    darks: np.ndarray
    flats: np.ndarray
    geometry: ScanGeometry
    start: dict[str, Any] = field(default_factory=dict)
    stop: dict[str, Any] = field(default_factory=dict)


def format_of(path: str | Path, format: str | None = None) -> str:
    """The export format: ``format`` if given, else the one of the suffix of ``path``."""
    formats = RAW_FORMATS + DERIVED_FORMATS
    if format is not None:
        if format not in formats:
            raise ConfigError(f"Export format must be one of {', '.join(formats)}; got {format!r}.")
        return format
    suffix = Path(path).suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    raise ConfigError(
        f"Cannot tell the export format of {Path(path).name!r}: expected a suffix "
        f"{', '.join(SUFFIXES)}, or a format (--format {'|'.join(formats)}; .h5 files are "
        "--format dxchange for a raw run's frames or --format hdf5 for a derived run's slices)."
    )


def export(
    run: Container | RawScan | DerivedData,
    path: str | Path,
    *,
    format: str | None = None,
    fps: float = 4.0,
    max_frames: int = 48,
    runs: Container | None = None,
) -> Path:
    """Write a raw run (``nxtomo``, ``dxchange``) or a derived run (``tiff``, ``hdf5``,
    ``png``, ``gif``) to ``path``; the format from ``format`` or the suffix.

    ``fps`` and ``max_frames`` are for GIF; ``runs`` (the raw runs' container) is
    needed for a scan whose darks and flats are in a separate run.
    """
    path = Path(path)
    fmt = format_of(path, format)
    if fmt in RAW_FORMATS:
        scan = run if isinstance(run, RawScan) else read_raw(run, runs=runs)
        path.parent.mkdir(parents=True, exist_ok=True)
        return (_write_nxtomo if fmt == "nxtomo" else _write_dxchange)(scan, path)
    data = run if isinstance(run, DerivedData) else read_derived(run)
    if len(data.reconstruction) == 0:
        raise NotDerivedError(
            f"Derived run {data.uid} has no reconstructed slice to export "
            f"(exit_status {data.stop.get('exit_status')!r}: {data.stop.get('reason', '')})."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "gif":
        return _animation(data, path, fps=fps, max_frames=max_frames)
    writers = {"tiff": _write_tiff, "hdf5": _write_nxdata, "png": _contact_sheet}
    return writers[fmt](data, path)


def export_uid(
    catalog: Container,
    uid: str,
    path: str | Path,
    *,
    format: str | None = None,
    fps: float = 4.0,
    raw: str = "raw",
    derived: str = "derived",
) -> str:
    """Export the run ``uid`` of a catalog root; return a line saying what was written.

    ``uid`` (full, first characters, or scan id) names a raw run for ``nxtomo``
    and ``dxchange``; for the other formats a derived run, or a raw run (its
    newest derived run).

    Raises
    ------
    ConfigError
        A raw-run format asked of a derived run, or the other way round.
    RunNotFoundError
        No such run.
    """
    from ..catalog import runs_container
    from .live import open_derived
    from .replay import lookup_run

    fmt = format_of(path, format)
    if fmt in RAW_FORMATS:
        runs = runs_container(catalog, raw)
        try:
            run = lookup_run(runs, uid)
        except RunNotFoundError:
            other = _find(catalog, derived, uid)
            if other is None:
                raise
            raise _not_raw(other, fmt) from None
        scan = read_raw(run, runs=runs)
        out = export(scan, path, format=fmt)
        return (
            f"raw run {scan.uid}: {len(scan.projections)} projections, {len(scan.darks)} darks, "
            f"{len(scan.flats)} flats written to {out} ({fmt})"
        )
    try:
        run = open_derived(catalog, uid, container=derived, raw_container=raw)
    except RunNotFoundError:
        other = _find(catalog, raw, uid)
        if other is None:
            raise
        raise ConfigError(
            f"Run {other['uid']} is a raw run with no derived run; --format {fmt} writes a "
            f"derived run's slices. Export its frames with --format {'|'.join(RAW_FORMATS)}, "
            "or make a derived run first (bluesky-jit replay)."
        ) from None
    data = read_derived(run)
    out = export(data, path, format=fmt, fps=fps)
    return (
        f"derived run {data.uid} (raw run {data.raw_uid}): {len(data.reconstruction)} slices "
        f"written to {out} ({fmt})"
    )


def _not_raw(start: dict[str, Any], fmt: str) -> ConfigError:
    return ConfigError(
        f"Run {start['uid']} is a derived run; --format {fmt} writes a raw run's frames. "
        f"Pass its raw run {start.get('raw_uid')!r} instead, or export the slices with "
        f"--format {'|'.join(DERIVED_FORMATS)}."
    )


def _find(catalog: Container, container: str, uid: str) -> dict[str, Any] | None:
    """The start document of run ``uid`` in ``catalog[container]``, or None."""
    from .replay import lookup_run

    if container not in catalog:
        return None
    try:
        return dict(lookup_run(catalog[container], uid).metadata["start"])
    except RunNotFoundError:
        return None


# ---------------------------------------------------------------------------- raw runs
class _Frames:
    """A :class:`~bluesky_jit.ingest.FrameSink` that keeps the raw frames it is given."""

    def __init__(self) -> None:
        self.geometry: ScanGeometry | None = None
        self.darks: np.ndarray | None = None
        self.flats: np.ndarray | None = None
        self.frames: dict[int, tuple[np.ndarray, float]] = {}
        self.problems: list[Exception] = []

    def begin(self, start: Any, geometry: ScanGeometry | None) -> None:
        self.geometry = geometry

    def calibration(self, darks: np.ndarray, flats: np.ndarray) -> None:
        self.darks, self.flats = np.asarray(darks), np.asarray(flats)

    def projection(self, frame: np.ndarray, *, angle_deg: float, index: int) -> None:
        self.frames[index] = (np.asarray(frame), angle_deg)

    def problem(self, error: Exception) -> None:
        self.problems.append(error)

    def end(self, stop: Any) -> None:
        pass


def read_raw(run: Container, *, runs: Container | None = None) -> RawScan:
    """Read a raw tomography run's projections, angles, darks and flats.

    The run's documents go through :class:`~bluesky_jit.ingest.TomoIngest`
    (frames filled from the detector files, or fetched through the Tiled
    server where this machine cannot read them), as in a replay.

    Parameters
    ----------
    run : BlueskyRun
    runs : CatalogOfBlueskyRuns, optional
        The raw runs' container: needed when the scan's darks and flats are in
        a separate dark/flat run (``tomo.dark_flat_uid``).

    Raises
    ------
    NotTomographyError, ConfigError, ScanDataError
    """
    from ..callbacks import is_tomography
    from ..errors import NotTomographyError
    from ..ingest import CalibrationStore
    from .replay import lookup_run

    start = dict(run.metadata["start"])
    if start.get("plan_name") == "bluesky_jit":
        raise _not_raw(start, "nxtomo|dxchange")
    if not is_tomography(start):
        raise NotTomographyError(
            f"Run {start['uid']} (plan {start.get('plan_name')!r}) is not a tomography scan: its "
            "start document has no 'tomo' block. Pass the uid of a scan."
        )
    calibrations = CalibrationStore()
    sink = _Frames()
    with tempfile.TemporaryDirectory(prefix="bluesky-jit-export-") as cache:
        dark_flat_uid = (start.get("tomo") or {}).get("dark_flat_uid")
        if dark_flat_uid:
            if runs is None:
                raise ConfigError(
                    f"Run {start['uid']} takes its darks and flats from run {dark_flat_uid}: "
                    "pass runs= (the raw runs' container) to read it."
                )
            _ingest(lookup_run(runs, dark_flat_uid), _Frames(), calibrations, Path(cache))
        _ingest(run, sink, calibrations, Path(cache))
    if sink.problems or not sink.frames or sink.darks is None:
        why = str(sink.problems[0]) if sink.problems else "it holds no projection frame"
        raise ScanDataError(f"Run {start['uid']} cannot be exported: {why}")
    order = sorted(sink.frames)
    return RawScan(
        uid=start["uid"],
        projections=np.stack([sink.frames[i][0] for i in order]),
        angles=np.array([sink.frames[i][1] for i in order], dtype=np.float64),
        darks=sink.darks,
        flats=sink.flats,
        geometry=sink.geometry,
        start=start,
        stop=dict(run.metadata.get("stop") or {}),
    )


def _ingest(run: Container, sink: _Frames, calibrations: Any, cache: Path) -> _Frames:
    from ..catalog import documents
    from ..ingest import TomoIngest
    from .replay import localize_frames

    ingest = TomoIngest(sink, calibrations=calibrations)
    for name, doc in localize_frames(run, list(documents(run)), cache_dir=cache):
        ingest(name, doc)
    return sink


def _write_nxtomo(scan: RawScan, path: Path) -> Path:
    import pint
    from nxtomo.application.nxtomo import NXtomo
    from nxtomo.nxobject.nxdetector import ImageKey

    units = pint.get_application_registry()
    nx = NXtomo()
    nx.title = f"{scan.start.get('plan_name', 'scan')} {scan.uid}"
    nx.start_time = _iso(scan.start.get("time"))
    nx.end_time = _iso(scan.stop.get("time"))
    nx.sample.name = str(scan.start.get("sample") or "")
    keys = [ImageKey.DARK_FIELD] * len(scan.darks) + [ImageKey.FLAT_FIELD] * len(scan.flats)
    detector = nx.instrument.detector
    detector.data = np.concatenate([scan.darks, scan.flats, scan.projections])
    detector.image_key_control = keys + [ImageKey.PROJECTION] * len(scan.projections)
    calibration_angles = np.full(len(keys), scan.angles[0])  # taken before the rotation
    nx.sample.rotation_angle = np.concatenate([calibration_angles, scan.angles]) * units.degree
    geometry = scan.geometry
    detector.half_acquisition = False
    detector.x_pixel_size = detector.y_pixel_size = geometry.pixel_size * units.millimeter
    detector.x_rotation_axis_pixel_position = float(geometry.center_of_rotation)
    if geometry.beam == "cone":
        detector.distance = geometry.origin_detector * units.millimeter
        nx.instrument.source.distance = -geometry.source_origin * units.millimeter
    nx.save(str(path), data_path="entry", overwrite=True)
    return path


def _iso(timestamp: float | None) -> Any:
    from datetime import UTC, datetime

    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=UTC)


def _write_dxchange(scan: RawScan, path: Path) -> Path:
    from simulated_devices.recordings import write_dxchange

    return write_dxchange(
        path,
        data=scan.projections,
        flats=scan.flats,
        darks=scan.darks,
        theta=scan.angles,
        sample_name=scan.start.get("sample"),
    )


# ------------------------------------------------------------------------ derived runs
def _streams(data: DerivedData) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, slices, projection indices) of the streams that have slices."""
    streams = [
        ("reconstruction", data.reconstruction, data.reconstruction_index),
        ("denoised", data.denoised, data.denoised_index),
    ]
    return [s for s in streams if len(s[1])]


def _slice_geometry(data: DerivedData) -> tuple[ScanGeometry, str]:
    """The derived run's scan geometry and the units of its slices."""
    from ..geometry import geometry_from_start

    geometry = geometry_from_start({"tomo": data.start.get("geometry") or {}})
    return geometry, data.units.get("reconstruction") or "1/mm"


def _write_tiff(data: DerivedData, path: Path) -> Path:
    import tifffile

    geometry, units = _slice_geometry(data)
    per_cm = 10.0 / geometry.voxel_size  # voxel size in mm
    with tifffile.TiffWriter(path) as tif:
        for stream, images, index in _streams(data):
            about = {
                "stream": stream,
                "units": data.units.get(stream) or units,
                "voxel_size_mm": geometry.voxel_size,
                "projection_index": [int(i) for i in index],
                "uid": data.uid,
                "raw_uid": data.raw_uid,
            }
            tif.write(
                np.asarray(images, dtype=np.float32),
                photometric="minisblack",
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                description=f"bluesky_jit {stream} slices of raw run {data.raw_uid}: linear "
                f"attenuation ({about['units']}), voxel size {geometry.voxel_size:g} mm",
                metadata=about,  # JSON in the series' first page (tifffile's shaped_metadata)
            )
    return path


def _write_nxdata(data: DerivedData, path: Path) -> Path:
    import h5py

    geometry, units = _slice_geometry(data)
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs.update(NX_class="NXentry", default="reconstruction")
        f.attrs["default"] = "entry"
        entry["title"] = f"bluesky_jit derived run {data.uid} of raw run {data.raw_uid}"
        for stream, images, index in _streams(data):
            group = entry.create_group(stream)
            group.attrs.update(
                NX_class="NXdata", signal="data", axes=["projection_index", "y", "x"]
            )
            group.attrs.update(projection_index_indices=0, y_indices=1, x_indices=2)
            for key, value in geometry.to_dict().items():
                if value is not None:
                    group.attrs[key] = value
            signal = group.create_dataset("data", data=np.asarray(images, dtype=np.float32))
            signal.attrs.update(units=data.units.get(stream) or units)
            signal.attrs["long_name"] = f"{stream} (linear attenuation)"
            group["projection_index"] = np.asarray(index, dtype=np.int64)
            group["projection_index"].attrs["long_name"] = "last projection used"
            for axis, size in (("y", images.shape[1]), ("x", images.shape[2])):
                coords = (np.arange(size) - (size - 1) / 2) * geometry.voxel_size
                group[axis] = coords
                group[axis].attrs["units"] = "mm"
            group["pixel_size"] = geometry.voxel_size
            group["pixel_size"].attrs["units"] = "mm"
    return path


def _contact_sheet(data: DerivedData, path: Path) -> Path:
    from matplotlib.figure import Figure  # off-screen, whatever the backend

    n = len(data.reconstruction)
    picks = sorted(set(np.linspace(0, n - 1, min(n, 6)).round().astype(int).tolist()))
    denoised_at = {int(i): k for k, i in enumerate(data.denoised_index)}
    cols = len(picks)
    fig = Figure(figsize=(2.4 * max(cols, 2), 2.4 * 2 + 2.6))
    grid = fig.add_gridspec(3, max(cols, 2), height_ratios=[1, 1, 1.1])
    window = _window(data.reconstruction[picks[-1]])
    for c, i in enumerate(picks):
        index = int(data.reconstruction_index[i])
        ax = fig.add_subplot(grid[0, c])
        ax.imshow(data.reconstruction[i], cmap="gray", vmin=window[0], vmax=window[1])
        ax.set_title(f"projection {index}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(grid[1, c])
        ax.axis("off")
        if index in denoised_at:
            ax.imshow(
                data.denoised[denoised_at[index]], cmap="gray", vmin=window[0], vmax=window[1]
            )
        else:
            ax.text(0.5, 0.5, "not trained yet", ha="center", va="center", fontsize=8)
        if c == 0:
            ax.set_title("denoised", fontsize=8, loc="left")
    ax = fig.add_subplot(grid[2, :])
    rows = _metric_rows(data.metrics)
    if rows:
        ax.plot([r["step"] for r in rows], [r["alpha"] for r in rows], ".-", color="tab:red")
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.axhline(0.5, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("hold-out alpha")
    fig.suptitle(_title(data.uid, data.raw_uid, data.stop.get("exit_status", "running")))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _animation(data: DerivedData, path: Path, *, fps: float, max_frames: int) -> Path:
    from PIL import Image

    n = len(data.reconstruction)
    picks = sorted(set(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int).tolist()))
    denoised_at = {int(i): k for k, i in enumerate(data.denoised_index)}
    window = _window(data.reconstruction[-1])
    frames = []
    for i in picks:
        rec = _to_uint8(data.reconstruction[i], window)
        k = denoised_at.get(int(data.reconstruction_index[i]))
        den = _to_uint8(data.denoised[k], window) if k is not None else np.zeros_like(rec)
        gap = np.full((rec.shape[0], 4), 255, np.uint8)
        frames.append(Image.fromarray(np.hstack([rec, gap, den])).convert("P"))
    duration = int(1000 / fps)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration, loop=0)
    return path
