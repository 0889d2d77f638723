"""Recorded scans replay faithfully: in acquisition order, with the recording's angles."""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_jit.errors import ConfigError
from simulated_devices.beamline import hw as make_hw
from simulated_devices.plans import recorded_scan, tomo_continuous, tomo_scan
from simulated_devices.recordings import DXchangeRecording, write_dxchange
from simulated_devices.sources import RecordingSource

from .test_simulated_devices import events_by_stream, record, stream_frames

ROTATIONS, PER_ROTATION, SHAPE = 3, 8, (4, 12)


def write_rotations(path, rotations=ROTATIONS, per_rotation=PER_ROTATION, span=360.0, shape=SHAPE):
    """A DXchange file whose frame k holds the value 1000 + k (darks 10 + j, flats 5000 + j)."""
    n = rotations * per_rotation
    data = (1000 + np.arange(n, dtype=np.uint16))[:, None, None] * np.ones(shape, np.uint16)
    darks = (10 + np.arange(2, dtype=np.uint16))[:, None, None] * np.ones(shape, np.uint16)
    flats = (5000 + np.arange(3, dtype=np.uint16))[:, None, None] * np.ones(shape, np.uint16)
    theta = span * np.arange(n) / per_rotation
    return write_dxchange(path, data=data, flats=flats, darks=darks, theta=theta)


def beamline(tmp_path, path, **source_options):
    source = RecordingSource(DXchangeRecording.open(path, lazy=True), **source_options)
    return make_hw(tmp_path / "detector", source=source)


def test_multi_rotation_recording_replays_in_order(RE, tmp_path):
    path = write_rotations(tmp_path / "three.h5")
    beam = beamline(tmp_path, path)
    docs = record(RE)
    RE(recorded_scan(*beam.plan_devices))
    start = docs[0][1]
    assert start["plan_name"] == "recorded_scan"
    tomo = start["tomo"]
    assert (tomo["num_angles"], tomo["angular_range"], tomo["rotations"]) == (8, [0.0, 360.0], 3)
    assert start["num_angles"] == 24 and start["num_dark_images"] == 2
    frames = stream_frames(docs)
    identity = frames["primary"][:, 0, 0].astype(int) - 1000  # the frame index it was recorded as
    np.testing.assert_array_equal(identity, np.arange(24))
    rec = DXchangeRecording.open(path)
    for stream, recorded in (("primary", rec.data), ("dark", rec.darks), ("flat", rec.flats)):
        np.testing.assert_array_equal(frames[stream], recorded)
    angles = [e["data"]["rot_stage"] for e in events_by_stream(docs)["primary"]]
    np.testing.assert_allclose(angles, rec.theta)
    assert docs[-1][1]["exit_status"] == "success"


def test_a_plan_with_the_recordings_angles_replays_in_order_too(RE, tmp_path):
    beam = beamline(tmp_path, write_rotations(tmp_path / "three.h5"))
    docs = record(RE)
    args = beam.plan_devices
    RE(tomo_continuous(*args, num_angles=8, rotations=3, angular_range=(0, 360), num_darks=1))
    second = len(docs)
    RE(
        tomo_continuous(
            *args, num_angles=8, rotations=2, angular_range=(0, 360), num_darks=0, num_flats=0
        )
    )
    first_run, second_run = stream_frames(docs[:second]), stream_frames(docs[second:])
    np.testing.assert_array_equal(first_run["primary"][:, 0, 0] - 1000, np.arange(24))
    # a new run starts from the first projection again (no darks or flats between)
    np.testing.assert_array_equal(second_run["primary"][:, 0, 0] - 1000, np.arange(16))


def test_a_plan_whose_angles_disagree_is_refused_before_the_run(RE, tmp_path):
    beam = beamline(tmp_path, write_rotations(tmp_path / "one.h5", rotations=1, per_rotation=12))
    docs = record(RE)
    args = beam.plan_devices
    with pytest.raises(ValueError) as refused:  # angular_range left at its (0, 180) default
        RE(tomo_scan(*args, num_angles=12))
    message = str(refused.value)
    assert "disagree" in message and "projection 1 is at 15 deg in the plan and 30 deg" in message
    assert "12 projections: 1 rotation(s) of 12 over 0-360 deg" in message
    assert "recorded_scan(" in message and "angular_range=(0.0, 360.0)" in message
    with pytest.raises(ValueError, match="asks for 24 projections"):
        RE(tomo_continuous(*args, num_angles=12, rotations=2, angular_range=(0, 360)))
    assert docs == []  # refused before any run opened


