"""Scan metadata -> geometry values (parallel, cone, vectors, slices).

One place, :func:`geometry_from_start`, turns a run's start document into a
:class:`ScanGeometry`, with explicit overrides. From there everything is a
frozen value that compares equal, hashes and has a ``repr`` that evaluates
back to an equal object (``eval(repr(g), vars(bluesky_jit.geometry)) == g``):

- :class:`ScanGeometry`: the static set-up of a scan (detector, distances,
  centre of rotation, angular range), read from metadata;
- :class:`ProjectionGeometry` (factories :func:`parallel`, :func:`cone`): a
  circular scan with its actual projection angles; ``geom[0::2]`` is the
  geometry of every second projection (the Noise2Inverse split);
- :class:`VectorGeometry` (factories :func:`parallel_vec`, :func:`cone_vec`):
  one source/ray, detector centre and pixel axes per projection, for any
  trajectory (ASTRA's ``parallel3d_vec`` / ``cone_vec`` layout, in our axes);
- :class:`Slice`: a reconstruction plane as a value (centre, two in-plane unit
  axes, shape, pixel size), with :meth:`Slice.axial`, :meth:`Slice.zoom`,
  :meth:`Slice.crop` and :func:`orthogonal_slices`.

Conventions (binding; shared with ``simulated_devices.phantoms``)
----------------------------------------------------------------
World axes: ``z`` is the rotation axis and runs along detector rows (row
index grows with ``z``); ``x`` and ``y`` span the axial plane. A slice image
``img[i, j]`` lies at ``center + (j - (cols - 1) / 2) * pixel_size * axis_u +
(i - (rows - 1) / 2) * pixel_size * axis_v``; the default axial slice has
``axis_u = x`` and ``axis_v = y``, so ``x = (j - (n - 1) / 2) * pixel_size``
and ``y = (i - (n - 1) / 2) * pixel_size``.

Parallel beam, stage angle theta: the point ``(x, y, z)`` projects onto
detector column ``center_of_rotation + (x cos(theta) + y sin(theta)) /
pixel_size`` and row ``center_row + z / pixel_size``. The beam runs along
``e_b = (-sin(theta), cos(theta), 0)``, the detector column axis is
``e_u = (cos(theta), sin(theta), 0)``.

Cone beam (circular): the source sits at ``-source_origin * e_b``, the
detector plane at ``+origin_detector * e_b``; the central ray hits it at
(``center_row``, ``center_of_rotation``). With magnification
``M = (source_origin + origin_detector) / (source_origin + X . e_b)`` the point
``X`` projects onto column ``center_of_rotation + M (X . e_u) / pixel_size``
and row ``center_row + M z / pixel_size``. Reconstruction voxels default to the
detector pixel size at the rotation axis, ``pixel_size * source_origin /
(source_origin + origin_detector)`` (:attr:`ScanGeometry.voxel_size`).

A detector tilt (degrees) turns the detector pixel grid in its own plane
about (``center_row``, ``center_of_rotation``): pixel axes become
``u' = cos(t) u + sin(t) v`` and ``v' = -sin(t) u + cos(t) v``.

Every geometry reduces to one projective 3x4 matrix per projection
(:meth:`ProjectionGeometry.matrices`): ``(c w, r w, w) = P (x, y, z, 1)``,
with ``w = 1`` for parallel beam and ``w = 1`` on the rotation axis for cone
beam, so that ``1 / w**2`` is the FDK distance weight.

Scale: lengths are in the unit of ``pixel_size`` (mm by convention);
reconstructed values are attenuation coefficients in 1/unit (1/mm), so they
do not change when the detector is binned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import numpy as np

from .errors import GeometryError

__all__ = [
    "BEAM_TYPES",
    "ProjectionGeometry",
    "ScanGeometry",
    "Slice",
    "VectorGeometry",
    "cone",
    "cone_vec",
    "geometry_from_start",
    "orthogonal_slices",
    "parallel",
    "parallel_vec",
    "window_weight",
]

BEAM_TYPES = ("parallel", "cone")


# -- helpers --------------------------------------------------------------------------------
def _shape2(value: Any, what: str, hint: str = "") -> tuple[int, int]:
    try:
        shape = tuple(value)
    except TypeError:
        shape = ()
    message = f"{what} must be two positive integers (rows, columns); got {value!r}.{hint}"
    if len(shape) != 2 or any(
        isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating))
        for s in shape
    ):
        raise GeometryError(message)
    if any(int(s) != s or s < 1 for s in shape):
        raise GeometryError(message)
    return int(shape[0]), int(shape[1])


def _positive(value: Any, what: str, hint: str = "") -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise GeometryError(f"{what} must be a positive number; got {value!r}.{hint}")
    return number


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise GeometryError(f"{what} must be a finite number; got {value!r}.")
    return number


def _centre(cor: Any, crow: Any, rows: int, cols: int) -> tuple[float, float]:
    """``center_of_rotation`` and ``center_row`` checked; by default the middle column and row."""
    cor = _finite((cols - 1) / 2 if cor is None else cor, "center_of_rotation")
    if not 0 <= cor <= cols - 1:
        raise GeometryError(
            f"center_of_rotation {cor!r} lies outside the detector (columns 0..{cols - 1}). "
            f"Give it in detector pixels, e.g. {(cols - 1) / 2} for the middle column."
        )
    return cor, _finite((rows - 1) / 2 if crow is None else crow, "center_row")


def _cone_distances(so: Any, od: Any, needs: str, fix: str = "") -> tuple[float, float]:
    """``source_origin`` (> 0) and ``origin_detector`` (>= 0) of a cone beam, in mm."""
    if so is None or od is None:
        raise GeometryError(
            f"{needs} source_origin and origin_detector (mm); got source_origin={so!r}, "
            f"origin_detector={od!r}.{fix}"
        )
    od = _finite(od, "origin_detector (axis-to-detector distance, mm)")
    if od < 0:
        raise GeometryError(
            f"origin_detector must be >= 0 (axis-to-detector distance, mm); got {od!r}."
        )
    return _positive(so, "source_origin (source-to-axis distance, mm)"), od


def _angles(value: Any, beam: str) -> tuple[float, ...]:
    """Angles in radians; an int n means n angles evenly over 180 (parallel) or 360 degrees."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 1:
            raise GeometryError(f"angles={value!r}: need at least one projection angle.")
        span = math.pi if beam == "parallel" else 2 * math.pi
        return tuple(float(a) for a in np.linspace(0, span, int(value), endpoint=False))
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise GeometryError(
            f"angles must be a sequence of numbers (radians) or a count; got {value!r}."
        ) from error
    if array.size == 0:
        raise GeometryError("angles is empty: a geometry needs at least one projection angle.")
    if not np.all(np.isfinite(array)):
        raise GeometryError(
            f"angles hold {int(np.count_nonzero(~np.isfinite(array)))} NaN or infinite values; "
            "expected finite angles in radians."
        )
    return tuple(float(a) for a in array)


