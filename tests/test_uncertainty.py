"""The uncertainty map beside each denoised slice: the estimator, and the derived stream."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bluesky_jit.buffers import ReplayBuffer
from bluesky_jit.catalog import derived_runs_for, runs_container
from bluesky_jit.errors import ConfigError, ScanDataError
from bluesky_jit.evaluation import disc_mask
from bluesky_jit.models import build_model
from bluesky_jit.noise2inverse import UNCERTAINTY_SCALE, error_rms, inputs, uncertainty
from bluesky_jit.training import Trainer
from bluesky_jit.worker_process import JitProcess, tiled_writer
from simulated_devices.beamline import hw as make_hw

from .helpers import blobs
from .test_callbacks import CONFIG, SHAPE, run_scan, source

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "uncertainty.py"


@pytest.fixture(scope="module")
def bead_bed():
    """The benchmark's bead-bed phantom, small: 64 px, 90 angles, a U-Net after 300 steps."""
    import torch

    spec = importlib.util.spec_from_file_location("uncertainty_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    args = argparse.Namespace(steps=300, splits=2, size=64, rows=16, angles=90, fps=90.0)
    case = benchmark.denoise_case("bead_bed", 1000.0, args)
    torch.set_num_threads(before)
    return benchmark, case


def test_two_outputs_give_half_their_difference_unsmoothed_and_unscaled():
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=(2, 8, 9))
    sigma = uncertainty(outputs, "X:1", scale=1.0, smooth_px=0)
    assert sigma.shape == (8, 9) and sigma.dtype == np.float32
    np.testing.assert_allclose(sigma, np.abs(outputs[0] - outputs[1]) / 2, rtol=1e-6)
    assert np.all(uncertainty(outputs, "X:1") >= 0)


@pytest.mark.parametrize("k", [2, 4, 6])
@pytest.mark.parametrize("strategy", ["X:1", "1:X"])
def test_without_a_network_it_is_the_noise_of_the_mean_for_any_k(k, strategy):
    """Identity 'network' on K noisy splits: sigma**2 is the variance of their mean, s**2 / K,
    also for X:1, whose inputs are correlated (each the mean of K - 1 splits)."""
    rng = np.random.default_rng(k)
    s = 0.5
    splits = 1.0 + s * rng.standard_normal((k, 256, 256))
    sigma = uncertainty(inputs(splits, strategy), strategy, scale=1.0)
    assert np.mean(sigma**2) == pytest.approx(s**2 / k, rel=0.1)
    error = np.abs(splits.mean(axis=0) - 1.0)
    assert np.mean(error <= 2 * sigma) == pytest.approx(0.95, abs=0.02)


def test_larger_where_the_noise_is_larger_and_scaled():
    rng = np.random.default_rng(1)
    level = np.where(np.arange(64) < 32, 0.1, 1.0)[None, :] * np.ones((64, 1))
    outputs = level * rng.standard_normal((2, 64, 64))
    sigma = uncertainty(outputs, "X:1", scale=1.0)
    assert sigma[:, 40:].mean() > 5 * sigma[:, :24].mean()
    np.testing.assert_allclose(uncertainty(outputs, "X:1", scale=3.0), 3 * sigma, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["X:1", "1:X"])
def test_the_error_is_estimated_from_the_left_out_splits_without_truth(strategy):
    """A 'network' that keeps half of its input's noise and blurs a step: error_rms finds the
    RMS error against the truth from the splits alone, and the map takes that size."""
    rng = np.random.default_rng(4)
    truth = np.where(np.arange(96) < 48, 1.0, 2.0) * np.ones((96, 1))
    splits = truth + 0.3 * rng.standard_normal((4, 96, 96))
    fed = inputs(splits, strategy)
    bias = 0.05 * np.sin(np.arange(96) / 5.0)
    outputs = truth + 0.5 * (fed - truth) + bias
    true_rms = np.sqrt(np.mean((outputs - truth)[:, disc_mask(96)] ** 2))
    assert error_rms(fed, outputs, strategy) == pytest.approx(true_rms, rel=0.05)
    sigma = uncertainty(outputs, strategy, inputs=fed, scale=1.0)
    assert np.sqrt(np.mean(sigma.astype(float) ** 2)) == pytest.approx(true_rms, rel=0.05)
    shape = uncertainty(outputs, strategy, scale=1.0)  # without inputs: the spread alone
    np.testing.assert_allclose(sigma / shape, sigma[0, 0] / shape[0, 0], rtol=1e-4)
    alone = uncertainty(outputs, strategy)
    np.testing.assert_allclose(alone, UNCERTAINTY_SCALE * shape, rtol=1e-6)
    agreeing = np.broadcast_to(outputs.mean(axis=0), outputs.shape)  # no spread at all
    flat = uncertainty(agreeing, strategy, inputs=fed, scale=1.0)
    np.testing.assert_allclose(flat, error_rms(fed, agreeing, strategy), rtol=1e-6)


