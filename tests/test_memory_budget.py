"""The memory budget: metadata cannot make the process allocate what the frames do not need."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from event_model import compose_run

from bluesky_jit.callbacks import JitCallback
from bluesky_jit.memory import plan_memory
from bluesky_jit.projections import ProjectionBuffer

from .test_callbacks import CONFIG, Collector
from .test_ingest import COLS, ROWS, feed, inline_run, stream_run, tomo_md

MB = 2**20


def rss() -> int:
    """Resident memory of this process now (bytes)."""
    with open("/proc/self/statm") as statm:
        import os

        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def disk_scan(tomo: dict, shape: tuple[int, int], *, rotations: int = 2, darks: int = 2) -> list:
    """Documents of a parallel-beam scan of a centred disk, frames inline in the events."""
    rows, cols = shape
    s = np.arange(cols) - (cols - 1) / 2
    path = 2 * np.sqrt(np.clip((cols / 3) ** 2 - s**2, 0, None))
    projection = np.broadcast_to(1000 * np.exp(-0.02 * path), shape).astype(np.float32)
    bundle = compose_run(metadata={"tomo": tomo, "plan_name": "tomo"})
    docs = [("start", bundle.start_doc)]
    image = {"dtype": "array", "shape": list(shape), "source": "sim"}
    angle = {"dtype": "number", "shape": [], "source": "sim"}
    n = tomo["num_angles"]
    for stream, count, value in (("dark", darks, 0), ("flat", darks, 1000), ("primary", 0, 0)):
        keys = {"det": image, **({"rot_stage": angle} if stream == "primary" else {})}
        desc = bundle.compose_descriptor(name=stream, data_keys=keys)
        docs.append(("descriptor", desc.descriptor_doc))
        for k in range(count or rotations * n):
            data = {"det": np.full(shape, value, np.float32) if count else projection}
            if stream == "primary":
                data["rot_stage"] = k * 180 / n
            docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, 0))))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def run(docs: list, config, tmp_path) -> tuple[Collector, object]:
    derived = Collector()
    jit = JitCallback(config=config, emit=derived, directory=tmp_path / "derived")
    for name, doc in docs:
        jit(name, doc)
    assert jit.flush(timeout=120)
    jit.close()
    return derived, jit.summaries[0]


def test_a_scan_larger_than_the_budget_keeps_the_rows_of_its_slice(tmp_path):
    """96 x 32 frames over a 0.2 MB budget: a band of rows for the axial slice, 4 x 4 binned
    frames for the vertical ones, said in the derived run; the slices still come."""
    tomo = {"num_angles": 16, "angular_range": [0, 180], "detector_shape": [96, 32]}
    config = CONFIG.replace(memory_budget_gb=0.0002)
    derived, summary = run(disk_scan(tomo, (96, 32)), config, tmp_path)
    assert summary.exit_status == "success", summary.reason
    memory = derived.named("start")[0]["memory"]
    assert memory["rows"][0] <= 47 < 49 <= memory["rows"][1] <= 52, memory
    assert memory["vertical_binning"] == 4
    assert "kept detector rows" in memory["reduced"] and "memory_budget_gb" in memory["reduced"]
    assert memory["needed_bytes"] <= memory["budget_bytes"] < memory["whole_frames_bytes"]
    assert summary.slices >= 2
    full = summary.last_slice
    assert full.shape == (32, 32) and full[16, 16] == pytest.approx(0.02, rel=0.25)
    events = {d["uid"]: d["name"] for d in derived.named("descriptor")}
    vertical = [e for e in derived.named("event") if events[e["descriptor"]].endswith("_xz")]
    assert vertical  # the vertical slices of the binned frames: (96 / 4) x (32 / 4)
    (xz,) = [d for d in derived.named("descriptor") if d["name"].endswith("_xz")]
    assert [24, 8] in [key["shape"][-2:] for key in xz["data_keys"].values()]


@pytest.mark.parametrize(
    ("shape", "angles", "said"),
    [
        ((40000, 40000), 1800, "raise runtime.memory_budget_gb"),
        ((2048, 2048), 180, "the scan metadata says the detector is (2048, 2048)"),
        ((8, 48), 10**8, "at 100000000 projections per rotation"),
    ],
)
def test_metadata_announcing_a_huge_detector_allocates_nothing(tmp_path, shape, angles, said):
    """The frames are 8 x 48: neither the plan nor the first frames allocate the announced size;
    the run fails at once, saying what to change."""
    tomo = {"num_angles": angles, "angular_range": [0, 180], "detector_shape": list(shape)}
    docs = disk_scan({**tomo, "num_angles": 4}, (8, 48), rotations=1)
    docs[0][1]["tomo"] = tomo
    config = CONFIG.replace(memory_budget_gb=4.0)
    before = rss()
    derived, summary = run(docs, config, tmp_path)
    assert rss() - before < 500 * MB
    assert summary.exit_status == "fail"
    assert said in summary.reason, summary.reason
    (stop,) = derived.named("stop")
    assert stop["exit_status"] == "fail" and said in stop["reason"]


def test_a_budget_too_small_is_refused_with_a_fix(tmp_path):
    tomo = {"num_angles": 16, "angular_range": [0, 180], "detector_shape": [8, 48]}
    config = CONFIG.replace(memory_budget_gb=1e-6)
    _, summary = run(disk_scan(tomo, (8, 48)), config, tmp_path)
    assert summary.exit_status == "fail"
    assert "the memory budget is 0.00 MB" in summary.reason
    assert "raise runtime.memory_budget_gb" in summary.reason
    with pytest.raises(Exception, match="fix tomo\\['detector_shape'\\]"):
        plan_memory(
            geometry=_geometry((8, 48)),
            capacity=32,
            extra=6,
            row=4,
            reach=1,
            vertical=True,
            budget=1000,
        )


def _geometry(shape):
    from bluesky_jit.geometry import ScanGeometry

    return ScanGeometry(detector_shape=shape, num_angles=16)


def test_the_projection_buffer_allocates_at_the_first_frame():
    before = rss()
    buffer = ProjectionBuffer(2, (40000, 40000))
    assert buffer.data is None and rss() - before < 500 * MB
    with pytest.raises(Exception, match="the buffer keeps \\(40000, 40000\\)"):
        buffer.append(np.zeros((8, 48), np.float32), angle=0.0, index=0)
    assert buffer.data is None


@pytest.mark.parametrize("announced", [(ROWS, COLS), (40000, 40000)])
def test_an_hdf5_frame_of_40000_squared_is_refused_before_reading(tmp_path, announced):
    """A 3 kB file whose dataset announces one 40000 x 40000 frame: its shape is read, its data
    is not."""
    docs = stream_run(tmp_path, replay_order=False)
    docs[0][1]["tomo"]["detector_shape"] = list(announced)
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        for stream in ("dark", "flat", "primary"):
            f.create_dataset(stream, shape=(8, 40000, 40000), dtype="u2", chunks=(1, 500, 500))
    assert (tmp_path / "frames.h5").stat().st_size < 10_000
    before = rss()
    sink, _ = feed(docs, memory_budget=2**30)
    assert rss() - before < 500 * MB
    assert sink.projections == []
    assert any("frames of shape (40000, 40000)" in p and "none of them was read" in p
               for p in sink.problems), sink.problems  # fmt: skip


def test_projections_waiting_for_flats_are_bounded():
    """Flats after the rotation: the frames wait, but not beyond half the budget."""
    frame_bytes = ROWS * COLS * 8
    sink, ingest = feed(
        inline_run(streams=("dark", "primary", "flat")), memory_budget=20 * frame_bytes
    )
    assert sink.projections == []
    assert not ingest._waiting
    assert any("11 projections" in p and "waited for dark and flat fields" in p
               for p in sink.problems), sink.problems  # fmt: skip
    # within the budget they are all corrected once the flats come
    sink, _ = feed(inline_run(streams=("dark", "primary", "flat")), memory_budget=2**20)
    assert len(sink.projections) == 24 and sink.problems == []


def test_a_missing_detector_key_is_named_with_the_keys_there_are():
    sink, _ = feed(inline_run(md=tomo_md(detector_key="cam")))
    assert sink.projections == []
    assert any("'cam'" in p and "['det', 'rot_stage']" in p for p in sink.problems), sink.problems


def test_an_ad_hdf5_point_too_large_is_refused_before_reading(tmp_path):
    """Old-style Resource/Datum frames: 4 x 40000 x 40000 float64 (47.7 GB) a point, in kB."""
    from bluesky_jit.errors import ScanDataError
    from bluesky_jit.ingest import AreaDetectorHDF5Handler

    path = tmp_path / "ad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", (4, 40000, 40000), dtype="f8", chunks=(1, 50, 50))
    handler = AreaDetectorHDF5Handler(str(path), frame_per_point=4)
    before = rss()
    with pytest.raises(ScanDataError, match="47.68 GB a point.*not read"):
        handler(0)
    handler.close()
    assert rss() - before < 500 * MB