def _vec3(value: Any, what: str) -> tuple[float, float, float]:
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        array = np.array([])
    if array.size != 3 or not np.all(np.isfinite(array)):
        raise GeometryError(f"{what} must be three finite numbers (x, y, z); got {value!r}.")
    return float(array[0]), float(array[1]), float(array[2])


def _select(items: tuple, key: Any, what: str) -> tuple:
    """items[key] for a slice, an int or an index/boolean array; always a tuple."""
    if isinstance(key, slice):
        picked = items[key]
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        n = len(items)
        if not -n <= key < n:
            raise GeometryError(f"Projection {key} requested from a {what} of {n} projections.")
        picked = (items[key],)
    else:
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (len(items),):
                raise GeometryError(
                    f"A boolean projection mask needs {len(items)} entries; got {index.shape}."
                )
            index = np.flatnonzero(index)
        if index.dtype.kind not in "iu":
            raise GeometryError(
                f"Index a {what} with a slice, an int or integer indices; got {key!r}."
            )
        n = len(items)
        if index.size and (index.min() < -n or index.max() >= n):
            raise GeometryError(
                f"Projections {index.min()}..{index.max()} requested from a {what} of "
                f"{n} projections."
            )
        picked = tuple(items[int(i)] for i in index.reshape(-1))
    if not picked:
        raise GeometryError(f"The selection {key!r} leaves no projection of the {what}.")
    return picked


