"""Patch pairs from the projection buffer (PairMaker, SamplingRegion): K splits, Z and T stacks."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from bluesky_jit.errors import ConfigError, ScanDataError
from bluesky_jit.pairs import PairMaker, SamplingRegion
from bluesky_jit.projections import ProjectionBuffer, RampFilter
from bluesky_jit.reconstruction import TorchBackprojector

from .phantom_utils import disk_image, disk_sinogram, psnr


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BitSource:
    """A projection buffer whose projection i is the constant 2**i (bits name projections)."""

    def __init__(self, count: int, rows: int = 6, cols: int = 32):
        self.count, self.rows, self.cols = count, rows, cols
        self.shape = (rows, cols)

    def __len__(self):
        return self.count

    def last(self, n):
        return np.arange(self.count - n, self.count)

    def select(self, indices, rows=None):
        indices = np.asarray(indices)
        rows = slice(None) if rows is None else rows
        values = torch.tensor(2.0**indices, dtype=torch.float64)
        data = values[:, None, None].expand(len(indices), self.rows, self.cols)[:, rows]
        return data.clone(), torch.zeros(len(indices))


def sum_backproject(filtered, angles, x, y):
    """Every point gets the sum of the projections' values: the bitmask of those used."""
    return filtered[:, 0].sum() * torch.ones_like(x, dtype=torch.float64)


def bits(values, scale=1):
    out = np.rint(np.asarray(values, dtype=np.float64) * scale).astype(np.int64)
    assert np.allclose(out, np.asarray(values, np.float64) * scale)  # exact in float32
    return out


def maker(source, **kwargs):
    defaults = dict(window=12, rows=source.rows, pixel_size=1.0, row=3, patch_size=4)
    defaults.update(kwargs)
    return PairMaker(
        source,
        sum_backproject,
        region=SamplingRegion.disc(12.0),
        rng=np.random.default_rng(0),
        **defaults,
    )


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("strategy", ["X:1", "1:X"])
def test_input_and_target_never_share_a_projection(k, strategy):
    source = BitSource(24)
    pm = maker(source, splits=k, n2i_strategy=strategy)
    u, v = pm.pairs(64)
    assert u.shape == v.shape == (64, 1, 4, 4)
    scale_u, scale_v = (k - 1, 1) if strategy == "X:1" else (1, k - 1)
    bu, bv = bits(u[:, 0, 0, 0], scale_u), bits(v[:, 0, 0, 0], scale_v)
    window = int(sum(2**i for i in range(12, 24)))  # the newest 12 projections
    assert np.all(bu & bv == 0)  # disjoint
    assert np.all(bu | bv == window)  # together the whole window
    one = bv if strategy == "X:1" else bu
    for b in one:  # the single split is one residue class mod K
        members = [i for i in range(24) if b >> i & 1]
        assert len({i % k for i in members}) == 1 and len(members) == 12 // k


@pytest.mark.parametrize("stack", ["z", "t"])
@pytest.mark.parametrize("strategy", ["X:1", "1:X"])
def test_stacks_never_share_a_projection_with_the_target(stack, strategy):
    source = BitSource(24)
    pm = maker(source, splits=3, n2i_strategy=strategy, stack=stack, frames=3, frame_step=6)
    assert pm.span == (12 if stack == "z" else 24)
    u, v = pm.pairs(32)
    assert u.shape == (32, 1, 3, 4, 4) and v.shape == (32, 1, 1, 4, 4)
    scale_u, scale_v = (2, 1) if strategy == "X:1" else (1, 2)
    bv = bits(v[:, 0, 0, 0, 0], scale_v)
    for f in range(3):
        bu = bits(u[:, 0, f, 0, 0], scale_u)
        assert np.all(bu & bv == 0)
        if stack == "t":  # frame f comes from window f: projections 6 f .. 6 f + 11
            lo, hi = 6 * f, 6 * f + 11
            assert all(all(lo <= i <= hi for i in range(24) if b >> i & 1) for b in bu)
    # the target is the middle frame: window 1 (t) or the window itself (z)
    lo = 6 if stack == "t" else 12
    assert all(all(lo <= i < lo + 12 for i in range(24) if b >> i & 1) for b in bv)


