"""Shared fixtures: a real RunEngine and fresh simulated hardware."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture
def RE():
    """A real bluesky RunEngine on its own event loop, stopped and closed at teardown."""
    from bluesky import RunEngine
    from bluesky.utils import TransitionError

    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop)
    yield engine
    if engine.state not in ("idle", "panicked"):
        try:
            engine.halt()
        except TransitionError:
            pass
    loop.call_soon_threadsafe(loop.stop)
    engine._th.join()
    loop.close()


@pytest.fixture
def hw(RE, tmp_path):
    """Default simulated beamline (ophyd-async, 16 x 128 bubble column), files in tmp_path."""
    from simulated_devices.beamline import hw as make_hw

    return make_hw(tmp_path / "detector")


# -- catalog ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def local_catalog(tmp_path_factory):
    """One embedded Tiled server (``tiled serve config``) for the session.

    Tests write detector and derived files under ``local_catalog.data_root``,
    which the server may read.
    """
    from bluesky_jit.catalog import LocalCatalog

    root = tmp_path_factory.mktemp("jit-catalog")
    catalog = LocalCatalog(root / "catalog", readable_storage=[root])
    catalog.data_root = root
    yield catalog
    catalog.close()


@pytest.fixture
def data_dir(local_catalog, request):
    """A fresh directory the session catalog can read."""
    path = local_catalog.data_root / "data" / request.node.name.replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ==========================================================================================
# Issue 5 (command line, listen, replay, profile, live view): one embedded catalog and one
# demo-written run shared by tests/test_cli.py, test_listen.py, test_replay.py,
# test_profile.py and test_live.py. Starting a catalog costs seconds, so it is started once.
# ==========================================================================================

TINY_JIT_TOML = """\
[jit]
refresh_every = 8
batch_size = 8
buffer_capacity = 64
pairs_per_refresh = 16
holdout_per_refresh = 4
holdout_size = 8
patch_size = 8
max_train_steps_per_s = 20.0
metrics_every_s = 0.2
"""
"""Settings file of a tiny, fast pipeline (detector 4 x 32, 16 angles per rotation)."""

TINY_SCAN = ["--size", "32", "--rows", "4", "--angles", "16", "--rotations", "2", "--no-pace"]


@pytest.fixture(scope="session")
def jit_catalog(tmp_path_factory):
    """An embedded Tiled catalog (``tiled serve config``) reading everything under ``.base``."""
    from bluesky_jit.catalog import LocalCatalog

    base = tmp_path_factory.mktemp("jit_session")
    catalog = LocalCatalog(base / "catalog", readable_storage=[base])
    catalog.base = base
    yield catalog
    catalog.close()


@pytest.fixture(scope="session")
def tiny_toml(jit_catalog):
    """Path of a settings file with the tiny pipeline's [jit] section."""
    path = jit_catalog.base / "tiny.toml"
    path.write_text(TINY_JIT_TOML)
    return path


@pytest.fixture(scope="session")
def tiny_config():
    """The JitConfig of TINY_JIT_TOML."""
    import tomllib

    from bluesky_jit.config import JitConfig

    return JitConfig.from_dict(tomllib.loads(TINY_JIT_TOML)["jit"])


@pytest.fixture(scope="session")
def demo_run(jit_catalog, tiny_toml):
    """A run written by `bluesky-jit demo` (run through the command line) into jit_catalog.

    Returns the demo's summary dict (raw_uid, derived_uid, ...).
    """
    import json

    from bluesky_jit.cli import main

    summary = jit_catalog.base / "demo_summary.json"
    code = main(
        [
            "demo",
            "--catalog",
            jit_catalog.uri,
            "--api-key",
            jit_catalog.api_key,
            "--data-dir",
            str(jit_catalog.base / "demo"),
            *TINY_SCAN,
            "--config",
            str(tiny_toml),
            "--summary",
            str(summary),
            "--no-progress",
        ]
    )
    result = json.loads(summary.read_text())
    assert code == 0, result
    return result


# -- data ------------------------------------------------------------------------------
TOOTH = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared/data/tooth.h5"


@pytest.fixture(scope="session")
def tooth_path():
    """The real tooth scan (DXchange) in ``shared/data`` beside the repository."""
    if not TOOTH.exists():
        pytest.skip(f"{TOOTH} is not there (the shared data folder sits beside the repository)")
    return TOOTH
