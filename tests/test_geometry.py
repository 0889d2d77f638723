import math

import numpy as np
import pytest

import bluesky_jit.geometry as geometry_module
from bluesky_jit.errors import BlueskyJitError, GeometryError
from bluesky_jit.geometry import (
    ProjectionGeometry,
    ScanGeometry,
    Slice,
    VectorGeometry,
    cone,
    cone_vec,
    geometry_from_start,
    orthogonal_slices,
    parallel,
    parallel_vec,
)

NAMESPACE = vars(geometry_module)


def test_geometry_is_a_value_with_evaluable_repr():
    g = ScanGeometry(detector_shape=(4, 64), pixel_size=0.5, center_of_rotation=30.5, num_angles=90)
    assert g == eval(repr(g), {"ScanGeometry": ScanGeometry})
    assert hash(g) == hash(ScanGeometry(**{**g.to_dict(), "detector_shape": (4, 64)}))
    assert g.replace(num_angles=91) != g


def test_default_center_of_rotation_is_detector_centre():
    assert ScanGeometry(detector_shape=(2, 10)).center_of_rotation == 4.5


def test_from_start_reads_tomo_block_and_overrides_win():
    start = {
        "uid": "x",
        "time": 0,
        "num_angles": 120,  # FXI-style top-level key, used when tomo has none
        "tomo": {"beam": "parallel", "detector_shape": [8, 32], "pixel_size": 2.0},
    }
    g = geometry_from_start(start, {"center_of_rotation": 15.0})
    assert g.detector_shape == (8, 32)
    assert g.num_angles == 120
    assert g.pixel_size == 2.0
    assert g.center_of_rotation == 15.0


@pytest.mark.parametrize(
    "tomo, fragment",
    [
        ({"detector_shape": [8, 32], "beam": "fan"}, "Unknown beam type 'fan'"),
        ({"detector_shape": [8, 32], "center_of_rotation": 40}, "outside the detector"),
        ({"detector_shape": [8, 32], "beam": "cone"}, "source_origin"),
        ({"detector_shape": [8, 32], "angular_range": [10, 0]}, "angular_range"),
        ({}, "no detector shape"),
    ],
)
def test_bad_geometry_says_what_and_how(tomo, fragment):
    with pytest.raises(GeometryError, match=fragment) as info:
        geometry_from_start({"tomo": tomo})
    assert isinstance(info.value, ValueError) and isinstance(info.value, BlueskyJitError)


# -- projection geometries as values ------------------------------------------------------
NAMESPACE = vars(geometry_module)


def test_factories_are_keyword_only_values_that_slice_by_projection():
    pg = parallel(angles=8, shape=(4, 16), pixel_size=0.5, center_of_rotation=7.0)
    assert len(pg) == 8 and pg.angles[1] == math.pi / 8
    assert pg == parallel(
        angles=np.linspace(0, np.pi, 8, endpoint=False),
        shape=[4, 16],
        pixel_size=0.5,
        center_of_rotation=7,
    )
    assert hash(pg) == hash(eval(repr(pg), NAMESPACE))
    even = pg[0::2]
    assert isinstance(even, ProjectionGeometry) and even.angles == pg.angles[0::2]
    assert pg[[1, 3]].angles == (pg.angles[1], pg.angles[3])
    assert len(pg[5]) == 1
    with pytest.raises(TypeError):
        parallel(8, (4, 16))  # keyword-only
    cg = cone(angles=12, shape=(4, 16), source_origin=100, origin_detector=50, tilt=1.5)
    assert len(cg) == 12 and cg.angles[-1] < 2 * math.pi
    assert eval(repr(cg), NAMESPACE) == cg
    assert cg[0::3] != cg and cg[0::3] == cg[0::3]


