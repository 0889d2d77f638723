"""`hw`: a fresh simulated tomography beamline per call (re-exported by the package)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SimulatedBeamline", "hw"]


@dataclass
class SimulatedBeamline:
    """Devices returned by `hw`.

    Attributes
    ----------
    rot_stage : SimMotor or SynAxis
        Rotation stage, degrees (data key ``rot_stage``).
    shutter : SignalRW or EnumSignalV1
        ``ShutterState.OPEN`` / ``CLOSED``.
    sample_stage : SignalRW or EnumSignalV1
        ``SamplePosition.IN`` / ``OUT``.
    det : TomoDetector or TomoDetectorV1
        The camera (data key ``det``).
    source : FrameSource
        What the camera sees; ``source.phantom`` holds the truth for phantom sources.
    api : str
        ``"async"`` or ``"v1"``.
    save_path : Path
        Where detector files go.
    """

    rot_stage: Any
    shutter: Any
    sample_stage: Any
    det: Any
    source: Any
    api: str
    save_path: Path

    @property
    def plan_devices(self) -> tuple[Any, Any, Any, Any]:
        """``(det, rot_stage, shutter, sample_stage)``: the devices the plans take, in order,
        as in ``tomo_continuous(*beamline.plan_devices, num_angles=90)``."""
        return (self.det, self.rot_stage, self.shutter, self.sample_stage)

    def devices(self) -> dict[str, Any]:
        """The devices by name, e.g. to ``globals().update(...)`` in a profile."""
        return {
            "rot_stage": self.rot_stage,
            "shutter": self.shutter,
            "sample_stage": self.sample_stage,
            "det": self.det,
        }


def hw(
    save_path: str | Path,
    *,
    source: Any = None,
    api: str = "async",
    external: bool = True,
    frame_rate: float | None = None,
    paced: bool = False,
    seed: int = 0,
    timeout: float = 10.0,
) -> SimulatedBeamline:
    """Fresh simulated tomography devices, connected.

    Parameters
    ----------
    save_path : str or Path
        Directory for detector files (created if missing).
    source : FrameSource, optional
        Default ``PhantomSource(BubbleColumn(detector_shape=(16, 128)), photons=1000)``.
    api : {"async", "v1"}
        ophyd-async devices (needs a RunEngine made beforehand: they connect in
        its event loop) or ophyd v1 devices.
    external : bool
        v1 only: files with Resource/Datum (True) or frames inline (False). The
        ophyd-async detector always writes files.
    frame_rate : float, optional
        Virtual frames per second: frame ``k`` is taken at ``t = k / frame_rate``.
        None freezes the phantom at ``t = 0`` (static sample).
    paced : bool
        Hold frames to ``frame_rate`` in wall-clock time too.
    seed : int
        Seed of the detector noise.
    timeout : float
        Seconds to wait for ophyd-async devices to connect.

    Returns
    -------
    SimulatedBeamline
    """
    from bluesky_jit.errors import ConfigError

    from .detector import TomoDetector
    from .detector_v1 import TomoDetectorV1
    from .motion import make_rot_stage, make_sample_stage, make_shutter
    from .phantoms import BubbleColumn
    from .sources import PhantomSource

    if api not in ("async", "v1"):
        raise ConfigError(f"api must be 'async' or 'v1'; got {api!r}.")
    if api == "async" and not external:
        raise ConfigError(
            "The ophyd-async detector always writes files (external=True); for frames "
            "inline in events use api='v1', external=False."
        )
    save_path = Path(save_path).resolve()  # ophyd-async path providers need absolute paths
    save_path.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = PhantomSource(BubbleColumn(detector_shape=(16, 128)), photons=1000)
    rot_stage = make_rot_stage(api=api)
    shutter = make_shutter(api=api)
    sample_stage = make_sample_stage(api=api)
    common = dict(
        source=source,
        rot_stage=rot_stage,
        shutter=shutter,
        sample_stage=sample_stage,
        frame_rate=frame_rate,
        paced=paced,
        seed=seed,
        name="det",
    )
    if api == "v1":
        det = TomoDetectorV1(save_path=save_path, external=external, **common)
    else:
        from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider

        det = TomoDetector(
            path_provider=StaticPathProvider(UUIDFilenameProvider(), save_path), **common
        )
        _connect([rot_stage, shutter, sample_stage, det], timeout)
    return SimulatedBeamline(rot_stage, shutter, sample_stage, det, source, api, save_path)


def _connect(devices: list[Any], timeout: float) -> None:
    import asyncio

    from bluesky.run_engine import call_in_bluesky_event_loop

    from bluesky_jit.errors import ConfigError

    async def connect_all() -> None:
        await asyncio.gather(*(d.connect(timeout=timeout) for d in devices))

    try:
        call_in_bluesky_event_loop(connect_all(), timeout=timeout + 5)
    except RuntimeError as exc:
        if "event loop not running" not in str(exc):
            raise
        raise ConfigError(
            "ophyd-async devices connect in the RunEngine's event loop, and none is running. "
            "Create a RunEngine before calling hw(api='async') (RE = RunEngine()), or use "
            "api='v1'."
        ) from exc
