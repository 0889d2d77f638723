"""JitProcess: the JitCallback's work in a child process, fed by a real RunEngine.

Real parts only: a RunEngine, the simulated ophyd-async beamline, a child
Python process on two pipes, and the session's Tiled catalog.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import msgpack
import numpy as np
import pytest

from bluesky_jit.catalog import derived_runs_for, runs_container
from bluesky_jit.codec import packb, unpackb
from bluesky_jit.pipeline import VERTICAL_STREAMS
from bluesky_jit.worker_process import JitProcess, tiled_writer
from simulated_devices.beamline import hw as make_hw
from simulated_devices.plans import tomo_continuous

from .helpers import wait_for
from .test_callbacks import ANGLES, CONFIG, SHAPE, Collector, run_scan, source

ALL_PLANES = ("reconstruction", *VERTICAL_STREAMS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_scan_through_the_child_process_into_the_catalog(RE, local_catalog, data_dir):
    client = local_catalog.client()
    derived_runs = runs_container(client, "derived")
    writer = tiled_writer(derived_runs, spool_dir=data_dir / "spool" / "derived")
    derived = Collector(writer)
    finished = []
    jit = JitProcess(
        config=CONFIG, emit=derived, directory=data_dir / "derived", on_run_finished=finished.append
    )
    child = jit._process.pid
    uid, raw = run_scan(RE, jit, make_hw(data_dir / "raw", source=source(), frame_rate=20.0))
    assert writer.flush(timeout=60)

    assert raw.named("stop")[0]["exit_status"] == "success"
    (summary,) = jit.summaries
    assert finished == [summary] or finished[0].derived_uid == summary.derived_uid
    assert summary.exit_status == "success" and summary.problems == []
    assert summary.projections == 2 * ANGLES
    assert summary.slices == 1 + ANGLES // CONFIG.reconstruction.refresh_every
    assert summary.geometry.detector_shape == SHAPE  # rebuilt from the child's message
    # the derived documents came back through the pipe, valid, and reached the catalog
    assert derived.named("start")[0]["raw_uid"] == uid
    assert derived.named("stop")[0]["exit_status"] == "success"
    (run,) = derived_runs_for(derived_runs, uid)
    recs = run["reconstruction"]["reconstruction"].read()
    assert recs.shape == (summary.slices, SHAPE[1], SHAPE[1])
    np.testing.assert_allclose(recs[-1], summary.last_slice, rtol=1e-5, atol=1e-6)
    # close() ended the child
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert jit.lost == 0


def test_moving_the_slices_and_the_centre_reaches_the_child(RE, tmp_path):
    derived = Collector()
    jit = JitProcess(config=CONFIG, emit=derived, directory=tmp_path / "derived")

    running = []

    def move_at_projection_30(name, doc):
        if name == "event" and doc["seq_num"] == 30 and "rot_stage" in doc["data"]:
            assert jit.flush(timeout=30)

            # the run is open in the child; progress() shows it within its 0.5 s period.
            # The vertical slices follow the axial one, so wait until all three are there.
            def sliced():
                running[:] = [s for s in jit.progress() if set(ALL_PLANES) <= set(s.images)]
                return running

            wait_for(sliced, 10, "the three slices in progress()")
            jit.move_slices(slice_row=1, vertical={1: -2.0})
            jit.set_center(SHAPE[1] / 2 + 1)

    RE.subscribe(move_at_projection_30)
    run_scan(RE, jit, make_hw(tmp_path / "raw", source=source(), frame_rate=20.0))
    rows = [e["data"]["slice_row"] for e in derived.named("event") if "slice_row" in e["data"]]
    assert rows[0] == SHAPE[0] // 2 and rows[-1] == 1
    done = jit.summaries[0]  # the newest image of each stream and where it lies, by value
    assert set(ALL_PLANES) <= set(running[-1].images)
    assert done.positions["reconstruction"] == 1 and done.positions["reconstruction_xz"] == -2.0
    assert running[-1].geometry.center_of_rotation == (SHAPE[1] - 1) / 2
    assert done.geometry.center_of_rotation == SHAPE[1] / 2 + 1
    np.testing.assert_array_equal(done.images["reconstruction"], done.last_slice)
    assert running[-1].raw_uid == jit.summaries[0].raw_uid
    assert running[-1].slices < jit.summaries[0].slices
    assert running[-1].projections >= 30 - 6  # darks and flats have seq_nums too


def test_quality_signals_steer_the_scan_from_the_child(RE, tmp_path):
    from bluesky_jit.steering import QualitySignals, until_quality

    quality = QualitySignals(name="jit_quality")
    jit = JitProcess(config=CONFIG, directory=tmp_path / "derived", quality=quality)
    beamline = make_hw(tmp_path / "raw", source=source(), frame_rate=20.0, paced=True)
    RE.subscribe(jit)
    report = {}
    plan = tomo_continuous(
        *beamline.plan_devices,
        num_angles=ANGLES, rotations=20, num_darks=3, num_flats=3,
    )  # fmt: skip
    RE(until_quality(plan, quality, alpha_below=0.9, skip_motors=(beamline.rot_stage,),
                     report=report))  # fmt: skip
    assert jit.flush(timeout=60)
    jit.close()
    assert report["good_at"] is not None and report["events"] < 20 * ANGLES, report
    assert quality.alpha.get() <= 0.9


def test_a_dead_child_costs_the_scan_nothing(RE, tmp_path):
    """The child killed mid-scan: the run ends success, later documents are counted lost."""
    jit = JitProcess(config=CONFIG, directory=tmp_path / "derived")

    def kill_at_projection_20(name, doc):
        if name == "event" and doc["seq_num"] == 20:
            os.kill(jit._process.pid, signal.SIGKILL)

    RE.subscribe(kill_at_projection_20)
    raw = Collector()
    RE.subscribe(raw)
    RE.subscribe(jit)
    beamline = make_hw(tmp_path / "raw", source=source(), frame_rate=40.0, paced=True)
    (uid,) = RE(
        tomo_continuous(
            *beamline.plan_devices,
            num_angles=ANGLES, rotations=2, num_darks=3, num_flats=3,
        )
    )  # fmt: skip
    assert raw.named("stop")[0]["exit_status"] == "success"
    assert len(raw.named("event")) >= 2 * ANGLES
    assert jit.flush(timeout=10) is False
    assert jit.lost > 0
    jit.close(timeout=10)


def test_the_child_ends_with_its_parent(tmp_path):
    """No orphan: a parent that dies without close() takes its worker with it."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from bluesky_jit.worker_process import JitProcess, tiled_writer
        jit = JitProcess(directory={str(tmp_path / "derived")!r})
        print(jit._process.pid, flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    child = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(child):  # a zombie of the finished parent is gone too; only a live one fails
        status = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        assert status == "Z", f"worker {child} outlived its parent (state {status})"


def test_bad_settings_are_refused_before_a_child_starts():
    with pytest.raises(Exception, match="nice"):
        JitProcess(nice=40)


def test_codec_keeps_arrays_and_refuses_code():
    doc = {"data": {"det": np.arange(6, dtype=np.uint16).reshape(2, 3)}, "t": (1, 2.5)}
    back = unpackb(packb(doc))
    assert back["data"]["det"].dtype == np.uint16
    np.testing.assert_array_equal(back["data"]["det"], doc["data"]["det"])
    assert back["t"] == [1, 2.5]
    objects = msgpack.packb(
        msgpack.ExtType(42, msgpack.packb(["|O", [1], b"\0" * 8])), use_bin_type=True
    )
    with pytest.raises(ValueError, match="numbers only"):
        unpackb(objects)
    with pytest.raises(ValueError):
        unpackb(b"\x80\x04\x95")  # a pickle's first bytes are not msgpack
    with pytest.raises(TypeError, match="plain values"):
        packb({"f": object()})


def test_raw_runs_through_a_writer_process_into_the_catalog(RE, local_catalog, data_dir):
    raw_runs = runs_container(local_catalog.client(), "raw")
    writer = tiled_writer(raw_runs, spool_dir=data_dir / "spool" / "raw", process=True)
    # the API key went down the pipe: not on the child's command line
    cmdline = open(f"/proc/{writer._process.pid}/cmdline", "rb").read()
    assert local_catalog.api_key.encode() not in cmdline
    RE.subscribe(writer)
    beamline = make_hw(data_dir / "raw", source=source(), frame_rate=40.0)
    (uid,) = RE(
        tomo_continuous(
            *beamline.plan_devices,
            num_angles=ANGLES, rotations=1, num_darks=3, num_flats=3,
        )
    )  # fmt: skip
    assert writer.flush(timeout=60)
    assert writer.stats.written > 0 and writer.stats.lost == 0 and writer.stats.runs_written == 1
    run = raw_runs[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run["primary"]["det"].read().shape[0] == ANGLES
    writer.close(timeout=30)
    assert writer.lost == 0


def test_child_processes_keep_off_the_scan_s_core(tmp_path):
    from bluesky_jit.budget import reserved_cores

    cores = sorted(os.sched_getaffinity(0))
    jit = JitProcess(directory=tmp_path / "derived")
    try:
        pid = jit._process.pid
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        child = sorted(os.sched_getaffinity(pid))
        every = {tuple(sorted(os.sched_getaffinity(tid))) for tid in threads}
    finally:
        jit.close(timeout=30)
    assert child == (cores[reserved_cores(len(cores)) :] or cores)
    assert every == {tuple(child)}  # every thread, also those started before it moved
    if len(cores) >= 2:
        assert cores[0] not in child
    probe = "from bluesky_jit.budget import leave_cores_to_the_scan as f; print(f())"
    one = subprocess.run(
        ["taskset", "-c", str(cores[-1]), sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert one.stdout.split() == [f"[{cores[-1]}]"]  # one core: kept


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a core left to the scan")
@pytest.mark.parametrize("borrow", [True, False])
def test_only_the_child_s_trainer_may_use_the_scan_s_idle_core(RE, tmp_path, borrow):
    scan_core = min(os.sched_getaffinity(0))
    seen: dict[str, set] = {}

    def look_at_the_child(name, doc):  # late in the scan, while the trainer runs
        if name == "event" and doc["seq_num"] == ANGLES + 12 and "rot_stage" in doc["data"]:
            wait_for(lambda: any(s.train_steps for s in jit.progress()), 30, "a training step")
            pid = jit._process.pid
            for tid in os.listdir(f"/proc/{pid}/task"):
                seen[tid] = set(os.sched_getaffinity(int(tid)))
            seen["main"] = set(os.sched_getaffinity(pid))

    config = CONFIG.replace(borrow_idle_cores=borrow)
    jit = JitProcess(config=config, directory=tmp_path / "derived")
    RE.subscribe(look_at_the_child)
    run_scan(RE, jit, make_hw(tmp_path / "raw", source=source(), frame_rate=20.0))
    (summary,) = jit.summaries
    assert scan_core not in seen.pop("main")  # the worker keeps off the scan's core
    borrowing = [tid for tid, cores in seen.items() if scan_core in cores]
    if borrow:
        assert scan_core in summary.budget["train_cores"]
        assert any("left to the scan" in reason for reason in summary.budget["reasons"])
        assert len(borrowing) == 1  # the trainer's thread, and no other
    else:
        assert summary.budget["train_cores"] is None and seen and borrowing == []


def test_progress_metric_rows_cross_the_pipe_once(tmp_path):
    from bluesky_jit.pipeline import RunSummary
    from bluesky_jit.worker_process import _summary_message

    jit = JitProcess(directory=tmp_path / "derived")
    try:
        summary = RunSummary(raw_uid="r", metrics=[{"step": 1}, {"step": 2}])
        jit._handle(["progress", [_summary_message(summary, 0)]])
        summary.metrics.append({"step": 3})
        second = _summary_message(summary, 2)
        assert second["metrics"] == [{"step": 3}]  # only the new row goes down the pipe
        jit._handle(["progress", [second]])
        assert [row["step"] for row in jit.progress()[0].metrics] == [1, 2, 3]
    finally:
        jit.close(timeout=30)


def test_settings_the_child_cannot_run_are_refused_by_the_constructor(tmp_path):
    import torch

    from bluesky_jit.config import JitConfig
    from bluesky_jit.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        JitProcess(config=JitConfig(device="cuda"), directory=tmp_path / "derived")