def _tilt_axes(u: np.ndarray, v: np.ndarray, tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    t = math.radians(tilt_deg)
    c, s = math.cos(t), math.sin(t)
    return c * u + s * v, -s * u + c * v


def vectors_to_matrices(beam: str, vectors: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Projective matrices (n, 3, 4) from ASTRA-layout vectors (n, 12) in our world axes.

    ``vectors[k] = (ray or source, detector centre, u, v)``: for parallel beam the
    ray direction, for cone beam the source position; ``u`` and ``v`` step one
    detector column and one row. The detector centre lies between the middle
    pixels, at column ``(cols - 1) / 2`` and row ``(rows - 1) / 2``. The third
    row is normalised so that ``w = 1`` at the world origin.
    """
    vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, 12)
    rows, cols = shape
    c0, r0 = (cols - 1) / 2, (rows - 1) / 2
    first, d, u, v = vectors[:, 0:3], vectors[:, 3:6], vectors[:, 6:9], vectors[:, 9:12]
    n = len(vectors)
    mats = np.zeros((n, 3, 4))
    if beam == "parallel":
        ray = first
        # dual basis of (u, v, ray): X - D = a u + b v + t ray
        du_star = np.cross(v, ray)
        du_star /= np.einsum("ij,ij->i", u, du_star)[:, None]
        dv_star = np.cross(ray, u)
        dv_star /= np.einsum("ij,ij->i", v, dv_star)[:, None]
        mats[:, 0, :3] = du_star
        mats[:, 0, 3] = c0 - np.einsum("ij,ij->i", d, du_star)
        mats[:, 1, :3] = dv_star
        mats[:, 1, 3] = r0 - np.einsum("ij,ij->i", d, dv_star)
        mats[:, 2, 3] = 1.0
        return mats
    src = first
    normal = np.cross(u, v)
    # in-plane dual vectors: (H - D) = a u + b v with H on the detector plane
    u_star = np.cross(v, normal)
    u_star /= np.einsum("ij,ij->i", u, u_star)[:, None]
    v_star = np.cross(normal, u)
    v_star /= np.einsum("ij,ij->i", v, v_star)[:, None]
    # w(X) = (X - S).n / ((D - S).n); H = S + (X - S) / w
    denom = np.einsum("ij,ij->i", d - src, normal)
    w_row = np.concatenate([normal, -np.einsum("ij,ij->i", src, normal)[:, None]], 1)
    w_row /= denom[:, None]
    for k, (dual, centre) in enumerate(((u_star, c0), (v_star, r0))):
        # w * (a - centre) = w (S - D).dual + (X - S).dual
        s_minus_d = np.einsum("ij,ij->i", src - d, dual)
        row = np.concatenate([dual, -np.einsum("ij,ij->i", src, dual)[:, None]], 1)
        mats[:, k] = row + (s_minus_d + centre)[:, None] * w_row
    mats[:, 2] = w_row
    # normalise so that w = 1 at the origin (the FDK distance weight is then 1 / w**2)
    w0 = mats[:, 2, 3].copy()
    if np.any(w0 <= 0):
        raise GeometryError(
            "The world origin lies behind a cone-beam source (or on its plane); expected the "
            "object between source and detector. Check the sign of the source vectors."
        )
    return mats / w0[:, None, None]


# -- the scan ----------------------------------------------------------------------------
class _Beam:
    """``magnification`` and ``voxel_size`` of a parallel or cone beam."""

    beam: str
    pixel_size: float
    source_origin: float | None
    origin_detector: float | None

    @property
    def magnification(self) -> float:
        """Detector pixels per voxel at the rotation axis (1 for parallel beam)."""
        if self.beam == "parallel":
            return 1.0
        return (self.source_origin + self.origin_detector) / self.source_origin

    @property
    def voxel_size(self) -> float:
        """Default reconstruction pixel size: the detector pixel at the rotation axis."""
        return self.pixel_size / self.magnification


@dataclass(frozen=True, kw_only=True)
class ScanGeometry(_Beam):
    """The static geometry of a tomography scan, as read from its metadata.

    Per-projection angles are not part of it: they come with every frame, read
    from the rotation stage; :meth:`projection_geometry` adds them.

    Parameters
    ----------
    detector_shape : (int, int)
        Detector (rows, columns).
    pixel_size : float
        Detector pixel size (mm); for parallel beam also the voxel size.
    center_of_rotation : float
        Detector column (pixels) onto which the rotation axis projects
        (cone beam: where the central ray hits). Default: the middle column.
    angular_range : (float, float)
        Start and stop angle (degrees) of one rotation, stop excluded.
    num_angles : int
        Projections per rotation.
    beam : {"parallel", "cone"}
    rotations : int
        Number of rotations in the scan.
    source_origin, origin_detector : float or None
        Cone beam only: source-to-axis and axis-to-detector distances (mm).
    center_row : float or None
        Detector row of the central ray (cone) or of ``z = 0``; default middle.
    detector_tilt : float
        In-plane detector rotation (degrees), see the module notes.
    """

    detector_shape: tuple[int, int]
    pixel_size: float = 1.0
    center_of_rotation: float | None = None
    angular_range: tuple[float, float] = (0.0, 180.0)
    num_angles: int = 180
    beam: str = "parallel"
    rotations: int = 1
    source_origin: float | None = None
    origin_detector: float | None = None
    center_row: float | None = None
    detector_tilt: float = 0.0
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        shape = _shape2(self.detector_shape, "detector_shape")
        object.__setattr__(self, "detector_shape", shape)
        rows, cols = shape
        try:
            angular_range = tuple(float(a) for a in self.angular_range)
        except (TypeError, ValueError):
            angular_range = ()
        if len(angular_range) != 2 or not all(math.isfinite(a) for a in angular_range):
            raise GeometryError(
                f"angular_range must be (start, stop) in degrees; got {self.angular_range!r}."
            )
        object.__setattr__(self, "angular_range", angular_range)
        if self.beam not in BEAM_TYPES:
            raise GeometryError(
                f"Unknown beam type {self.beam!r}; expected one of {BEAM_TYPES}. "
                "Set tomo['beam'] in the start document or pass beam=... as an override."
            )
        if self.beam == "cone":
            so, od = _cone_distances(
                self.source_origin,
                self.origin_detector,
                "A cone-beam geometry needs",
                " Add both to tomo[...] or pass them as overrides.",
            )
            object.__setattr__(self, "source_origin", so)
            object.__setattr__(self, "origin_detector", od)
        object.__setattr__(
            self,
            "pixel_size",
            _positive(self.pixel_size, "pixel_size", " Give the detector pixel size in mm."),
        )
        cor, crow = _centre(self.center_of_rotation, self.center_row, rows, cols)
        object.__setattr__(self, "center_of_rotation", cor)
        object.__setattr__(self, "center_row", crow)
        object.__setattr__(self, "detector_tilt", _finite(self.detector_tilt, "detector_tilt"))
        start, stop = self.angular_range
        if not stop > start:
            raise GeometryError(
                f"angular_range must increase (start, stop) in degrees; got {self.angular_range!r}."
            )
        if (
            isinstance(self.num_angles, bool)
            or int(self.num_angles) != self.num_angles
            or self.num_angles < 2
        ):
            raise GeometryError(f"num_angles must be an integer >= 2; got {self.num_angles!r}.")
        object.__setattr__(self, "num_angles", int(self.num_angles))
        if self.beam == "cone" and stop - start < 360 - 1e-6:
            raise GeometryError(
                f"Cone-beam FDK needs a full rotation: angular_range spanning 360 degrees; got "
                f"{self.angular_range!r}. Short-scan (Parker) weighting is not implemented; scan "
                "360 degrees or set angular_range=(0, 360)."
            )

    @property
    def rows(self) -> int:
        return self.detector_shape[0]

    @property
    def cols(self) -> int:
        return self.detector_shape[1]

    @property
    def angular_span(self) -> float:
        """Degrees covered by one rotation."""
        return self.angular_range[1] - self.angular_range[0]

    @property
    def slice_size(self) -> int:
        """Default side (pixels) of an axial slice: the detector width."""
        return self.cols

    def row_to_z(self, row: float) -> float:
        """The height z (mm) seen at a detector row (at the rotation axis for cone beam)."""
        return (row - self.center_row) * self.voxel_size

    def z_to_row(self, z: float) -> float:
        return self.center_row + z / self.voxel_size

    def nominal_angles(self) -> np.ndarray:
        """The ``num_angles`` angles (radians) of one rotation, evenly spaced."""
        start, stop = np.radians(self.angular_range)
        return np.linspace(start, stop, self.num_angles, endpoint=False)

    def projection_geometry(self, angles: Any = None) -> ProjectionGeometry:
        """This scan with given projection angles (radians; nominal ones by default)."""
        angles = self.nominal_angles() if angles is None else angles
        common = dict(
            angles=angles,
            shape=self.detector_shape,
            pixel_size=self.pixel_size,
            center_of_rotation=self.center_of_rotation,
            center_row=self.center_row,
            tilt=self.detector_tilt,
        )
        if self.beam == "cone":
            return cone(
                **common, source_origin=self.source_origin, origin_detector=self.origin_detector
            )
        return parallel(**common)

    def axial_slice(
        self,
        row: float | None = None,
        *,
        shape: int | None = None,
        pixel_size: float | None = None,
        center_xy: Sequence[float] = (0.0, 0.0),
    ) -> Slice:
        """The axial slice at a detector row (default: the middle row), centred at x, y (mm)."""
        row = self.center_row if row is None else row
        n = self.slice_size if shape is None else shape
        return Slice.axial(
            z=self.row_to_z(row),
            shape=(n, n),
            pixel_size=self.voxel_size if pixel_size is None else pixel_size,
            center_xy=center_xy,
        )

    # -- checks against the data --------------------------------------------------------
    @property
    def field_of_view(self) -> tuple[float, float, float]:
        """The reconstruction volume: (radius, z_min, z_max) in mm.

        A cylinder around the rotation axis: out to the farther detector edge
        from the centre of rotation, and as tall as the detector, both at the
        rotation axis (the voxel scale). Points outside it are seen by no
        projection (parallel beam) or by almost none (cone beam).
        """
        half = max(self.center_of_rotation, self.cols - 1 - self.center_of_rotation) + 0.5
        z0 = self.row_to_z(-0.5)
        z1 = self.row_to_z(self.rows - 0.5)
        return half * self.voxel_size, min(z0, z1), max(z0, z1)

    def check_slice(self, slice_: Slice) -> None:
        """Raise GeometryError if no part of ``slice_`` lies inside :attr:`field_of_view`."""
        radius, z0, z1 = self.field_of_view
        rows, cols = slice_.shape
        # a grid of at most 65 x 65 samples with both edges; the distance to the
        # volume is 1-Lipschitz, so a slice whose samples are all farther away
        # than half a sample cell's diagonal misses the volume
        i = np.unique(np.linspace(0, rows - 1, min(rows, 65)))
        j = np.unique(np.linspace(0, cols - 1, min(cols, 65)))
        pts = slice_.origin + i[:, None, None] * slice_.step_v + j[None, :, None] * slice_.step_u
        outside = np.maximum.reduce(
            [
                np.hypot(pts[..., 0], pts[..., 1]) - radius,
                z0 - pts[..., 2],
                pts[..., 2] - z1,
                np.zeros(pts.shape[:-1]),
            ]
        )
        cell = slice_.pixel_size * math.hypot(
            (rows - 1) / max(len(i) - 1, 1), (cols - 1) / max(len(j) - 1, 1)
        )
        if float(outside.min()) > cell / 2 + 1e-9:
            cx, cy, cz = slice_.center
            raise GeometryError(
                f"The slice centred at ({cx:g}, {cy:g}, {cz:g}) mm ({rows}x{cols} pixels of "
                f"{slice_.pixel_size:g} mm) lies outside the reconstruction volume: a cylinder "
                f"of radius {radius:.4g} mm around the rotation axis, z from {z0:.4g} to "
                f"{z1:.4g} mm (its nearest pixel is {float(outside.min()):.4g} mm away). Move "
                "the slice's centre inside, e.g. center=(0, 0, 0), or check its pixel_size "
                "(mm, not pixels)."
            )

    def check_angles(self, angles: Any) -> None:
        """Raise GeometryError if one rotation's angles (radians) leave part of the range uncovered.

        The angles are folded onto :attr:`angular_range` (modulo 180 degrees
        for a parallel-beam half rotation, 360 otherwise); the largest gap
        between neighbours, the wrap-around included, may be at most four
        nominal steps (``span / num_angles``) or 5 % of the span, whichever is
        larger, so that a few dropped frames pass and a scan over part of the
        range (or angles sent in radians as degrees) does not.
        """
        deg = np.degrees(np.asarray(angles, dtype=np.float64).reshape(-1))
        if deg.size == 0:
            raise GeometryError("No projection angle to check; expected one rotation's angles.")
        span = self.angular_span
        period = 180.0 if self.beam == "parallel" and span <= 180.0 + 1e-9 else 360.0
        folded = np.sort(np.mod(deg - self.angular_range[0], period))
        inside = folded[folded < span + 1e-9] if span < period else folded
        step = span / self.num_angles
        allowed = max(4 * step, 0.05 * span)
        if inside.size:
            edges = np.concatenate([[0.0], inside, [span]]) if span < period else inside
            gaps = np.diff(edges)
            wrap = (
                0.0 if span < period else period - (inside[-1] - inside[0])
            )  # full circle: last to first
            largest = float(max(gaps.max(initial=0.0), wrap))
        else:
            largest = span
        if largest > allowed:
            lo, hi = float(deg.min()), float(deg.max())
            raise GeometryError(
                f"The {deg.size} projection angles of the last rotation run from {lo:.4g} to "
                f"{hi:.4g} degrees and leave a gap of {largest:.4g} degrees in the range the "
                f"geometry claims, angular_range={self.angular_range} with num_angles="
                f"{self.num_angles} (at most {allowed:.3g} degrees allowed). Set "
                "tomo['angular_range'] and tomo['num_angles'] to what the scan covers, or check "
                "the rotation stage readback (degrees expected, not radians)."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the keys of the ``tomo`` start-document block)."""
        return {
            f.name: (list(v) if isinstance(v, tuple) else v)
            for f in fields(self)
            if f.name != "extra"
            for v in [getattr(self, f.name)]
        }

    def replace(self, **changes: Any) -> ScanGeometry:
        return replace(self, **changes)


# -- projection geometries ---------------------------------------------------------------
class _Projections:
    """Shared behaviour: length, slicing by projection index, matrices."""

    beam: str
    shape: tuple[int, int]
    vector_array: np.ndarray
    """(n, 12): ray or source, detector centre, u, v of every projection."""

    @cached_property
    def _matrices(self) -> np.ndarray:
        mats = vectors_to_matrices(self.beam, self.vector_array, self.shape)
        mats.setflags(write=False)
        return mats

    def matrices(self) -> np.ndarray:
        """Projective maps, shape (n, 3, 4): ``(c w, r w, w) = P (x, y, z, 1)`` (read-only)."""
        return self._matrices

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detector (row, column) of world points and the weight factor w.

        Parameters
        ----------
        points : ndarray, shape (..., 3)

        Returns
        -------
        row, col, w : ndarray, shape (n, ...)
        """
        pts = np.asarray(points, dtype=np.float64)
        mats = self.matrices()
        flat = pts.reshape(-1, 3)
        h = mats[:, :, :3] @ flat.T + mats[:, :, 3:]  # (n, 3, points)
        h = np.moveaxis(h, 1, -1).reshape(len(mats), *pts.shape[:-1], 3)
        w = h[..., 2]
        return h[..., 1] / w, h[..., 0] / w, w


@dataclass(frozen=True, kw_only=True)
class ProjectionGeometry(_Projections, _Beam):
    """A circular parallel- or cone-beam scan with its projection angles.

    Make one with :func:`parallel` or :func:`cone`. ``len(g)`` is the number of
    projections and ``g[0::2]`` (any slice, int or index array) the geometry of
    a subset, e.g. the even projections of a Noise2Inverse split.

    Parameters
    ----------
    beam : {"parallel", "cone"}
    angles : tuple of float
        Stage angles (radians).
    shape : (int, int)
        Detector (rows, cols).
    pixel_size : float
        Detector pixel size (mm).
    center_of_rotation, center_row : float
        Detector column and row of the rotation axis / central ray (pixels).
    tilt : float
        In-plane detector rotation (degrees).
    source_origin, origin_detector : float or None
        Cone beam: source-to-axis and axis-to-detector distances (mm).
    """

    beam: str
    angles: tuple[float, ...]
    shape: tuple[int, int]
    pixel_size: float = 1.0
    center_of_rotation: float | None = None
    center_row: float | None = None
    tilt: float = 0.0
    source_origin: float | None = None
    origin_detector: float | None = None

    def __post_init__(self) -> None:
        if self.beam not in BEAM_TYPES:
            raise GeometryError(f"Unknown beam type {self.beam!r}; expected one of {BEAM_TYPES}.")
        object.__setattr__(self, "angles", _angles(self.angles, self.beam))
        rows, cols = _shape2(self.shape, "shape")
        object.__setattr__(self, "shape", (rows, cols))
        object.__setattr__(self, "pixel_size", _positive(self.pixel_size, "pixel_size"))
        cor, crow = _centre(self.center_of_rotation, self.center_row, rows, cols)
        object.__setattr__(self, "center_of_rotation", cor)
        object.__setattr__(self, "center_row", crow)
        object.__setattr__(self, "tilt", _finite(self.tilt, "tilt"))
        if self.beam == "cone":
            so, od = _cone_distances(self.source_origin, self.origin_detector, "cone(...) needs")
            object.__setattr__(self, "source_origin", so)
            object.__setattr__(self, "origin_detector", od)
        elif self.source_origin is not None or self.origin_detector is not None:
            raise GeometryError(
                "source_origin/origin_detector belong to cone beam; a parallel geometry got "
                f"source_origin={self.source_origin!r}, origin_detector={self.origin_detector!r}. "
                "Use cone(...) or leave them out."
            )

    def __len__(self) -> int:
        return len(self.angles)

    def __getitem__(self, key: Any) -> ProjectionGeometry:
        return replace(self, angles=_select(self.angles, key, "geometry"))

    def to_vec(self) -> VectorGeometry:
        """The same scan as per-projection vectors (see :func:`vectors_to_matrices`)."""
        return VectorGeometry(beam=self.beam, vectors=self.vector_array, shape=self.shape)

    @property
    def vector_array(self) -> np.ndarray:
        rows, cols = self.shape
        a = np.asarray(self.angles)
        e_u = np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], 1)
        e_b = np.stack([-np.sin(a), np.cos(a), np.zeros_like(a)], 1)
        u = e_u * self.pixel_size
        v = np.broadcast_to(np.array([0.0, 0.0, self.pixel_size]), u.shape)
        u, v = _tilt_axes(u, v, self.tilt)
        # pixel (center_row, center_of_rotation) sits at the principal point
        offset = ((cols - 1) / 2 - self.center_of_rotation) * u + (
            (rows - 1) / 2 - self.center_row
        ) * v
        if self.beam == "parallel":
            first, centre = e_b, offset
        else:
            first = -self.source_origin * e_b
            centre = self.origin_detector * e_b + offset
        return np.concatenate([first, centre, u, v], 1)


def parallel(
    *,
    angles: Any,
    shape: Sequence[int],
    pixel_size: float = 1.0,
    center_of_rotation: float | None = None,
    center_row: float | None = None,
    tilt: float = 0.0,
) -> ProjectionGeometry:
    """A circular parallel-beam geometry.

    Parameters
    ----------
    angles : array_like of float, or int
        Angles in radians; an int ``n`` gives ``n`` angles evenly over 180 degrees.
    shape : (int, int)
        Detector (rows, cols).

    Examples
    --------
    >>> g = parallel(angles=180, shape=(16, 128))
    >>> len(g[0::2])
    90
    """
    return ProjectionGeometry(
        beam="parallel",
        angles=angles,
        shape=shape,
        pixel_size=pixel_size,
        center_of_rotation=center_of_rotation,
        center_row=center_row,
        tilt=tilt,
    )


def cone(
    *,
    angles: Any,
    shape: Sequence[int],
    source_origin: float,
    origin_detector: float,
    pixel_size: float = 1.0,
    center_of_rotation: float | None = None,
    center_row: float | None = None,
    tilt: float = 0.0,
) -> ProjectionGeometry:
    """A circular cone-beam geometry (an int ``angles`` spreads them over 360 degrees)."""
    return ProjectionGeometry(
        beam="cone",
        angles=angles,
        shape=shape,
        pixel_size=pixel_size,
        center_of_rotation=center_of_rotation,
        center_row=center_row,
        tilt=tilt,
        source_origin=source_origin,
        origin_detector=origin_detector,
    )


@dataclass(frozen=True, kw_only=True)
class VectorGeometry(_Projections):
    """Any trajectory: one row of 12 numbers per projection.

    ``(ray or source, detector centre, u, v)`` in world coordinates (mm), in
    ASTRA's ``parallel3d_vec`` / ``cone_vec`` layout but in the world axes of
    this module: for parallel beam the ray direction, for cone beam the source
    position; ``u``/``v`` step one detector column/row.
    """

    beam: str
    vectors: tuple[tuple[float, ...], ...]
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.beam not in BEAM_TYPES:
            raise GeometryError(f"Unknown beam type {self.beam!r}; expected one of {BEAM_TYPES}.")
        try:
            array = np.asarray(self.vectors, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise GeometryError(
                f"vectors must be numbers of shape (n, 12); got {self.vectors!r}."
            ) from error
        if array.ndim != 2 or array.shape[1] != 12 or array.shape[0] == 0:
            raise GeometryError(
                f"vectors must have shape (n, 12) with n >= 1 (ray/source, detector centre, u, "
                f"v); got shape {array.shape}."
            )
        if not np.all(np.isfinite(array)):
            raise GeometryError("vectors hold NaN or infinite values.")
        if np.any(np.linalg.norm(np.cross(array[:, 6:9], array[:, 9:12]), axis=1) == 0):
            raise GeometryError(
                "Detector axes u and v are parallel (or zero) for some projection; expected two "
                "independent pixel steps."
            )
        object.__setattr__(self, "vectors", tuple(tuple(float(x) for x in row) for row in array))
        object.__setattr__(self, "shape", _shape2(self.shape, "shape"))

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def vector_array(self) -> np.ndarray:
        return np.asarray(self.vectors)

    def __getitem__(self, key: Any) -> VectorGeometry:
        return replace(self, vectors=_select(self.vectors, key, "geometry"))

    def to_vec(self) -> VectorGeometry:
        return self


def parallel_vec(*, vectors: Any, shape: Sequence[int]) -> VectorGeometry:
    """A parallel-beam vector geometry (rows: ray, detector centre, u, v)."""
    return VectorGeometry(beam="parallel", vectors=vectors, shape=shape)


def cone_vec(*, vectors: Any, shape: Sequence[int]) -> VectorGeometry:
    """A cone-beam vector geometry (rows: source, detector centre, u, v)."""
    return VectorGeometry(beam="cone", vectors=vectors, shape=shape)


# -- slices ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Slice:
    """A reconstruction plane as a value.

    Pixel ``img[i, j]`` lies at ``center + (j - (cols - 1) / 2) * pixel_size *
    axis_u + (i - (rows - 1) / 2) * pixel_size * axis_v``.

    Parameters
    ----------
    shape : (int, int)
        Image (rows, cols).
    pixel_size : float
        Image pixel size (mm); smaller than the voxel size zooms in.
    center : (float, float, float)
        World position of the image centre (mm).
    axis_u, axis_v : (float, float, float)
        In-plane directions of growing column and row index; normalised on
        construction, must be orthogonal.
    """

    shape: tuple[int, int]
    pixel_size: float = 1.0
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    axis_u: tuple[float, float, float] = (1.0, 0.0, 0.0)
    axis_v: tuple[float, float, float] = (0.0, 1.0, 0.0)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "shape",
            _shape2(
                self.shape,
                "Slice shape",
                " A slice or region of interest needs at least one pixel each way, e.g. "
                "shape=(20, 20).",
            ),
        )
        object.__setattr__(self, "pixel_size", _positive(self.pixel_size, "Slice pixel_size"))
        object.__setattr__(self, "center", _vec3(self.center, "Slice center"))
        axes = []
        for name in ("axis_u", "axis_v"):
            vec = np.asarray(_vec3(getattr(self, name), f"Slice {name}"))
            norm = float(np.linalg.norm(vec))
            if norm == 0:
                raise GeometryError(
                    f"Slice {name} is the zero vector; give an in-plane direction, e.g. (1, 0, 0)."
                )
            axes.append(vec / norm)
        dot = float(axes[0] @ axes[1])
        if abs(dot) > 1e-6:
            raise GeometryError(
                f"Slice axes must be orthogonal; got axis_u={self.axis_u!r}, "
                f"axis_v={self.axis_v!r} (cosine {dot:.3g}). Pass two perpendicular directions, "
                "e.g. axis_u=(1, 0, 0), axis_v=(0, 1, 0) for an axial slice."
            )
        for name, vec in zip(("axis_u", "axis_v"), axes, strict=True):
            object.__setattr__(self, name, tuple(float(x) for x in vec))

    @classmethod
    def axial(
        cls,
        *,
        shape: Sequence[int],
        z: float = 0.0,
        pixel_size: float = 1.0,
        center_xy: Sequence[float] = (0.0, 0.0),
    ) -> Slice:
        """A slice perpendicular to the rotation axis at height z (x along j, y along i)."""
        x, y = center_xy
        return cls(shape=shape, pixel_size=pixel_size, center=(x, y, z))

    @classmethod
    def xz(cls, *, shape: Sequence[int], y: float = 0.0, pixel_size: float = 1.0) -> Slice:
        """A vertical slice at fixed y: x along columns, z along rows."""
        return cls(
            shape=shape,
            pixel_size=pixel_size,
            center=(0.0, y, 0.0),
            axis_u=(1.0, 0.0, 0.0),
            axis_v=(0.0, 0.0, 1.0),
        )

    @classmethod
    def yz(cls, *, shape: Sequence[int], x: float = 0.0, pixel_size: float = 1.0) -> Slice:
        """A vertical slice at fixed x: y along columns, z along rows."""
        return cls(
            shape=shape,
            pixel_size=pixel_size,
            center=(x, 0.0, 0.0),
            axis_u=(0.0, 1.0, 0.0),
            axis_v=(0.0, 0.0, 1.0),
        )

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def normal(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in np.cross(self.axis_u, self.axis_v))

    @property
    def is_axial(self) -> bool:
        """True when the plane is perpendicular to the rotation axis."""
        return abs(abs(self.normal[2]) - 1.0) < 1e-9

    @property
    def step_u(self) -> np.ndarray:
        """World step (mm) from one column to the next."""
        return np.asarray(self.axis_u) * self.pixel_size

    @property
    def step_v(self) -> np.ndarray:
        """World step (mm) from one row to the next."""
        return np.asarray(self.axis_v) * self.pixel_size

    @property
    def origin(self) -> np.ndarray:
        """World position of pixel (0, 0)."""
        rows, cols = self.shape
        return np.asarray(self.center) - (cols - 1) / 2 * self.step_u - (rows - 1) / 2 * self.step_v

    def points(self) -> np.ndarray:
        """World coordinates of every pixel, shape (rows, cols, 3)."""
        rows, cols = self.shape
        i = np.arange(rows)[:, None, None]
        j = np.arange(cols)[None, :, None]
        return self.origin + i * self.step_v + j * self.step_u

    def moved(self, *, center: Sequence[float]) -> Slice:
        """The same plane orientation and size around a new centre."""
        return replace(self, center=center)

    def zoom(self, factor: float) -> Slice:
        """Magnify by ``factor`` about the centre (same shape, pixel size / factor)."""
        factor = _positive(factor, "zoom factor")
        return replace(self, pixel_size=self.pixel_size / factor)

    def crop(self, rows: slice, cols: slice) -> Slice:
        """Region of interest: the sub-image ``img[rows, cols]`` as a slice of its own."""
        r = range(self.rows)[rows]
        c = range(self.cols)[cols]
        if r.step != 1 or c.step != 1 or not len(r) or not len(c):
            raise GeometryError(
                f"crop needs non-empty unit-step ranges inside the {self.shape} image; got "
                f"rows={rows!r}, cols={cols!r}."
            )
        centre = (
            self.origin
            + (r.start + (len(r) - 1) / 2) * self.step_v
            + (c.start + (len(c) - 1) / 2) * self.step_u
        )
        return replace(self, shape=(len(r), len(c)), center=tuple(centre))


def orthogonal_slices(
    geometry: ScanGeometry,
    *,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    size: int | None = None,
    pixel_size: float | None = None,
) -> tuple[Slice, Slice, Slice]:
    """Three orthogonal slices through ``center``: axial (x, y), xz and yz (RECAST3D default).

    The axial slice is ``size`` x ``size`` (default the detector width); the
    vertical ones are ``size`` wide and as tall as the detector.
    """
    pixel = geometry.voxel_size if pixel_size is None else pixel_size
    n = geometry.slice_size if size is None else int(size)
    height = max(1, int(round(geometry.rows * geometry.voxel_size / pixel)))
    x, y, z = _vec3(center, "center")
    return (
        Slice.axial(shape=(n, n), z=z, pixel_size=pixel, center_xy=(x, y)),
        replace(Slice.xz(shape=(height, n), y=y, pixel_size=pixel), center=(x, y, z)),
        replace(Slice.yz(shape=(height, n), x=x, pixel_size=pixel), center=(x, y, z)),
    )


def default_slices(
    geometry: ScanGeometry,
    *,
    slice_row: int | None = None,
    slice_size: int | None = None,
    slice_center: Sequence[float] = (0.0, 0.0),
) -> tuple[Slice, Slice, Slice]:
    """The reconstruction settings' slices: `orthogonal_slices` through the axial slice's centre.

    Parameters
    ----------
    geometry : ScanGeometry
    slice_row : int, optional
        Detector row of the axial slice; default the middle row.
    slice_size : int, optional
        Side in pixels; default the detector width.
    slice_center : (float, float)
        Centre (x, y), pixels from the rotation axis.
    """
    row = geometry.rows // 2 if slice_row is None else slice_row
    x, y = (float(c) * geometry.voxel_size for c in slice_center)
    return orthogonal_slices(geometry, center=(x, y, geometry.row_to_z(row)), size=slice_size)


# -- metadata ----------------------------------------------------------------------------
def geometry_from_start(
    start: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> ScanGeometry:
    """Build the scan geometry from a run's start document.

    Reads the ``tomo`` block (see README, "Scan metadata"); falls back to the
    NSLS-II FXI top-level key ``num_angles``. ``overrides`` win over both.

    Raises
    ------
    GeometryError
        If the detector shape is missing, an override is unknown, or a value
        is inconsistent.
    """
    known = {f.name for f in fields(ScanGeometry)} - {"extra"}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise GeometryError(
            f"Unknown geometry override(s) {unknown}; known keys are {sorted(known)}."
        )
    tomo = dict(start.get("tomo") or {})
    values: dict[str, Any] = {}
    for name in known:
        if name in tomo and tomo[name] is not None:
            values[name] = tomo[name]
    if "num_angles" not in values and "num_angles" in start:
        values["num_angles"] = start["num_angles"]
    values.update(overrides or {})
    if "detector_shape" not in values:
        raise GeometryError(
            "The start document has no detector shape: expected start['tomo']['detector_shape'] "
            f"= [rows, columns]; the start document has keys {sorted(start)}. Add the tomo "
            "block to the plan's metadata or pass geometry overrides (detector_shape=...)."
        )
    for key in ("detector_shape", "angular_range"):
        if key in values and isinstance(values[key], Iterable):
            values[key] = tuple(values[key])
    return ScanGeometry(**values)


def window_weight(num_projections: int) -> float:
    """FBP quadrature weight pi / n for n projections evenly covering 180 or 360 degrees."""
    return math.pi / num_projections