def test_z_stack_uses_nearby_rows_clipped_at_the_edges():
    seen = []

    def spy(filtered, angles, x, y):
        seen.append(float(filtered[0, 0]))
        return torch.zeros_like(x)

    class RowSource(BitSource):
        def select(self, indices, rows=None):
            rows = slice(None) if rows is None else rows
            data = torch.arange(self.rows, dtype=torch.float32)[None, :, None]
            return data.expand(len(indices), self.rows, self.cols)[:, rows].clone(), torch.zeros(
                len(indices)
            )

    source = RowSource(12)
    pm = PairMaker(
        source,
        spy,
        window=12,
        rows=6,
        pixel_size=1.0,
        row=0,
        patch_size=4,
        stack="z",
        frames=5,
        region=SamplingRegion.disc(12.0),
    )
    pm.pairs(3)
    assert set(seen) == {0.0, 1.0, 2.0}  # rows -2, -1 clipped to 0; then 1, 2


def test_settings_change_during_the_run():
    source = BitSource(24)
    pm = maker(source, slice_size=32)
    assert pm.pairs(2)[0].shape == (2, 1, 4, 4)
    pm.set_patch_size(6)
    pm.set_region(SamplingRegion.disc(10.0))
    pm.set_row(5)
    assert pm.pairs(2)[0].shape == (2, 1, 6, 6) and pm.row == 5
    with pytest.raises(ConfigError, match="larger than the 32x32 slice"):
        pm.set_patch_size(33)
    with pytest.raises(ConfigError, match="does not fit"):
        pm.set_patch_size(20)  # fits the slice, not the disc of radius 10
        pm.pairs(1)
    with pytest.raises(ConfigError, match="row"):
        pm.set_row(6)


def test_settings_may_change_from_another_thread():
    source = BitSource(24)
    pm = maker(source, slice_size=32)
    stop = threading.Event()

    def fiddle():
        while not stop.wait(0.0005):
            pm.set_patch_size(4)
            pm.set_patch_size(5)

    thread = threading.Thread(target=fiddle)
    thread.start()
    try:
        for _ in range(30):
            u, v = pm.pairs(2)
            assert u.shape == v.shape and u.shape[-1] in (4, 5)
    finally:
        stop.set()
        thread.join()


