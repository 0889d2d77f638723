"""Replay of stored runs (bluesky_jit.apps.replay) against a real Tiled server, no mocks.

The run replayed is the one `bluesky-jit demo` wrote (conftest ``demo_run``);
its live derived run is the reference: replaying with the same settings and
seed must give the same reconstructions.
"""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_jit.apps.replay import (
    NotTomographyError,
    RunNotFoundError,
    live_order,
    replay,
)
from bluesky_jit.apps.session import find_derived
from bluesky_jit.catalog import derived_runs_for, runs_container
from bluesky_jit.errors import ScanDataError

from .helpers import run_engine


@pytest.fixture(scope="module")
def containers(jit_catalog, demo_run):
    client = jit_catalog.client()
    return runs_container(client, "raw"), runs_container(client, "derived")


def reconstructions(run):
    table = run["reconstruction"].read()
    return table["projection_index"].values, table["reconstruction"].values


def replay_one(containers, jit_catalog, tiny_config, uid, **kwargs):
    raw, derived = containers
    (summary,) = replay(
        raw,
        [uid],
        derived_runs=derived,
        directory=jit_catalog.base / "replayed",
        config=tiny_config,
        progress=False,
        timeout=120,
        **kwargs,
    )
    return summary, derived[summary.derived_uid]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"pace": "fast"}, id="fast-stored-order"),
        pytest.param({"pace": "realtime", "speed": 8.0}, id="realtime-live-order"),
    ],
)
def test_replay_gives_the_live_reconstructions(
    containers, jit_catalog, demo_run, tiny_config, kwargs
):
    raw_uid = demo_run["raw_uid"]
    summary, run = replay_one(containers, jit_catalog, tiny_config, raw_uid[:8], **kwargs)
    assert summary.exit_status == "success", summary.reason
    live_index, live = reconstructions(containers[1][demo_run["derived_uid"]])
    index, replayed = reconstructions(run)
    assert len(live) >= 2
    np.testing.assert_array_equal(index, live_index)
    np.testing.assert_allclose(replayed, live, rtol=0, atol=1e-6 * np.abs(live).max())
    start = run.metadata["start"]
    assert start["raw_uid"] == raw_uid  # linked to the original
    assert start["replay"]["pace"] == kwargs["pace"]
    assert start["config"] == containers[1][demo_run["derived_uid"]].metadata["start"]["config"]
    assert "denoised" in run and "metrics" in run
    live_run = containers[1][demo_run["derived_uid"]]
    for stream in ("reconstruction_xz", "reconstruction_yz"):  # vertical slices, if any
        if stream in live_run:
            expected = live_run[stream][stream].read()
            np.testing.assert_allclose(run[stream][stream].read(), expected, rtol=0, atol=1e-5)
    linked = [r.metadata["start"]["uid"] for r in derived_runs_for(containers[1], raw_uid)]
    assert demo_run["derived_uid"] in linked and summary.derived_uid in linked


@pytest.mark.slow
def test_frames_come_through_tiled_when_files_are_not_here(
    containers, jit_catalog, demo_run, tiny_config
):
    # The detector files "moved" for this machine; the Tiled server still reads them.
    moved = {str(jit_catalog.base): str(jit_catalog.base / "not-mounted-here")}
    summary, run = replay_one(
        containers, jit_catalog, tiny_config, demo_run["raw_uid"], root_map=moved
    )
    assert summary.exit_status == "success", summary.reason
    _, live = reconstructions(containers[1][demo_run["derived_uid"]])
    np.testing.assert_allclose(
        reconstructions(run)[1], live, rtol=0, atol=1e-6 * np.abs(live).max()
    )
    assert any((jit_catalog.base / "replay_cache").glob("*.h5"))


def test_derived_runs_are_found_by_search(containers, demo_run, tiny_config):
    derived = containers[1]
    raw_uid = demo_run["raw_uid"]
    by_raw = find_derived(derived, raw_uid=raw_uid)
    assert demo_run["derived_uid"] in [r.metadata["start"]["uid"] for r in by_raw]
    by_model = find_derived(derived, raw_uid=raw_uid, model="unet")
    assert len(by_model) == len(by_raw)
    assert find_derived(derived, model="no-such-model") == []
    by_config = find_derived(
        derived, config={"seed": 0, "refresh_every": tiny_config.reconstruction.refresh_every}
    )
    assert demo_run["derived_uid"] in [r.metadata["start"]["uid"] for r in by_config]
    assert find_derived(derived, raw_uid=raw_uid, config={"refresh_every": 999}) == []
    ok = find_derived(derived, raw_uid=raw_uid, exit_status="success")
    assert demo_run["derived_uid"] in [r.metadata["start"]["uid"] for r in ok]


