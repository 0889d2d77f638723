"""Rotation stage, shutter and sample stage, for ophyd-async and for ophyd v1.

Plans move them with plain values, the same for both APIs::

    yield from bps.mv(rot_stage, 12.5)                 # degrees
    yield from bps.mv(shutter, ShutterState.OPEN)      # "Open" / "Closed"
    yield from bps.mv(sample_stage, SamplePosition.OUT)  # "In" / "Out"

Each reads back under its own name (``rot_stage``, ``shutter``,
``sample_stage``). The detectors read the state through a `BeamlineReader`,
which holds the devices without making them children of the detector
(storing an ophyd-async device as an attribute of another device would).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ophyd
from ophyd.sim import SynAxis
from ophyd_async.core import Device as AsyncDevice
from ophyd_async.core import InOut, SignalRW, StrictEnum, soft_signal_rw
from ophyd_async.sim import SimMotor

from bluesky_jit.errors import ConfigError

__all__ = [
    "BeamlineReader",
    "BeamlineState",
    "EnumSignalV1",
    "SamplePosition",
    "ShutterState",
    "make_rot_stage",
    "make_sample_stage",
    "make_shutter",
]

SamplePosition = InOut
"""Sample stage positions: ``SamplePosition.IN == "In"``, ``SamplePosition.OUT == "Out"``."""


class ShutterState(StrictEnum):
    """Shutter positions."""

    OPEN = "Open"
    CLOSED = "Closed"


@dataclass(frozen=True)
class BeamlineState:
    """What the detector sees when it exposes.

    Attributes
    ----------
    angle_deg : float
        Rotation stage readback, degrees.
    shutter_open : bool
    sample_in : bool
    """

    angle_deg: float
    shutter_open: bool
    sample_in: bool


class EnumSignalV1(ophyd.Signal):
    """An ophyd v1 soft signal that accepts only the values of a `StrictEnum`.

    Parameters
    ----------
    enum : type of StrictEnum
        Allowed values (stored as plain strings).
    value : str
        Initial value.
    name : str
        Reading key.
    """

    def __init__(self, *, enum: type[StrictEnum], value: str, name: str, **kwargs: Any) -> None:
        self._allowed = [m.value for m in enum]
        super().__init__(value=self._check(value, name), name=name, **kwargs)

    def _check(self, value: Any, name: str) -> str:
        if value not in self._allowed:
            raise ConfigError(f"{name} accepts {self._allowed}; got {value!r}.")
        return str(value)

    def put(self, value: Any, **kwargs: Any) -> None:
        """Set the value after checking it is one of the enum's values."""
        super().put(self._check(value, self.name), **kwargs)


def make_rot_stage(*, api: str = "async", name: str = "rot_stage") -> Any:
    """Rotation stage in degrees that moves instantly.

    Parameters
    ----------
    api : {"async", "v1"}
        ophyd-async `SimMotor` (``velocity = 0`` means an instant move; connect it
        before use) or ophyd v1 ``SynAxis`` (``delay = 0``).
    name : str
        Device name, also the reading key of the angle.

    Returns
    -------
    ophyd_async.sim.SimMotor or ophyd.sim.SynAxis
    """
    if api == "async":
        return SimMotor(name=name, instant=True, units="deg")
    if api == "v1":
        return SynAxis(name=name, value=0.0, delay=0.0, labels={"motors"})
    raise ConfigError(f"api must be 'async' or 'v1'; got {api!r}.")


def make_shutter(*, api: str = "async", name: str = "shutter") -> Any:
    """A shutter, initially closed.

    Returns
    -------
    ophyd_async.core.SignalRW[ShutterState] or EnumSignalV1
    """
    if api == "async":
        return soft_signal_rw(ShutterState, ShutterState.CLOSED, name=name)
    if api == "v1":
        return EnumSignalV1(enum=ShutterState, value=ShutterState.CLOSED.value, name=name)
    raise ConfigError(f"api must be 'async' or 'v1'; got {api!r}.")


def make_sample_stage(*, api: str = "async", name: str = "sample_stage") -> Any:
    """A sample stage with two positions, in the beam and out of it (for flats), initially in.

    Returns
    -------
    ophyd_async.core.SignalRW[SamplePosition] or EnumSignalV1
    """
    if api == "async":
        return soft_signal_rw(SamplePosition, SamplePosition.IN, name=name)
    if api == "v1":
        return EnumSignalV1(enum=SamplePosition, value=SamplePosition.IN.value, name=name)
    raise ConfigError(f"api must be 'async' or 'v1'; got {api!r}.")


class BeamlineReader:
    """Reads the beamline state for a detector; not a Device, so holds devices freely.

    Parameters
    ----------
    rot_stage, shutter, sample_stage : device or None
        ``None`` means fixed: angle 0, shutter open, sample in.
    api : {"async", "v1"}
        ophyd-async devices (read with `read_async`) or ophyd v1 devices (`read_sync`).
    """

    def __init__(
        self,
        *,
        rot_stage: Any = None,
        shutter: Any = None,
        sample_stage: Any = None,
        api: str = "async",
    ) -> None:
        if api not in ("async", "v1"):
            raise ConfigError(f"api must be 'async' or 'v1'; got {api!r}.")
        for label, dev in (
            ("rot_stage", rot_stage),
            ("shutter", shutter),
            ("sample_stage", sample_stage),
        ):
            if dev is None:
                continue
            if (api == "async") != isinstance(dev, AsyncDevice):
                want = "ophyd-async" if api == "async" else "ophyd v1"
                raise ConfigError(
                    f"This detector reads {want} devices; {label}={dev!r} is not one. Build "
                    f"the stages with make_rot_stage(api={api!r}) etc., or use hw(api=...)."
                )
        self._devices = (rot_stage, shutter, sample_stage)

    async def read_async(self) -> BeamlineState:
        """The state from ophyd-async devices (`Locatable`: motors and signals)."""
        rot, shut, samp = self._devices
        angle = 0.0 if rot is None else float((await rot.locate())["readback"])
        shutter = ShutterState.OPEN if shut is None else await _async_value(shut)
        sample = SamplePosition.IN if samp is None else await _async_value(samp)
        return BeamlineState(angle, shutter == ShutterState.OPEN, sample == SamplePosition.IN)

    def read_sync(self) -> BeamlineState:
        """The state from ophyd v1 devices (``position`` for motors, ``get()`` for signals)."""
        rot, shut, samp = self._devices
        angle = 0.0 if rot is None else float(rot.position)
        shutter = ShutterState.OPEN if shut is None else shut.get()
        sample = SamplePosition.IN if samp is None else samp.get()
        return BeamlineState(angle, shutter == ShutterState.OPEN, sample == SamplePosition.IN)


async def _async_value(device: Any) -> Any:
    if isinstance(device, SignalRW):
        return await device.get_value()
    return (await device.locate())["readback"]
