"""Frame sources: what the simulated detector sees for a given beamline state.

A source answers one question: given the stage angle, the virtual time, the
frame number and whether the shutter is open and the sample in the beam, what
frame does the camera record? The detectors (`simulated_devices.detector`,
`simulated_devices.detector_v1`) ask it on every trigger.

- `PhantomSource`: Poisson-noisy counts of an analytic phantom
  (`simulated_devices.phantoms`); its noiseless truth stays
  available as ``source.phantom`` for evaluation.
- `RecordingSource`: replays a recorded scan (`DXchangeRecording`).

``metadata()`` returns the geometry part of the ``tomo`` start-document block
(see `simulated_devices.plans`): ``beam``, ``detector_shape``, ``pixel_size``,
``center_of_rotation``, ``source_origin``, ``origin_detector`` and, for phantom
sources, ``phantom``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from bluesky_jit.errors import ConfigError, GeometryError, ScanDataError

from .phantoms import BubbleColumn
from .recordings import DXchangeRecording

__all__ = ["FrameSource", "PhantomSource", "RecordingSource"]


@runtime_checkable
class FrameSource(Protocol):
    """What a simulated detector needs from its source.

    Attributes
    ----------
    detector_shape : tuple of int
        ``(rows, cols)`` of every frame.
    dtype : numpy.dtype
        dtype of every frame.
    sample_name : str
        Goes to the start document's ``sample``.
    """

    detector_shape: tuple[int, int]
    dtype: np.dtype
    sample_name: str

    def frame(
        self,
        *,
        angle_deg: float,
        t: float,
        index: int,
        shutter_open: bool,
        sample_in: bool,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """One frame, shape ``detector_shape``, dtype ``dtype``.

        Parameters
        ----------
        angle_deg : float
            Rotation stage readback, degrees.
        t : float
            Virtual time of the frame, s.
        index : int
            Frame number since the detector was made (darks and flats included).
        shutter_open, sample_in : bool
            Beam on the detector; sample in the beam.
        rng : numpy.random.Generator
            The only randomness a source may use.
        """
        ...

    def metadata(self) -> dict[str, Any]:
        """Geometry keys of the ``tomo`` start-document block (JSON-able)."""
        ...


class PhantomSource:
    """Photon-counting frames of an analytic phantom.

    Counts per pixel, with ``I0 = photons * profile`` (``profile`` is 1, or
    falls off smoothly by ``beam_falloff`` toward the left and right edges):

    - shutter closed (dark): ``round(dark_level + read_noise * N(0, 1))``;
    - shutter open, sample out (flat): ``Poisson(I0) + dark``;
    - shutter open, sample in: ``Poisson(I0 * exp(-p)) + dark`` with ``p`` the
      phantom's line integrals at the stage angle and time.

    Parameters
    ----------
    phantom : BubbleColumn, SinteringGrains or PorousFlow
        Any object with ``detector_shape``, ``pixel_size``,
        ``center_of_rotation``, ``project(angle_deg, t)`` and ``describe()``.
    photons : float
        Mean counts of a flat-field pixel (above the dark level).
    dark_level : float
        Mean dark counts.
    read_noise : float
        Standard deviation of the dark counts.
    beam_falloff : float
        Fractional intensity lost at the left/right detector edges, in [0, 1).
    dtype : numpy dtype
        Frame dtype; integer dtypes must hold ``photons + dark_level`` with margin.
    sample_name : str
        For the start document.

    Examples
    --------
    >>> src = PhantomSource(BubbleColumn(detector_shape=(8, 64)), photons=500)
    >>> rng = np.random.default_rng(0)
    >>> src.frame(angle_deg=0.0, t=0.0, index=0, shutter_open=True, sample_in=True,
    ...           rng=rng).shape
    (8, 64)
    """

    def __init__(
        self,
        phantom: BubbleColumn,
        *,
        photons: float = 1000.0,
        dark_level: float = 100.0,
        read_noise: float = 2.0,
        beam_falloff: float = 0.0,
        dtype: Any = np.uint16,
        sample_name: str = "bubble_column",
    ) -> None:
        if not photons > 0:
            raise ConfigError(f"photons must be > 0; got {photons!r}.")
        if dark_level < 0 or read_noise < 0:
            raise ConfigError(
                f"dark_level and read_noise must be >= 0; got {dark_level!r}, {read_noise!r}."
            )
        if not 0.0 <= beam_falloff < 1.0:
            raise ConfigError(f"beam_falloff must be in [0, 1); got {beam_falloff!r}.")
        self.phantom = phantom
        self.photons = float(photons)
        self.dark_level = float(dark_level)
        self.read_noise = float(read_noise)
        self.beam_falloff = float(beam_falloff)
        self.dtype = np.dtype(dtype)
        self.sample_name = sample_name
        self.detector_shape = tuple(int(v) for v in phantom.detector_shape)
        cols = self.detector_shape[1]
        edge = np.linspace(-1.0, 1.0, cols) ** 2
        self.profile = (1.0 - self.beam_falloff * edge)[None, :] * np.ones(
            (self.detector_shape[0], 1)
        )
        if self.dtype.kind in "ui":
            top = self.photons + 6 * np.sqrt(self.photons) + self.dark_level + 6 * self.read_noise
            limit = np.iinfo(self.dtype).max
            if top > limit:
                raise ConfigError(
                    f"photons + dark_level ({self.photons:g} + {self.dark_level:g}, plus 6 sigma "
                    f"of noise = {top:.0f}) overflow {self.dtype.name} (max {limit}). "
                    "Lower photons or dark_level, or pass a wider dtype (uint32, float32)."
                )
        elif self.dtype.kind != "f":
            raise ConfigError(f"dtype must be an integer or float dtype; got {self.dtype}.")

    def _dark(self, rng: np.random.Generator) -> np.ndarray:
        dark = np.full(self.detector_shape, self.dark_level)
        if self.read_noise:
            dark = dark + self.read_noise * rng.standard_normal(self.detector_shape)
        return np.maximum(np.rint(dark), 0.0)

    def frame(
        self,
        *,
        angle_deg: float,
        t: float,
        index: int,
        shutter_open: bool,
        sample_in: bool,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """One frame; see the class docstring.

        Returns
        -------
        ndarray, shape (rows, cols), dtype ``self.dtype``
        """
        counts = self._dark(rng)
        if shutter_open:
            mean = self.photons * self.profile
            if sample_in:
                mean = mean * np.exp(-self.phantom.project(angle_deg, t))
            counts += rng.poisson(mean)
        if self.dtype.kind in "ui":
            counts = np.clip(counts, 0, np.iinfo(self.dtype).max)
        return counts.astype(self.dtype)

    def metadata(self) -> dict[str, Any]:
        """Geometry keys of the ``tomo`` block plus ``phantom`` (with its ``noise``)."""
        rows, cols = self.detector_shape
        return {
            "beam": "parallel",
            "detector_shape": [rows, cols],
            "pixel_size": float(self.phantom.pixel_size),
            "center_of_rotation": float(self.phantom.center_of_rotation),
            "source_origin": None,
            "origin_detector": None,
            "phantom": {
                **self.phantom.describe(),
                "noise": {
                    "model": "poisson",
                    "photons": self.photons,
                    "dark_level": self.dark_level,
                    "read_noise": self.read_noise,
                    "beam_falloff": self.beam_falloff,
                    "dtype": self.dtype.str,
                },
            },
        }

    def __repr__(self) -> str:
        return f"PhantomSource({self.phantom!r}, photons={self.photons:g})"


class RecordingSource:
    """Replays a recorded scan, in acquisition order or by nearest angle.

    ``replay="in_order"`` (the default) serves frames by their place in the
    recording: the k-th projection taken since the beam last changed (shutter
    closed, sample out, sample in) is recorded projection k, whatever the
    stage angle, so a recording of many rotations replays frame for frame. A
    plan checks its angles against the recording's before it runs
    (`check_angles`); `simulated_devices.plans.recorded_scan` takes them from
    the recording. Asking for more projections than recorded is an error.

    ``replay="nearest_angle"`` serves the recorded frame whose angle is
    nearest the stage angle, modulo 360 deg; it refuses recordings of more
    than one rotation (their frames share angles). A recording of half a turn
    (the usual 0-180 deg) is then extended by symmetry: the projection at
    ``theta + 180`` is the one at ``theta`` mirrored about the rotation axis,
    rebuilt from its transmission so that the flat-field profile stays in
    place: ``dark + (flat - dark) * mirror(T)`` with ``T = (raw - dark) /
    (flat - dark)`` and mean darks and flats.

    In both modes dark and flat frames cycle through the recorded ones in order.

    Parameters
    ----------
    recording : DXchangeRecording
        The scan (``DXchangeRecording.open(path, lazy=True)`` reads frame by frame).
    center_of_rotation : float, optional
        Detector column of the rotation axis, px; default ``(cols - 1) / 2``
        (the tooth scan needs about 295).
    pixel_size : float
        mm per pixel (DXchange files seldom say).
    replay : {"in_order", "nearest_angle"}
        How projections are chosen (above).
    mirror : bool
        ``nearest_angle`` only: use the mirror symmetry above; False replays the
        nearest recorded angle only.
    sample_name : str, optional
        Default: the recording's sample name, else the file stem.
    """

    def __init__(
        self,
        recording: DXchangeRecording,
        *,
        center_of_rotation: float | None = None,
        pixel_size: float = 1.0,
        replay: str = "in_order",
        mirror: bool = True,
        sample_name: str | None = None,
    ) -> None:
        self.recording = recording
        self.detector_shape = recording.detector_shape
        rows, cols = self.detector_shape
        cor = (cols - 1) / 2 if center_of_rotation is None else float(center_of_rotation)
        if not 0.0 <= cor <= cols - 1:
            raise GeometryError(
                f"center_of_rotation must lie on the detector, in [0, {cols - 1}] px; got {cor}."
            )
        if not pixel_size > 0:
            raise ConfigError(f"pixel_size must be > 0 mm; got {pixel_size!r}.")
        self.layout = recording.layout
        self._where = str(recording.path) if recording.path is not None else "in memory"
        _check_replay(replay, self.layout, self._where, int(recording.data.shape[0]))
        self.center_of_rotation = cor
        self.pixel_size = float(pixel_size)
        self.replay = replay
        self.mirror = bool(mirror)
        self.dtype = recording.data.dtype
        default_name = recording.sample_name or (
            recording.path.stem if recording.path is not None else "recording"
        )
        self.sample_name = sample_name or default_name
        self._theta = np.mod(recording.theta, 360.0)
        self._dark_mean = recording.darks.mean(axis=0, dtype=np.float64)
        self._gain = recording.flats.mean(axis=0, dtype=np.float64) - self._dark_mean
        self._beam: str | None = None  # "dark", "flat" or "projection": the last frame's
        self._taken = 0  # frames taken since the beam last changed

    def rewind(self) -> None:
        """Start again from the first recorded dark, flat and projection."""
        self._beam, self._taken = None, 0

    def check_angles(self, angles: Any, *, plan: str = "the plan") -> None:
        """Refuse a plan whose stage angles are not the recorded ones (``in_order`` replay).

        Angles agree when they are equal modulo 360 deg to within a quarter of
        the recorded angle step; a plan may take fewer projections than recorded.

        Parameters
        ----------
        angles : array_like
            The plan's projection angles, degrees, in order.
        plan : str
            The plan's name, for the message.

        Raises
        ------
        ScanDataError
            (a ValueError) saying what the plan asks, what was recorded and how to fix it.
        """
        if self.replay != "in_order":
            return
        angles = np.asarray(angles, dtype=np.float64).reshape(-1)
        theta = self.recording.theta
        lay = self.layout
        fix = (
            "Replay it with recorded_scan(det, rot_stage, shutter, sample_stage), which takes its "
            f"angles from the recording, or ask for num_angles={lay['num_angles']}, "
            f"angular_range={tuple(lay['angular_range'])}, rotations={lay['rotations']}."
        )
        recorded = (
            f"the recording ({self._where}) has {theta.size} projections: {lay['rotations']} "
            f"rotation(s) of {lay['num_angles']} over {_range(lay['angular_range'])} deg"
        )
        if angles.size > theta.size:
            raise ScanDataError(f"{plan} asks for {angles.size} projections, but {recorded}. {fix}")
        span = lay["angular_range"][1] - lay["angular_range"][0]
        tolerance = 0.25 * abs(span) / lay["num_angles"]
        off = np.abs((angles - theta[: angles.size] + 180.0) % 360.0 - 180.0)
        bad = np.flatnonzero(off > tolerance)
        if bad.size:
            k = int(bad[0])
            raise ScanDataError(
                f"{plan}'s angles disagree with the recording's: projection {k} is at "
                f"{angles[k]:g} deg in the plan and {theta[k]:g} deg in the file ({bad.size} of "
                f"{angles.size} projections differ by more than {tolerance:.3g} deg); {recorded}. "
                f"{fix}"
            )

    def nearest(self, angle_deg: float) -> tuple[int, bool]:
        """Index of the recorded frame used at `angle_deg`, and whether it is mirrored.

        Parameters
        ----------
        angle_deg : float
            Stage angle, degrees.

        Returns
        -------
        index : int
            Row of ``recording.data``.
        mirrored : bool
            True where the frame is the mirror image of the recorded one.
        """
        a = float(angle_deg) % 360.0
        d = np.abs(self._theta - a)
        d = np.minimum(d, 360.0 - d)
        k = int(np.argmin(d))
        if not self.mirror:
            return k, False
        dm = np.abs(np.mod(self._theta + 180.0, 360.0) - a)
        dm = np.minimum(dm, 360.0 - dm)
        km = int(np.argmin(dm))
        if dm[km] < d[k] - 1e-9:
            return km, True
        return k, False

    def frame(
        self,
        *,
        angle_deg: float,
        t: float,
        index: int,
        shutter_open: bool,
        sample_in: bool,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """The recorded frame for this state (see the class docstring).

        Returns
        -------
        ndarray, shape (rows, cols), dtype of the recording
        """
        rec = self.recording
        beam = "dark" if not shutter_open else "flat" if not sample_in else "projection"
        if beam != self._beam:
            self._beam, self._taken = beam, 0
        taken, self._taken = self._taken, self._taken + 1
        if beam == "dark":
            return rec.darks[taken % rec.darks.shape[0]].copy()
        if beam == "flat":
            return rec.flats[taken % rec.flats.shape[0]].copy()
        if self.replay == "in_order":
            if taken >= rec.data.shape[0]:
                raise ScanDataError(
                    f"The recording ({self._where}) has {rec.data.shape[0]} projections; "
                    f"projection {taken + 1} was asked for. Take at most {rec.data.shape[0]} "
                    "(recorded_scan takes exactly the recorded ones)."
                )
            return np.array(rec.data[taken])
        k, mirrored = self.nearest(angle_deg)
        if not mirrored:
            return np.array(rec.data[k])
        gain = np.where(self._gain > 0, self._gain, 1.0)
        trans = (rec.data[k] - self._dark_mean) / gain
        cols = self.detector_shape[1]
        src = 2 * self.center_of_rotation - np.arange(cols)
        flipped = np.stack([np.interp(src, np.arange(cols), row) for row in trans])
        out = self._dark_mean + self._gain * flipped
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(self.dtype)

    def metadata(self) -> dict[str, Any]:
        """Geometry keys of the ``tomo`` block, plus ``recording`` (file, frame counts, replay)."""
        rows, cols = self.detector_shape
        rec = self.recording
        return {
            "beam": "parallel",
            "detector_shape": [rows, cols],
            "pixel_size": self.pixel_size,
            "center_of_rotation": self.center_of_rotation,
            "source_origin": None,
            "origin_detector": None,
            "recording": {
                "path": None if rec.path is None else str(rec.path),
                "num_angles": int(rec.data.shape[0]),
                "num_flats": int(rec.flats.shape[0]),
                "num_darks": int(rec.darks.shape[0]),
                "replay": self.replay,
            },
        }

    def __repr__(self) -> str:
        return f"RecordingSource({self.sample_name!r}, shape={self.detector_shape})"


def _range(angular_range: Any) -> str:
    return f"{angular_range[0]:g}-{angular_range[1]:g}"


def _check_replay(replay: Any, layout: dict[str, Any], where: str, n: int) -> None:
    if replay not in ("in_order", "nearest_angle"):
        raise ConfigError(f"replay must be 'in_order' or 'nearest_angle'; got {replay!r}.")
    if replay == "nearest_angle" and layout["rotations"] > 1:
        raise ConfigError(
            f"replay='nearest_angle' serves the frame nearest the stage angle modulo 360 deg, "
            f"but the recording ({where}) has {layout['rotations']} rotations ({n} projections, "
            f"{layout['num_angles']} per rotation) whose frames share angles: it would be "
            "replayed scrambled. Replay it in acquisition order: RecordingSource(recording) "
            "(replay='in_order') with simulated_devices.plans.recorded_scan."
        )
