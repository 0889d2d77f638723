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
