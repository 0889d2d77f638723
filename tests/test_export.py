"""Export (bluesky_jit.apps.export): each format written from the session's demo run and read
back with that format's own library (nxtomo, h5py, tifffile), and ``bluesky-jit export``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bluesky_jit.apps.cli import main
from bluesky_jit.apps.export import DERIVED_FORMATS, RAW_FORMATS, export, read_raw
from bluesky_jit.apps.live import read_derived
from bluesky_jit.catalog import runs_container
from bluesky_jit.errors import ConfigError

from . import test_replay

hex_layout_scan = test_replay.hex_layout_scan  # a fixture: darks and flats in a run of their own


@pytest.fixture(scope="module")
def raw_runs(jit_catalog):
    return runs_container(jit_catalog.client(), "raw")


@pytest.fixture(scope="module")
def scan(raw_runs, demo_run):
    """The demo's raw run, read back (projections, angles, darks, flats)."""
    return read_raw(raw_runs[demo_run["raw_uid"]], runs=raw_runs)


@pytest.fixture(scope="module")
def derived(jit_catalog, demo_run):
    run = runs_container(jit_catalog.client(), "derived")[demo_run["derived_uid"]]
    return read_derived(run)


def stored(raw_runs, uid, stream, key):
    """A stream's column as the catalog serves it (frames squeezed to (n, rows, cols))."""
    values = np.asarray(raw_runs[uid][stream][key].read())
    return values.reshape(len(values), *values.shape[-2:]) if values.ndim > 2 else values


def test_read_raw_keeps_the_scans_frames_angles_darks_and_flats(raw_runs, demo_run, scan):
    uid = demo_run["raw_uid"]
    np.testing.assert_array_equal(scan.projections, stored(raw_runs, uid, "primary", "det"))
    np.testing.assert_array_equal(scan.angles, stored(raw_runs, uid, "primary", "rot_stage"))
    np.testing.assert_array_equal(scan.darks, stored(raw_runs, uid, "dark", "det"))
    np.testing.assert_array_equal(scan.flats, stored(raw_runs, uid, "flat", "det"))
    assert scan.projections.dtype == np.uint16 and scan.angles[1] == 180 / 16


def test_nxtomo_reads_back_with_nxtomo(scan, tmp_path):
    from nxtomo.application.nxtomo import NXtomo
    from nxtomo.nxobject.nxdetector import ImageKey

    path = export(scan, tmp_path / "scan.nxs")
    nx = NXtomo().load(str(path), "entry", detector_data_as="as_numpy_array")
    detector = nx.instrument.detector
    keys = np.array([key.value for key in detector.image_key_control])
    n_dark, n_flat, n = len(scan.darks), len(scan.flats), len(scan.projections)
    assert (n_dark, n_flat, n) == (10, 10, 32)
    assert (
        list(keys)
        == [ImageKey.DARK_FIELD.value] * n_dark
        + [ImageKey.FLAT_FIELD.value] * n_flat
        + [ImageKey.PROJECTION.value] * n
    )
    assert detector.data.shape == (n_dark + n_flat + n, 4, 32)
    np.testing.assert_array_equal(detector.data[keys == 0], scan.projections)
    np.testing.assert_array_equal(detector.data[keys == 2], scan.darks)
    np.testing.assert_array_equal(detector.data[keys == 1], scan.flats)
    angles = nx.sample.rotation_angle
    assert str(angles.units) == "degree"
    np.testing.assert_allclose(angles.magnitude[keys == 0], scan.angles)
    assert detector.x_pixel_size.to("mm").magnitude == pytest.approx(1.0)
    assert detector.x_rotation_axis_pixel_position == pytest.approx(15.5)
    assert nx.sample.name == "bubble column (simulated)"


def test_a_scan_with_a_separate_dark_flat_run_exports_that_runs_fields(
    raw_runs, hex_layout_scan, tmp_path
):
    """HEX layout, ophyd v1 detector (Resource/Datum through the Filler)."""
    from nxtomo.application.nxtomo import NXtomo

    with pytest.raises(ConfigError, match="takes its darks and flats from run"):
        read_raw(raw_runs[hex_layout_scan])
    path = export(raw_runs[hex_layout_scan], tmp_path / "hex.nxs", runs=raw_runs)
    nx = NXtomo().load(str(path), "entry", detector_data_as="as_numpy_array")
    keys = [key.value for key in nx.instrument.detector.image_key_control]
    assert keys == [2, 2, 1, 1] + [0] * 16
    np.testing.assert_allclose(nx.sample.rotation_angle.magnitude[4:], np.arange(16) * 180 / 16)


def test_dxchange_reads_back_with_h5py(scan, tmp_path):
    from simulated_devices.recordings import DXchangeRecording

    path = export(scan, tmp_path / "scan.h5", format="dxchange")
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["/exchange/data"][()], scan.projections)
        np.testing.assert_array_equal(f["/exchange/data_white"][()], scan.flats)
        np.testing.assert_array_equal(f["/exchange/data_dark"][()], scan.darks)
        theta = f["/exchange/theta"]
        # the DXchange schema keeps degrees; dxchange.read_aps_32id hands tomopy radians
        assert theta.attrs["units"] == "degrees"
        np.testing.assert_allclose(np.deg2rad(theta[()]), np.deg2rad(scan.angles))
    assert DXchangeRecording.open(path).detector_shape == (4, 32)  # the project's own reader


