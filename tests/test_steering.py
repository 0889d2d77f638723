"""Quality feedback as ophyd signals, and a plan that stops the scan once it is good enough."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bluesky_jit.errors import ConfigError
from bluesky_jit.steering import QualitySignals, good_enough, noise_levels, until_quality


@pytest.mark.parametrize(("k", "strategy"), [(2, "X:1"), (4, "X:1"), (4, "1:X")])
def test_noise_levels_recover_the_noise_of_synthetic_splits(k, strategy):
    rng = np.random.default_rng(0)
    s = 0.3  # noise std of one split's reconstruction
    n = 200_000
    clean = rng.uniform(size=n)
    splits = clean + s * rng.standard_normal((k, n))
    one, rest = splits[0], splits[1:].mean(axis=0)
    u, v = (rest, one) if strategy == "X:1" else (one, rest)
    oracle = clean  # a perfect denoiser
    quality = {
        "alpha": float(np.mean((oracle - v) ** 2) / np.mean((u - v) ** 2)),
        "mse_input": float(np.mean((u - v) ** 2)),
        "mse_output": float(np.mean((oracle - v) ** 2)),
    }
    levels = noise_levels(quality, splits=k, strategy=strategy)
    assert levels["sigma_split"] == pytest.approx(s, rel=0.01)
    assert levels["sigma_fbp"] == pytest.approx(s / math.sqrt(k), rel=0.01)
    assert levels["sigma_denoised"] < 0.05 * s  # an oracle leaves (almost) no error
    identity = dict(quality, mse_output=quality["mse_input"], alpha=1.0)
    left = noise_levels(identity, splits=k, strategy=strategy)["sigma_denoised"]
    expected_input_noise = s / math.sqrt(k - 1) if strategy == "X:1" else s
    assert left == pytest.approx(expected_input_noise, rel=0.02)  # no denoising: input noise


def test_quality_signals_publish_and_thresholds():
    quality = QualitySignals(name="jit_quality")
    assert math.isnan(quality.alpha.get())
    levels = quality.publish({"alpha": 0.55, "mse_input": 2.0, "mse_output": 1.1, "step": 7})
    assert quality.alpha.get() == 0.55 and quality.train_step.get() == 7
    # K = 2: s**2 = mse_input / 2 = 1, and the full reconstruction has half that variance
    assert quality.sigma_fbp.get() == pytest.approx(levels["sigma_fbp"]) == pytest.approx(0.5**0.5)
    assert "jit_quality_alpha" in quality.read()
    assert good_enough(0.55, alpha_below=0.6)
    assert not good_enough(math.nan, alpha_below=0.6)  # unknown never passes
    assert not good_enough(0.55, 0.2, alpha_below=0.6, sigma_below=0.1)
    with pytest.raises(ConfigError, match="threshold"):
        good_enough(0.5)


def run_steered(RE, hw, *, stop=True, on_good=None, alpha_below=0.6, **kwargs):
    """A tomo_continuous scan; a stand-in learning stage lowers alpha with every event."""
    from simulated_devices.plans import tomo_continuous

    quality = QualitySignals(name="jit_quality")
    docs = []

    def learner(name, doc):
        docs.append((name, doc))
        if name == "event" and doc["descriptor"] in primary:
            n = len([1 for nm, d in docs if nm == "event" and d["descriptor"] in primary])
            quality.publish({"alpha": 1.0 - 0.05 * n, "mse_input": 1.0, "mse_output": 0.6})

    primary = set()

    def descriptors(name, doc):
        if name == "descriptor" and doc["name"] == "primary":
            primary.add(doc["uid"])

    RE.subscribe(descriptors)
    RE.subscribe(learner)
    report = {}
    plan = tomo_continuous(
        *hw.plan_devices,
        num_angles=8,
        rotations=2,
        num_darks=1,
        num_flats=1,
        flats_at_end=True,
    )
    RE(
        until_quality(
            plan,
            quality,
            alpha_below=alpha_below,
            skip_motors=(hw.rot_stage,),
            stop=stop,
            on_good=on_good,
            report=report,
            **kwargs,
        )
    )
    return docs, report


@pytest.mark.timeout(60)
def test_plan_stops_the_scan_when_alpha_crosses_the_threshold(RE, hw):
    docs, report = run_steered(RE, hw)
    stop = next(d for n, d in docs if n == "stop")
    assert stop["exit_status"] == "success"
    # alpha = 1 - 0.05 n after n projections: 0.6 is reached after 8 of the 16 planned
    assert report["good_at"] == 8 and report["events"] == 8 and report["skipped"] == 8
    assert report["alpha"] == pytest.approx(0.6)
    assert stop["num_events"]["primary"] == 8
    assert stop["num_events"]["flat"] == 1  # the rest of the plan (flats at the end) ran
    angles = [
        d["data"][hw.rot_stage.name]
        for n, d in docs
        if n == "event" and hw.rot_stage.name in d["data"]
    ]
    assert len(angles) == 8 and max(angles) < 180  # 8 of 16 angles over two rotations


@pytest.mark.timeout(60)
def test_plan_adapts_instead_of_stopping(RE, hw):
    import bluesky.plan_stubs as bps

    calls = []

    def adapt():
        calls.append(1)
        yield from bps.null()

    docs, report = run_steered(RE, hw, stop=False, on_good=adapt, min_events=2)
    stop = next(d for n, d in docs if n == "stop")
    assert calls == [1]  # once
    assert stop["num_events"]["primary"] == 16 and report["events"] == 16
    assert report["good_at"] == 8 and report["skipped"] == 0


@pytest.mark.timeout(60)
def test_plan_runs_to_the_end_when_never_good_enough(RE, hw):
    docs, report = run_steered(RE, hw, alpha_below=0.1)
    stop = next(d for n, d in docs if n == "stop")
    assert stop["num_events"]["primary"] == 16 and report["good_at"] is None


def test_bad_plan_arguments():
    with pytest.raises(ConfigError, match="alpha_below"):
        list(until_quality(iter([]), QualitySignals(name="q"), alpha_below=None))
    with pytest.raises(ConfigError, match="min_events"):
        list(until_quality(iter([]), QualitySignals(name="q"), min_events=-1))
