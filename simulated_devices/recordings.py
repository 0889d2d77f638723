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

import h5py
import numpy as np

from bluesky_jit.errors import ScanDataError

__all__ = ["DXchangeRecording", "write_dxchange"]


@dataclass(frozen=True, eq=False)
class DXchangeRecording:
    """A DXchange scan held in memory.

    Attributes
    ----------
    data : ndarray, shape (n_theta, rows, cols)
        Projections, counts.
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

    data: np.ndarray
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

    @classmethod
    def open(cls, path: str | Path) -> DXchangeRecording:
        """Read a DXchange file into memory.

        Parameters
        ----------
        path : str or Path
            HDF5 file with ``/exchange/data``, ``data_white``, ``data_dark`` and ``theta``.

        Returns
        -------
        DXchangeRecording
        """
        path = Path(path)
        if not path.is_file():
            raise ScanDataError(f"Expected a DXchange HDF5 file; {str(path)!r} does not exist.")
        with h5py.File(path, "r") as f:
            missing = [
                k for k in ("data", "data_white", "data_dark", "theta") if f"/exchange/{k}" not in f
            ]
            if missing:
                raise ScanDataError(
                    f"{path} is not a DXchange scan: expected /exchange/data, data_white, "
                    f"data_dark and theta; missing {missing}."
                )
            theta = np.asarray(f["/exchange/theta"][()], dtype=np.float64)
            units = f["/exchange/theta"].attrs.get("units", "degrees")
            if isinstance(units, bytes):
                units = units.decode()
            if str(units).lower().startswith("rad"):
                theta = np.degrees(theta)
            name = None
            if "/measurement/sample/name" in f:
                raw = f["/measurement/sample/name"][()]
                if isinstance(raw, np.ndarray):
                    raw = raw.reshape(-1)[0] if raw.size else ""
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
            return cls(
                data=f["/exchange/data"][()],
                flats=f["/exchange/data_white"][()],
                darks=f["/exchange/data_dark"][()],
                theta=theta,
                sample_name=name,
                path=path,
            )


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


def _check_stack(
    data: np.ndarray,
    flats: np.ndarray,
    darks: np.ndarray,
    theta: np.ndarray,
    *,
    where: Path | None,
) -> None:
    src = f" in {where}" if where is not None else ""
    if data.ndim != 3:
        raise ScanDataError(f"Expected data of shape (n_theta, rows, cols){src}; got {data.shape}.")
    for label, arr in (("flats", flats), ("darks", darks)):
        if arr.ndim != 3 or arr.shape[1:] != data.shape[1:] or arr.shape[0] < 1:
            raise ScanDataError(
                f"Expected {label} of shape (n >= 1, {data.shape[1]}, {data.shape[2]}) to match "
                f"the projections{src}; got {arr.shape}."
            )
    if theta.shape != (data.shape[0],):
        raise ScanDataError(
            f"Expected one angle per projection, theta of shape ({data.shape[0]},){src}; "
            f"got {theta.shape}."
        )