def test_vector_geometry_repr_slice_and_same_maps_as_circular():
    for g in (
        parallel(angles=5, shape=(6, 10), pixel_size=0.7, center_of_rotation=3.2, center_row=2.0),
        cone(angles=5, shape=(6, 10), source_origin=80, origin_detector=40, center_row=3.1),
        cone(angles=5, shape=(6, 10), source_origin=80, origin_detector=40, tilt=2.0),
    ):
        vg = g.to_vec()
        assert isinstance(vg, VectorGeometry) and len(vg) == 5
        assert eval(repr(vg), NAMESPACE) == vg
        np.testing.assert_allclose(vg.matrices(), g.matrices(), atol=1e-12)
        np.testing.assert_allclose(vg[1::2].matrices(), g[1::2].matrices(), atol=1e-12)
    made = parallel_vec(vectors=vg.vector_array[:2], shape=(6, 10))
    assert made.beam == "parallel" and len(made) == 2
    assert cone_vec(vectors=vg.vector_array, shape=(6, 10)) == vg


def test_parallel_map_follows_the_documented_convention():
    g = parallel(
        angles=[0.3, 1.9], shape=(8, 32), pixel_size=0.5, center_of_rotation=14.2, center_row=3.0
    )
    pts = np.array([[1.0, -2.0, 0.5], [-3.0, 4.0, -1.0]])
    row, col, w = g.project(pts)
    for a, theta in enumerate(g.angles):
        expect = 14.2 + (pts[:, 0] * math.cos(theta) + pts[:, 1] * math.sin(theta)) / 0.5
        np.testing.assert_allclose(col[a], expect)
        np.testing.assert_allclose(row[a], 3.0 + pts[:, 2] / 0.5)
    np.testing.assert_allclose(w, 1.0)


def test_cone_map_has_magnification_and_unit_weight_on_the_axis():
    so, od, ps = 200.0, 100.0, 1.5
    g = cone(
        angles=[0.0, 0.7],
        shape=(16, 32),
        source_origin=so,
        origin_detector=od,
        pixel_size=ps,
        center_of_rotation=15.0,
        center_row=7.5,
    )
    pts = np.array([[0.0, 0.0, 0.0], [5.0, -3.0, 2.0]])
    row, col, w = g.project(pts)
    for a, theta in enumerate(g.angles):
        e_u = np.array([math.cos(theta), math.sin(theta), 0])
        e_b = np.array([-math.sin(theta), math.cos(theta), 0])
        mag = (so + od) / (so + pts @ e_b)
        np.testing.assert_allclose(col[a], 15.0 + mag * (pts @ e_u) / ps)
        np.testing.assert_allclose(row[a], 7.5 + mag * pts[:, 2] / ps)
        np.testing.assert_allclose(w[a], (so + pts @ e_b) / so)
    assert w[0, 0] == pytest.approx(1.0)


def test_tilt_turns_the_pixel_grid_about_the_principal_point():
    g0 = parallel(angles=[0.0], shape=(9, 9))
    g1 = parallel(angles=[0.0], shape=(9, 9), tilt=90.0)
    pts = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    r0, c0, _ = g0.project(pts)
    r1, c1, _ = g1.project(pts)
    # a 90 degree tilt swaps detector axes (about the centre, 4.0)
    np.testing.assert_allclose(c1 - 4, r0 - 4, atol=1e-12)
    np.testing.assert_allclose(r1 - 4, -(c0 - 4), atol=1e-12)


def test_scan_geometry_makes_projection_geometries_and_slices():
    scan = ScanGeometry(detector_shape=(10, 64), pixel_size=2.0, num_angles=90)
    pg = scan.projection_geometry()
    assert len(pg) == 90 and pg.pixel_size == 2.0 and pg.center_of_rotation == 31.5
    cg = ScanGeometry(
        detector_shape=(10, 64),
        pixel_size=1.5,
        beam="cone",
        source_origin=200,
        origin_detector=100,
        angular_range=(0, 360),
        num_angles=36,
    )
    assert cg.voxel_size == pytest.approx(1.0)
    assert cg.projection_geometry().beam == "cone"
    axial = scan.axial_slice(7)
    assert axial.is_axial and axial.center[2] == pytest.approx((7 - 4.5) * 2.0)
    assert scan.z_to_row(scan.row_to_z(3.25)) == pytest.approx(3.25)
    three = orthogonal_slices(scan)
    assert [s.shape for s in three] == [(64, 64), (10, 64), (10, 64)]
    assert three[0].is_axial and not three[1].is_axial
    np.testing.assert_allclose(np.cross(three[1].normal, three[2].normal), [0, 0, 1], atol=1e-12)