def test_bad_outputs_and_too_few_splits():
    assert uncertainty(np.zeros((1, 4, 4)), "X:1") is None  # one output: no spread
    with pytest.raises(ScanDataError, match=r"shape \(K, H, W\)"):
        uncertainty(np.zeros((4, 4)), "X:1")
    with pytest.raises(ConfigError, match="strategy"):
        uncertainty(np.zeros((2, 4, 4)), "2:2")


def test_uncertainty_stream_in_the_derived_run_in_the_catalog(RE, local_catalog, data_dir):
    """A real scan (the worker in its child process, as the README wires it): the derived
    run read back from Tiled has one uncertainty map per denoised slice, finite,
    non-negative, in 1/mm, at the denoised slices' indices; the summary has the last one.
    A warm start (a network after one step on blobs) denoises from the first slice on."""
    rng = np.random.default_rng(0)
    pairs = [blobs(rng, 16, 16)[:, None].astype(np.float32) for _ in range(2)]
    buffer = ReplayBuffer(16, rng=rng)
    buffer.push(*pairs)
    warm = Trainer(build_model(CONFIG.training.model, seed=0), buffer, batch_size=8)
    warm.step()
    derived_runs = runs_container(local_catalog.client(), "derived")
    writer = tiled_writer(derived_runs, spool_dir=data_dir / "spool")
    config = CONFIG.replace(warm_start=str(warm.save(data_dir / "warm.pt")))
    jit = JitProcess(config=config, emit=writer, directory=data_dir / "derived")
    uid, _ = run_scan(RE, jit, make_hw(data_dir / "raw", source=source(), frame_rate=20.0))
    assert writer.flush(timeout=60)
    summary = jit.summaries[0]
    assert summary.problems == [] and summary.denoised == summary.slices > 0

    (run,) = derived_runs_for(derived_runs, uid)
    sigma = run["uncertainty"]["uncertainty"].read()
    assert sigma.shape == (summary.denoised, SHAPE[1], SHAPE[1])
    assert np.all(np.isfinite(sigma)) and np.all(sigma >= 0) and sigma.max() > 0
    np.testing.assert_allclose(sigma[-1], summary.last_uncertainty, rtol=1e-6)
    np.testing.assert_array_equal(summary.images["uncertainty"], summary.last_uncertainty)
    denoised, table = run["denoised"].read(), run["uncertainty"].read()
    np.testing.assert_array_equal(table["projection_index"], denoised["projection_index"])
    assert run["uncertainty"].metadata["data_keys"]["uncertainty"]["units"] == "1/mm"


def test_on_a_phantom_it_is_larger_where_the_error_is_larger(bead_bed):
    """Against the truth: sigma ranks the error, and 2 sigma covers most pixels."""
    benchmark, case = bead_bed
    mask = case["mask"]
    sigma = uncertainty(case["outputs"], "X:1", inputs=case["inputs"])[mask]
    error = np.abs(case["outputs"].mean(axis=0) - case["truth"])[mask]
    rated = benchmark.rate(sigma, error, 1.0)
    assert rated["spearman"] > 0.15  # measured 0.29
    assert rated["mean_error_top_decile"] > 1.5 * rated["mean_error_bottom_decile"]  # 2.4x
    assert 0.8 < rated["coverage_2sigma"] < 0.995  # 0.88 (not a case it was fitted on)
