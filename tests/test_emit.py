"""Tests of bluesky_jit.emit: documents out, without a Tiled server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import event_model
import h5py
import numpy as np
import pytest

from bluesky_jit.emit import DerivedRun
from bluesky_jit.errors import CatalogError, ConfigError, ScanDataError

SHAPE = (6, 5)


@pytest.fixture
def raw_start() -> dict:
    return dict(
        event_model.compose_run(
            metadata={"scan_id": 7, "plan_name": "tomo_scan", "sample": "phantom"}
        ).start_doc
    )


@pytest.fixture
def docs() -> list[tuple[str, dict]]:
    return []


@pytest.fixture
def run(raw_start: dict, docs: list, tmp_path: Path) -> Iterator[DerivedRun]:
    run = DerivedRun(
        raw_start=raw_start,
        emit=lambda name, doc: docs.append((name, doc)),
        directory=tmp_path / "derived files",  # a space: the URI must not be %-encoded
        image_shape=SHAPE,
        metadata={"config": {"refresh_every": 10, "slice_row": None}, "backend": "torch"},
    )
    yield run
    run.close()  # no-op when the test closed it; releases the HDF5 file otherwise


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def validate(docs: list[tuple[str, dict]]) -> None:
    for name, doc in docs:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)


def test_documents_are_schema_valid_and_linked(run, docs, raw_start):
    run.start()
    recs = images(3)
    for i, image in enumerate(recs):
        run.add_reconstruction(image, projection_index=10 * i, num_projections=30)
    run.add_denoised(recs[0], projection_index=0, train_step=5, weights_version=1)
    run.add_metrics(train_step=1, loss=0.5, alpha=0.1, pairs_seen=64)
    run.add_metrics(train_step=2, loss=0.25, alpha=0.1, pairs_seen=128)
    stop = run.close()

    validate(docs)
    names = [name for name, _ in docs]
    assert names[0] == "start" and names[-1] == "stop" and names.count("stop") == 1
    assert names.count("descriptor") == 3 and names.count("stream_resource") == 2
    assert names.count("stream_datum") == 4 and names.count("event") == 6

    start = docs[0][1]
    assert start["uid"] == run.uid
    assert start["plan_name"] == "bluesky_jit"
    assert start["raw_uid"] == raw_start["uid"] and start["raw_scan_id"] == 7
    assert start["sample"] == "phantom"
    assert start["config"] == {"refresh_every": 10, "slice_row": None}
    assert start["backend"] == "torch"
    provenance = start["provenance"]
    assert provenance["raw_uid"] == raw_start["uid"]
    assert provenance["raw_plan_name"] == "tomo_scan"
    assert provenance["package"] == "bluesky_jit" and provenance["version"]
    assert stop["num_events"] == {"reconstruction": 3, "denoised": 1, "metrics": 2}
    assert stop["exit_status"] == "success"


def test_stream_datum_matches_event_seq_num(run, docs):
    run.start()
    for image in images(3):
        run.add_reconstruction(image, projection_index=1)
    run.close()
    descriptor = next(doc for name, doc in docs if name == "descriptor")
    resource = next(doc for name, doc in docs if name == "stream_resource")
    assert descriptor["data_keys"]["reconstruction"]["external"] == "STREAM:"
    assert descriptor["data_keys"]["reconstruction"]["shape"] == list(SHAPE)
    assert descriptor["data_keys"]["reconstruction"]["dtype_numpy"] == "<f4"
    assert resource["mimetype"] == "application/x-hdf5"
    assert resource["uri"] == "file://localhost" + str(run.path)
    assert resource["parameters"] == {"dataset": "/reconstruction", "chunk_shape": [1, *SHAPE]}
    datums = [doc for name, doc in docs if name == "stream_datum"]
    events = [doc for name, doc in docs if name == "event"]
    assert [d["seq_nums"]["start"] for d in datums] == [e["seq_num"] for e in events] == [1, 2, 3]
    assert [d["indices"] for d in datums] == [{"start": i, "stop": i + 1} for i in range(3)]
    assert all(d["descriptor"] == descriptor["uid"] for d in datums)
    assert all(e["data"] == {"projection_index": 1} for e in events)


def test_hdf5_contents_equal_images_while_open_and_after(run):
    run.start()
    recs, dens = images(3, seed=1), images(2, seed=2)
    for image in recs[:2]:
        run.add_reconstruction(image)
    # SWMR: a reader sees flushed frames while the writer still holds the file.
    with h5py.File(run.path, "r", swmr=True) as f:
        np.testing.assert_array_equal(f["reconstruction"][:], recs[:2])
    run.add_reconstruction(recs[2])
    for image in dens:
        run.add_denoised(image.astype(np.float64))  # stored as float32
    run.close()
    assert run.path == run.path.parent / f"{run.uid}.h5"
    with h5py.File(run.path, "r") as f:
        for key, expected in (("reconstruction", recs), ("denoised", dens)):
            dataset = f[key]
            assert dataset.dtype == np.float32 and dataset.chunks == (1, *SHAPE)
            assert dataset.maxshape == (None, *SHAPE)
            np.testing.assert_array_equal(dataset[:], expected)


def test_close_twice_and_fail_status(run, docs):
    run.start()
    run.add_metrics(loss=1.0)
    stop = run.close(exit_status="fail", reason="worker crashed: ValueError")
    again = run.close()
    assert again == stop
    stops = [doc for name, doc in docs if name == "stop"]
    assert len(stops) == 1
    assert stops[0]["exit_status"] == "fail"
    assert stops[0]["reason"] == "worker crashed: ValueError"
    assert run.closed
    validate(docs)
    with pytest.raises(CatalogError, match="after close"):
        run.add_metrics(loss=2.0)


def test_close_without_images_writes_no_file(run, docs):
    run.start()
    stop = run.close(exit_status="abort", reason="scan aborted")
    assert [name for name, _ in docs] == ["start", "stop"]
    assert stop["num_events"] == {} and stop["exit_status"] == "abort"
    assert not run.path.exists()
    validate(docs)


def test_close_before_start_emits_nothing(run, docs):
    assert run.close() is None
    assert docs == []
    with pytest.raises(CatalogError, match="before start"):
        run.add_metrics(loss=1.0)


def test_context_manager_marks_failure(raw_start, docs, tmp_path):
    with pytest.raises(RuntimeError):
        with DerivedRun(
            raw_start=raw_start,
            emit=lambda name, doc: docs.append((name, doc)),
            directory=tmp_path,
            image_shape=SHAPE,
            metadata={},
        ) as run:
            run.add_reconstruction(images(1)[0])
            raise RuntimeError("boom")
    assert docs[-1][0] == "stop"
    assert docs[-1][1]["exit_status"] == "fail" and "boom" in docs[-1][1]["reason"]


def test_scalars_are_typed_on_first_use(run, docs):
    run.start()
    run.add_metrics(train_step=np.int64(1), loss=np.float32(0.5), ok=True, note="x")
    run.add_metrics(train_step=2, loss=np.array(1), ok=False, note="y")  # 0-d int as a number
    descriptor = next(doc for name, doc in docs if name == "descriptor")
    dtypes = {key: value["dtype"] for key, value in descriptor["data_keys"].items()}
    assert dtypes == {"train_step": "integer", "loss": "number", "ok": "boolean", "note": "string"}
    events = [doc for name, doc in docs if name == "event"]
    assert events[1]["data"] == {"train_step": 2, "loss": 1.0, "ok": False, "note": "y"}
    assert type(events[0]["data"]["train_step"]) is int
    assert type(events[1]["data"]["loss"]) is float
    with pytest.raises(ScanDataError, match="declared 'integer'"):
        run.add_metrics(train_step=2.5, loss=1.0, ok=True, note="z")
    with pytest.raises(ScanDataError, match="same scalar names"):
        run.add_metrics(train_step=3)
    validate(docs)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: r.add_metrics(), "at least one"),
        (lambda r: r.add_metrics(time=1.0), "reserved"),
        (lambda r: r.add_metrics(loss=None), "bool, int, float or str"),
        (lambda r: r.add_reconstruction(np.zeros((5, 6))), "shape"),
        (lambda r: r.add_denoised(np.zeros(SHAPE), denoised=1), "reserved"),
        (lambda r: r.add_reconstruction(np.zeros(SHAPE, dtype=complex)), "real array"),
    ],
)
def test_bad_inputs_raise_scan_data_error(run, call, match):
    run.start()
    with pytest.raises(ScanDataError, match=match):
        call(run)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metadata": {"raw_uid": "x"}}, "must not set"),
        ({"metadata": {"geometry": np.zeros(3)}}, "JSON-able"),
        ({"metadata": {"alpha": float("nan")}}, "JSON-able"),
        ({"image_shape": (4,)}, "image_shape"),
        ({"image_shape": (4, 0)}, "image_shape"),
        ({"raw_start": {"scan_id": 1}}, "uid"),
    ],
)
def test_bad_construction_raises_config_error(raw_start, tmp_path, kwargs, match):
    args = dict(
        raw_start=raw_start,
        emit=lambda name, doc: None,
        directory=tmp_path,
        image_shape=SHAPE,
        metadata={},
    )
    with pytest.raises(ConfigError, match=match):
        DerivedRun(**(args | kwargs))


def test_bad_exit_status(run):
    run.start()
    with pytest.raises(ConfigError, match="exit_status"):
        run.close(exit_status="crashed")
    assert not run.closed


def test_import_does_not_import_tiled():
    code = "import sys, bluesky_jit.emit; print('tiled' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
