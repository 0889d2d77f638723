import numpy as np
import pytest
import torch

from bluesky_jit.errors import ScanDataError
from bluesky_jit.projections import FlatField, ProjectionBuffer, RampFilter, split_subsets


def test_flatfield_recovers_line_integrals():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 2, size=(4, 16))
    dark = np.full((3, 4, 16), 100.0)
    flat = np.full((5, 4, 16), 1100.0)
    frame = 100 + 1000 * np.exp(-p)
    np.testing.assert_allclose(FlatField(dark, flat)(frame), p, rtol=1e-5)


def test_flatfield_rejects_nan_and_wrong_shape():
    ff = FlatField(np.zeros((1, 4, 16)), np.ones((1, 4, 16)))
    bad = np.ones((4, 16))
    bad[1, 2] = np.nan
    with pytest.raises(ScanDataError, match="NaN"):
        ff(bad)
    with pytest.raises(ScanDataError, match=r"shape \(4, 15\).*\(4, 16\)"):
        ff(np.ones((4, 15)))


def test_swapped_darks_and_flats_are_explained():
    with pytest.raises(ScanDataError, match="swapped"):
        FlatField(np.ones((1, 2, 2)) * 10, np.ones((1, 2, 2)))


def test_ramp_filter_removes_constant_and_is_linear():
    f = RampFilter(64)
    a = torch.randn(3, 64)
    b = torch.randn(3, 64)
    torch.testing.assert_close(f(a + 2 * b), f(a) + 2 * f(b), atol=1e-5, rtol=1e-5)
    # the ramp has no DC response: a constant row filters to ~0 away from the edges
    assert f(torch.ones(1, 64))[0, 16:48].abs().max() < 0.01


def test_ring_buffer_keeps_the_newest_and_selects_by_global_index():
    buf = ProjectionBuffer(5, (2, 3))
    for i in range(8):
        buf.append(torch.full((2, 3), float(i)), angle=0.1 * i, index=i)
    assert list(buf.last(5)) == [3, 4, 5, 6, 7]
    data, angles = buf.select([4, 6], rows=1)
    assert data.shape == (2, 3)
    assert data[:, 0].tolist() == [4.0, 6.0]
    np.testing.assert_allclose(angles.numpy(), [0.4, 0.6], rtol=1e-6)
    with pytest.raises(ScanDataError, match="buffer holds 3..7"):
        buf.select([1, 2])


def test_even_and_odd_subsets_are_disjoint_and_cover_the_window():
    window = np.arange(17, 17 + 180)
    even, odd = split_subsets(window, 2)
    assert set(even).isdisjoint(odd)
    assert sorted(np.concatenate([even, odd])) == list(window)
    splits = split_subsets(window, 3)
    assert sum(len(s) for s in splits) == len(window)
    assert all(np.all(s % 3 == j) for j, s in enumerate(splits))


def test_fdk_weights_are_one_on_the_central_ray_and_fall_off():
    from bluesky_jit.geometry import ScanGeometry
    from bluesky_jit.projections import fdk_weights

    g = ScanGeometry(
        detector_shape=(5, 9),
        pixel_size=2.0,
        beam="cone",
        source_origin=100.0,
        origin_detector=50.0,
        angular_range=(0, 360),
        center_of_rotation=4.0,
        center_row=2.0,
    )
    w = fdk_weights(g)
    assert w.shape == (5, 9) and w[2, 4] == pytest.approx(1.0)
    assert w[0, 0] == pytest.approx(150 / np.sqrt(150**2 + 8**2 + 4**2))
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert np.all(fdk_weights(ScanGeometry(detector_shape=(5, 9))) == 1)


def test_projection_filter_scales_cone_projections_to_the_axis():
    """Cone beam: weights, then the ramp with the pixel size seen at the rotation axis."""
    from bluesky_jit.geometry import ScanGeometry
    from bluesky_jit.projections import ProjectionFilter, fdk_weights

    g = ScanGeometry(
        detector_shape=(4, 32),
        pixel_size=1.5,
        beam="cone",
        source_origin=100.0,
        origin_detector=50.0,
        angular_range=(0, 360),
    )
    p = torch.rand(4, 32)
    expected = RampFilter(32, pixel_size=1.0)(p * torch.from_numpy(fdk_weights(g)))
    torch.testing.assert_close(ProjectionFilter(g)(p), expected, atol=1e-6, rtol=1e-5)
    flat = ScanGeometry(detector_shape=(4, 32), pixel_size=1.5)
    torch.testing.assert_close(ProjectionFilter(flat)(p), RampFilter(32, pixel_size=1.5)(p))


def test_select_takes_rows_first_and_angles_come_in_double_precision():
    buf = ProjectionBuffer(4, (3, 2))
    for i in range(4):
        buf.append(
            torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * i,
            angle=0.1 * i + 1e-9,
            index=i,
        )
    data, _ = buf.select([1, 3], rows=slice(1, 3))
    assert data.shape == (2, 2, 2)
    assert data[0].tolist() == [[12.0, 13.0], [14.0, 15.0]]
    assert buf.angles_of([2]).dtype == np.float64 and buf.angles_of([2])[0] == 0.2 + 1e-9


def test_fft_length_is_even_long_enough_and_does_not_change_the_ram_lak_filter():
    from bluesky_jit.projections import fft_length

    for cols in (1, 7, 64, 607, 768, 2048):
        length = fft_length(cols)
        assert length % 2 == 0 and length >= 2 * cols - 1
    f = RampFilter(768)
    assert f.pad == 1536
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 768)).astype(np.float32))
    wide = RampFilter(768)
    wide.pad = 2048  # the power of two used before: the same linear convolution
    n = np.arange(-1024, 1024)
    kernel = np.zeros(2048)
    kernel[n == 0] = 0.25
    kernel[n % 2 == 1] = -1.0 / (np.pi * n[n % 2 == 1]) ** 2
    wide._response_np = np.real(np.fft.rfft(np.fft.ifftshift(kernel))).astype(np.float32)
    torch.testing.assert_close(f(x), wide(x), atol=1e-5, rtol=1e-4)


def test_skipped_frames_leave_a_gap_in_the_indices_not_a_shift():
    """A rejected frame (NaN, wrong shape) is never appended; later indices still find theirs."""
    buf = ProjectionBuffer(4, (1, 2))
    for i in (0, 1, 3, 4, 5, 7):  # 2 and 6 were skipped
        buf.append(torch.full((1, 2), float(i)), angle=0.1 * i, index=i)
    assert list(buf.last(4)) == [3, 4, 5, 7]
    data, _ = buf.select([7, 3])
    assert data[:, 0, 0].tolist() == [7.0, 3.0]
    np.testing.assert_allclose(buf.angles_of([5]), [0.5])
    with pytest.raises(ScanDataError, match=r"Projections 1\.\.2 were requested.*holds 3\.\.7"):
        buf.select([1, 2])
