# ruff: noqa: F821 - names come from the earlier startup files (one IPython namespace)
"""Just-in-time denoising of every tomography run; raw and derived runs into the catalog."""

from bluesky_jit.apps.live import LiveView
from bluesky_jit.apps.session import attach, jit_config

jit = attach(RE, catalog, config=jit_config(settings["jit"]))
live = LiveView(jit)  # live.start() shows the live figure (%matplotlib first), live.stop()
