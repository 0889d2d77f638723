# ruff: noqa: F821 - names come from the earlier startup files (one IPython namespace)
"""The catalog: BLUESKY_JIT_CATALOG (Tiled URI or data directory), else ./bluesky_jit_data."""

import atexit

from bluesky_jit.apps.session import open_catalog

catalog = open_catalog(
    settings["catalog"].get("uri"),
    api_key=settings["catalog"].get("api_key"),
    data_dir=settings["catalog"].get("data_dir"),
)
atexit.register(catalog.close)
print(f"bluesky-jit profile: catalog {catalog.description}")
