import numpy as np
import pytest
import torch

from bluesky_jit.errors import ScanDataError
from bluesky_jit.geometry import ScanGeometry
from bluesky_jit.projections import RampFilter, split_subsets
from bluesky_jit.reconstruction import TorchBackprojector, patch_grid, slice_grid
from bluesky_jit.reconstruction.streaming import StreamingReconstructor

from .phantom_utils import disk_image, disk_sinogram

N, COLS = 128, 128


def torch_fbp(sino, angles, cor, n=N, pixel_size=1.0):
    q = RampFilter(sino.shape[1], pixel_size=pixel_size)(torch.tensor(sino, dtype=torch.float32))
    x, y = slice_grid(n, pixel_size=pixel_size)
    bp = TorchBackprojector(cols=sino.shape[1], center_of_rotation=cor, pixel_size=pixel_size)
    return bp.backproject(q, torch.tensor(angles), x, y).numpy()


def inner(n=N, r=40):
    x, y = slice_grid(n)
    return (x**2 + y**2).numpy() < r**2


def rel(a, b, mask):
    return np.linalg.norm((a - b)[mask]) / np.linalg.norm(b[mask])


@pytest.mark.parametrize("cor", [63.5, 60.3, 66.0])
def test_torch_fbp_agrees_with_astra_cpu_fbp(cor):
    """Relative L2 difference to ASTRA's CPU FBP below 5% inside the object."""
    astra_backend = pytest.importorskip("bluesky_jit.reconstruction.astra_backend")
    angles = np.linspace(0, np.pi, 180, endpoint=False)
    sino = disk_sinogram(angles, COLS, cor)
    ours = torch_fbp(sino, angles, cor)
    ref = astra_backend.astra_fbp(sino, angles, n=N, center_of_rotation=cor)
    mask = inner()
    assert rel(ours, ref, mask) < 0.05
    truth = disk_image(N)
    assert rel(ours, truth, mask) < 0.12
    assert rel(ref, truth, mask) < 0.12


def test_fbp_scale_is_attenuation_per_unit_length():
    """Binning (pixel size 2, half the columns) keeps the reconstructed values."""
    angles = np.linspace(0, np.pi, 180, endpoint=False)
    fine = torch_fbp(disk_sinogram(angles, 128, 63.5), angles, 63.5)
    coarse = torch_fbp(disk_sinogram(angles, 64, 31.5, 2.0), angles, 31.5, n=64, pixel_size=2.0)
    assert abs(fine[64, 64] - 0.01) < 0.002
    assert abs(coarse[32, 32] - 0.01) < 0.002


def test_full_rotation_360_gives_same_scale_as_180():
    a180 = np.linspace(0, np.pi, 180, endpoint=False)
    a360 = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    r180 = torch_fbp(disk_sinogram(a180, COLS, 63.5), a180, 63.5)
    r360 = torch_fbp(disk_sinogram(a360, COLS, 63.5), a360, 63.5)
    assert rel(r360, r180, inner()) < 0.02


def test_patches_equal_the_slice_at_the_same_points():
    angles = np.linspace(0, np.pi, 90, endpoint=False)
    sino = disk_sinogram(angles, COLS, 63.5)
    full = torch_fbp(sino, angles, 63.5)
    q = RampFilter(COLS)(torch.tensor(sino, dtype=torch.float32))
    bp = TorchBackprojector(cols=COLS, center_of_rotation=63.5)
    # the 20x20 patch covering slice rows 30..49 and columns 60..79
    centre = torch.tensor([[(60 + 79) / 2 - (N - 1) / 2, (30 + 49) / 2 - (N - 1) / 2]])
    x, y = patch_grid(centre, 20)
    patch = bp.backproject(q, torch.tensor(angles), x, y)[0].numpy()
    np.testing.assert_allclose(patch, full[30:50, 60:80], atol=1e-5)


def _stream(geometry, frames_angles, **kw):
    rec = StreamingReconstructor(geometry, **kw)
    rows, cols = geometry.detector_shape
    rec.set_flatfield(np.zeros((1, rows, cols)), np.full((1, rows, cols), 1000.0))
    due = []
    for i, (frame, angle) in enumerate(frames_angles):
        due.append(rec.add_frame(frame, angle_deg=angle, index=i))
    return rec, due


def test_streaming_reconstructor_refreshes_every_k_after_a_rotation_and_halves_average():
    g = ScanGeometry(detector_shape=(3, COLS), num_angles=90, angular_range=(0, 180))
    angles_deg = np.arange(130) * 2.0  # continuous rotation past 180
    sino = disk_sinogram(np.radians(angles_deg), COLS, 63.5)
    frames = [
        (np.repeat(1000 * np.exp(-s)[None], 3, axis=0), a)
        for s, a in zip(sino, angles_deg, strict=True)
    ]
    rec, due = _stream(g, frames, refresh_every=10)
    assert [i for i, d in enumerate(due) if d] == [89, 99, 109, 119, 129]
    s = rec.reconstruct()
    assert list(s.indices) == list(range(40, 130))
    np.testing.assert_allclose(s.full, (s.even + s.odd) / 2, atol=1e-6)
    assert rel(s.full, disk_image(N), inner()) < 0.15
    # even and odd halves see the same object
    assert rel(s.even, s.odd, inner()) < 0.2


