"""RunEngine and settings (BLUESKY_JIT_CONFIG file, BLUESKY_JIT_* variables)."""

from bluesky import RunEngine

from bluesky_jit.apps.session import profile_settings

settings = profile_settings()
RE = RunEngine({})
