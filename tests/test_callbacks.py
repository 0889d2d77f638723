"""End to end with real parts: RunEngine, simulated ophyd devices, JitCallback, Tiled.

Tiny scans (8 x 48 detector, 24 angles per rotation) keep each test to a few
seconds on two cores.
"""

from __future__ import annotations

import threading
import time

import event_model
import numpy as np
import pytest

from bluesky_jit.callbacks import JitCallback
from bluesky_jit.catalog import derived_runs_for, runs_container
from bluesky_jit.config import JitConfig
from bluesky_jit.worker_process import tiled_writer
from simulated_devices.beamline import hw as make_hw
from simulated_devices.phantoms import BubbleColumn
from simulated_devices.plans import tomo_continuous, tomo_scan
from simulated_devices.sources import PhantomSource

SHAPE = (8, 48)
ANGLES = 24
CONFIG = JitConfig(
    refresh_every=6,
    patch_size=16,
    pairs_per_refresh=32,
    holdout_per_refresh=4,
    batch_size=8,
    buffer_capacity=64,
    holdout_size=16,
    metrics_every_s=0.2,
    neighbourhood_rows=1,
)


def validate(name, doc):
    event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)


class Collector:
    """Validates and keeps every document; forwards to an optional writer."""

    def __init__(self, forward=None):
        self.docs = []
        self.forward = forward

    def __call__(self, name, doc):
        validate(name, doc)
        self.docs.append((name, doc))
        if self.forward is not None:
            self.forward(name, doc)

    def named(self, name):
        return [d for n, d in self.docs if n == name]


def source(dtype=np.uint16, **kw):
    return PhantomSource(
        BubbleColumn(detector_shape=SHAPE, seed=1, bed_fraction=0.0),
        photons=2000,
        dtype=dtype,
        **kw,
    )


def run_scan(RE, jit, beamline, plan=tomo_continuous, **kw):
    raw = Collector()
    RE.subscribe(raw)
    RE.subscribe(jit)
    args = dict(num_angles=ANGLES, num_darks=3, num_flats=3)
    if plan is tomo_continuous:
        args["rotations"] = 2
    args.update(kw)
    (uid,) = RE(plan(*beamline.plan_devices, **args))
    assert jit.flush(timeout=120)
    jit.close()
    return uid, raw


def test_live_scan_to_catalog_end_to_end(RE, local_catalog, data_dir):
    client = local_catalog.client()
    raw_runs = runs_container(client, "raw")
    derived_runs = runs_container(client, "derived")
    derived_writer = tiled_writer(derived_runs, spool_dir=data_dir / "spool" / "derived")
    derived_docs = Collector(derived_writer)
    jit = JitCallback(config=CONFIG, emit=derived_docs, directory=data_dir / "derived")
    raw_writer = tiled_writer(raw_runs, spool_dir=data_dir / "spool" / "raw")
    RE.subscribe(raw_writer)
    beamline = make_hw(data_dir / "raw", source=source(), frame_rate=20.0)
    uid, raw = run_scan(RE, jit, beamline)
    assert raw_writer.flush(timeout=60) and derived_writer.flush(timeout=60)

    # every raw document the RunEngine made is schema-valid, and the scan completed
    assert raw.named("stop")[0]["exit_status"] == "success"
    summary = jit.summaries[0]
    assert summary.problems == [], summary.problems
    assert summary.projections == 2 * ANGLES
    # a slice after the first full rotation, then every 6 projections
    assert summary.slices == 1 + ANGLES // CONFIG.reconstruction.refresh_every
    assert summary.train_steps > 0

    start = derived_docs.named("start")[0]
    assert start["raw_uid"] == uid
    assert start["config"]["reconstruction"]["refresh_every"] == CONFIG.reconstruction.refresh_every
    assert start["geometry"]["detector_shape"] == list(SHAPE)
    assert start["model"]["name"] == CONFIG.training.model
    stop = derived_docs.named("stop")[0]
    assert stop["exit_status"] == "success"
    # images are not inline: they are in HDF5 referenced by stream resources
    assert {d["data_key"] for d in derived_docs.named("stream_resource")} >= {"reconstruction"}
    assert all("reconstruction" not in e["data"] for e in derived_docs.named("event"))

    # read back from the catalog, found by the raw run's uid
    (run,) = derived_runs_for(derived_runs, uid)
    recs = run["reconstruction"]["reconstruction"].read()
    assert recs.shape == (summary.slices, SHAPE[1], SHAPE[1])
    np.testing.assert_allclose(recs[-1], summary.last_slice, rtol=1e-5, atol=1e-6)
    assert run.metadata["stop"]["exit_status"] == "success"
    # the two vertical slices of the three orthogonal ones
    xz = run["reconstruction_xz"]["reconstruction_xz"].read()
    assert xz.shape == (summary.slices, SHAPE[0], SHAPE[1])
    assert len(run["metrics"].read()["loss"]) >= 1
    # the raw run is in the catalog too, with its frames
    raw_frames = raw_runs[uid]["primary"]["det"].read()
    assert raw_frames.shape[0] == 2 * ANGLES