def test_nearest_angle_replay_refuses_a_multi_rotation_recording(tmp_path):
    rec = DXchangeRecording.open(write_rotations(tmp_path / "three.h5"))
    with pytest.raises(ConfigError) as refused:
        RecordingSource(rec, replay="nearest_angle")
    assert "has 3 rotations (24 projections, 8 per rotation)" in str(refused.value)
    assert "replay='in_order'" in str(refused.value)
    single = DXchangeRecording.open(write_rotations(tmp_path / "one.h5", rotations=1))
    assert RecordingSource(single, replay="nearest_angle").replay == "nearest_angle"


def test_the_tooth_scan_still_replays(RE, tmp_path, tooth_path):
    rec = DXchangeRecording.open(tooth_path)
    beam = beamline(tmp_path, tooth_path, center_of_rotation=295.0)
    docs = record(RE)
    RE(recorded_scan(*beam.plan_devices))
    tomo = docs[0][1]["tomo"]
    assert (tomo["num_angles"], tomo["angular_range"], tomo["rotations"]) == (181, [0, 180], 1)
    frames = stream_frames(docs)
    np.testing.assert_array_equal(frames["primary"], rec.data)
    np.testing.assert_array_equal(frames["flat"], rec.flats)


def test_slice_size_and_centre_set_the_published_slice(RE, tmp_path, tooth_path):
    """A 64-pixel slice 40 px right of and 20 px above the axis is that part of the full slice."""
    from bluesky_jit import JitCallback, JitConfig

    base = JitConfig(refresh_every=1000, slice_row=0, vertical_slices=False, train=False)
    slices = {}
    for name, config in {
        "full": base,
        "zoom": base.replace(slice_size=64, slice_center=(40.0, -20.0)),
    }.items():
        derived = []
        jit = JitCallback(
            config=config,
            emit=lambda n, d, out=derived: out.append((n, d)),
            directory=tmp_path / name,
        )
        token = RE.subscribe(jit)
        beam = beamline(tmp_path / name, tooth_path, center_of_rotation=295.0)
        RE(recorded_scan(*beam.plan_devices))
        RE.unsubscribe(token)
        assert jit.flush(timeout=120)
        jit.close()
        slices[name] = jit.summaries[0].last_slice
        descriptors = [d for n, d in derived if n == "descriptor"]
        images = [k for d in descriptors for k in d["data_keys"].values() if k["dtype"] == "array"]
        assert images and all(k["shape"] == [*slices[name].shape] for k in images)
    assert slices["full"].shape == (640, 640) and slices["zoom"].shape == (64, 64)
    # x along columns, y along rows: the full slice's pixel (i, j) is at (j - 319.5, i - 319.5)
    crop = slices["full"][268 : 268 + 64, 328 : 328 + 64]  # float32 sums: ~1 % apart
    np.testing.assert_allclose(slices["zoom"], crop, rtol=0, atol=0.02 * np.abs(crop).max())
    assert np.corrcoef(slices["zoom"].ravel(), crop.ravel())[0, 1] > 0.999


def test_demo_replays_a_recording_end_to_end(tmp_path, jit_catalog, tiny_toml, capsys):
    import json

    from bluesky_jit.apps.cli import EXIT_USAGE, main
    from bluesky_jit.catalog import runs_container

    path = write_rotations(tmp_path / "two.h5", rotations=2, per_rotation=16, shape=(4, 32))
    key = jit_catalog.base / "recording_key"
    key.write_text(jit_catalog.api_key)
    key.chmod(0o600)
    summary, figures = tmp_path / "summary.json", tmp_path / "figures"
    common = ["--catalog", jit_catalog.uri, "--api-key-file", str(key), "--no-progress"]
    code = main(
        ["demo", "--recording", str(path), *common, "--config", str(tiny_toml), "--no-pace",
         "--data-dir", str(jit_catalog.base / "recording"), "--summary", str(summary),
         "--figures", str(figures)]
    )  # fmt: skip
    result = json.loads(summary.read_text())
    assert code == 0, result
    assert result["exit_status"] == "success" and result["derived_in_catalog"]
    assert result["projections"] == 32 and result["frames"] == 32 + 2 + 3
    assert result["slices"] >= 1 and result["settings"]["recording"] == str(path)
    assert sorted(p.name for p in figures.iterdir()) == ["learning_curve.png", "slices.png"]
    assert "a recording has no ground truth" in capsys.readouterr().out
    raw = runs_container(jit_catalog.client(), "raw")[result["raw_uid"]]
    tomo = raw.metadata["start"]["tomo"]
    assert (tomo["num_angles"], tomo["rotations"], tomo["recording"]["replay"]) == (
        16,
        2,
        "in_order",
    )

    missing = tmp_path / "missing.h5"
    assert main(["demo", "--recording", str(missing), *common]) == EXIT_USAGE
    assert f"{str(missing)!r} does not exist" in capsys.readouterr().err
