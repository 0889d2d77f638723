"""Tests of bluesky_jit.catalog against a real ``tiled serve config`` server (no mocks).

One server is started per module (a start costs seconds); the restart test
swaps it for a new server on the same directory, so test order does not matter.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import event_model
import numpy as np
import pytest

from bluesky_jit.catalog import (
    LocalCatalog,
    connect,
    derived_runs_for,
    documents,
    runs_container,
)
from bluesky_jit.emit import DerivedRun
from bluesky_jit.errors import CatalogError
from bluesky_jit.worker_process import tiled_writer

SHAPE = (8, 6)


@dataclass
class Served:
    """The module's server; ``catalog`` is replaced when a test restarts it."""

    catalog: LocalCatalog
    raw_start: dict = field(default_factory=dict)
    uid: str = ""
    recs: np.ndarray = field(default_factory=lambda: np.empty(0))
    dens: np.ndarray = field(default_factory=lambda: np.empty(0))
    live_shapes: list[tuple[int, ...]] = field(default_factory=list)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("catalog")
    served = Served(catalog=LocalCatalog(directory))
    try:
        write_derived_run(served)
        yield served
    finally:
        served.catalog.close()


def write_derived_run(served: Served) -> None:
    """Write one derived run through TiledWriter, reading it back while it is written."""
    derived = runs_container(served.catalog.client(), "derived")
    served.raw_start = dict(
        event_model.compose_run(metadata={"scan_id": 42, "plan_name": "tomo_scan"}).start_doc
    )
    rng = np.random.default_rng(0)
    served.recs = rng.random((3, *SHAPE), dtype=np.float32)
    served.dens = rng.random((2, *SHAPE), dtype=np.float32)
    writer = tiled_writer(derived, batch_size=1, spool_dir=served.catalog.directory / "spool")
    run = DerivedRun(
        raw_start=served.raw_start,
        emit=writer,
        directory=served.catalog.directory / "derived files",  # a space in the file URI
        image_shape=SHAPE,
        metadata={"config": {"refresh_every": 10}, "model": {"name": "unet"}},
    )
    served.uid = run.uid
    run.start()
    for i, image in enumerate(served.recs):
        run.add_reconstruction(image, projection_index=10 * i, num_projections=30)
        # SWMR: the server reads frames while the run is being written.
        assert writer.flush(timeout=60)
        served.live_shapes.append(derived[run.uid]["reconstruction"]["reconstruction"].shape)
    for i, image in enumerate(served.dens):
        run.add_denoised(image, projection_index=20, train_step=5 * i, weights_version=i)
    run.add_metrics(train_step=1, loss=0.5, alpha=0.1, pairs_seen=64)
    run.add_metrics(train_step=2, loss=0.25, alpha=0.2, pairs_seen=128)
    run.close(exit_status="fail", reason="trainer diverged")
    assert writer.flush(timeout=60)


@pytest.fixture
def derived(served: Served):
    return runs_container(served.catalog.client(), "derived")


def test_arrays_read_back_equal(served, derived):
    run = derived[served.uid]
    assert sorted(run) == ["denoised", "metrics", "reconstruction"]
    recs = run["reconstruction"]["reconstruction"].read()
    assert recs.dtype == np.float32
    np.testing.assert_array_equal(recs, served.recs)
    np.testing.assert_array_equal(run["denoised"]["denoised"].read(), served.dens)
    np.testing.assert_array_equal(run["reconstruction/reconstruction"][1], served.recs[1])
    assert served.live_shapes == [(1, *SHAPE), (2, *SHAPE), (3, *SHAPE)]


def test_scalars_read_back_equal(served, derived):
    run = derived[served.uid]
    metrics = run["metrics"].read()
    np.testing.assert_array_equal(metrics["train_step"].values, [1, 2])
    np.testing.assert_array_equal(metrics["loss"].values, [0.5, 0.25])
    np.testing.assert_array_equal(metrics["pairs_seen"].values, [64, 128])
    recon = run["reconstruction"].read()
    np.testing.assert_array_equal(recon["projection_index"].values, [0, 10, 20])
    np.testing.assert_array_equal(recon["reconstruction"].values, served.recs)
    np.testing.assert_array_equal(run["denoised"].read()["weights_version"].values, [0, 1])


def test_start_and_stop_round_trip(served, derived):
    run = derived[served.uid]
    start, stop = run.metadata["start"], run.metadata["stop"]
    assert start["raw_uid"] == served.raw_start["uid"] and start["raw_scan_id"] == 42
    assert start["config"] == {"refresh_every": 10}
    assert start["provenance"]["raw_plan_name"] == "tomo_scan"
    assert stop["exit_status"] == "fail" and stop["reason"] == "trainer diverged"
    assert stop["num_events"] == {"reconstruction": 3, "denoised": 2, "metrics": 2}


def test_raw_uid_search(served, derived):
    found = derived_runs_for(derived, served.raw_start["uid"])
    assert [run.metadata["start"]["uid"] for run in found] == [served.uid]
    assert derived_runs_for(derived, "no-such-uid") == []


def test_documents_replay_is_schema_valid(served, derived):
    replayed = list(documents(derived[served.uid]))
    names = [name for name, _ in replayed]
    assert names[0] == "start" and names[-1] == "stop"
    for name, doc in replayed:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
    assert replayed[0][1]["uid"] == served.uid
    assert replayed[-1][1]["exit_status"] == "fail"
    assert names.count("event") == 3 + 2 + 2
    resources = [doc for name, doc in replayed if name == "stream_resource"]
    assert sorted(doc["data_key"] for doc in resources) == ["denoised", "reconstruction"]


def test_runs_container_is_idempotent_and_checks_spec(served):
    client = served.catalog.client()
    first = runs_container(client, "raw")
    assert runs_container(client, "raw").uri == first.uri
    assert "CatalogOfBlueskyRuns" in {spec.name for spec in first.specs}
    client.create_container("plain")
    with pytest.raises(CatalogError, match="not a container of Bluesky runs"):
        runs_container(client, "plain")


def test_restart_sees_earlier_runs(served):
    old = served.catalog
    old.close()
    assert not old.running
    served.catalog = LocalCatalog(old.directory, api_key=old.api_key)
    run = runs_container(served.catalog.client(), "derived")[served.uid]
    assert run.metadata["stop"]["reason"] == "trainer diverged"
    np.testing.assert_array_equal(run["reconstruction"]["reconstruction"].read(), served.recs)


def test_unreachable_uri_fails_fast():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(CatalogError, match="Cannot reach"):
        connect(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 3
    with pytest.raises(CatalogError, match="http://host:port"):
        connect("localhost:8000")


def test_wrong_api_key_is_a_catalog_error(served):
    with pytest.raises(CatalogError, match="API key"):
        connect(served.catalog.uri, api_key="wrong")


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(CatalogError, match="alphanumeric"):
        LocalCatalog(tmp_path, api_key="not-alnum!")
    with pytest.raises(CatalogError, match="list of directories"):
        LocalCatalog(tmp_path, readable_storage=tmp_path)  # type: ignore[arg-type]


def test_import_does_not_import_tiled():
    code = "import sys, bluesky_jit.catalog; print('tiled' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_server_that_cannot_start_raises_with_log_tail(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CatalogError, match="address already in use") as info:
            LocalCatalog(tmp_path, port=port, api_key="secret123")
    assert "secret123" not in str(info.value)  # the log's API key is redacted
