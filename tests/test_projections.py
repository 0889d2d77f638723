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
