"""Recorded scans in the DXchange HDF5 layout: read them, and write new ones.

DXchange (the APS layout, read by tomopy and dxchange) keeps one scan in::

    /exchange/data        (n_theta, rows, cols)  projections, counts
    /exchange/data_white  (n_flat, rows, cols)   flat fields (beam, no sample)
    /exchange/data_dark   (n_dark, rows, cols)   dark fields (no beam)
    /exchange/theta       (n_theta,)             stage angles, degrees
    /measurement/sample/name                     optional sample name

References
----------
De Carlo, F. et al. (2014). Scientific Data Exchange: a schema for HDF5-based
storage of raw and analyzed data. J. Synchrotron Rad. 21, 1224-1230.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bluesky_jit.errors import ScanDataError

__all__ = ["DXchangeRecording", "scan_layout", "write_dxchange"]


@dataclass(frozen=True, eq=False)
class DXchangeRecording:
    """A DXchange scan held in memory.

    Attributes
    ----------
    data : ndarray or h5py.Dataset, shape (n_theta, rows, cols)
        Projections, counts (a dataset of the open file when read with ``lazy=True``).
    flats : ndarray, shape (n_flat, rows, cols)
        Flat fields.
    darks : ndarray, shape (n_dark, rows, cols)
        Dark fields.
    theta : ndarray, shape (n_theta,), float64
        Stage angle of each projection, degrees.
    sample_name : str or None
        ``/measurement/sample/name`` if present.
    path : pathlib.Path or None
        The file it was read from.
    """

    data: Any
    flats: np.ndarray
    darks: np.ndarray
    theta: np.ndarray
    sample_name: str | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        _check_stack(self.data, self.flats, self.darks, self.theta, where=self.path)

    @property
    def detector_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of one frame."""
        return (int(self.data.shape[1]), int(self.data.shape[2]))

    @property
    def layout(self) -> dict[str, Any]:
        """The scan's ``num_angles`` (per rotation), ``angular_range`` and ``rotations``.

        See `scan_layout`.
        """
        return scan_layout(self.theta)

    def close(self) -> None:
        """Close the file of a recording read with ``lazy=True`` (nothing otherwise)."""
        if isinstance(self.data, h5py.Dataset) and self.data.id.valid:
            self.data.file.close()

    @classmethod
    def open(cls, path: str | Path, *, lazy: bool = False) -> DXchangeRecording:
        """Read a DXchange file.

        The datasets' shapes and dtypes are checked before any frame is read.

        Parameters
        ----------
        path : str or Path
            HDF5 file with ``/exchange/data``, ``data_white``, ``data_dark`` and ``theta``.
        lazy : bool
            Keep the file open and read each projection when it is asked for
            (``data`` is then the h5py dataset); darks, flats and angles are read at once.

        Returns
        -------
        DXchangeRecording
        """
        path = Path(path)
        if not path.is_file():
            raise ScanDataError(f"Expected a DXchange HDF5 file; {str(path)!r} does not exist.")
        f = h5py.File(path, "r")
        try:
            missing = [
                k for k in ("data", "data_white", "data_dark", "theta") if f"/exchange/{k}" not in f
            ]
            if missing:
                raise ScanDataError(
                    f"{path} is not a DXchange scan: expected /exchange/data, data_white, "
                    f"data_dark and theta; missing {missing}."
                )
            data, flats, darks, theta = (
                f[f"/exchange/{k}"] for k in ("data", "data_white", "data_dark", "theta")
            )
            _check_stack(data, flats, darks, theta, where=path)  # before reading any frame
            recording = cls(
                data=data if lazy else data[()],
                flats=flats[()],
                darks=darks[()],
                theta=_theta_degrees(theta),
                sample_name=_sample_name(f),
                path=path,
            )
        except BaseException:
            f.close()
            raise
        if not lazy:
            f.close()
        return recording


