"""Tests of simulated_devices: analytic phantom, sources, devices and plans on a real RunEngine."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlparse

import event_model
import h5py
import numpy as np
import pytest
from bluesky import plans as bp

from bluesky_jit.errors import ConfigError
from simulated_devices.acquisition import FrameClock
from simulated_devices.beamline import hw as make_hw
from simulated_devices.phantoms import BubbleColumn, sphere_chord
from simulated_devices.plans import (
    TOMO_KEYS,
    dark_flat_run,
    scan_angles,
    tomo_continuous,
    tomo_scan,
)
from simulated_devices.recordings import DXchangeRecording, write_dxchange
from simulated_devices.sources import PhantomSource, RecordingSource

SMALL = dict(detector_shape=(8, 64), seed=3, container_center=(4.0, -2.5))


@pytest.fixture(scope="module")
def column() -> BubbleColumn:
    """An off-centre column, so that flips and transposes of the geometry show."""
    return BubbleColumn(detector_shape=(16, 96), seed=1, container_center=(6.0, -4.0))


def record(RE):
    """Subscribe a list to RE; returns the list of (name, doc)."""
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    return docs


def validate_all(docs):
    for name, doc in docs:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)


def events_by_stream(docs):
    names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    out = defaultdict(list)
    for n, d in docs:
        if n == "event":
            out[names[d["descriptor"]]].append(d)
    return out


def stream_frames(docs):
    """Frames per stream: h5py on the StreamResource uri/dataset, sliced by StreamDatum."""
    names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    resources = {d["uid"]: d for n, d in docs if n == "stream_resource"}
    frames = defaultdict(list)
    for n, d in docs:
        if n != "stream_datum":
            continue
        res = resources[d["stream_resource"]]
        with h5py.File(urlparse(res["uri"]).path, "r", swmr=True) as f:
            ds = f[res["parameters"]["dataset"]]
            frames[names[d["descriptor"]]].append(ds[d["indices"]["start"] : d["indices"]["stop"]])
    return {k: np.concatenate(v) for k, v in frames.items()}


# ---------------------------------------------------------------------------- phantom
def test_sphere_and_container_projections_match_chord_formulas():
    kw = dict(detector_shape=(12, 64), seed=5, bed_fraction=0.0)
    empty = BubbleColumn(n_bubbles=0, **kw)
    one = BubbleColumn(n_bubbles=1, **kw)
    t, angle = 0.7, 33.0
    x, y, z, r = one.bubbles(t)[0]
    th = np.radians(angle)
    cols = np.arange(64)
    rows = np.arange(12)
    du = (cols - one.center_of_rotation) * one.pixel_size - (x * np.cos(th) + y * np.sin(th))
    dz = np.array([one.row_z(row) for row in rows]) - z
    chord = sphere_chord(r, np.sqrt(dz[:, None] ** 2 + du[None, :] ** 2))
    diff = one.project(angle, t) - empty.project(angle, t)
    assert chord.max() > 0
    np.testing.assert_allclose(diff, -one.mu_liquid * chord, atol=1e-12)
    # Container on the axis: 2 (mu_wall wall + mu_liquid r_in); its peak is max_attenuation.
    p = empty.project(0.0, 0.0)[0]
    centre = np.interp(empty.center_of_rotation, cols, p)
    expected = 2 * (empty.mu_wall * empty.wall_thickness + empty.mu_liquid * empty.inner_radius)
    assert centre == pytest.approx(expected, rel=1e-3)
    assert p.max() == pytest.approx(empty.max_attenuation, rel=0.02)
    assert 1.5 <= empty.max_attenuation <= 2.5


def test_projection_conserves_mass_over_angles(column):
    t, px = 1.3, column.pixel_size
    sino = np.stack([column.project(a, t) for a in np.linspace(0.0, 360.0, 9)])
    row_mass = sino.sum(axis=2) * px  # (angle, row): integral of mu over the slice
    # pixel-centre sampling of the sharp column edges leaves ~0.2 % wobble
    assert (np.ptp(row_mass, axis=0) / row_mass.mean(axis=0)).max() < 5e-3
    for row in (2, 13):
        area = column.truth(t, row).sum() * px**2
        assert row_mass[:, row].mean() == pytest.approx(area, rel=5e-3)


@pytest.mark.parametrize("row", [3, 14])  # bubbles, bed
def test_truth_sums_match_projections_at_0_and_90_deg(column, row):
    t = 0.4
    img = column.truth(t, row)
    px = column.pixel_size
    p0, p90, p180 = (column.project(a, t)[row] for a in (0.0, 90.0, 180.0))
    err0 = np.abs(img.sum(axis=0) * px - p0).max() / p0.max()
    err90 = np.abs(img.sum(axis=1) * px - p90).max() / p90.max()
    assert err0 < 0.05
    assert err90 < 0.05
    # the test can fail: a mirrored convention would match 180 deg instead
    assert np.abs(img.sum(axis=0) * px - p180).max() / p0.max() > 4 * err0


def test_bubbles_move_and_phantom_is_deterministic(column):
    row = 4
    assert np.abs(column.truth(0.0, row) - column.truth(5.0, row)).max() > 0.5 * column.mu_liquid
    z0, z1 = column.bubbles(0.0)[:, 2], column.bubbles(0.1)[:, 2]
    rising = z1 < z0  # toward row 0, except the ones that recycle to the bed
    assert rising.mean() > 0.7
    same = BubbleColumn(detector_shape=(16, 96), seed=1, container_center=(6.0, -4.0))
    np.testing.assert_array_equal(same.project(20.0, 2.0), column.project(20.0, 2.0))
    other = BubbleColumn(detector_shape=(16, 96), seed=2, container_center=(6.0, -4.0))
    assert not np.array_equal(other.project(20.0, 2.0), column.project(20.0, 2.0))
    desc = json.loads(json.dumps(column.describe()))
    rebuilt = BubbleColumn.from_description(desc)
    np.testing.assert_array_equal(rebuilt.project(20.0, 2.0), column.project(20.0, 2.0))


def test_phantom_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="bed_fraction"):
        BubbleColumn(detector_shape=(8, 32), bed_fraction=1.5)
    with pytest.raises(ValueError, match="center_of_rotation"):
        BubbleColumn(detector_shape=(8, 32), center_of_rotation=40.0)
    with pytest.raises(ConfigError, match="type"):
        BubbleColumn.from_description({"type": "Sphere"})


# ---------------------------------------------------------------------------- sources
def test_phantom_source_poisson_statistics():
    src = PhantomSource(
        BubbleColumn(detector_shape=(16, 128), bed_fraction=0.0, n_bubbles=0),
        photons=400,
        dark_level=50,
        read_noise=3.0,
    )
    rng = np.random.default_rng(0)
    kw = dict(angle_deg=0.0, t=0.0, index=0, rng=rng)
    flats = np.stack([src.frame(shutter_open=True, sample_in=False, **kw) for _ in range(20)])
    darks = np.stack([src.frame(shutter_open=False, sample_in=True, **kw) for _ in range(20)])
    assert flats.dtype == np.uint16
    signal = flats.astype(float) - 50
    assert signal.mean() == pytest.approx(400, rel=0.01)
    assert flats.astype(float).var() == pytest.approx(400 + 9, rel=0.1)
    assert darks.mean() == pytest.approx(50, abs=0.1)
    assert darks.astype(float).std() == pytest.approx(3.0, rel=0.1)
    proj = np.stack([src.frame(shutter_open=True, sample_in=True, **kw) for _ in range(20)])
    p = -np.log((proj.mean(axis=0) - 50) / 400)
    assert np.abs(p - src.phantom.project(0.0, 0.0)).mean() < 0.02


def test_phantom_source_overflow_is_a_config_error():
    with pytest.raises(ConfigError, match="overflow uint16"):
        PhantomSource(BubbleColumn(detector_shape=(8, 32)), photons=65000, dark_level=1000)
    PhantomSource(BubbleColumn(detector_shape=(8, 32)), photons=65000, dtype=np.float32)


def test_dxchange_round_trip_and_recording_source(tmp_path, tooth_path):
    rec = DXchangeRecording.open(tooth_path)
    assert rec.data.shape == (181, 2, 640)
    src = RecordingSource(rec, center_of_rotation=295.0, replay="nearest_angle")
    rng = np.random.default_rng(0)
    for k in (0, 37, 180):
        frame = src.frame(
            angle_deg=rec.theta[k], t=0.0, index=k, shutter_open=True, sample_in=True, rng=rng
        )
        np.testing.assert_array_equal(frame, rec.data[k])
    for k in range(13):  # darks in recorded order, cycling
        dark = src.frame(angle_deg=0, t=0, index=k, shutter_open=False, sample_in=True, rng=rng)
    np.testing.assert_array_equal(dark, rec.darks[12 % 10])
    # beyond 180 deg: the mirror image about the rotation axis
    k, mirrored = src.nearest(rec.theta[40] + 180.0)
    assert (k, mirrored) == (40, True)
    mir = src.frame(
        angle_deg=rec.theta[40] + 180.0, t=0, index=0, shutter_open=True, sample_in=True, rng=rng
    )
    assert mir.dtype == rec.data.dtype
    assert not np.allclose(mir, rec.data[40])
    assert src.metadata()["center_of_rotation"] == 295.0

    path = write_dxchange(
        tmp_path / "small.h5",
        data=rec.data[:5],
        flats=rec.flats[:2],
        darks=rec.darks[:2],
        theta=rec.theta[:5],
        sample_name="tooth",
    )
    back = DXchangeRecording.open(path)
    np.testing.assert_array_equal(back.data, rec.data[:5])
    np.testing.assert_array_equal(back.theta, rec.theta[:5])
    assert back.sample_name == "tooth"
    with pytest.raises(ValueError, match="one angle per projection"):
        write_dxchange(
            tmp_path / "bad.h5", data=rec.data[:5], flats=rec.flats, darks=rec.darks, theta=[0.0]
        )


# ---------------------------------------------------------------------------- devices + plans
def test_tomo_scan_with_ophyd_async_detector(RE, tmp_path):
    source = PhantomSource(BubbleColumn(**SMALL), photons=20000, dark_level=100)
    beam = make_hw(tmp_path, source=source, frame_rate=20.0)
    docs = record(RE)
    (uid,) = RE(
        tomo_scan(
            *beam.plan_devices,
            num_angles=6,
            num_darks=2,
            num_flats=3,
        )
    )
    validate_all(docs)
    counts = Counter(n for n, _ in docs)
    assert counts["stream_resource"] == 3  # one file per stream
    start = docs[0][1]
    assert start["uid"] == uid
    assert start["plan_name"] == "tomo_scan"
    assert (start["num_angles"], start["num_dark_images"], start["num_bkg_images"]) == (6, 2, 3)
    assert start["detectors"] == ["det"] and start["motors"] == ["rot_stage"]
    tomo = start["tomo"]
    assert set(TOMO_KEYS) <= set(tomo)
    assert tomo["detector_shape"] == [8, 64]
    assert tomo["angular_range"] == [0.0, 180.0]
    assert (tomo["num_angles"], tomo["rotations"], tomo["role"]) == (6, 1, "scan")
    assert (tomo["angle_key"], tomo["detector_key"], tomo["frame_rate"]) == (
        "rot_stage",
        "det",
        20.0,
    )
    assert tomo["phantom"]["type"] == "BubbleColumn"
    assert tomo["phantom"]["noise"]["photons"] == 20000

    events = events_by_stream(docs)
    assert {k: len(v) for k, v in events.items()} == {"dark": 2, "flat": 3, "primary": 6}
    angles = [e["data"]["rot_stage"] for e in events["primary"]]
    np.testing.assert_allclose(angles, scan_angles(num_angles=6))
    order = [e["data"]["det-frame_index"] for s in ("dark", "flat", "primary") for e in events[s]]
    assert order == list(range(11))

    frames = stream_frames(docs)
    assert {k: v.shape for k, v in frames.items()} == {
        "dark": (2, 8, 64),
        "flat": (3, 8, 64),
        "primary": (6, 8, 64),
    }
    for res in (d for n, d in docs if n == "stream_resource"):
        with h5py.File(urlparse(res["uri"]).path, "r") as f:  # exactly the frames, no more
            assert f[res["parameters"]["dataset"]].shape[0] in (2, 3, 6)
    dark = frames["dark"].mean(axis=0)
    flat = frames["flat"].mean(axis=0)
    assert dark.mean() == pytest.approx(100, abs=1) and flat.mean() > 100 * dark.mean()
    # each projection is the phantom at the stage angle and the frame's virtual time
    for ev, frame in zip(events["primary"], frames["primary"], strict=True):
        t = ev["data"]["det-sim_time"]
        assert t == pytest.approx(ev["data"]["det-frame_index"] / 20.0)
        p = -np.log(np.clip(frame - dark, 1, None) / (flat - dark))
        angle = ev["data"]["rot_stage"]
        err = np.abs(p - source.phantom.project(angle, t)).mean()
        wrong = np.abs(p - source.phantom.project(angle + 90.0, t)).mean()
        assert err < 0.03 and err < wrong / 3


def test_dark_flat_run_then_scan_and_continuous(RE, hw):
    docs = record(RE)
    (flat_uid,) = RE(dark_flat_run(hw.det, hw.shutter, hw.sample_stage, num_darks=2, num_flats=2))
    (scan_uid,) = RE(
        tomo_continuous(
            *hw.plan_devices,
            num_angles=3,
            rotations=2,
            dark_flat_uid=flat_uid,
        )
    )
    validate_all(docs)
    starts = [d for n, d in docs if n == "start"]
    assert [s["uid"] for s in starts] == [flat_uid, scan_uid]
    assert starts[0]["tomo"]["role"] == "dark_flat"
    assert starts[0]["tomo"]["num_angles"] == 0
    tomo = starts[1]["tomo"]
    assert (tomo["role"], tomo["dark_flat_uid"], tomo["rotations"]) == ("scan", flat_uid, 2)
    assert starts[1]["num_dark_images"] == starts[1]["num_bkg_images"] == 0
    assert starts[1]["sample"] == "bubble_column"
    split = next(i for i, (n, d) in enumerate(docs) if n == "start" and d["uid"] == scan_uid)
    first, second = events_by_stream(docs[:split]), events_by_stream(docs[split:])
    assert {k: len(v) for k, v in first.items()} == {"dark": 2, "flat": 2}
    assert set(second) == {"primary"}
    angles = [e["data"]["rot_stage"] for e in second["primary"]]
    np.testing.assert_allclose(angles, [0, 60, 120, 180, 240, 300])
    frames = stream_frames(docs[:split])
    assert frames["dark"].mean() < frames["flat"].mean() / 5


def test_recording_source_replays_through_a_scan(RE, tmp_path, tooth_path):
    rec = DXchangeRecording.open(tooth_path)
    source = RecordingSource(rec, center_of_rotation=295.0, replay="nearest_angle")
    beam = make_hw(tmp_path, source=source)
    docs = record(RE)
    args = beam.plan_devices
    RE(tomo_scan(*args, num_angles=4, num_darks=1, num_flats=1))
    start = docs[0][1]
    assert start["sample"] and start["tomo"]["center_of_rotation"] == 295.0
    frames = stream_frames(docs)["primary"]
    assert frames.dtype == np.float32
    for angle, frame in zip(scan_angles(num_angles=4), frames, strict=True):
        k = int(np.argmin(np.abs(rec.theta - angle)))
        np.testing.assert_array_equal(frame, rec.data[k])


def test_v1_detector_external_files_and_inline(RE, tmp_path):
    docs = record(RE)
    beam = make_hw(tmp_path / "ext", api="v1")
    args = beam.plan_devices
    RE(tomo_scan(*args, num_angles=3, num_darks=1, num_flats=2))
    validate_all(docs)
    resources = [d for n, d in docs if n == "resource"]
    datums = {d["datum_id"]: d for n, d in docs if n == "datum"}
    assert len(resources) == 3 and len(datums) == 6
    assert {r["spec"] for r in resources} == {"AD_HDF5"}
    assert all(r["resource_kwargs"] == {"frame_per_point": 1} for r in resources)
    events = events_by_stream(docs)
    primary = events["primary"]
    np.testing.assert_allclose([e["data"]["rot_stage"] for e in primary], [0, 60, 120])
    desc = next(d for n, d in docs if n == "descriptor" and d["name"] == "primary")
    assert desc["data_keys"]["det"]["shape"] == [1, 16, 128]
    assert desc["data_keys"]["det"]["external"] == "FILESTORE:"
    res = {r["uid"]: r for r in resources}
    for i, ev in enumerate(primary):
        datum = datums[ev["data"]["det"]]
        assert datum["datum_kwargs"] == {"point_number": i}
        r = res[datum["resource"]]
        with h5py.File(Path(r["root"]) / r["resource_path"], "r", swmr=True) as f:
            assert f["/entry/data/data"].shape == (3, 16, 128)

    docs.clear()
    inline = make_hw(tmp_path / "inline", api="v1", external=False)
    RE(bp.count([inline.det], num=2))
    validate_all(docs)
    assert not [n for n, _ in docs if n in ("resource", "datum")]
    frames = [d["data"]["det"] for n, d in docs if n == "event"]
    assert len(frames) == 2 and all(f.shape == (16, 128) for f in frames)
    assert frames[0].dtype == np.uint16


def test_pacing_holds_the_frame_rate_without_changing_virtual_time(RE, tmp_path):
    source = PhantomSource(BubbleColumn(**SMALL), photons=100)
    times = {}
    # 10 Hz: a paced frame waits 100 ms, far longer than a frame takes on a loaded machine
    for paced in (False, True):
        beam = make_hw(tmp_path / str(paced), source=source, frame_rate=10.0, paced=paced)
        docs = record(RE)
        t0 = time.perf_counter()
        RE(bp.count([beam.det], num=10))
        times[paced] = time.perf_counter() - t0
        sim = [d["data"]["det-sim_time"] for n, d in docs if n == "event"]
        np.testing.assert_allclose(sim, np.arange(10) / 10.0)
    assert times[True] >= 0.9
    assert times[False] < times[True]


def test_frame_clock_reanchors_when_late():
    clock = FrameClock(frame_rate=10.0, paced=True)
    assert clock.wait_time(now=100.0) == 0.0  # anchors
    clock.tick()
    assert clock.wait_time(now=100.03) == pytest.approx(0.07)
    clock.tick()
    assert clock.wait_time(now=100.25) == 0.0  # 0.05 s late: catch up, keep schedule
    clock.tick()
    assert clock.wait_time(now=100.31) == 0.0
    clock.tick()
    assert clock.wait_time(now=200.0) == 0.0  # far behind: new anchor, no burst
    clock.tick()
    assert clock.wait_time(now=200.02) == pytest.approx(0.08)
    with pytest.raises(ConfigError, match="frame_rate"):
        FrameClock(paced=True)


def test_hw_rejects_inline_frames_for_ophyd_async(RE, tmp_path):
    with pytest.raises(ConfigError, match="api='v1'"):
        make_hw(tmp_path, external=False)


def test_source_error_surfaces_at_once_not_as_a_timeout(RE, tmp_path):
    from bluesky.utils import FailedStatus

    from bluesky_jit.errors import ScanDataError

    class Broken(PhantomSource):
        def frame(self, **kwargs):
            raise ScanDataError("broken source")

    beam = make_hw(tmp_path, source=Broken(BubbleColumn(**SMALL)))
    t0 = time.perf_counter()
    with pytest.raises(FailedStatus, match="broken source"):
        RE(bp.count([beam.det]))
    assert time.perf_counter() - t0 < 5.0  # the exposure timeout would be 10 s


def test_detectors_refuse_devices_of_the_other_api(tmp_path):
    from simulated_devices.detector_v1 import TomoDetectorV1
    from simulated_devices.motion import make_rot_stage

    source = PhantomSource(BubbleColumn(**SMALL))
    with pytest.raises(ConfigError, match="ophyd v1"):
        TomoDetectorV1(source=source, save_path=tmp_path, rot_stage=make_rot_stage(api="async"))