def test_default_slice_is_the_axial_one_at_slice_row_and_backends_agree():
    g = ScanGeometry(detector_shape=(5, 64), num_angles=60, angular_range=(0, 180))
    angles_deg = np.arange(60) * 3.0
    sino = disk_sinogram(np.radians(angles_deg), 64, 31.5, disks=[(5.0, 3.0, 12.0, 0.05)])
    frames = [
        (np.repeat(1000 * np.exp(-s)[None], 5, axis=0), a)
        for s, a in zip(sino, angles_deg, strict=True)
    ]
    rec, _ = _stream(g, frames, refresh_every=60, slice_row=1)
    s = rec.reconstruct()
    assert s.row == 1 and s.slice.is_axial and s.full.shape == (64, 64)
    three = rec.reconstruct_slices()
    assert len(three) == 3 and three[0].slice == s.slice
    np.testing.assert_allclose(three[0].full, s.full)
    assert three[1].full.shape == (5, 64)  # xz: as tall as the detector
    torch_rec, _ = _stream(g, frames, refresh_every=60, slice_row=1, backend="torch")
    assert rel(torch_rec.reconstruct().full, s.full, inner(64, 28)) < 0.01
    halves = split_subsets(rec.window_indices(), 2)  # patches per split agree as well
    centers, rows = np.array([[3.0, -4.0], [-10.0, 6.0]]), np.array([1, 2])
    np.testing.assert_allclose(
        torch_rec.subset_patches(halves, centers, rows, size=8),
        rec.subset_patches(halves, centers, rows, size=8),
        atol=1e-6,
    )


def test_parallel_incremental_refresh_equals_from_scratch():
    """Axial (fast path per subset) and vertical slices, sliding over a continuous rotation."""
    g = ScanGeometry(detector_shape=(3, COLS), num_angles=90, angular_range=(0, 180))
    angles_deg = np.arange(150) * 2.0
    # the object darkens with time: frames entering and leaving the window differ
    sino = disk_sinogram(np.radians(angles_deg), COLS, 63.5) * (1 + 0.005 * np.arange(150))[:, None]
    frames = [
        (np.repeat(1000 * np.exp(-s)[None], 3, axis=0), a)
        for s, a in zip(sino, angles_deg, strict=True)
    ]
    inc = StreamingReconstructor(g, refresh_every=13)
    ref = StreamingReconstructor(g, refresh_every=13, incremental=False)
    for rec in (inc, ref):
        rec.set_flatfield(np.zeros((1, 3, COLS)), np.full((1, 3, COLS), 1000.0))
    checked = 0
    for i, (frame, angle) in enumerate(frames):
        due = inc.add_frame(frame, angle_deg=angle, index=i)
        assert due == ref.add_frame(frame, angle_deg=angle, index=i)
        if due:
            checked += 1
            for a, b in zip(inc.reconstruct_slices(), ref.reconstruct_slices(), strict=True):
                np.testing.assert_allclose(a.full, b.full, atol=1e-5 * np.abs(b.full).max())
                np.testing.assert_allclose(a.odd, b.odd, atol=1e-5 * np.abs(b.odd).max())
    assert checked == 5


def test_a_rejected_frame_does_not_break_later_refreshes():
    g = ScanGeometry(detector_shape=(3, 32), num_angles=20)
    rec = StreamingReconstructor(g, refresh_every=5)
    rec.set_flatfield(np.zeros((1, 3, 32)), np.full((1, 3, 32), 10.0))
    for i in range(30):
        frame = np.full((3, 32), 5.0)
        if i == 5:
            frame[0, 0] = np.nan
            with pytest.raises(ScanDataError, match="NaN"):
                rec.add_frame(frame, angle_deg=9.0 * i, index=i)
            continue
        rec.add_frame(frame, angle_deg=9.0 * i, index=i)
    s = rec.reconstruct()
    assert list(s.indices) == list(range(10, 30))


def test_set_center_reconstructs_about_the_new_axis_from_the_kept_projections():
    """A disk scanned about column 60.3, reconstructed first about the middle column (wrong)
    then, after set_center, as a reconstructor told the right centre from the start."""
    g = ScanGeometry(detector_shape=(3, COLS), num_angles=90, angular_range=(0, 180))
    angles_deg = np.arange(90) * 2.0
    sino = disk_sinogram(np.radians(angles_deg), COLS, 60.3)
    right = StreamingReconstructor(ScanGeometry(**{**g.to_dict(), "center_of_rotation": 60.3}))
    moved = StreamingReconstructor(g)
    for rec in (right, moved):
        rec.set_flatfield(np.zeros((1, 3, COLS)), np.full((1, 3, COLS), 1000.0))
        for i, (s, a) in enumerate(zip(sino, angles_deg, strict=True)):
            rec.add_frame(np.repeat(1000 * np.exp(-s)[None], 3, axis=0), angle_deg=a, index=i)
    expected = [s.full for s in right.reconstruct_slices()]
    before = [s.full for s in moved.reconstruct_slices()]  # running sums about the old axis
    moved.set_center(60.3)
    assert moved.geometry.center_of_rotation == 60.3
    after = [s.full for s in moved.reconstruct_slices()]
    for a, b, e in zip(before, after, expected, strict=True):
        np.testing.assert_allclose(b, e, atol=1e-5 * np.abs(e).max())
        assert np.abs(a - e).max() > 0.1 * np.abs(e).max()
    with pytest.raises(ValueError, match="outside the detector"):
        moved.set_center(COLS + 5)
