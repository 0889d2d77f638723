"""Documents out: one derived Bluesky run per raw run.

:class:`DerivedRun` turns arrays and scalars into event-model documents, built
with :func:`event_model.compose_run` (never by hand), and hands each
``(name, doc)`` pair to an ``emit`` callable such as a
``bluesky_tiled_plugins.TiledWriter``. Only this module (and ``ingest``) know
what a document looks like.

A derived run has these streams:

``reconstruction``
    One reconstructed slice per event, shape (H, W) float32, stored in the
    run's HDF5 file at ``/reconstruction``; the caller's scalars (e.g.
    ``projection_index``, ``num_projections``) go into the event.
``denoised``
    One denoised slice per event, stored at ``/denoised``; scalars e.g.
    ``projection_index``, ``train_step``, ``weights_version``.
``uncertainty``
    Beside each denoised slice, its calibrated standard deviation per pixel
    (same shape and units), stored at ``/uncertainty``, with the same scalars
    (:func:`bluesky_jit.noise2inverse.uncertainty`).
``metrics``
    Scalars only (e.g. ``train_step``, ``loss``, ``alpha``, ``elapsed``,
    ``pairs_seen``), stored inline in the events.

Images of one run go to one HDF5 file, ``<directory>/<derived uid>.h5``, written
in SWMR mode so a Tiled server can read frames while later frames are written.
Each frame is referenced by a ``stream_datum`` of a single ``stream_resource``
per image stream (mimetype ``application/x-hdf5``, the layout ophyd-async
detectors use and ``bluesky_tiled_plugins``' HDF5 consolidator reads).
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import event_model
import h5py
import numpy as np

from ._version import __version__
from .errors import CatalogError, ConfigError, ScanDataError

__all__ = ["DerivedRun", "IMAGE_STREAMS", "STREAMS"]

PLAN_NAME: Final = "bluesky_jit"
PLAN_TYPE: Final = "derived"
"""``plan_type`` of a derived run: made by a callback from a raw run, not by a plan
(bluesky's plans say ``"generator"``); bluesky's ``LiveTable`` prints it at the stop."""
IMAGE_STREAMS: Final = ("reconstruction", "denoised", "uncertainty")
"""Streams that carry one image per event; the image data key is the stream name."""
STREAMS: Final = (*IMAGE_STREAMS, "metrics")
HDF5_MIMETYPE: Final = "application/x-hdf5"
EXIT_STATUSES: Final = ("success", "fail", "abort")

_RESERVED_START_KEYS: Final = frozenset(
    "uid time plan_name plan_type scan_id hints raw_uid raw_scan_id provenance sample".split()
)
HINTS: Final[dict[str, tuple[str, ...]]] = {"metrics": ("loss", "alpha")}
"""The fields a viewer should plot, per stream (a descriptor's ``hints``); image streams
hint none, as ophyd area detectors do, so bluesky's BestEffortCallback makes no empty
figure for them."""
DIMENSIONS: Final = (("step",), "metrics")
"""The independent variable: the start document's ``hints["dimensions"]``."""
IMAGE_UNITS: Final = "1/mm"
"""Reconstructed and denoised values, and their uncertainty, are linear attenuation
coefficients in 1/mm (README, "Scan metadata": binning the detector does not change them)."""
UNITS: Final[dict[str, str]] = {
    "sigma_fbp": IMAGE_UNITS,
    "sigma_denoised": IMAGE_UNITS,
    "steps_per_second": "1/s",
}
"""Units of scalars by name; otherwise a name ending in ``_s`` is in seconds and every
other scalar (indices, counts, loss, alpha) is unitless, ``""``."""
# TiledWriter renames data keys called "time" or "seq_num" (they clash with the
# event table's own columns), so a scalar with such a name would not read back
# under its own name.
_RESERVED_SCALAR_KEYS: Final = frozenset({"time", "seq_num"})

# JSON-schema dtype -> (numpy dtype string, Python type the value is stored as)
_DTYPES: Final[dict[str, tuple[str | None, type]]] = {
    "boolean": ("|b1", bool),
    "integer": ("<i8", int),
    "number": ("<f8", float),
    "string": (None, str),
}


class DerivedRun:
    """A derived Bluesky run holding the reconstructions and denoised slices of one raw run.

    Parameters
    ----------
    raw_start : dict
        Start document of the raw run being processed; its ``uid`` (and
        ``scan_id``, ``plan_name``, ``sample`` when present) are recorded.
    emit : callable
        ``emit(name, doc)`` receives every document, in order (e.g. a
        ``TiledWriter``, a ``RunEngine``-style dispatcher, a list's append).
        It is held by a strong reference, so a lambda is fine.
    directory : Path
        Where the run's HDF5 file ``<uid>.h5`` is written. It must be readable
        by the Tiled server (in its ``readable_storage``).
    image_shape : tuple of int
        (H, W), the shape of every reconstruction and denoised image.
    extra_images : dict of str to (int, int), optional
        More image streams and their (H, W), e.g. the two vertical slices
        ``{"reconstruction_xz": (rows, n), "reconstruction_yz": (rows, n)}``;
        written with :meth:`add_image`.
    metadata : dict
        JSON-able configuration recorded verbatim in the start document, e.g.
        ``{"config": asdict(jit_config), "geometry": ..., "model": ...,
        "backend": ...}``. Must not use the keys this class sets itself
        (``uid``, ``time``, ``plan_name``, ``plan_type``, ``scan_id``,
        ``hints``, ``raw_uid``, ``raw_scan_id``, ``provenance``, ``sample``).
    copy_keys : sequence of str
        Keys of ``raw_start`` copied into the start document when present,
        e.g. the facility's ``("data_session", "proposal_id")``, so that a
        catalog applies the raw run's access rules to the results.

    Notes
    -----
    Start document: the caller's ``metadata`` and the ``copy_keys`` of the
    raw run, plus ``plan_name="bluesky_jit"``, ``plan_type="derived"``,
    ``raw_uid`` (search with ``Key("start.raw_uid") == uid`` on the Tiled
    catalog), ``scan_id`` and ``raw_scan_id`` (both the raw run's),
    ``sample`` (copied from the raw run), ``hints={"dimensions": [[["step"],
    "metrics"]]}`` and a ``provenance`` dict (raw uid, scan id and plan name;
    package name and version; host). These are what bluesky's ``LiveTable``
    and ``BestEffortCallback`` read.

    Descriptors: every data key has ``units`` (images and noise levels
    ``1/mm``, times ``s``, other scalars ``""``, unitless) and an
    ``object_name``, the stream's name; ``object_keys`` and ``hints`` name the
    fields to plot (:data:`HINTS`: ``loss`` and ``alpha`` of ``metrics``).

    Scalars are passed as keyword arguments. A stream's data keys are declared
    by its first call (bool -> ``boolean``, int -> ``integer``, float ->
    ``number``, str -> ``string``; numpy scalars and 0-d arrays or tensors are
    unwrapped first); later calls must pass the same names, and values of the
    declared type (an int is accepted where a number was declared, not the
    reverse: pass ``float(x)`` for a quantity that may start at 0). ``None``
    is refused (use ``math.nan``). The names ``time`` and ``seq_num`` are
    reserved.

    The HDF5 file is created on the first image, with the datasets
    ``/reconstruction``, ``/denoised`` and ``/uncertainty`` (and one per extra
    image stream) of shape (N, H, W) float32, chunked
    per frame and growing along N; it is then switched to SWMR mode, and every
    frame is flushed before its documents are emitted.

    Not thread-safe by design: create, fill and close a run from one worker
    thread.

    Examples
    --------
    >>> run = DerivedRun(raw_start=start, emit=writer, directory=tmp,
    ...                  image_shape=(64, 64), metadata={"config": {}})
    >>> run.start()
    >>> run.add_reconstruction(slice_, projection_index=90, num_projections=91)
    >>> run.add_metrics(train_step=10, loss=0.01)
    >>> stop = run.close()
    """

    def __init__(
        self,
        *,
        raw_start: Mapping[str, Any],
        emit: Callable[[str, dict], None],
        directory: Path,
        image_shape: tuple[int, int],
        metadata: Mapping[str, Any],
        extra_images: Mapping[str, tuple[int, int]] | None = None,
        copy_keys: Sequence[str] = (),
    ) -> None:
        if not isinstance(raw_start, Mapping) or not isinstance(raw_start.get("uid"), str):
            raise ConfigError(
                "DerivedRun needs raw_start, the raw run's start document with a string 'uid'; "
                f"got {type(raw_start).__name__} with uid={_get(raw_start, 'uid')!r}. "
                "Pass the start document the raw run emitted."
            )
        if not callable(emit):
            raise ConfigError(
                f"DerivedRun needs emit, a callable emit(name, doc); got {emit!r}. "
                "Pass e.g. a TiledWriter."
            )
        shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else ()
        if len(shape) != 2 or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in shape
        ):
            raise ConfigError(
                f"DerivedRun image_shape must be (H, W), two positive integers; "
                f"got {image_shape!r}."
            )
        if not isinstance(metadata, Mapping):
            raise ConfigError(f"DerivedRun metadata must be a dict; got {type(metadata).__name__}.")
        if isinstance(copy_keys, str) or not all(isinstance(k, str) for k in copy_keys):
            raise ConfigError(
                f"DerivedRun copy_keys must be a sequence of start-document keys; got "
                f"{copy_keys!r}. Pass e.g. ('data_session', 'proposal_id')."
            )
        clash = sorted(_RESERVED_START_KEYS.intersection([*metadata, *copy_keys]))
        if clash:
            raise ConfigError(
                f"DerivedRun metadata and copy_keys must not set {clash}: DerivedRun sets them "
                f"itself. Got metadata keys {sorted(metadata)} and copy_keys "
                f"{list(copy_keys)}. Rename or drop those keys."
            )
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"DerivedRun metadata must be JSON-able (dicts, lists, str, finite numbers, "
                f"bool, None); json.dumps failed with: {err}. Convert arrays with .tolist() "
                "and dataclasses with dataclasses.asdict()."
            ) from err

        self._emit = emit
        self._directory = Path(directory)
        self._image_shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self._shapes: dict[str, tuple[int, int]] = dict.fromkeys(IMAGE_STREAMS, self._image_shape)
        for name, extra in (extra_images or {}).items():
            if name in STREAMS or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(name)):
                raise ConfigError(
                    f"extra_images names new image streams; got {name!r}. Use a new name of "
                    f"letters, digits and '_' (not one of {list(STREAMS)})."
                )
            self._shapes[name] = (int(extra[0]), int(extra[1]))
        self._bundle = event_model.compose_run(
            metadata=_start_metadata(raw_start, metadata, copy_keys)
        )
        self._path = self._directory.resolve() / f"{self.uid}.h5"
        self._file: h5py.File | None = None
        self._streams: dict[str, _Stream] = {}
        self._started = False
        self._stop: dict[str, Any] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def uid(self) -> str:
        """Uid of the derived run (its start document's ``uid``)."""
        return self._bundle.start_doc["uid"]

    @property
    def start_doc(self) -> dict[str, Any]:
        """The start document (emitted by :meth:`start`)."""
        return dict(self._bundle.start_doc)

    @property
    def path(self) -> Path:
        """Absolute path of the run's HDF5 file (created on the first image)."""
        return self._path

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return self._image_shape

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has emitted the stop document."""
        return self._stop is not None

    # --------------------------------------------------------------------- public
    def start(self) -> dict[str, Any]:
        """Emit the start document.

        Returns
        -------
        dict
            The start document.
        """
        if self._started:
            raise CatalogError(
                f"DerivedRun {self.uid} was already started; call start() once per run."
            )
        self._started = True
        self._emit("start", self._bundle.start_doc)
        return self._bundle.start_doc

    def add_reconstruction(self, image: np.ndarray, **scalars: Any) -> None:
        """Write one reconstructed slice and emit its documents.

        Parameters
        ----------
        image : ndarray, shape (H, W)
            Real-valued slice; stored as float32.
        **scalars : bool, int, float or str
            Recorded in the event, e.g. ``projection_index``, ``num_projections``.
        """
        self._add_image("reconstruction", image, scalars)

    def add_denoised(self, image: np.ndarray, **scalars: Any) -> None:
        """As :meth:`add_reconstruction`, for a denoised slice (scalars e.g. ``train_step``,
        ``weights_version``)."""
        self._add_image("denoised", image, scalars)

    def add_image(self, stream: str, image: np.ndarray, **scalars: Any) -> None:
        """Write one image of a stream named in ``extra_images`` (or a standard one).

        Parameters
        ----------
        stream : str
        image : ndarray, shape given for ``stream``
        **scalars : bool, int, float or str
        """
        if stream not in self._shapes:
            raise ConfigError(
                f"Unknown image stream {stream!r}; this run has {sorted(self._shapes)}. "
                "Declare it in DerivedRun(extra_images={...})."
            )
        self._add_image(stream, image, scalars)

    def add_metrics(self, **scalars: Any) -> None:
        """Emit one event of training metrics.

        Parameters
        ----------
        **scalars : bool, int, float or str
            At least one, e.g. ``train_step``, ``loss``, ``alpha``, ``elapsed``,
            ``pairs_seen``.
        """
        self._check_open("add_metrics")
        if not scalars:
            raise ScanDataError(
                "DerivedRun.add_metrics needs at least one scalar; got none. "
                "Pass e.g. add_metrics(train_step=10, loss=0.01)."
            )
        stream = self._stream("metrics", scalars)
        data = stream.coerce(scalars)
        self._emit_event(stream, data)

    def close(
        self, *, exit_status: Literal["success", "fail", "abort"] = "success", reason: str = ""
    ) -> dict[str, Any] | None:
        """Close the HDF5 file and emit the stop document.

        Safe to call more than once: later calls return the first stop
        document and emit nothing. A run that was never started emits nothing
        and returns None.

        Parameters
        ----------
        exit_status : {"success", "fail", "abort"}
            Recorded in the stop document.
        reason : str
            Why the run ended, e.g. the error message when it failed.

        Returns
        -------
        dict or None
            The stop document (with ``num_events`` per stream).
        """
        if exit_status not in EXIT_STATUSES:
            raise ConfigError(
                f"DerivedRun.close exit_status must be one of {EXIT_STATUSES}; got {exit_status!r}."
            )
        if not isinstance(reason, str):
            raise ConfigError(
                f"DerivedRun.close reason must be a str; got {type(reason).__name__}. "
                "Pass e.g. reason=str(error)."
            )
        if self._stop is not None:
            return self._stop
        try:
            self._close_file()
        finally:
            if self._started:
                self._stop = dict(self._bundle.compose_stop(exit_status=exit_status, reason=reason))
                self._emit("stop", self._stop)
        return self._stop

    def __enter__(self) -> DerivedRun:
        if not self._started:
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
        else:
            self.close(exit_status="fail", reason=f"{type(exc).__name__}: {exc}")

    def __repr__(self) -> str:
        counts = {name: s.count for name, s in self._streams.items()}
        state = "closed" if self.closed else "open" if self._started else "new"
        return f"<DerivedRun {self.uid} {state} events={counts}>"

    # -------------------------------------------------------------------- private
    def _check_open(self, what: str) -> None:
        if not self._started:
            raise CatalogError(
                f"DerivedRun.{what} was called before start(); call run.start() first."
            )
        if self._stop is not None:
            raise CatalogError(
                f"DerivedRun.{what} was called after close() on run {self.uid}; "
                "create a new DerivedRun for new results."
            )

    def _stream(self, name: str, scalars: Mapping[str, Any]) -> _Stream:
        """Return the stream, declaring it (descriptor, stream resource) on first use."""
        stream = self._streams.get(name)
        if stream is not None:
            stream.check_keys(scalars)
            return stream
        image_key = name if name in self._shapes else None
        schema = _declare(name, scalars, image_key=image_key)
        data_keys: dict[str, Any] = {
            key: {"dtype": dtype, "shape": [], "source": PLAN_NAME, "units": _unit(key)}
            | ({"dtype_numpy": np_dtype} if (np_dtype := _DTYPES[dtype][0]) else {})
            for key, dtype in schema.items()
        }
        if image_key is not None:
            height, width = self._shapes[name]
            data_keys[image_key] = {
                "dtype": "array",
                "dtype_numpy": np.dtype("<f4").str,
                "shape": [height, width],
                "dims": ["y", "x"],
                "external": "STREAM:",
                "source": f"{PLAN_NAME}:{name}",
                "units": IMAGE_UNITS,
            }
        for key in data_keys.values():
            key["object_name"] = name
        # one "object" per stream, as bluesky's viewers look fields up by object name
        hinted = [key for key in HINTS.get(name, ()) if key in data_keys]
        descriptor = self._bundle.compose_descriptor(
            name=name,
            data_keys=data_keys,
            object_keys={name: list(data_keys)},
            hints={name: {"fields": hinted}},
        )
        stream = _Stream(name=name, image_key=image_key, schema=schema, descriptor=descriptor)
        self._streams[name] = stream
        self._emit("descriptor", descriptor.descriptor_doc)
        if image_key is not None:
            height, width = self._shapes[name]
            resource = self._bundle.compose_stream_resource(
                mimetype=HDF5_MIMETYPE,
                uri=_file_uri(self._path),
                data_key=image_key,
                parameters={"dataset": f"/{image_key}", "chunk_shape": [1, height, width]},
            )
            stream.resource = resource
            self._emit("stream_resource", resource.stream_resource_doc)
        return stream

    def _add_image(self, name: str, image: np.ndarray, scalars: dict[str, Any]) -> None:
        self._check_open(f"add_{name}")
        frame = _as_frame(image, self._shapes[name], name)
        stream = self._stream(name, scalars)
        data = stream.coerce(scalars)
        dataset = self._dataset(name)
        index = dataset.shape[0]
        dataset.resize(index + 1, axis=0)
        dataset[index] = frame
        dataset.flush()
        seq_num = index + 1
        if stream.resource is None:  # pragma: no cover - set in _stream for images
            raise CatalogError(f"Stream {name!r} has no stream resource.")
        datum = stream.resource.compose_stream_datum(
            indices={"start": index, "stop": index + 1},
            seq_nums={"start": seq_num, "stop": seq_num + 1},
            descriptor=stream.descriptor.descriptor_doc,
        )
        self._emit("stream_datum", datum)
        self._emit_event(stream, data, seq_num=seq_num)

    def _emit_event(
        self, stream: _Stream, data: dict[str, Any], *, seq_num: int | None = None
    ) -> None:
        now = time.time()
        event = stream.descriptor.compose_event(
            data=data, timestamps=dict.fromkeys(data, now), seq_num=seq_num, time=now
        )
        stream.count += 1
        self._emit("event", event)

    def _dataset(self, name: str) -> h5py.Dataset:
        if self._file is None:
            self._file = _open_swmr_file(self._path, self._shapes)
        return self._file[name]

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


@dataclass(kw_only=True)
class _Stream:
    """Per-stream state: declared scalar schema, descriptor and stream-resource bundles."""

    name: str
    image_key: str | None
    schema: dict[str, str]
    descriptor: event_model.ComposeDescriptorBundle
    resource: event_model.ComposeStreamResourceBundle | None = None
    count: int = 0

    def check_keys(self, scalars: Mapping[str, Any]) -> None:
        if set(scalars) != set(self.schema):
            raise ScanDataError(
                f"Stream {self.name!r} was declared with scalars {sorted(self.schema)}; "
                f"got {sorted(scalars)}. Pass the same scalar names on every call."
            )

    def coerce(self, scalars: Mapping[str, Any]) -> dict[str, Any]:
        """Return the scalars as builtins of their declared types."""
        out = {}
        for key, value in scalars.items():
            declared = self.schema[key]
            got = _json_dtype(self.name, key, value)
            if got == declared or (declared == "number" and got == "integer"):
                out[key] = _DTYPES[declared][1](_builtin(value))
            else:
                raise ScanDataError(
                    f"Scalar {key!r} of stream {self.name!r} was declared {declared!r} by its "
                    f"first value; got {value!r} ({got}). Pass values of one type per key "
                    "(e.g. always float(x) for a quantity that may be integral)."
                )
        return out


# ------------------------------------------------------------------------ helpers
def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, Mapping) else None


def _unit(key: str) -> str:
    """The units of a scalar by its name (:data:`UNITS`; ``_s`` seconds; else ``""``)."""
    if key in UNITS:
        return UNITS[key]
    return "s" if key.endswith("_s") else ""


def _start_metadata(
    raw_start: Mapping[str, Any], metadata: Mapping[str, Any], copy_keys: Sequence[str] = ()
) -> dict[str, Any]:
    raw_scan_id = raw_start.get("scan_id")
    if isinstance(raw_scan_id, bool) or not isinstance(raw_scan_id, (int, np.integer)):
        raw_scan_id = None
    provenance = {
        "raw_uid": raw_start["uid"],
        "raw_scan_id": raw_scan_id if raw_scan_id is None else int(raw_scan_id),
        "raw_plan_name": raw_start.get("plan_name"),
        "package": "bluesky_jit",
        "version": __version__,
        "host": socket.gethostname(),
    }
    md: dict[str, Any] = {
        **metadata,
        **{key: raw_start[key] for key in copy_keys if key in raw_start},
        "plan_name": PLAN_NAME,
        "plan_type": PLAN_TYPE,
        "hints": {"dimensions": [[list(DIMENSIONS[0]), DIMENSIONS[1]]]},
        "raw_uid": raw_start["uid"],
        "provenance": provenance,
    }
    if raw_scan_id is not None:
        md["raw_scan_id"] = md["scan_id"] = int(raw_scan_id)
    if "sample" in raw_start:
        md["sample"] = raw_start["sample"]
    return md


def _builtin(value: Any) -> Any:
    """Unwrap numpy scalars and 0-d arrays or tensors (anything with ``ndim == 0`` and ``item``)."""
    if isinstance(value, np.generic) or (
        getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None))
    ):
        return value.item()
    return value


def _json_dtype(stream: str, key: str, value: Any) -> str:
    value = _builtin(value)
    for name, (_, kind) in _DTYPES.items():  # boolean before integer: a bool is an int
        if isinstance(value, kind):
            return name
    raise ScanDataError(
        f"Scalar {key!r} of stream {stream!r} must be a bool, int, float or str; "
        f"got {type(value).__name__} {value!r}. Pass images as the first argument of "
        "add_reconstruction/add_denoised and convert None to a number (e.g. math.nan)."
    )


def _declare(stream: str, scalars: Mapping[str, Any], *, image_key: str | None) -> dict[str, str]:
    """Return {key: JSON dtype} for the first scalars of a stream."""
    for key in scalars:
        if key in _RESERVED_SCALAR_KEYS or key == image_key:
            reserved = sorted(_RESERVED_SCALAR_KEYS | ({image_key} if image_key else set()))
            raise ScanDataError(
                f"Scalar name {key!r} is reserved in stream {stream!r} (reserved: {reserved}); "
                "rename it, e.g. 'elapsed' for a time."
            )
    return {key: _json_dtype(stream, key, value) for key, value in scalars.items()}


def _file_uri(path: Path) -> str:
    """``file://localhost/abs/path``, unquoted: Tiled reads the path back verbatim.

    (``Path.as_uri`` percent-encodes, e.g. spaces, which Tiled would not decode.)
    """
    posix = path.as_posix()
    return "file://localhost" + (posix if posix.startswith("/") else "/" + posix)


def _as_frame(image: Any, shape: tuple[int, int], stream: str) -> np.ndarray:
    array = np.asarray(image)
    if array.shape != shape or array.dtype.kind not in "biuf":
        raise ScanDataError(
            f"A {stream} image must be a real array of shape {shape} (image_shape); got "
            f"shape {array.shape} dtype {array.dtype}. Pass one (H, W) slice per call."
        )
    return array.astype(np.float32, copy=False)


def _open_swmr_file(path: Path, shapes: Mapping[str, tuple[int, int]]) -> h5py.File:
    """Create the run's HDF5 file with growing (N, H, W) datasets, then enter SWMR mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        file = h5py.File(path, "w-", libver="latest")
    except (OSError, ValueError) as err:
        raise CatalogError(
            f"Cannot create the derived run's HDF5 file {path}: {err}. "
            "Check that the directory is writable and the file does not exist yet."
        ) from err
    try:
        for name, (height, width) in shapes.items():
            file.create_dataset(
                name,
                shape=(0, height, width),
                maxshape=(None, height, width),
                chunks=(1, height, width),
                dtype="<f4",
                fillvalue=math.nan,
            )
        # SWMR must be switched on after every dataset exists: no new objects after it.
        file.swmr_mode = True
    except Exception:
        file.close()
        raise
    return file
