"""Simulated tomography beamline: phantoms, recordings, devices and plans.

`hw` returns fresh, connected devices on every call; importing this package
builds nothing. ophyd-async devices connect in the RunEngine's event loop, so
create the RunEngine first::

    from bluesky import RunEngine
    from simulated_devices import hw
    from simulated_devices.plans import tomo_scan

    RE = RunEngine()
    beamline = hw("/tmp/scan")  # api="async": ophyd-async devices
    RE(tomo_scan(*beamline.plan_devices, num_angles=90))
    truth = beamline.source.phantom.truth(t=0.0, row=8)

Modules: `phantoms` (analytic `BubbleColumn`), `recordings` (DXchange files),
`sources` (frames from a phantom or a recording), `motion` (stages, shutter),
`detector` (ophyd-async `TomoDetector`), `detector_v1` (ophyd v1
`TomoDetectorV1`), `plans` (`tomo_scan`, `tomo_continuous`, `dark_flat_run`).
The geometry convention is in `simulated_devices.phantoms`, the start-document
``tomo`` block in `simulated_devices.plans`.
"""

from .beamline import SimulatedBeamline, hw

__all__ = ["SimulatedBeamline", "hw"]
