"""The package's face: five lazy names, and an import that pulls in nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "numba", "tiled", "bluesky", "ophyd", "h5py", "skimage", "typing")

PROBE = f"""
import json, sys
import bluesky_jit
heavy = [name for name in {HEAVY!r} if name in sys.modules]
import bluesky_jit.apps.replay
from bluesky_jit import JitCallback, JitConfig, JitProcess, LocalCatalog, replay
from bluesky_jit.callbacks import JitCallback as home_callback
from bluesky_jit.catalog import LocalCatalog as home_catalog
from bluesky_jit.config import JitConfig as home_config
from bluesky_jit.apps.replay import replay as home_replay
from bluesky_jit.worker_process import JitProcess as home_process
same = [JitCallback is home_callback, JitConfig is home_config, JitProcess is home_process,
        LocalCatalog is home_catalog, replay is home_replay, bluesky_jit.replay is home_replay]
print(json.dumps({{"heavy": heavy, "same": same, "dir": dir(bluesky_jit)}}))
"""


def test_import_is_light_and_the_face_resolves_to_the_homes():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["heavy"] == []
    assert result["same"] == [True] * 6
    names = {"JitCallback", "JitConfig", "JitProcess", "LocalCatalog", "replay"}
    assert set(result["dir"]) >= names


def test_an_unknown_name_is_an_attribute_error():
    import bluesky_jit

    with pytest.raises(AttributeError, match="NoSuchThing"):
        bluesky_jit.NoSuchThing  # noqa: B018