def test_slice_is_a_value_with_roi_zoom_and_points():
    s = Slice.axial(shape=(4, 6), pixel_size=0.5, z=2.0)
    assert s == eval(repr(s), NAMESPACE) and hash(s) == hash(eval(repr(s), NAMESPACE))
    pts = s.points()
    assert pts.shape == (4, 6, 3)
    np.testing.assert_allclose(pts[0, 0], [-1.25, -0.75, 2.0])
    np.testing.assert_allclose(pts[3, 5], [1.25, 0.75, 2.0])
    roi = s.crop(slice(1, 3), slice(2, 6))
    np.testing.assert_allclose(roi.points(), pts[1:3, 2:6])
    z = s.zoom(2)
    assert z.pixel_size == 0.25 and z.center == s.center and z.shape == s.shape
    moved = s.moved(center=(1, 2, 3))
    assert moved.center == (1.0, 2.0, 3.0) and moved.axis_u == s.axis_u
    tilted = Slice(shape=(3, 3), axis_u=(2, 0, 0), axis_v=(0, 1, 1))
    assert tilted.axis_u == (1.0, 0.0, 0.0)
    assert tilted.axis_v == pytest.approx((0.0, 2**-0.5, 2**-0.5))


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: Slice(shape=(4, 4), axis_u=(1, 0, 0), axis_v=(1, 1, 0)), "orthogonal"),
        (lambda: Slice(shape=(4, 4), axis_u=(0, 0, 0)), "zero vector"),
        (lambda: Slice(shape=(4, 0)), "positive integers"),
        (lambda: Slice(shape=(4, 4), pixel_size=-1), "pixel_size must be a positive"),
        (lambda: parallel(angles=[], shape=(4, 4)), "at least one projection"),
        (lambda: parallel(angles=[0.0, float("nan")], shape=(4, 4)), "NaN"),
        (lambda: parallel(angles=4, shape=(4, 4))[7], "Projection 7 requested"),
        (lambda: parallel(angles=4, shape=(4, 4))[4:], "leaves no projection"),
        (lambda: cone(angles=4, shape=(4, 4), source_origin=0, origin_detector=1), "source_origin"),
        (
            lambda: ProjectionGeometry(beam="parallel", angles=4, shape=(4, 4), source_origin=5),
            "belong to cone beam",
        ),
        (lambda: parallel_vec(vectors=np.zeros((2, 11)), shape=(4, 4)), r"shape \(n, 12\)"),
        (
            lambda: ScanGeometry(
                detector_shape=(4, 4), beam="cone", source_origin=100, origin_detector=10
            ),
            "full rotation",
        ),
        (lambda: ScanGeometry(detector_shape=(4, 4), pixel_size=0), "pixel_size"),
        (lambda: ScanGeometry(detector_shape=(4, 4), num_angles=1), "num_angles"),
        (lambda: Slice.axial(shape=(4, 4)).crop(slice(2, 2), slice(0, 4)), "non-empty"),
    ],
)
def test_bad_values_say_what_and_how(make, fragment):
    with pytest.raises(GeometryError, match=fragment):
        make()


def test_unknown_override_is_named():
    with pytest.raises(GeometryError, match="Unknown geometry override.*'pixelsize'"):
        geometry_from_start({"tomo": {"detector_shape": [4, 4]}}, {"pixelsize": 2})


