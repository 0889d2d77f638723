"""The CPU budget, and training and refreshes yielding to a worker that fell behind the scan.

The budget is decided from the cores; the trainer pauses while its pause
event is set; due refreshes are skipped under a backlog but there is one per
rotation and always one at the end; a paced scan through a real RunEngine
loses no frame.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bluesky_jit.budget import MAX_TRAIN_THREADS, CpuBudget, available_cores
from bluesky_jit.buffers import ReplayBuffer
from bluesky_jit.callbacks import JitCallback
from bluesky_jit.config import JitConfig
from bluesky_jit.errors import ConfigError
from bluesky_jit.geometry import geometry_from_start
from bluesky_jit.models import build_model
from bluesky_jit.pipeline import RunPipeline
from bluesky_jit.process_trainer import ProcessTrainer
from bluesky_jit.training import Trainer
from simulated_devices.beamline import hw as make_hw
from simulated_devices.plans import tomo_continuous

from . import helpers
from .test_callbacks import ANGLES, CONFIG, SHAPE, Collector, source


def wait_for(predicate, timeout=30.0, what="the condition"):
    return helpers.wait_for(predicate, timeout, what, interval=0.01)


# -- the budget ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "reserved", "worker", "train"),
    [(1, 0, 1, 1), (2, 1, 1, 1), (4, 1, 2, 1), (16, 2, 10, 4)],
)
def test_budget_from_the_cores(cores, reserved, worker, train):
    budget = CpuBudget.decide(JitConfig(), cores=cores)
    assert (budget.cores, budget.reserved) == (cores, reserved)
    assert budget.worker_threads == budget.infer_threads == worker
    assert budget.train_threads == train <= MAX_TRAIN_THREADS
    assert budget.interop_threads == 1
    assert budget.plugin_threads == max(1, cores - reserved)
    assert budget.reasons and f"{cores} core" in budget.reasons[0]
    # numba: serial kernels for one thread, else numba's own choice capped per thread
    assert budget.recon_threads_arg == (1 if worker == 1 else None)
    record = budget.to_dict()
    assert record["reasons"] == list(budget.reasons) and record["train_threads"] == train


def test_budget_with_explicit_settings():
    budget = CpuBudget.decide(JitConfig(cpu_threads=6), cores=16)
    assert (budget.plugin_threads, budget.train_threads, budget.worker_threads) == (6, 2, 4)
    assert budget.reserved == 10 and any("cpu_threads=6" in r for r in budget.reasons)
    budget = CpuBudget.decide(JitConfig(train_threads=3, infer_threads=2), cores=2)
    assert (budget.train_threads, budget.infer_threads, budget.worker_threads) == (3, 2, 1)
    assert any("train_threads=3" in r for r in budget.reasons)
    default = CpuBudget.decide(JitConfig())
    assert default.cores == available_cores() >= 1
    assert CpuBudget.decide(None, cores=2) == CpuBudget.decide(JitConfig(), cores=2)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_budget_and_config_refuse_bad_thread_counts(value):
    with pytest.raises(ConfigError, match="cores"):
        CpuBudget.decide(JitConfig(), cores=value)
    with pytest.raises(ConfigError, match="cpu_threads"):
        JitConfig(cpu_threads=value)
    with pytest.raises(ConfigError, match="pause_training_above"):
        JitConfig(pause_training_above=value)


def test_the_pipeline_applies_the_budget(tmp_path):
    pipeline = RunPipeline(
        config=CONFIG.replace(vertical_slices=False), emit=None, directory=tmp_path, cores=16
    )
    pipeline.begin({"uid": "raw-1"}, _geometry())
    assert pipeline.trainer.num_threads == 4 and pipeline.denoiser.num_threads == 10
    assert pipeline.summary.budget["train_threads"] == 4
    assert pipeline.summary.budget["pause_training_above"] == CONFIG.reconstruction.refresh_every
    assert pipeline.summary.budget["skip_refreshes_above"] == ANGLES  # a rotation
    pipeline.end({"exit_status": "success"})
    explicit = CONFIG.replace(train_threads=2, infer_threads=3, vertical_slices=False)
    pipeline = RunPipeline(config=explicit, emit=None, directory=tmp_path, cores=16)
    pipeline.begin({"uid": "raw-2"}, _geometry())
    assert pipeline.trainer.num_threads == 2 and pipeline.denoiser.num_threads == 3
    pipeline.end({"exit_status": "success"})


# -- the trainer pauses -----------------------------------------------------------------------


def _pairs(n, size=12, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.uniform(0, 1, (n, 1, 1, 1)) * np.ones((n, 1, size, size))
    u = clean + 0.3 * rng.standard_normal(clean.shape)
    v = clean + 0.3 * rng.standard_normal(clean.shape)
    return u.astype(np.float32), v.astype(np.float32)


@pytest.mark.timeout(60)
def test_the_trainer_takes_no_step_while_paused_and_resumes():
    model = build_model("unet", {"features": 2}, seed=0)
    buffer = ReplayBuffer(64, rng=np.random.default_rng(0))
    buffer.push(*_pairs(32))
    trainer = Trainer(model, buffer, batch_size=8, num_threads=1)
    trainer.pause.set()  # frames are waiting before training even starts
    trainer.start()
    try:
        assert wait_for(lambda: trainer.paused_s > 0.3)
        assert trainer.steps == 0 and trainer.pauses == 1
        trainer.pause.clear()
        assert wait_for(lambda: trainer.steps >= 3)
        trainer.pause.set()
        assert wait_for(lambda: trainer.pauses == 2)
        held, paused = trainer.steps, trainer.paused_s
        assert wait_for(lambda: trainer.paused_s > paused + 0.3)
        assert trainer.steps == held
        trainer.pause.clear()
        assert wait_for(lambda: trainer.steps > held)
    finally:
        trainer.stop()
    assert trainer.error is None and trainer.paused_s >= 0.6


def test_the_trainer_shares_an_outside_pause_event():
    event = threading.Event()
    model = build_model("unet", {"features": 2}, seed=0)
    trainer = Trainer(model, ReplayBuffer(16), batch_size=8, pause=event)
    assert trainer.pause is event
    with pytest.raises(ConfigError, match="is_set"):
        Trainer(model, ReplayBuffer(16), batch_size=8, pause=True)


@pytest.mark.timeout(120)
def test_the_process_trainer_pauses_on_a_shared_event():
    before = torch.get_num_threads()
    trainer = ProcessTrainer("unet", {"features": 2}, buffer_capacity=64, batch_size=8)
    try:
        trainer.pause.set()
        trainer.buffer.push(*_pairs(32))
        trainer.start()
        assert wait_for(lambda: trainer.paused_s > 0.3, timeout=90)
        assert trainer.steps == 0
        trainer.pause.clear()
        assert wait_for(lambda: trainer.steps > 0, timeout=60)
    finally:
        trainer.stop()
    assert trainer.error is None and trainer.paused_s > 0.3
    assert torch.get_num_threads() == before  # the child's threads are its own


# -- refreshes are coalesced under a backlog ------------------------------------------------------


def _geometry():
    tomo = {
        "detector_shape": list(SHAPE),
        "num_angles": ANGLES,
        "angular_range": [0, 180],
        "pixel_size": 1.0,
        "center_of_rotation": (SHAPE[1] - 1) / 2,
    }
    return geometry_from_start({"tomo": tomo})


def _feed(pipeline, frames, backlog, start=0):
    """Darks and flats (first), then projections ``start ...``; ``backlog(i)`` frames wait at i."""
    rng = np.random.default_rng(1 + start)
    flat = np.full(SHAPE, 2000.0, np.float32)
    if start == 0:
        pipeline.calibration(np.zeros((2, *SHAPE), np.float32), np.stack([flat, flat]))
    for i in range(start, start + frames):
        pipeline._waiting = backlog(i)
        counts = flat * np.exp(-0.02 * rng.uniform(0.5, 1.5, SHAPE)).astype(np.float32)
        pipeline.projection(counts, angle_deg=i * 180.0 / ANGLES, index=i)


def _pipeline(tmp_path, **settings):
    config = CONFIG.replace(train=False, vertical_slices=False, **settings)
    box = {}
    pipeline = RunPipeline(
        config=config, emit=None, directory=tmp_path, backlog=lambda: box["p"]._waiting
    )
    box["p"] = pipeline
    pipeline._waiting = 0
    pipeline.begin({"uid": "raw"}, _geometry())
    at = []
    refresh = pipeline.refresh
    pipeline.refresh = lambda: (at.append(pipeline.summary.projections), refresh())
    return pipeline, at


def test_due_refreshes_are_coalesced_under_a_backlog_and_the_last_always_happens(tmp_path):
    k = CONFIG.reconstruction.refresh_every
    frames = 3 * ANGLES - 2  # the last due refresh (66) is skipped; 4 projections after it

    pipeline, at = _pipeline(tmp_path)
    _feed(pipeline, frames, backlog=lambda i: 0)
    pipeline.end({"exit_status": "success"})
    assert at == [*range(ANGLES, frames, k), frames]  # every k, and the last projections
    assert pipeline.summary.refreshes_skipped == 0

    pipeline, at = _pipeline(tmp_path)
    _feed(pipeline, frames, backlog=lambda i: 0 if i < ANGLES else 100)  # far behind
    pipeline.end({"exit_status": "success"})
    summary = pipeline.summary
    assert at == [ANGLES, 2 * ANGLES, 3 * ANGLES - 2]  # one per rotation, the last at the stop
    assert summary.refreshes_skipped == len(range(ANGLES, frames, k)) - 2
    assert summary.slices == 3 and summary.projections == frames
    assert summary.exit_status == "success", summary.reason
    np.testing.assert_array_equal(summary.last_indices, np.arange(frames - ANGLES, frames))


def test_a_lower_skip_threshold_and_a_backlog_that_drains(tmp_path):
    k = CONFIG.reconstruction.refresh_every
    pipeline, at = _pipeline(tmp_path, skip_refreshes_above=4)
    # behind from the first rotation on, then caught up from projection 40
    _feed(pipeline, 2 * ANGLES, backlog=lambda i: 10 if ANGLES <= i < 40 else 0)
    pipeline.end({"exit_status": "success"})
    assert at == [ANGLES, ANGLES + 3 * k, 2 * ANGLES]  # 30 and 36 skipped
    assert pipeline.summary.refreshes_skipped == 2


def test_the_backlog_pauses_the_pipelines_trainer(tmp_path):
    pipeline, _ = _pipeline(tmp_path)
    pause = pipeline.trainer.pause
    threshold = CONFIG.reconstruction.refresh_every
    _feed(pipeline, 3, backlog=lambda i: threshold + 1)
    assert pause.is_set()
    _feed(pipeline, 1, backlog=lambda i: threshold, start=3)  # not drained enough: still paused
    assert pause.is_set()
    _feed(pipeline, 1, backlog=lambda i: threshold // 2, start=4)
    assert not pause.is_set()
    _feed(pipeline, 1, backlog=lambda i: threshold + 1, start=5)
    assert pause.is_set()
    pipeline.end({"exit_status": "success"})
    assert not pause.is_set()  # the end clears it


# -- a real RunEngine ---------------------------------------------------------------------------


def _scan(RE, jit, beamline, rotations):
    raw = Collector()
    RE.subscribe(raw)
    RE.subscribe(jit)
    RE(
        tomo_continuous(
            *beamline.plan_devices,
            num_angles=ANGLES,
            num_darks=3,
            num_flats=3,
            rotations=rotations,
        )
    )
    assert jit.flush(timeout=120)
    jit.close()
    return raw


def _projections_sent(raw):
    streams = {d["uid"]: d["name"] for d in raw.named("descriptor")}
    return sum(
        1
        for e in raw.named("event")
        if streams[e["descriptor"]] == "primary" and "rot_stage" in e["data"]
    )


@pytest.mark.timeout(300)
def test_a_paced_scan_is_ingested_whole_with_the_budget_recorded(RE, tmp_path):
    derived = Collector()
    jit = JitCallback(config=CONFIG, emit=derived, directory=tmp_path / "derived")
    beamline = make_hw(tmp_path / "raw", source=source(), frame_rate=20.0, paced=True)
    raw = _scan(RE, jit, beamline, rotations=3)
    summary = jit.summaries[0]
    sent = _projections_sent(raw)
    assert sent == 3 * ANGLES
    assert summary.projections == sent
    assert summary.exit_status == "success", summary.reason
    assert not any("dropped" in p for p in summary.problems)
    assert summary.slices >= 3 and summary.train_steps > 0
    start = derived.named("start")[0]
    assert start["budget"]["cores"] == available_cores()
    assert start["budget"] == summary.budget
    metrics = [e["data"] for e in derived.named("event") if "alpha" in e["data"]]
    assert metrics and {"train_paused_s", "refreshes_skipped"} <= set(metrics[-1])
    assert metrics[-1]["refreshes_skipped"] == summary.refreshes_skipped
    assert summary.to_dict()["train_paused_s"] == summary.train_paused_s >= 0


@pytest.mark.timeout(300)
def test_a_worker_behind_the_scan_pauses_training_skips_refreshes_and_drops_nothing(RE, tmp_path):
    """The worker is held mid-scan while the scan runs on; then it catches up."""
    config = CONFIG.replace(skip_refreshes_above=8)
    derived = Collector()
    jit = JitCallback(config=config, emit=derived, directory=tmp_path / "derived")
    route, release, state = jit._router, threading.Event(), {}

    def held_after_the_first_refresh(name, doc):
        pipeline = next(iter(jit.pipelines.values()), None)
        trainer = getattr(pipeline, "trainer", None)
        if "held" not in state and trainer is not None and trainer.running:
            state["held"] = pipeline.summary.projections
            release.wait(120)
        route(name, doc)
        if "held" in state and "seen" not in state and getattr(pipeline, "_yielding", False):
            # the catching-up worker paused the trainer: let the trainer see it
            state["seen"] = wait_for(lambda: trainer.pauses >= 1, timeout=60)

    jit._router = held_after_the_first_refresh
    beamline = make_hw(tmp_path / "raw", source=source(), frame_rate=20.0)
    RE.subscribe(jit)
    raw = Collector()
    RE.subscribe(raw)
    RE(
        tomo_continuous(
            *beamline.plan_devices,
            num_angles=ANGLES,
            num_darks=3,
            num_flats=3,
            rotations=3,
        )
    )
    assert wait_for(lambda: "held" in state, timeout=60)
    release.set()  # the scan is over; the worker is a rotation and more behind
    assert jit.flush(timeout=120)
    jit.close()
    summary = jit.summaries[0]
    assert state["seen"], "the trainer never paused while frames waited"
    assert summary.projections == _projections_sent(raw) == 3 * ANGLES
    assert summary.exit_status == "success", summary.reason
    assert summary.train_paused_s > 0 and summary.refreshes_skipped > 0
    assert summary.train_steps > 0
    rows = [e["data"] for e in derived.named("event") if "slice_row" in e["data"]]
    ends = [r["projection_index"] for r in rows]
    assert ends[-1] == 3 * ANGLES - 1  # the last projections are always shown
    assert max(np.diff([ANGLES - 1, *ends])) <= ANGLES  # and one slice per rotation at least
    final = [e["data"] for e in derived.named("event") if "alpha" in e["data"]][-1]
    assert final["refreshes_skipped"] == summary.refreshes_skipped
    assert final["train_paused_s"] == pytest.approx(summary.train_paused_s, abs=1e-6)


def _nice_of_thread(tid: int) -> int:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])  # the 19th field of stat(5): nice


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
@pytest.mark.timeout(60)
def test_the_trainer_thread_runs_at_the_lowest_priority_the_budget_gives():
    budget = CpuBudget.decide(JitConfig(), cores=2)
    assert budget.train_nice == 19 and any("nice 19" in r for r in budget.reasons)
    model = build_model("unet", {"features": 2}, seed=0)
    buffer = ReplayBuffer(64, rng=np.random.default_rng(0))
    buffer.push(*_pairs(32))
    trainer = Trainer(model, buffer, batch_size=8, num_threads=1, nice=budget.train_nice)
    trainer.start()
    try:
        assert wait_for(lambda: trainer.steps >= 1)
        assert _nice_of_thread(trainer._thread.native_id) == 19
        assert _nice_of_thread(threading.get_native_id()) == os.nice(0)  # the caller is unchanged
    finally:
        trainer.stop()
    with pytest.raises(ConfigError, match="nice"):
        Trainer(model, buffer, batch_size=8, nice=40)


def test_the_trainer_borrows_the_scan_s_cores_only_where_the_budget_says():
    here = sorted(os.sched_getaffinity(0))
    budget = CpuBudget.decide(JitConfig(), cores=1, left=(here[0],))
    assert budget.train_cores == tuple(here)  # the process's cores and the one left
    assert any("left to the scan" in r for r in budget.reasons)
    assert any("1 left to the RunEngine and the detector by this" in r for r in budget.reasons)
    # a child that left the scan's core does not reserve another one
    assert CpuBudget.decide(JitConfig(), cores=3, left=(here[0],)).plugin_threads == 3
    assert CpuBudget.decide(JitConfig(), cores=3, left=()).plugin_threads == 2
    assert CpuBudget.decide(JitConfig(borrow_idle_cores=False), left=(here[0],)).train_cores is None
    assert CpuBudget.decide(JitConfig(), left=()).train_cores is None  # nothing was left
    model = build_model("unet", {"features": 2}, seed=0)
    buffer = ReplayBuffer(64, rng=np.random.default_rng(0))
    buffer.push(*_pairs(32))
    trainer = Trainer(model, buffer, batch_size=8, num_threads=1, cores=[here[-1]])
    trainer.start()
    try:
        assert wait_for(lambda: trainer.steps >= 1)
        assert os.sched_getaffinity(trainer._thread.native_id) == {here[-1]}
        assert sorted(os.sched_getaffinity(0)) == here  # the caller keeps its cores
    finally:
        trainer.stop()
    with pytest.raises(ConfigError, match="cores"):
        Trainer(model, buffer, batch_size=8, cores=[-1])


# -- the pace guard ---------------------------------------------------------------------------


class _Scan:
    """Appends frame arrival times at ``rate`` per second; ``slowed`` of it while training runs."""

    def __init__(self, rate: float, slowed: float) -> None:
        import collections

        self.rate, self.slowed = rate, slowed
        self.arrivals = collections.deque(maxlen=2048)
        self.paused = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def pause(self, on: bool) -> None:
        self.paused = on

    def _run(self) -> None:
        t = time.monotonic()
        while not self.stop.is_set():
            t += 1.0 / (self.rate if self.paused else self.rate * self.slowed)
            time.sleep(max(0.0, t - time.monotonic()))
            self.arrivals.append(time.monotonic())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("slowed, expect", [(0.7, "yields"), (1.0, "trains")])
def test_the_pace_guard_yields_exactly_when_training_slows_the_scan(slowed, expect):
    from bluesky_jit.budget import PaceGuard

    scan = _Scan(rate=80.0, slowed=slowed)
    guard = PaceGuard(scan.arrivals, scan.pause, probe_every_s=0.8, probe_s=0.3)
    scan.thread.start()
    guard.start()
    try:
        assert wait_for(lambda: guard.probes >= 6, timeout=40)
    finally:
        guard.stop()
        scan.stop.set()
    history = guard.history
    if expect == "yields":
        # training costs the scan 30 % while it runs: the guard halves the duty on each
        # slowdown and settles about where the scan loses its tolerance (4 %, a duty of
        # about 0.13), going a step above it now and then to check
        assert guard.slowdowns >= 3, history
        assert sum(history[2:]) / len(history[2:]) <= 0.35 and min(history) <= 0.2, history
    else:
        assert guard.slowdowns <= 1 and guard.duty == 1.0, history
        assert guard.interval > 0.8  # an undisturbed scan is probed less often
    assert scan.paused is False  # stopped: training runs freely


@pytest.mark.timeout(90)
def test_the_pace_guard_probes_less_while_undisturbed_and_again_once_the_scan_slows():
    from bluesky_jit.budget import PaceGuard

    scan = _Scan(rate=80.0, slowed=1.0)
    guard = PaceGuard(
        scan.arrivals, scan.pause, probe_every_s=0.5, probe_s=0.3, max_probe_every_s=2.0
    )
    scan.thread.start()
    guard.start()
    try:
        wait_for(lambda: guard.interval == 2.0, 40, "the longest interval between probes")
        first, slowdowns = guard.probes, guard.slowdowns
        wait_for(lambda: guard.probes > first, 10, "a probe")
        start = time.monotonic()
        wait_for(lambda: guard.probes > first + 1, 10, "the next probe")
        # 2 s apart (and the probe's own 0.3 s), not 0.5 s, unless a slow-down reset it
        assert time.monotonic() - start >= 1.5 or guard.slowdowns > slowdowns
        scan.slowed = 0.7  # training now costs the scan 30 %
        wait_for(lambda: guard.slowdowns >= 1, 30, "a slow-down found")
        assert guard.interval < 2.0 and guard.duty < 1.0
    finally:
        guard.stop()
        scan.stop.set()


@pytest.mark.timeout(30)
def test_the_pace_guard_lets_training_run_when_no_frames_come():
    import collections

    from bluesky_jit.budget import PaceGuard

    states = []
    arrivals = collections.deque([time.monotonic() - 5.0] * 20)  # a scan that ended 5 s ago
    guard = PaceGuard(arrivals, states.append, probe_every_s=0.5, probe_s=0.2)
    guard.start()
    time.sleep(1.0)  # nothing to wait for: the guard must do nothing for a second
    guard.stop()
    assert states in ([], [False]) and guard.probes == 0


@pytest.mark.timeout(30)
def test_a_pause_in_the_scan_brings_back_the_short_probe_interval():
    import collections

    from bluesky_jit.budget import PaceGuard

    arrivals = collections.deque([time.monotonic() - 5.0] * 20)  # the scan paused 5 s ago
    guard = PaceGuard(arrivals, lambda on: None, probe_every_s=0.5, max_probe_every_s=8.0)
    guard.interval = 8.0  # as after many probes that found the scan undisturbed
    guard.start()
    try:
        wait_for(lambda: guard.interval == 0.5, 5, "the short interval back")
    finally:
        guard.stop()