def scan_layout(theta: np.ndarray) -> dict[str, Any]:
    """How a recording's angles divide into rotations, in the plans' terms.

    Angles stored modulo 360 deg are unwrapped first. A recording covering at
    most one full turn is one rotation of all its projections; a longer one
    has ``round(360 / step)`` projections per 360-degree rotation, the last
    rotation possibly partial.

    Parameters
    ----------
    theta : ndarray, shape (n,)
        Recorded stage angles, degrees, in acquisition order.

    Returns
    -------
    dict
        ``num_angles`` (per rotation), ``angular_range`` ``[start, stop]``
        (stop excluded) and ``rotations``, as in the ``tomo`` start-document block.

    Examples
    --------
    >>> scan_layout(np.arange(60) * 18.0)
    {'num_angles': 20, 'angular_range': [0.0, 360.0], 'rotations': 3}
    """
    theta = np.unwrap(np.asarray(theta, dtype=np.float64), period=360.0)
    start = float(theta[0])
    step = float(np.median(np.diff(theta))) if theta.size > 1 else 180.0
    if step == 0:
        raise ScanDataError(
            f"Expected the recorded angles to advance; the median step of {theta.size} angles "
            f"from {start:g} deg is 0. Check /exchange/theta (degrees, one per projection)."
        )
    if theta.size * abs(step) <= 360.0 + abs(step) / 2:
        stop = round(start + theta.size * step, 9)
        return {"num_angles": int(theta.size), "angular_range": [start, stop], "rotations": 1}
    per_rotation = max(1, round(360.0 / abs(step)))
    return {
        "num_angles": per_rotation,
        "angular_range": [start, round(start + float(np.copysign(360.0, step)), 9)],
        "rotations": -(-theta.size // per_rotation),
    }


def write_dxchange(
    path: str | Path,
    *,
    data: np.ndarray,
    flats: np.ndarray,
    darks: np.ndarray,
    theta: np.ndarray,
    sample_name: str | None = None,
) -> Path:
    """Write a scan as a DXchange HDF5 file, readable by `DXchangeRecording.open`.

    Parameters
    ----------
    path : str or Path
        File to create (overwritten if present).
    data : ndarray, shape (n_theta, rows, cols)
        Projections.
    flats : ndarray, shape (n_flat, rows, cols)
        Flat fields.
    darks : ndarray, shape (n_dark, rows, cols)
        Dark fields.
    theta : ndarray, shape (n_theta,)
        Stage angles, degrees.
    sample_name : str, optional
        Stored as ``/measurement/sample/name``.

    Returns
    -------
    pathlib.Path
        `path`.
    """
    path = Path(path)
    data, flats, darks = (np.asarray(a) for a in (data, flats, darks))
    theta = np.asarray(theta, dtype=np.float64)
    _check_stack(data, flats, darks, theta, where=path)
    with h5py.File(path, "w") as f:
        f.create_dataset("/implements", data="exchange:measurement")
        d = f.create_dataset("/exchange/data", data=data)
        d.attrs["axes"] = "theta:y:x"
        d.attrs["units"] = "counts"
        f.create_dataset("/exchange/data_white", data=flats).attrs["axes"] = "theta_white:y:x"
        f.create_dataset("/exchange/data_dark", data=darks).attrs["axes"] = "theta_dark:y:x"
        f.create_dataset("/exchange/theta", data=theta).attrs["units"] = "degrees"
        if sample_name is not None:
            f.create_dataset("/measurement/sample/name", data=sample_name)
    return path


def _theta_degrees(dataset: Any) -> np.ndarray:
    theta = np.asarray(dataset[()], dtype=np.float64)
    units = dataset.attrs.get("units", "degrees")
    if isinstance(units, bytes):
        units = units.decode()
    return np.degrees(theta) if str(units).lower().startswith("rad") else theta


def _sample_name(f: h5py.File) -> str | None:
    if "/measurement/sample/name" not in f:
        return None
    raw = f["/measurement/sample/name"][()]
    if isinstance(raw, np.ndarray):
        raw = raw.reshape(-1)[0] if raw.size else ""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _check_dtype(dtype: Any, *, where: Path | None) -> None:
    if np.dtype(dtype).kind not in "uif":
        src = f" in {where}" if where is not None else ""
        raise ScanDataError(
            f"Expected projections of an integer or float dtype{src}; got {dtype}. "
            "Store /exchange/data as counts (e.g. uint16 or float32)."
        )


def _check_stack(
    data: Any,
    flats: Any,
    darks: Any,
    theta: Any,
    *,
    where: Path | None,
) -> None:
    src = f" in {where}" if where is not None else ""
    _check_dtype(data.dtype, where=where)
    if len(data.shape) != 3:
        raise ScanDataError(f"Expected data of shape (n_theta, rows, cols){src}; got {data.shape}.")
    for label, arr in (("flats", flats), ("darks", darks)):
        if len(arr.shape) != 3 or arr.shape[1:] != data.shape[1:] or arr.shape[0] < 1:
            raise ScanDataError(
                f"Expected {label} of shape (n >= 1, {data.shape[1]}, {data.shape[2]}) to match "
                f"the projections{src}; got {arr.shape}."
            )
    if theta.shape != (data.shape[0],):
        raise ScanDataError(
            f"Expected one angle per projection, theta of shape ({data.shape[0]},){src}; "
            f"got {theta.shape}."
        )