def test_new_scan_fields_come_from_the_start_document():
    start = {"tomo": {"detector_shape": [8, 32], "center_row": 2.5, "detector_tilt": 0.3}}
    g = geometry_from_start(start)
    assert g.center_row == 2.5 and g.detector_tilt == 0.3
    assert g.to_dict()["center_row"] == 2.5


# -- bad input: what came, what was expected, how to fix -------------------
def test_centre_of_rotation_outside_the_detector_is_refused_by_the_factories_too():
    with pytest.raises(GeometryError, match=r"center_of_rotation 20.0 lies outside.*0\.\.15.*7\.5"):
        parallel(angles=4, shape=(4, 16), center_of_rotation=20.0)
    with pytest.raises(GeometryError, match="center_of_rotation -3.0 lies outside"):
        cone(angles=4, shape=(4, 16), source_origin=100, origin_detector=50, center_of_rotation=-3)
    with pytest.raises(GeometryError, match=r"center_of_rotation 40.0 lies outside.*e\.g\. 15\.5"):
        ScanGeometry(detector_shape=(4, 32), center_of_rotation=40)


def test_angles_must_cover_the_claimed_range():
    g = ScanGeometry(detector_shape=(4, 16), num_angles=90, angular_range=(0, 180))
    g.check_angles(np.radians(np.arange(90) * 2.0))  # the nominal rotation
    g.check_angles(np.radians(np.arange(90, 180) * 2.0))  # the second half-turn of 360
    g.check_angles(np.radians(np.delete(np.arange(90) * 2.0, [10, 11, 40])))  # dropped frames
    with pytest.raises(GeometryError, match=r"from 0 to 89 degrees.*angular_range=\(0.0, 180.0\)"):
        g.check_angles(np.radians(np.arange(90) * 1.0))  # half the range
    with pytest.raises(GeometryError, match="degrees expected, not radians"):
        g.check_angles(np.radians(np.radians(np.arange(90) * 2.0)))  # radians sent as degrees
    c = ScanGeometry(
        detector_shape=(4, 16),
        beam="cone",
        source_origin=100,
        origin_detector=50,
        angular_range=(0, 360),
        num_angles=60,
    )
    c.check_angles(np.radians(np.arange(60) * 6.0 + 720))  # a later rotation
    with pytest.raises(GeometryError, match="0 to 177 degrees and leave a gap of 183 degrees"):
        c.check_angles(np.radians(np.arange(60) * 3.0))  # 180 degrees of a 360 degree claim


def test_slice_outside_the_reconstruction_volume_is_named():
    g = ScanGeometry(detector_shape=(16, 64), pixel_size=0.5)
    radius, z0, z1 = g.field_of_view
    assert radius == pytest.approx(16.0) and (z0, z1) == pytest.approx((-4.0, 4.0))
    g.check_slice(Slice.axial(shape=(8, 8), z=3.9, pixel_size=0.5))
    g.check_slice(Slice.axial(shape=(8, 8), z=0.0, pixel_size=0.5, center_xy=(17.0, 0.0)))
    with pytest.raises(
        GeometryError,
        match=r"centred at \(0, 0, 50\) mm.*radius 16 mm.*z from -4 to 4 mm.*center=\(0, 0, 0\)",
    ):
        g.check_slice(Slice.axial(shape=(8, 8), z=50.0))
    with pytest.raises(GeometryError, match="outside the reconstruction volume"):
        g.check_slice(Slice.xz(shape=(8, 8), y=30.0, pixel_size=0.5))


def test_zero_size_roi_says_how_to_fix():
    with pytest.raises(GeometryError, match=r"got \(0, 20\).*at least one pixel"):
        Slice(shape=(0, 20))
    with pytest.raises(GeometryError, match=r"non-empty.*\(4, 4\) image.*slice\(3, 1"):
        Slice.axial(shape=(4, 4)).crop(slice(0, 4), slice(3, 1))
    with pytest.raises(GeometryError, match="zoom factor must be a positive number; got 0"):
        Slice.axial(shape=(4, 4)).zoom(0)
