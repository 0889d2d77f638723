"""The supervised training target (TomoGAN-style): the window's FBP in, a SIRT over more
projections as target; on arrays, live into the catalog, and its bad settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bluesky_jit.callbacks import JitCallback
from bluesky_jit.catalog import derived_runs_for, runs_container
from bluesky_jit.config import JitConfig
from bluesky_jit.errors import ConfigError
from bluesky_jit.evaluation import disc_mask, psnr
from bluesky_jit.geometry import ScanGeometry
from bluesky_jit.pairs import PairMaker, SamplingRegion
from bluesky_jit.pipeline import RunPipeline
from bluesky_jit.reconstruction.streaming import StreamingReconstructor
from bluesky_jit.worker_process import tiled_writer
from simulated_devices.beamline import hw as make_hw
from simulated_devices.cone import Ball, ball_truth, parallel_projections

from .test_callbacks import CONFIG, Collector, run_scan, source

BALLS = (Ball(3, -2, 0, 8, 0.02), Ball(-5, 4, 0, 4, 0.05), Ball(0, 0, 0, 13, 0.01))
N, ANGLES, PATCH = 48, 32, 16


def noisy_scan(rotations: int, photons: float = 300.0):
    """A reconstructor fed ``rotations`` half turns of Poisson-noisy balls (3 x 48 detector)."""
    geometry = ScanGeometry(detector_shape=(3, N), num_angles=ANGLES)
    rec = StreamingReconstructor(geometry, refresh_every=8, vertical_slices=False)
    rec.set_flatfield(np.zeros((1, 3, N)), np.full((1, 3, N), photons))
    pairs = PairMaker.from_reconstructor(
        rec,
        target="supervised",
        target_windows=2,
        target_iterations=100,
        patch_size=PATCH,
        neighbourhood_rows=1,
        rng=np.random.default_rng(0),
    )
    deg = np.arange(rotations * ANGLES) * 180.0 / ANGLES
    proj = parallel_projections(BALLS, np.radians(deg), detector_shape=(3, N))
    rng = np.random.default_rng(1)
    ready = []
    for i, angle in enumerate(deg):
        ready.append(pairs.ready)
        frame = rng.poisson(photons * np.exp(-proj[i])).astype(float)
        rec.add_frame(frame, angle_deg=angle, index=i)
    return rec, pairs, ready


def test_the_sirt_target_is_closer_to_the_truth_and_pairs_are_cut_from_it():
    rec, pairs, ready = noisy_scan(rotations=2)
    # pairs wait for target_windows windows of line integrals, then come at once
    assert not any(ready) and pairs.ready
    fbp = rec.reconstruct()
    target = rec.sirt_slice(rec.buffer.last(2 * ANGLES), fbp.row, iterations=100)
    truth = ball_truth(BALLS, fbp.slice.points())
    mask = disc_mask(N, 0.9)
    assert psnr(target, truth, mask) > psnr(fbp.full, truth, mask) + 2.0

    # patches at the slice centre: the input is the window's FBP, the target the SIRT, there
    voxel = rec.geometry.voxel_size
    pairs.set_region(SamplingRegion.disc((PATCH / 2 * math.sqrt(2) + 0.1) * voxel))
    u, v = pairs.pairs(6)
    assert u.shape == v.shape == (6, 1, PATCH, PATCH)
    cut = slice((N - PATCH) // 2, (N + PATCH) // 2)
    for k in range(6):
        errors = []
        for row in range(3):  # the slice row and its neighbours
            full = rec.reconstruct(row).full[cut, cut]
            sirt = rec.sirt_slice(rec.buffer.last(2 * ANGLES), row, iterations=100)[cut, cut]
            errors.append(max(np.abs(u[k, 0] - full).max(), np.abs(v[k, 0] - sirt).max()))
        assert min(errors) < 1e-5
    # inference denoises the window's FBP: one input, no Noise2Inverse splits
    inputs, window = pairs.inference_inputs(refresh=fbp)
    assert inputs.shape == (1, N, N) and np.array_equal(window, fbp.indices)
    np.testing.assert_allclose(inputs[0], fbp.full)


def test_a_supervised_scan_ends_success_with_denoised_slices_in_the_catalog(
    RE, local_catalog, data_dir
):
    config = CONFIG.replace(target="supervised", target_iterations=50)
    derived_runs = runs_container(local_catalog.client(), "derived")
    writer = tiled_writer(derived_runs, spool_dir=data_dir / "spool")
    derived = Collector(writer)
    jit = JitCallback(config=config, emit=derived, directory=data_dir / "derived")
    beamline = make_hw(data_dir / "raw", source=source(), frame_rate=20.0, paced=True)
    uid, _ = run_scan(RE, jit, beamline, rotations=8)  # pairs wait for two rotations
    assert writer.flush(timeout=60)
    summary = jit.summaries[0]
    assert summary.exit_status == "success", summary.reason
    assert summary.train_steps > 0 and summary.denoised > 0

    start = derived.named("start")[0]
    assert start["config"]["pairs"]["target"] == "supervised"
    assert start["target"] == {"kind": "supervised", "windows": 2, "iterations": 50}
    assert start["noise2inverse"] is None  # no splits: nothing of Noise2Inverse to record
    metrics = [e["data"] for e in derived.named("event") if "alpha" in e["data"]]
    # alpha rates the network against the SIRT target; the split-noise estimates do not apply
    assert any(math.isfinite(m["alpha"]) for m in metrics)
    assert all(math.isnan(m["sigma_fbp"]) and math.isnan(m["sigma_denoised"]) for m in metrics)

    (run,) = derived_runs_for(derived_runs, uid)
    denoised = run["denoised"]["denoised"].read()
    assert denoised.shape == (summary.denoised, *summary.last_slice.shape)
    np.testing.assert_allclose(denoised[-1], summary.last_denoised, rtol=1e-5, atol=1e-6)
    # one network output: no spread, so no uncertainty stream
    assert "uncertainty" not in {d["name"] for d in derived.named("descriptor")}


def test_bad_supervised_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="target_windows must be a positive integer; got 0"):
        JitConfig(target="supervised", target_windows=0)
    with pytest.raises(ConfigError, match="target_iterations must be a positive integer"):
        JitConfig(target_iterations=-5)
    with pytest.raises(ConfigError, match="Unknown training target 'gan'"):
        JitConfig(target="gan")
    with pytest.raises(ConfigError, match='target="supervised" trains on single slices'):
        JitConfig.for_variant("Z3", target="supervised")
    with pytest.raises(ConfigError, match="needs a reconstructor"):
        PairMaker(
            np.zeros(0),
            lambda *a: None,
            window=8,
            rows=1,
            pixel_size=1.0,
            row=0,
            target="supervised",
        )
    # cone beam: SIRT here is parallel beam only; the derived run fails and says so
    cone = ScanGeometry(
        detector_shape=(8, 32),
        num_angles=16,
        beam="cone",
        angular_range=(0.0, 360.0),
        source_origin=100.0,
        origin_detector=50.0,
    )
    pipeline = RunPipeline(
        config=JitConfig(target="supervised"), emit=None, directory=tmp_path, beside_scan=False
    )
    pipeline.begin({"uid": "cone-run"}, cone)
    pipeline.end({"exit_status": "success"})
    assert pipeline.summary.exit_status == "fail"
    assert 'target="supervised"' in pipeline.summary.reason
    assert "parallel beam" in pipeline.summary.reason
