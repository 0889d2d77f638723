"""Streaming SIRT (Liu et al. 2019): matched operators, convergence, warm start over windows."""

import numpy as np
import pytest

from bluesky_jit.errors import ConfigError, GeometryError
from bluesky_jit.geometry import ScanGeometry, Slice, parallel
from bluesky_jit.reconstruction.sirt import ShearOperator, StreamingSIRT, sirt
from simulated_devices.cone import Ball, ball_truth, parallel_projections

BALLS = (Ball(3, -2, 0, 8, 0.02), Ball(-5, 4, 0, 4, 0.05), Ball(0, 0, 0, 13, 0.01))


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_forward_projector_is_the_exact_transpose_and_has_line_integral_scale():
    rng = np.random.default_rng(0)
    angles = np.linspace(0, np.pi, 60, endpoint=False)
    geom = parallel(angles=angles, shape=(1, 64), pixel_size=0.5)
    s = Slice.axial(shape=(50, 50), pixel_size=0.6)
    op = ShearOperator(geom, s)
    x = rng.standard_normal(s.shape).astype(np.float32)
    y = rng.standard_normal((60, 64)).astype(np.float32)
    assert np.sum(op.forward(x) * y) == pytest.approx(np.sum(x * op.back(y)), rel=1e-4)
    sino = parallel_projections(BALLS, angles, detector_shape=(1, 64), pixel_size=0.5, center_row=0)
    assert rel(op.forward(ball_truth(BALLS, s.points())), sino[:, 0]) < 0.05


def test_sirt_converges_towards_the_phantom():
    angles = np.linspace(0, np.pi, 60, endpoint=False)
    geom = parallel(angles=angles, shape=(1, 64), pixel_size=0.5)
    s = Slice.axial(shape=(50, 50), pixel_size=0.6)
    op = ShearOperator(geom, s)
    sino = parallel_projections(BALLS, angles, detector_shape=(1, 64), pixel_size=0.5, center_row=0)
    truth = ball_truth(BALLS, s.points())
    errors = [rel(sirt(op, sino[:, 0], iterations=i), truth) for i in (1, 10, 60)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.16


def test_streaming_sirt_refreshes_every_window_and_warm_start_improves():
    geometry = ScanGeometry(detector_shape=(3, 48), num_angles=90)
    angles_deg = np.arange(180) * 2.0 * 1.01  # a little over two rotations
    proj = parallel_projections(BALLS, np.radians(angles_deg), detector_shape=(3, 48))
    rec = StreamingSIRT(geometry, window=16, iterations=2)
    rec.set_flatfield(np.zeros((1, 3, 48)), np.ones((1, 3, 48)))
    truth = ball_truth(BALLS, rec.slice.points())
    errors = []
    due = []
    for i, (p, a) in enumerate(zip(proj, angles_deg, strict=True)):
        due.append(rec.add_frame(np.exp(-p), angle_deg=a, index=i))
        if due[-1]:
            errors.append(rel(rec.reconstruct(), truth))
    assert [i for i, d in enumerate(due) if d][:3] == [15, 31, 47]
    assert rec.updates == len(errors) == 11
    # each window alone sees 32 degrees; the warm start accumulates the rotation
    assert errors[-1] < 0.5 * errors[0] and errors[-1] < 0.3


def test_sirt_rejects_cone_and_bad_settings():
    cone_scan = ScanGeometry(
        detector_shape=(4, 8),
        beam="cone",
        source_origin=100,
        origin_detector=10,
        angular_range=(0, 360),
    )
    with pytest.raises(GeometryError, match="parallel beam"):
        StreamingSIRT(cone_scan)
    with pytest.raises(ConfigError, match="window >= 1"):
        StreamingSIRT(ScanGeometry(detector_shape=(4, 8)), window=0)


def test_sirt_flat_fields_must_match_the_detector():
    from bluesky_jit.errors import ScanDataError

    rec = StreamingSIRT(ScanGeometry(detector_shape=(3, 48), num_angles=60), window=8)
    with pytest.raises(ScanDataError, match=r"shape \(3, 40\).*detector is \(3, 48\)"):
        rec.set_flatfield(np.zeros((1, 3, 40)), np.ones((1, 3, 40)))
