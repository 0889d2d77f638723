"""Scan metadata -> geometry values.

One place turns a run's start document into a :class:`ScanGeometry`, with
explicit overrides. Geometry is a frozen value: it compares equal, hashes, and
its ``repr`` evaluates back to an equal object.

Conventions (shared with ``simulated_devices.phantoms``)
-------------------------------------------------------
The rotation axis projects onto detector column ``center_of_rotation`` and z
runs along detector rows. A slice image ``img[i, j]`` has
``x = (j - (n - 1) / 2) * pixel_size`` and ``y = (i - (n - 1) / 2) * pixel_size``.
At stage angle theta a point (x, y) projects onto detector column
``center_of_rotation + (x cos(theta) + y sin(theta)) / pixel_size``.
Lengths are in the unit of ``pixel_size`` (mm by convention); reconstructed
values are attenuation coefficients in 1/unit (1/mm), so they do not change
when the detector is binned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import GeometryError

BEAM_TYPES = ("parallel", "cone")


@dataclass(frozen=True, kw_only=True)
class ScanGeometry:
    """The static geometry of a tomography scan.

    Per-projection angles are not part of it: they come with every frame, read
    from the rotation stage.

    Parameters
    ----------
    detector_shape : (int, int)
        Detector (rows, columns).
    pixel_size : float
        Detector pixel size (mm); also the reconstruction voxel size.
    center_of_rotation : float
        Detector column (pixels) onto which the rotation axis projects.
    angular_range : (float, float)
        Start and stop angle (degrees) of one rotation, stop excluded.
    num_angles : int
        Projections per rotation.
    beam : {"parallel", "cone"}
    rotations : int
        Number of rotations in the scan.
    source_origin, origin_detector : float or None
        Cone beam only: source-to-axis and axis-to-detector distances (mm).
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
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        shape = tuple(self.detector_shape)
        if len(shape) != 2 or any(int(s) != s or s < 1 for s in shape):
            raise GeometryError(
                "detector_shape must be two positive integers (rows, columns); "
                f"got {self.detector_shape!r}."
            )
        object.__setattr__(self, "detector_shape", (int(shape[0]), int(shape[1])))
        object.__setattr__(self, "angular_range", tuple(float(a) for a in self.angular_range))
        if self.beam not in BEAM_TYPES:
            raise GeometryError(
                f"Unknown beam type {self.beam!r}; expected one of {BEAM_TYPES}. "
                "Set tomo['beam'] in the start document or pass beam=... as an override."
            )
        if self.beam == "cone" and (self.source_origin is None or self.origin_detector is None):
            raise GeometryError(
                "A cone-beam geometry needs source_origin and origin_detector (mm); got "
                f"source_origin={self.source_origin!r}, origin_detector={self.origin_detector!r}."
            )
        if not self.pixel_size > 0:
            raise GeometryError(f"pixel_size must be positive; got {self.pixel_size!r}.")
        if self.center_of_rotation is None:
            object.__setattr__(self, "center_of_rotation", (self.detector_shape[1] - 1) / 2)
        cols = self.detector_shape[1]
        if not 0 <= self.center_of_rotation <= cols - 1:
            raise GeometryError(
                f"center_of_rotation {self.center_of_rotation!r} lies outside the detector "
                f"(columns 0..{cols - 1}). Give it in detector pixels, e.g. {(cols - 1) / 2}."
            )
        start, stop = self.angular_range
        if not stop > start:
            raise GeometryError(
                f"angular_range must increase (start, stop) in degrees; got {self.angular_range!r}."
            )
        if int(self.num_angles) != self.num_angles or self.num_angles < 2:
            raise GeometryError(f"num_angles must be an integer >= 2; got {self.num_angles!r}.")

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


def geometry_from_start(
    start: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> ScanGeometry:
    """Build the scan geometry from a run's start document.

    Reads the ``tomo`` block (see README, "Scan metadata"); falls back to the
    NSLS-II FXI top-level key ``num_angles``. ``overrides`` win over both.

    Raises
    ------
    GeometryError
        If the detector shape is missing or a value is inconsistent.
    """
    tomo = dict(start.get("tomo") or {})
    values: dict[str, Any] = {}
    for f in fields(ScanGeometry):
        if f.name in tomo and tomo[f.name] is not None:
            values[f.name] = tomo[f.name]
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
        if key in values:
            values[key] = tuple(values[key])
    return ScanGeometry(**values)


def window_weight(num_projections: int) -> float:
    """FBP quadrature weight pi / n for n projections evenly covering 180 or 360 degrees."""
    return math.pi / num_projections
