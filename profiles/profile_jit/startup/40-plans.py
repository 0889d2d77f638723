# ruff: noqa: F821 - names come from the earlier startup files (one IPython namespace)
"""Plans: tomo(num_angles=90, rotations=1) is a continuous scan with darks and flats."""

from bluesky_jit.apps.session import tomo_plan

tomo = tomo_plan(beamline, sample="bubble column (simulated)")
print("bluesky-jit profile: RE(tomo(num_angles=90, rotations=2)); live.start() for the live view")