def test_tiff_stack_reads_back_with_tifffile(derived, tmp_path):
    import tifffile

    path = export(derived, tmp_path / "slices.tif")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == len(derived.reconstruction) + len(derived.denoised)
        rec, den = tif.series
        np.testing.assert_array_equal(rec.asarray(), derived.reconstruction)
        np.testing.assert_array_equal(den.asarray(), derived.denoised)
        assert rec.dtype == np.float32
        about = tif.shaped_metadata[0]
        assert about["stream"] == "reconstruction" and about["units"] == "1/mm"
        assert about["projection_index"] == derived.reconstruction_index.tolist()
        assert tif.shaped_metadata[1]["stream"] == "denoised"
        page = tif.pages[0]
        assert page.resolution == (10.0, 10.0)  # pixels per cm: 1 mm voxels
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert "linear attenuation (1/mm)" in page.description


def test_nxdata_reads_back_with_h5py(derived, tmp_path):
    path = export(derived, tmp_path / "slices.h5", format="hdf5")
    with h5py.File(path, "r") as f:
        assert f.attrs["default"] == "entry"
        entry = f["entry"]
        assert entry.attrs["NX_class"] == "NXentry" and entry.attrs["default"] == "reconstruction"
        for stream, images in (
            ("reconstruction", derived.reconstruction),
            ("denoised", derived.denoised),
        ):
            group = entry[stream]
            assert group.attrs["NX_class"] == "NXdata" and group.attrs["signal"] == "data"
            assert list(group.attrs["axes"]) == ["projection_index", "y", "x"]
            np.testing.assert_array_equal(group["data"][()], images)
            assert group["data"].attrs["units"] == "1/mm"
            assert group["x"].attrs["units"] == group["pixel_size"].attrs["units"] == "mm"
            assert group["x"].shape == (images.shape[2],) and group["pixel_size"][()] == 1.0
            assert group.attrs["center_of_rotation"] == 15.5 and group.attrs["beam"] == "parallel"
        np.testing.assert_array_equal(
            entry["reconstruction/projection_index"][()], derived.reconstruction_index
        )


# ----------------------------------------------------------------------------- command
@pytest.fixture
def key(jit_catalog, monkeypatch):
    monkeypatch.setenv("TILED_API_KEY", jit_catalog.api_key)


def test_cli_exports_raw_and_derived_runs_by_short_uid(
    jit_catalog, demo_run, key, tmp_path, capsys
):
    from nxtomo.application.nxtomo import NXtomo

    nxs = tmp_path / "scan.nxs"
    assert main(["export", jit_catalog.uri, demo_run["raw_uid"][:8], "--out", str(nxs)]) == 0
    out = capsys.readouterr().out
    assert f"32 projections, 10 darks, 10 flats written to {nxs} (nxtomo)" in out
    assert len(NXtomo().load(str(nxs), "entry").sample.rotation_angle) == 52
    h5 = tmp_path / "slices.h5"
    argv = ["export", jit_catalog.uri, demo_run["derived_uid"][:8], "--out", str(h5)]
    assert main([*argv, "--format", "hdf5"]) == 0
    assert f"written to {h5} (hdf5)" in capsys.readouterr().out
    with h5py.File(h5, "r") as f:
        assert f["entry/reconstruction"].attrs["NX_class"] == "NXdata"


def test_cli_says_which_format_fits_the_run(
    jit_catalog, demo_run, count_run, key, tmp_path, capsys
):
    uri, derived_uid, raw_uid = jit_catalog.uri, demo_run["derived_uid"], demo_run["raw_uid"]
    # a raw-run format asked of a derived run: its raw uid, or a derived-run format
    assert main(["export", uri, derived_uid[:8], "--out", str(tmp_path / "a.nxs")]) == 2
    err = capsys.readouterr().err
    assert "is a derived run" in err and raw_uid in err and "--format tiff|hdf5|png|gif" in err
    # a derived-run format asked of a raw run that has none
    assert main(["export", uri, count_run, "--format", "tiff", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "is a raw run with no derived run" in err and "--format nxtomo|dxchange" in err
    # .h5 is either: the user says which
    assert main(["export", uri, raw_uid, "--out", str(tmp_path / "a.h5")]) == 2
    assert "--format dxchange" in capsys.readouterr().err
    assert (
        main(["export", uri, count_run, "--format", "dxchange", "--out", str(tmp_path / "b.h5")])
        == 2
    )
    assert "not a tomography scan" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_command_offers_every_format():
    from bluesky_jit.apps.cli import cli

    (option,) = [p for p in cli.commands["export"].params if p.name == "format"]
    assert tuple(option.type.choices) == RAW_FORMATS + DERIVED_FORMATS
