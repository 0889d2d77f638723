"""Shared fixtures: a real RunEngine, fresh simulated hardware, session Tiled catalogs.

Plain helpers (``wait_for``, ``run_engine``, ``blobs``) are in :mod:`tests.helpers`.
"""

from __future__ import annotations

import pytest

from .helpers import run_engine


@pytest.fixture
def RE():
    """A real bluesky RunEngine on its own event loop, stopped and closed at teardown."""
    with run_engine() as engine:
        yield engine


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored after): steady timings on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hw(RE, tmp_path):
    """Default simulated beamline (ophyd-async, 16 x 128 bubble column), files in tmp_path."""
    from simulated_devices.beamline import hw as make_hw

    return make_hw(tmp_path / "detector")


# -- catalog ---------------------------------------------------------------------------
def session_catalog(tmp_path_factory, name):
    """An embedded Tiled server (``tiled serve config``) reading everything under ``.base``."""
    from bluesky_jit.catalog import LocalCatalog

    base = tmp_path_factory.mktemp(name)
    catalog = LocalCatalog(base / "catalog", readable_storage=[base])
    catalog.base = base
    yield catalog
    catalog.close()


@pytest.fixture(scope="session")
def local_catalog(tmp_path_factory):
    """One session catalog for the callback and writer tests (files under ``.base``)."""
    yield from session_catalog(tmp_path_factory, "jit-catalog")


@pytest.fixture
def data_dir(local_catalog, request):
    """A fresh directory the session catalog can read."""
    path = local_catalog.base / "data" / request.node.name.replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ==========================================================================================
# The command line, listen, replay, profile and live view share one embedded catalog and one
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
vertical_slices = false
"""
"""Settings file of a tiny, fast pipeline (detector 4 x 32, 16 angles per rotation)."""


def spool_dir_for(catalog):
    """A spool directory beside a session catalog (writers of tests never share one)."""
    import tempfile

    return tempfile.mkdtemp(prefix="spool-", dir=catalog.directory.parent)


TINY_SCAN = ["--size", "32", "--rows", "4", "--angles", "16", "--rotations", "2", "--no-pace"]


@pytest.fixture(scope="session")
def jit_catalog(tmp_path_factory):
    """The session catalog of the command line, listen, replay, profile and live tests."""
    yield from session_catalog(tmp_path_factory, "jit_session")


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

    from bluesky_jit.apps.cli import main

    summary = jit_catalog.base / "demo_summary.json"
    key_path = jit_catalog.base / "demo_key"
    key_path.write_text(jit_catalog.api_key)
    key_path.chmod(0o600)
    code = main(
        [
            "demo",
            "--catalog",
            jit_catalog.uri,
            "--api-key-file",
            str(key_path),
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


@pytest.fixture(scope="session")
def count_run(jit_catalog):
    """Uid of a plain `count` run (not a tomography scan) in the raw container."""
    from bluesky.plans import count
    from ophyd.sim import det1

    from bluesky_jit.catalog import runs_container
    from bluesky_jit.worker_process import tiled_writer

    raw = runs_container(jit_catalog.client(), "raw")
    writer = tiled_writer(raw, spool_dir=spool_dir_for(jit_catalog))
    with run_engine() as RE:
        RE.subscribe(writer)
        (uid,) = RE(count([det1], num=2))
    assert writer.flush(timeout=60)
    return uid


@pytest.fixture(scope="session")
def bad_tomo_run(jit_catalog):
    """Uid of a tomography scan without darks and flats (its derived run fails), in raw."""
    from bluesky_jit.apps.session import simulated_beamline
    from bluesky_jit.catalog import runs_container
    from bluesky_jit.worker_process import tiled_writer
    from simulated_devices.plans import tomo_scan

    raw = runs_container(jit_catalog.client(), "raw")
    writer = tiled_writer(raw, spool_dir=spool_dir_for(jit_catalog))
    settings = {"size": 32, "rows": 4, "photons": 300.0, "api": "v1"}
    beamline = simulated_beamline(jit_catalog.base / "bad_run", settings)
    plan = tomo_scan(
        *beamline.plan_devices,
        num_angles=16,
        num_darks=0,
        num_flats=0,
    )
    with run_engine() as RE:
        RE.subscribe(writer)
        (uid,) = RE(plan)
    assert writer.flush(timeout=60)
    return uid


@pytest.fixture(scope="session")
def lost_files_run(jit_catalog, demo_run):
    """The demo's raw run stored again in container ``raw_lost``, its detector files gone."""
    from bluesky_jit.catalog import documents, runs_container
    from bluesky_jit.worker_process import tiled_writer

    client = jit_catalog.client()
    original = runs_container(client, "raw")[demo_run["raw_uid"]]
    writer = tiled_writer(runs_container(client, "raw_lost"), spool_dir=spool_dir_for(jit_catalog))
    gone = jit_catalog.base / "deleted-detector-files"
    for name, doc in documents(original):
        if name == "stream_resource":
            doc = {**doc, "uri": (gone / f"{doc['uid']}.h5").as_uri()}
        writer(name, dict(doc))
    assert writer.flush(timeout=60)
    return demo_run["raw_uid"]


# -- data ------------------------------------------------------------------------------
TOOTH = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared/data/tooth.h5"


@pytest.fixture(scope="session")
def tooth_path():
    """The real tooth scan (DXchange) in ``shared/data`` beside the repository."""
    if not TOOTH.exists():
        pytest.skip(f"{TOOTH} is not there (the shared data folder sits beside the repository)")
    return TOOTH