def test_not_ready_and_bad_settings():
    pm = maker(BitSource(10))
    assert not pm.ready
    with pytest.raises(ScanDataError, match="needs 12 buffered projections"):
        pm.pairs(1)
    pm_t = maker(BitSource(20), stack="t", frames=3, frame_step=6)
    assert not pm_t.ready  # a T3 stack needs 12 + 2 * 6
    with pytest.raises(ScanDataError, match="requested"):
        maker(BitSource(24)).windows(end=30)
    bad = [
        ({"splits": 1}, "at least 2"),
        ({"n2i_strategy": "2:1"}, "strategy"),
        ({"stack": "x"}, "stack"),
        ({"frames": 3}, "stack="),
        ({"stack": "z", "frames": 4}, "odd"),
        ({"window": 2, "splits": 3}, "split"),
        ({"patch_size": 0}, "patch_size"),
        ({"frame_step": 0}, "frame_step"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ConfigError, match=match):
            maker(BitSource(24), **kwargs)


def test_windows_ending_at_an_earlier_projection():
    pm = maker(BitSource(30))
    np.testing.assert_array_equal(pm.windows()[0], np.arange(18, 30))
    np.testing.assert_array_equal(pm.windows(end=25)[0], np.arange(14, 26))


# -- with real reconstructions ----------------------------------------------------------------


@pytest.fixture(scope="module")
def disk_scan():
    """Filtered projections of the disks phantom (noiseless), 120 angles over 180 deg."""
    n, cols, rows = 120, 96, 3
    angles = np.arange(n) * np.pi / n
    sino = disk_sinogram(angles, cols, (cols - 1) / 2)
    ramp = RampFilter(cols)
    buffer = ProjectionBuffer(2 * n, (rows, cols))
    for i, a in enumerate(angles):
        frame = np.repeat(sino[i][None], rows, axis=0)
        buffer.append(ramp(torch.from_numpy(frame).float()), angle=float(a), index=i)
    bp = TorchBackprojector(cols=cols, center_of_rotation=(cols - 1) / 2)
    return buffer, bp.backproject, n, cols


@pytest.mark.parametrize("k", [2, 3])
def test_slice_splits_average_to_the_full_fbp(disk_scan, k):
    buffer, backproject, n, cols = disk_scan
    pm = PairMaker(
        buffer, backproject, window=n, rows=3, pixel_size=1.0, row=1, splits=k, slice_size=cols
    )
    splits = pm.slice_splits()
    assert splits.shape == (k, cols, cols)
    data, angles = buffer.select(np.arange(n), rows=slice(1, 2))
    x, y = torch.meshgrid(
        torch.arange(cols) - (cols - 1) / 2, torch.arange(cols) - (cols - 1) / 2, indexing="xy"
    )
    full = backproject(data[:, 0], angles, x.float(), y.float()).numpy()
    np.testing.assert_allclose(splits.mean(axis=0), full, atol=1e-4 * np.abs(full).max())
    truth = disk_image(cols)
    inside = np.hypot(x.numpy(), y.numpy()) < 40
    assert psnr(full, truth, inside) > 20
    inputs, window = pm.inference_inputs()
    np.testing.assert_array_equal(window, np.arange(n))
    np.testing.assert_allclose(inputs.mean(axis=0), full, atol=1e-4 * np.abs(full).max())


def test_pairs_of_a_noiseless_object_agree(disk_scan):
    buffer, backproject, n, cols = disk_scan
    pm = PairMaker(
        buffer,
        backproject,
        window=n,
        rows=3,
        pixel_size=1.0,
        row=1,
        patch_size=16,
        slice_size=cols,
        neighbourhood_rows=1,
        rng=np.random.default_rng(0),
    )
    u, v = pm.pairs(16)
    # same object, different projections: close up to angular undersampling
    err = np.sqrt(np.mean((u - v) ** 2)) / np.sqrt(np.mean(v**2))
    assert err < 0.2
    assert not math.isclose(float(np.abs(u - v).max()), 0.0)  # but not the same projections


# -- pairs made by the streaming reconstructor (the live pipeline's path) ---------------------


def _fed_reconstructor(geometry, frames, angles_deg, **kwargs):
    from bluesky_jit.reconstruction.streaming import StreamingReconstructor

    rec = StreamingReconstructor(geometry, refresh_every=len(frames), backend="numba", **kwargs)
    rows, cols = geometry.detector_shape
    rec.set_flatfield(np.zeros((1, rows, cols)), np.full((1, rows, cols), 1000.0))
    for i, (p, a) in enumerate(zip(frames, angles_deg, strict=True)):
        rec.add_frame(1000 * np.exp(-p), angle_deg=float(a), index=i)
    return rec


def test_reconstructor_pairs_match_the_row_backprojector_on_parallel_beam():
    from bluesky_jit.geometry import ScanGeometry

    n, cols, rows = 120, 96, 3
    angles = np.arange(n) * 180.0 / n
    sino = disk_sinogram(np.radians(angles), cols, (cols - 1) / 2)
    frames = np.repeat(sino[:, None], rows, axis=1)
    geometry = ScanGeometry(detector_shape=(rows, cols), num_angles=n)
    rec = _fed_reconstructor(geometry, frames, angles)
    settings = dict(
        splits=3, n2i_strategy="X:1", patch_size=16, neighbourhood_rows=1, stack="z", frames=3
    )
    ours = PairMaker.from_reconstructor(rec, rng=np.random.default_rng(5), **settings)
    assert ours.rows == rows and ours.window == n and ours.slice_size == geometry.slice_size
    bp = TorchBackprojector(cols=cols, center_of_rotation=(cols - 1) / 2)
    theirs = PairMaker(
        rec.buffer,
        bp.backproject,
        window=n,
        rows=rows,
        pixel_size=1.0,
        row=rec.row,
        slice_size=geometry.slice_size,
        rng=np.random.default_rng(5),
        **settings,
    )
    (u1, v1), (u2, v2) = ours.pairs(8), theirs.pairs(8)
    assert u1.shape == u2.shape == (8, 1, 3, 16, 16) and v1.shape == (8, 1, 1, 16, 16)
    scale = np.abs(v2).max()
    np.testing.assert_allclose(u1, u2, atol=2e-3 * scale)
    np.testing.assert_allclose(v1, v2, atol=2e-3 * scale)
    # full slices: the reconstructor's own (faster) slice path, equal to its FBP ...
    (ours_in, _), (theirs_in, _) = ours.inference_inputs(), theirs.inference_inputs()
    middle = ours_in[:, 1].mean(axis=0)
    full = rec.reconstruct().full
    np.testing.assert_allclose(middle, full, atol=1e-4 * np.abs(full).max())
    # ... and within interpolation differences of the row backprojector's
    assert np.linalg.norm(ours_in - theirs_in) < 0.02 * np.linalg.norm(theirs_in)


def test_reconstructor_pairs_work_in_cone_beam_and_average_to_the_fdk():
    from bluesky_jit.geometry import ScanGeometry
    from simulated_devices.cone import ball_phantom, cone_projections

    n, size = 120, 48
    geometry = ScanGeometry(
        detector_shape=(size, size),
        pixel_size=1.5,
        beam="cone",
        source_origin=200.0,
        origin_detector=100.0,
        angular_range=(0, 360),
        num_angles=n,
    )
    angles = np.arange(n) * 360.0 / n
    frames = cone_projections(
        ball_phantom(),
        np.radians(angles),
        detector_shape=(size, size),
        pixel_size=1.5,
        source_origin=200.0,
        origin_detector=100.0,
    )
    rec = _fed_reconstructor(geometry, frames, angles, slice_row=20)
    pm = PairMaker.from_reconstructor(
        rec, splits=4, n2i_strategy="1:X", patch_size=12, rng=np.random.default_rng(0)
    )
    u, v = pm.pairs(6)
    assert u.shape == v.shape == (6, 1, 12, 12) and np.isfinite(u).all()
    splits = pm.slice_splits()
    assert splits.shape == (4, geometry.slice_size, geometry.slice_size)
    full = rec.reconstruct().full
    np.testing.assert_allclose(splits.mean(axis=0), full, atol=1e-3 * np.abs(full).max())
    # K = 2: the refresh's even/odd halves are the inputs (no second FBP), equal to the splits'
    halves = PairMaker.from_reconstructor(rec, splits=2, patch_size=12)
    refresh = rec.reconstruct()
    inputs, window = halves.inference_inputs(refresh=refresh)
    assert np.array_equal(inputs, np.stack([refresh.odd, refresh.even]))  # X:1: the other half
    np.testing.assert_array_equal(window, refresh.indices)
    again, _ = halves.inference_inputs()
    np.testing.assert_allclose(again, inputs, atol=1e-3 * np.abs(full).max())


# -- the sampling region ---------------------------------------------------------------------


def test_disc_region_keeps_whole_patches_inside():
    region = SamplingRegion.disc(30.0, center=(5.0, -3.0))
    c = region.centers(2000, size=10, pixel_size=1.0, rng=np.random.default_rng(0))
    half = 4.5
    corners = [(sx * half, sy * half) for sx in (-1, 1) for sy in (-1, 1)]
    for dx, dy in corners:
        r = np.hypot(c[:, 0] + dx - 5.0, c[:, 1] + dy + 3.0)
        assert r.max() <= 30.0
    assert np.hypot(c[:, 0] - 5, c[:, 1] + 3).max() > 15  # and they use the disc
    with pytest.raises(ConfigError, match="does not fit"):
        region.centers(1, size=50, pixel_size=1.0, rng=np.random.default_rng(0))
    region.check_fits(42, 1.0)  # corners of the outer pixels: 20.5 * sqrt(2) + 0.5 < 30 mm
    with pytest.raises(ConfigError, match="does not fit"):
        region.check_fits(44, 1.0)


def test_mask_region_is_changeable_and_respected():
    mask = np.zeros((64, 64), bool)
    mask[10:30, 40:60] = True  # a 20 x 20 pixel box in one corner
    region = SamplingRegion.from_mask(mask, pixel_size=1.0)
    c = region.centers(500, size=8, pixel_size=1.0, rng=np.random.default_rng(1))
    cols = c[:, 0] + 31.5  # back to mask pixel indices
    rows = c[:, 1] + 31.5
    assert cols.min() - 3.5 >= 40 and cols.max() + 3.5 <= 59
    assert rows.min() - 3.5 >= 10 and rows.max() + 3.5 <= 29
    with pytest.raises(ConfigError, match="does not fit"):
        region.centers(1, size=24, pixel_size=1.0, rng=np.random.default_rng(0))
    region.check_fits(19, 1.0)  # centred on a mask pixel, a 20-wide patch overhangs by 1/2
    with pytest.raises(ConfigError, match="does not fit"):
        region.check_fits(20, 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"radius": 3.0, "mask": np.ones((4, 4), bool)},
        {"radius": -1.0},
        {"mask": np.zeros((4, 4), bool)},
        {"mask": np.ones((4, 4))},
        {"radius": 3.0, "pixel_size": 0.0},
    ],
)
def test_bad_regions(kwargs):
    with pytest.raises(ConfigError):
        SamplingRegion(**kwargs)
