"""The dynamic phantoms beyond the bubble column: SinteringGrains and PorousFlow."""

import json

import numpy as np
import pytest
import torch

from bluesky_jit.errors import ConfigError
from bluesky_jit.projections import RampFilter
from bluesky_jit.reconstruction import TorchBackprojector, slice_grid
from simulated_devices.phantoms import BubbleColumn, PorousFlow, SinteringGrains
from simulated_devices.sources import PhantomSource

SHAPE = (12, 96)
ROW = 6
KINDS = [SinteringGrains, PorousFlow]


def fbp(phantom, t, n_angles=180):
    """FBP of the phantom frozen at time `t` (a static-in-time window), product code."""
    angles = np.linspace(0.0, np.pi, n_angles, endpoint=False)
    sino = np.stack([phantom.project(np.degrees(a), t)[ROW] for a in angles])
    q = RampFilter(sino.shape[1])(torch.tensor(sino, dtype=torch.float32))
    x, y = slice_grid(SHAPE[1])
    bp = TorchBackprojector(cols=SHAPE[1], center_of_rotation=phantom.center_of_rotation)
    return bp.backproject(q, torch.tensor(angles), x, y).numpy()


def correlation(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_truth_changes_over_time(kind):
    phantom = kind(detector_shape=SHAPE, seed=3)
    early, late = phantom.truth(0.0, ROW), phantom.truth(40.0, ROW)
    changed = np.abs(late - early) > 0.5 * phantom.mu_liquid
    assert changed.mean() > 0.01  # more than 1 % of the slice changed by half the liquid's mu
    projections = [phantom.project(30.0, t)[ROW] for t in (0.0, 40.0)]
    assert not np.allclose(*projections)


@pytest.mark.parametrize("kind", KINDS)
def test_reconstruction_of_a_static_window_matches_the_truth(kind):
    phantom = kind(detector_shape=SHAPE, seed=3)
    t = 25.0
    truth, other = phantom.truth(t, ROW), phantom.truth(t + 15.0, ROW)
    image = fbp(phantom, t)
    assert correlation(image, truth) > 0.95
    # the grains' and the front's details are of this moment, not of another
    assert correlation(image - other, truth - other) > 0.5
    # the line integrals are those of the truth image (module convention)
    assert np.allclose(truth.sum(axis=0), phantom.project(0.0, t)[ROW], rtol=0.05, atol=0.05)


def test_grains_grow_until_they_touch_or_shrink_away():
    pack = SinteringGrains(detector_shape=SHAPE, seed=1, growth_time=10.0)
    r0, r1 = pack.radii(0.0), pack.radii(1e6)
    assert (r1 == 0).mean() == pytest.approx(pack.shrink_fraction, abs=0.15)
    assert (r1 > r0).mean() > 0.5
    xyz = pack._xyz
    d = np.sqrt(((xyz[:, None] - xyz[None]) ** 2).sum(axis=2)) + np.diag(np.full(len(r1), np.inf))
    gap = d - r1[:, None] - r1[None, :]
    assert gap.min() > -1e-9  # never overlapping, so projections stay exact
    assert (np.isclose(gap, 0, atol=1e-9).sum(axis=1) > 0).sum() >= 2  # some pairs merged


def test_front_spreads_and_recedes():
    flow = PorousFlow(detector_shape=SHAPE, seed=1, period=20.0)
    radii = [flow.front(t) for t in (0.0, 5.0, 10.0, 15.0, 20.0)]
    assert radii == pytest.approx([0, flow.front_radius / 2, flow.front_radius, radii[1], 0])
    x, y = flow.injection_point
    inside = flow.truth(10.0, ROW)[int(round(y + 47.5)), int(round(x + 47.5))]
    assert inside >= flow.mu_liquid + flow.mu_tracer - 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_seed_determines_the_phantom_and_description_rebuilds_it(kind):
    a, b, c = kind(detector_shape=SHAPE, seed=5), kind(detector_shape=SHAPE, seed=5), None
    np.testing.assert_array_equal(a.project(20.0, 7.0), b.project(20.0, 7.0))
    c = kind(detector_shape=SHAPE, seed=6)
    assert not np.array_equal(a.project(20.0, 7.0), c.project(20.0, 7.0))
    rebuilt = kind.from_description(json.loads(json.dumps(a.describe())))
    np.testing.assert_array_equal(rebuilt.project(20.0, 7.0), a.project(20.0, 7.0))
    source = PhantomSource(a, photons=500)
    assert source.metadata()["phantom"]["type"] == kind.__name__
    rng = np.random.default_rng(0)
    frame = source.frame(angle_deg=0, t=1.0, index=0, shutter_open=True, sample_in=True, rng=rng)
    assert frame.shape == SHAPE


@pytest.mark.parametrize(
    ("kind", "kwargs", "match"),
    [
        (SinteringGrains, {"packing": 0.5}, r"packing must be in \[0, 0.35\]"),
        (SinteringGrains, {"growth_time": 0}, "growth_time must be a finite number > 0"),
        (SinteringGrains, {"shrink_fraction": 1.5}, r"shrink_fraction must be in \[0, 1\]"),
        (SinteringGrains, {"grain_radius": (5.0, 2.0)}, "0 < min <= max"),
        (SinteringGrains, {"grain_radius": (60.0, 60.0)}, "use a smaller grain_radius"),
        (PorousFlow, {"injection_point": (80.0, 0.0)}, "outside the liquid.*move it inside"),
        (PorousFlow, {"period": -1.0}, "period must be a finite number > 0"),
        (PorousFlow, {"tracer_contrast": float("nan")}, "tracer_contrast must be"),
    ],
)
def test_bad_arguments_are_refused_with_a_fix(kind, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        kind(detector_shape=SHAPE, **kwargs)


def test_a_description_of_another_phantom_is_refused():
    desc = SinteringGrains(detector_shape=SHAPE).describe()
    with pytest.raises(ConfigError, match="type='SinteringGrains'.*that type's class"):
        BubbleColumn.from_description(desc)