def test_reconstruction_matches_the_phantom(RE, tmp_path):
    """The live slice resembles the truth: correlation well above noise."""
    src = source()
    jit = JitCallback(config=CONFIG, directory=tmp_path / "derived")
    beamline = make_hw(tmp_path / "raw", source=src, frame_rate=20.0)
    run_scan(RE, jit, beamline)
    summary = jit.summaries[0]
    t = np.asarray(summary.last_indices) / 20.0
    truth = src.phantom.truth_window(float(t[0]), float(t[-1]), SHAPE[0] // 2)
    r = np.corrcoef(summary.last_slice.ravel(), truth.ravel())[0, 1]
    assert r > 0.8


def test_ophyd_v1_resource_datum_detector(RE, tmp_path):
    jit = JitCallback(config=CONFIG, directory=tmp_path / "derived")
    beamline = make_hw(tmp_path / "raw", source=source(), api="v1", external=True)
    _, raw = run_scan(RE, jit, beamline, plan=tomo_scan)
    assert raw.named("resource") and raw.named("datum")
    summary = jit.summaries[0]
    assert summary.problems == []
    assert summary.projections == ANGLES
    assert summary.slices == 1


def test_callback_never_blocks_the_run_engine_and_reports_dropped_frames(RE, tmp_path):
    derived = Collector()
    jit = JitCallback(
        config=CONFIG.replace(queue_size=5), emit=derived, directory=tmp_path / "derived"
    )
    release = threading.Event()
    route = jit._router

    def stalled(name, doc):  # the worker is stuck (e.g. a slow GPU) until released
        release.wait(60)
        route(name, doc)

    jit._router = stalled
    beamline = make_hw(tmp_path / "raw", source=source())
    RE.subscribe(jit)
    t0 = time.monotonic()
    RE(
        tomo_scan(
            *beamline.plan_devices,
            num_angles=ANGLES,
            num_darks=2,
            num_flats=2,
        )
    )
    scan_s = time.monotonic() - t0
    release.set()
    assert jit.flush(timeout=60)
    jit.close()
    assert scan_s < 30  # the scan ran although the worker could not take a document
    stop = derived.named("stop")[0]
    assert stop["exit_status"] == "fail"
    assert "frame documents were dropped" in stop["reason"]


# -- bad input: the scan completes, the raw data are untouched, the derived run says why --


class Glitchy:
    """A detector source that misbehaves on one projection frame."""

    def __init__(self, inner, *, bad_index, kind):
        self.inner, self.bad_index, self.kind = inner, bad_index, kind
        self.detector_shape = inner.detector_shape
        self.dtype = inner.dtype
        self.sample_name = inner.sample_name

    def metadata(self):
        return self.inner.metadata()

    def frame(self, *, index, **kw):
        frame = self.inner.frame(index=index, **kw)
        if index == self.bad_index:
            if self.kind == "nan":
                frame = frame.astype(np.float32)
                frame[1, 5] = np.nan
            else:
                frame = np.zeros((SHAPE[0], SHAPE[1] + 4), dtype=frame.dtype)
        return frame


def bad_run(RE, tmp_path, *, src=None, api="async", external=True, **plan_kw):
    derived = Collector()
    jit = JitCallback(config=CONFIG, emit=derived, directory=tmp_path / "derived")
    beamline = make_hw(tmp_path / "raw", source=src or source(), api=api, external=external)
    uid, raw = run_scan(RE, jit, beamline, plan=tomo_scan, **plan_kw)
    assert raw.named("stop")[0]["exit_status"] == "success"  # the scan itself completed
    (stop,) = derived.named("stop")
    assert derived.named("start")[0]["raw_uid"] == uid
    return stop, raw


def test_scan_without_darks_or_flats(RE, tmp_path):
    stop, _ = bad_run(RE, tmp_path, num_darks=0, num_flats=0)
    assert stop["exit_status"] == "fail"
    assert "no dark and no flat fields" in stop["reason"]
    assert "num_flats=10" in stop["reason"]  # how to fix


def test_nan_frame_is_skipped_and_reported(RE, tmp_path):
    src = Glitchy(source(dtype=np.float32), bad_index=3 + 3 + 5, kind="nan")  # 6th projection
    stop, raw = bad_run(RE, tmp_path, src=src, api="v1", external=False)
    assert stop["exit_status"] == "fail"
    assert "Projection 5" in stop["reason"] and "NaN" in stop["reason"]
    # the one-rotation window is one short: the slice is made from the 23 that arrived
    assert "23 of the 24 projections of a rotation arrived" in stop["reason"], stop["reason"]
    # raw data untouched: the NaN is still in the raw event
    frames = [e["data"]["det"] for e in raw.named("event") if "rot_stage" in e["data"]]
    assert np.isnan(np.asarray(frames[5])).any()


def test_frame_of_the_wrong_shape(RE, tmp_path):
    src = Glitchy(source(dtype=np.float32), bad_index=3 + 3 + 2, kind="shape")
    stop, _ = bad_run(RE, tmp_path, src=src, api="v1", external=False)
    assert stop["exit_status"] == "fail"
    assert "shape (8, 52)" in stop["reason"] and "(8, 48)" in stop["reason"]


def test_missing_angle_reading(RE, tmp_path):
    src = source()
    md = {
        "tomo": {
            **src.metadata(),
            "detector_key": "det",
            "angle_key": "theta_enc",
            "num_angles": ANGLES,
            "angular_range": [0, 180],
        }
    }
    stop, _ = bad_run(RE, tmp_path, src=src, md=md)
    assert stop["exit_status"] == "fail"
    assert "no 'theta_enc' reading" in stop["reason"]


def test_unknown_beam_type(RE, tmp_path):
    src = source()
    md = {"tomo": {**src.metadata(), "beam": "helical", "num_angles": ANGLES}}
    stop, _ = bad_run(RE, tmp_path, src=src, md=md)
    assert stop["exit_status"] == "fail"
    assert "Unknown beam type 'helical'" in stop["reason"]


def test_runs_that_are_not_tomography_are_ignored(RE, tmp_path):
    from bluesky.plans import count
    from ophyd.sim import det

    derived = Collector()
    jit = JitCallback(config=CONFIG, emit=derived, directory=tmp_path)
    RE.subscribe(jit)
    RE(count([det], 3))
    assert jit.flush(timeout=10)
    jit.close()
    assert derived.docs == [] and len(jit.summaries) == 0


@pytest.mark.slow
def test_tooth_recording_through_the_run_engine_matches_astra(RE, tmp_path, tooth_path):
    """Replay of the real tooth scan (DXchange) reconstructs the tooth as ASTRA does."""
    import h5py

    from bluesky_jit.evaluation import disc_mask
    from bluesky_jit.reconstruction.astra_backend import astra_fbp
    from simulated_devices.recordings import DXchangeRecording
    from simulated_devices.sources import RecordingSource

    path = tooth_path
    cor = 295.0
    src = RecordingSource(DXchangeRecording.open(path), center_of_rotation=cor)
    config = CONFIG.replace(refresh_every=1000, slice_row=0, neighbourhood_rows=0)
    jit = JitCallback(config=config, directory=tmp_path / "derived")
    beamline = make_hw(tmp_path / "raw", source=src)
    # the recorded angles are k * 180 / 181: the plan's angles for 181 per rotation
    run_scan(RE, jit, beamline, plan=tomo_scan, num_angles=181, num_darks=10, num_flats=10)
    summary = jit.summaries[0]
    assert summary.problems == []
    assert summary.slices == 1
    with h5py.File(path, "r") as f:
        data = f["/exchange/data"][:, 0].astype(float)
        flat = f["/exchange/data_white"][:, 0].mean(0)
        dark = f["/exchange/data_dark"][:, 0].mean(0)
        theta = np.radians(f["/exchange/theta"][:])
    sino = -np.log(np.maximum((data - dark) / (flat - dark), 1e-6))
    ref = astra_fbp(sino, theta, n=640, center_of_rotation=cor)
    ours = summary.last_slice
    mask = disc_mask(640, 0.8)
    rel = np.linalg.norm((ours - ref)[mask]) / np.linalg.norm(ref[mask])
    assert rel < 0.05
    assert np.corrcoef(ours[mask], ref[mask])[0, 1] > 0.99


def test_warm_start_from_an_earlier_runs_checkpoint(RE, tmp_path):
    """Run 1 writes a checkpoint; run 2 starts from it without training and denoises at once."""
    first = CONFIG.replace(checkpoint_dir=str(tmp_path / "ckpt"))
    jit = JitCallback(config=first, directory=tmp_path / "d1")
    uid, _ = run_scan(RE, jit, make_hw(tmp_path / "raw1", source=source(), frame_rate=20.0))
    checkpoint = tmp_path / "ckpt" / uid / "latest.pt"
    assert checkpoint.exists()

    second = CONFIG.replace(warm_start=str(checkpoint), train=False)
    jit2 = JitCallback(config=second, directory=tmp_path / "d2")
    run_scan(RE, jit2, make_hw(tmp_path / "raw2", source=source(), frame_rate=20.0))
    summary = jit2.summaries[0]
    assert summary.problems == []
    assert summary.train_steps == 0
    assert summary.denoised == summary.slices > 0


def test_moving_the_slice_during_a_run(RE, tmp_path):
    derived = Collector()
    jit = JitCallback(config=CONFIG, emit=derived, directory=tmp_path / "derived")

    def move_at_projection_30(name, doc):
        if name == "event" and doc["seq_num"] == 30 and "rot_stage" in doc["data"]:
            assert jit.flush(timeout=30)
            jit.move_slices(slice_row=1)

    RE.subscribe(move_at_projection_30)
    run_scan(RE, jit, make_hw(tmp_path / "raw", source=source(), frame_rate=20.0))
    rows = [e["data"]["slice_row"] for e in derived.named("event") if "slice_row" in e["data"]]
    assert rows[0] == SHAPE[0] // 2 and rows[-1] == 1
    assert jit.summaries[0].problems == []


def test_scan_stops_once_the_denoiser_is_good_enough(RE, tmp_path):
    """Closed loop: JitCallback publishes alpha on ophyd signals; the plan stops on it."""
    from bluesky_jit.steering import QualitySignals, until_quality

    quality = QualitySignals(name="jit_quality")
    jit = JitCallback(config=CONFIG, directory=tmp_path / "derived", quality=quality)
    beamline = make_hw(tmp_path / "raw", source=source(), frame_rate=20.0, paced=True)
    RE.subscribe(jit)
    report = {}
    planned = 20 * ANGLES
    plan = tomo_continuous(
        *beamline.plan_devices,
        num_angles=ANGLES,
        rotations=20,
        num_darks=3,
        num_flats=3,
    )
    RE(
        until_quality(
            plan, quality, alpha_below=0.9, skip_motors=(beamline.rot_stage,), report=report
        )
    )
    assert jit.flush(timeout=60)
    jit.close()
    assert report["good_at"] is not None, report
    assert report["events"] < planned
    assert quality.alpha.get() <= 0.9
    summary = jit.summaries[0]
    assert summary.projections == report["events"]
    assert summary.exit_status == "success", summary.reason


@pytest.mark.parametrize("model", ["msdnet", "tunet", "smsnet"])
def test_other_2d_models_run_live_by_name(RE, tmp_path, model):
    derived = Collector()
    jit = JitCallback(config=CONFIG.replace(model=model), emit=derived, directory=tmp_path)
    run_scan(RE, jit, make_hw(tmp_path / "raw", source=source(), frame_rate=20.0))
    summary = jit.summaries[0]
    assert summary.exit_status == "success", summary.reason
    assert summary.slices > 0
    assert derived.named("start")[0]["model"]["name"] == model


def test_a_refresh_failing_at_the_stop_still_writes_a_failed_stop(RE, tmp_path):
    """Angles that cover a tenth of the range the metadata says: every refresh fails, the
    last one at the stop too; the derived run still ends, with ``fail`` and the reason."""
    derived = Collector()
    jit = JitCallback(
        config=CONFIG,
        emit=derived,
        directory=tmp_path / "derived",
        geometry_overrides={"angular_range": [0.0, 180.0]},
    )
    beamline = make_hw(tmp_path / "raw", source=source(), frame_rate=20.0)
    uid, raw = run_scan(RE, jit, beamline, angular_range=(0.0, 18.0))
    assert raw.named("stop")[0]["exit_status"] == "success"  # the scan never noticed
    (stop,) = derived.named("stop")
    assert stop["exit_status"] == "fail"
    assert "angle" in stop["reason"].lower(), stop["reason"]
    summary = jit.summaries[0]
    assert summary.exit_status == "fail" and summary.reason == stop["reason"]


def recorded_inline_scan(RE, tmp_path) -> Collector:
    """The documents of a 2-rotation scan of 16 angles, frames inline (ophyd v1)."""
    from bluesky_jit.apps.session import simulated_beamline

    settings = {"size": 32, "rows": 4, "photons": 2000.0, "api": "v1", "external": False}
    beamline = simulated_beamline(tmp_path / "raw", settings)
    raw = Collector()
    RE.subscribe(raw)
    RE(
        tomo_continuous(
            *beamline.plan_devices,
            num_angles=16, rotations=2, num_darks=2, num_flats=2,
        )
    )  # fmt: skip
    return raw


def test_one_bad_frame_costs_that_frame_only(RE, tmp_path):
    """A complex-valued frame (a numpy casting error, not a package error) is rejected and
    named; the run goes on, its other frames are reconstructed."""
    import copy

    raw = recorded_inline_scan(RE, tmp_path)
    primary = {d["uid"] for d in raw.named("descriptor") if d["name"] == "primary"}
    image_key = next(
        k for d in raw.named("descriptor") if d["uid"] in primary
        for k, v in d["data_keys"].items() if len(v.get("shape") or []) >= 2
    )  # fmt: skip
    jit = JitCallback(config=CONFIG.replace(refresh_every=4), emit=None, directory=tmp_path)
    for name, doc in raw.docs:
        if name == "event" and doc["descriptor"] in primary and doc["seq_num"] == 5:
            doc = copy.deepcopy(doc)
            doc["data"][image_key] = np.asarray(doc["data"][image_key]) * (1 + 1j)
        jit(name, doc)
    assert jit.flush(timeout=60)
    jit.close()
    summary = jit.summaries[0]
    assert summary.projections == 31  # all but the bad one
    assert summary.slices >= 1
    assert summary.exit_status == "fail"
    assert "event seq_num 5 rejected" in summary.reason, summary.reason


def test_documents_delivered_twice_are_ignored_and_counted(RE, tmp_path):
    """A bus that delivers every document twice: the run is processed as if once."""
    raw = recorded_inline_scan(RE, tmp_path)
    summaries = []
    for copies in (1, 2):
        jit = JitCallback(  # fed as a listener is: no scan beside it to yield to
            config=CONFIG.replace(refresh_every=4, train=False),
            directory=tmp_path,
            run_engine_here=False,
        )
        for name, doc in raw.docs:
            for _ in range(copies):
                jit(name, doc)
        assert jit.flush(timeout=60)
        jit.close()
        summaries.append(jit.summaries[0])
    once, twice = summaries
    assert twice.exit_status == "success", twice.reason
    assert (twice.projections, twice.slices) == (once.projections, once.slices)
    assert once.projections == 32 and once.slices >= 2
    # every document but the stop, whose second copy comes after the run's summary
    assert once.duplicates == 0 and twice.duplicates == len(raw.docs) - 1
    np.testing.assert_array_equal(twice.last_slice, once.last_slice)


def feed(jit, docs):
    for name, doc in docs:
        jit(name, doc)
    assert jit.flush(timeout=60)


def test_too_few_projections_for_a_slice_say_why(RE, tmp_path):
    """A one-rotation run that stops after 10 of 16 projections: no slice, and the stop
    says how many came and which gap they leave."""
    raw = recorded_inline_scan(RE, tmp_path)
    primary = {d["uid"] for d in raw.named("descriptor") if d["name"] == "primary"}
    docs = [
        (n, d) for n, d in raw.docs
        if not (n == "event" and d["descriptor"] in primary and d["seq_num"] > 10)
    ]  # fmt: skip
    jit = JitCallback(config=CONFIG.replace(train=False), directory=tmp_path)
    feed(jit, docs)
    jit.close()
    summary = jit.summaries[0]
    assert summary.slices == 0 and summary.exit_status == "fail"
    assert "10 of the 16 projections of a rotation arrived" in summary.reason, summary.reason
    assert "leave a gap" in summary.reason


def test_documents_that_cannot_be_routed_are_counted_not_lost(RE, tmp_path):
    """Documents out of order or missing: each such document fails its run with the
    reason, or, when its run cannot be told, is counted on the callback
    (JitCallback.unroutable)."""
    import copy

    raw = recorded_inline_scan(RE, tmp_path)
    run = raw.named("start")[0]["uid"]
    last = len(raw.docs) - 1  # the stop
    primary = next(d["uid"] for d in raw.named("descriptor") if d["name"] == "primary")
    first_primary = next(i for i, (n, d) in enumerate(raw.docs) if d is not None and n == "event"
                         and d["descriptor"] == primary)  # fmt: skip
    no_data = copy.deepcopy(raw.docs[first_primary + 3][1])
    del no_data["data"]
    datum = {
        "uid": "sd", "stream_resource": "nowhere", "descriptor": primary,
        "indices": {"start": 0, "stop": 1}, "seq_nums": {"start": 0, "stop": 0},
    }  # fmt: skip
    early = raw.docs[first_primary + 3]
    cases = {  # what is done to the stream -> in the stop's reason
        "an event before its descriptor": lambda d: (
            d[: first_primary - 1] + [early] + d[first_primary - 1 : first_primary + 3]
            + d[first_primary + 4 :]
        ),
        "an 'event' document without 'data'": lambda d: (
            d[: first_primary + 3] + [("event", no_data)] + d[first_primary + 4 :]
        ),
        "a document with the unknown name 'bogus'": lambda d: (
            d[:last] + [("bogus", {"uid": "b", "run_start": run})] + d[last:]
        ),
        "a stream_datum naming an unknown stream_resource": lambda d: (
            d[:last] + [("stream_datum", datum)] + d[last:]
        ),
    }  # fmt: skip
    for expected, mutate in cases.items():
        derived = Collector()
        jit = JitCallback(
            config=CONFIG.replace(train=False), emit=derived, directory=tmp_path,
            run_engine_here=False,
        )  # fmt: skip
        feed(jit, mutate(list(raw.docs)))
        jit.close()
        (stop,) = derived.named("stop")
        assert stop["exit_status"] == "fail", expected
        assert expected in stop["reason"] and "not processed" in stop["reason"], stop["reason"]
        assert jit.summaries[0].problems
        assert not jit.unroutable, jit.unroutable

    # no run to tell: counted on the callback, by reason
    jit = JitCallback(config=CONFIG.replace(train=False), directory=tmp_path)
    feed(jit, [("event", None), ("event", None)] + raw.docs[1:])  # and no start
    jit.close()
    assert jit.unroutable["an 'event' message that is not a document (NoneType)"] == 2
    assert jit.unroutable["a 'descriptor' document of a run whose start never came"] == 3
    assert jit.unroutable["an event before its descriptor"] == len(raw.named("event"))
    assert jit.unroutable["a 'stop' document of a run whose start never came"] == 1
    assert len(jit.summaries) == 0


def test_a_silent_run_is_closed_after_run_timeout(RE, tmp_path):
    """No stop ever comes: after run_timeout_s without a document the run is closed with an
    abort stop, its trainer stops; a document that comes later is counted, not processed."""
    from .helpers import wait_for

    raw = recorded_inline_scan(RE, tmp_path)
    derived = Collector()
    jit = JitCallback(
        config=CONFIG.replace(run_timeout_s=1.0), emit=derived, directory=tmp_path,
        run_engine_here=False,
    )  # fmt: skip
    feed(jit, raw.docs[:-1])
    pipeline = next(iter(jit.pipelines.values()))
    wait_for(lambda: derived.named("stop"), timeout=30)
    (stop,) = derived.named("stop")
    assert stop["exit_status"] == "abort"
    assert "no document came for 1 s" in stop["reason"]
    assert pipeline.trainer is None or not pipeline.trainer.running
    feed(jit, raw.docs[-1:])  # the real stop, too late
    jit.close()
    assert jit.unroutable == {"a 'stop' document after its run's stop": 1}
    assert len(derived.named("stop")) == 1


def test_close_writes_an_abort_stop_for_runs_still_open(RE, tmp_path):
    raw = recorded_inline_scan(RE, tmp_path)
    derived = Collector()
    jit = JitCallback(config=CONFIG, emit=derived, directory=tmp_path, run_engine_here=False)
    feed(jit, raw.docs[:-1])
    pipeline = next(iter(jit.pipelines.values()))
    jit.close(timeout=60)
    (stop,) = derived.named("stop")
    assert stop["exit_status"] == "abort"
    assert "the callback was closed before the run's stop document came" in stop["reason"]
    assert jit.summaries[0].exit_status == "abort"
    assert pipeline.trainer is None or not pipeline.trainer.running