def test_wrong_uid_is_refused_before_anything_is_written(containers, demo_run):
    raw, derived = containers
    before = len(derived)
    with pytest.raises(RunNotFoundError, match="No run 'deadbeef-0000'") as info:
        replay(raw, ["deadbeef-0000"], derived_runs=derived, progress=False)
    assert isinstance(info.value, LookupError)
    assert len(derived) == before


def test_a_run_that_is_not_a_tomography_scan_is_refused(containers, count_run):
    raw, derived = containers
    with pytest.raises(NotTomographyError, match="not a tomography scan"):
        replay(raw, [count_run], derived_runs=derived, progress=False)


def test_a_catalog_without_the_external_files_is_refused(jit_catalog, lost_files_run):
    client = jit_catalog.client()
    raw, derived = runs_container(client, "raw_lost"), runs_container(client, "derived")
    before = len(derived)
    with pytest.raises(ScanDataError, match="cannot read, and the Tiled server could not"):
        replay(raw, [lost_files_run], derived_runs=derived, progress=False)
    assert len(derived) == before


def test_live_order_puts_each_frame_after_its_event():
    docs = [
        ("start", {"uid": "r"}),
        ("descriptor", {"uid": "d", "run_start": "r", "name": "primary"}),
        ("event", {"descriptor": "d", "seq_num": 1, "time": 1.0}),
        ("event", {"descriptor": "d", "seq_num": 2, "time": 2.0}),
        ("stream_resource", {"uid": "sr", "run_start": "r"}),
        (
            "stream_datum",
            {
                "uid": "sd",
                "descriptor": "d",
                "stream_resource": "sr",
                "indices": {"start": 0, "stop": 2},
                "seq_nums": {"start": 1, "stop": 3},
            },
        ),
        ("stop", {"run_start": "r"}),
    ]
    out = list(live_order(docs))
    names = [n for n, _ in out]
    assert names == [
        "start",
        "descriptor",
        "event",
        "stream_resource",
        "stream_datum",
        "event",
        "stream_datum",
        "stop",
    ]
    datums = [d for n, d in out if n == "stream_datum"]
    assert [d["indices"] for d in datums] == [{"start": 0, "stop": 1}, {"start": 1, "stop": 2}]
    assert [d["seq_nums"] for d in datums] == [{"start": 1, "stop": 2}, {"start": 2, "stop": 3}]


@pytest.fixture(scope="module")
def hex_layout_scan(jit_catalog):
    """Uid of a scan whose darks and flats are in a separate dark/flat run (NSLS-II HEX)."""
    from bluesky_jit.apps.session import simulated_beamline
    from bluesky_jit.worker_process import tiled_writer
    from simulated_devices.plans import dark_flat_run, tomo_scan

    writer = tiled_writer(
        runs_container(jit_catalog.client(), "raw"), spool_dir=jit_catalog.base / "hex_spool"
    )
    settings = {"size": 32, "rows": 4, "photons": 300.0, "api": "v1"}
    bl = simulated_beamline(jit_catalog.base / "hex", settings)
    with run_engine() as RE:
        RE.subscribe(writer)
        (calibration,) = RE(
            dark_flat_run(bl.det, bl.shutter, bl.sample_stage, num_darks=2, num_flats=2)
        )
        (scan,) = RE(
            tomo_scan(
                *bl.plan_devices,
                num_angles=16,
                dark_flat_uid=calibration,
            )
        )
    assert writer.flush(timeout=60)
    return scan


def test_a_scan_with_a_separate_dark_flat_run_gets_it_replayed_first(
    containers, jit_catalog, tiny_config, hex_layout_scan
):
    summary, run = replay_one(containers, jit_catalog, tiny_config, hex_layout_scan)
    assert summary.exit_status == "success", summary.reason
    assert summary.raw_uid == hex_layout_scan  # the calibration run makes no summary here
    assert len(reconstructions(run)[1]) == 1  # one rotation of 16: one slice
