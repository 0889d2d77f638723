import pytest

from bluesky_jit.errors import BlueskyJitError, GeometryError
from bluesky_jit.geometry import ScanGeometry, geometry_from_start


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
