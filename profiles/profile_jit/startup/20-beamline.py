# ruff: noqa: F821 - names come from the earlier startup files (one IPython namespace)
"""The simulated beamline ([beamline] settings); a real profile creates its devices here."""

from bluesky_jit.apps.session import simulated_beamline

beamline = simulated_beamline(catalog.data_dir / "raw", settings["beamline"])
globals().update(beamline.devices())  # rot_stage, shutter, sample_stage, det
