"""Backends agree with each other and with ASTRA; slices at any orientation are consistent."""

import math

import numpy as np
import pytest
import torch

from bluesky_jit.evaluation import psnr
from bluesky_jit.geometry import Slice, cone, parallel
from bluesky_jit.projections import RampFilter
from bluesky_jit.reconstruction.backends import make_backend
from bluesky_jit.reconstruction.numba_backend import NumbaBackend
from bluesky_jit.reconstruction.torch_backend import TorchBackend
from simulated_devices.cone import ball_phantom, cone_projections, parallel_projections

from .phantom_utils import disk_image, disk_sinogram

N = 128


def filtered(sino, pixel_size=1.0, filter_name="ram-lak"):
    """(n, cols) or (n, rows, cols) line integrals -> (n, rows, cols) filtered float32."""
    sino = np.asarray(sino, dtype=np.float32)
    if sino.ndim == 2:
        sino = sino[:, None, :]
    ramp = RampFilter(sino.shape[-1], pixel_size=pixel_size, filter_name=filter_name)
    return ramp(torch.from_numpy(sino)).numpy()


def inner(n=N, r=40):
    c = np.arange(n) - (n - 1) / 2
    return c[:, None] ** 2 + c[None, :] ** 2 < r * r


def rel(a, b, mask=None):
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def disks():
    angles = np.linspace(0, np.pi, 180, endpoint=False)
    cor = 60.3
    q = filtered(disk_sinogram(angles, N, cor))
    return q, parallel(angles=angles, shape=(1, N), center_of_rotation=cor), cor, angles


@pytest.fixture(scope="module")
def numba_backend():
    return NumbaBackend()


@pytest.mark.parametrize("cor", [63.5, 60.3, 66.0])
def test_numba_fbp_agrees_with_astra_cpu_fbp_and_is_at_least_as_accurate(cor, numba_backend):
    """Relative L2 to ASTRA's CPU FBP below 5 % inside the object; PSNR at least ASTRA's."""
    astra_backend = pytest.importorskip("bluesky_jit.reconstruction.astra_backend")
    angles = np.linspace(0, np.pi, 180, endpoint=False)
    sino = disk_sinogram(angles, N, cor)
    geom = parallel(angles=angles, shape=(1, N), center_of_rotation=cor)
    ours = numba_backend.backproject(filtered(sino), geom, Slice.axial(shape=(N, N)))
    ref = astra_backend.astra_fbp(sino, angles, n=N, center_of_rotation=cor)
    mask = inner()
    assert rel(ours, ref, mask) < 0.05
    truth = disk_image(N)
    assert psnr(ours, truth, mask) >= psnr(ref, truth, mask) - 0.1


def test_fast_path_matches_direct_interpolation(disks, numba_backend):
    """The contiguous-load fast path stays within 1 % of pixel-driven linear interpolation."""
    q, geom, _, _ = disks
    direct = NumbaBackend(fast_path=False)
    for s in (
        Slice.axial(shape=(N, N)),
        Slice.axial(shape=(N, N)).zoom(2.5),
        Slice.axial(shape=(50, 70), pixel_size=1.3, center_xy=(7.0, -4.0)),
        Slice(
            shape=(N, N),
            axis_u=(math.cos(0.4), math.sin(0.4), 0),
            axis_v=(-math.sin(0.4), math.cos(0.4), 0),
        ),
    ):
        assert rel(numba_backend.backproject(q, geom, s), direct.backproject(q, geom, s)) < 0.01


def test_torch_and_numba_backends_agree(disks, numba_backend):
    q, geom, _, _ = disks
    s = Slice.axial(shape=(N, N))
    direct = NumbaBackend(fast_path=False).backproject(q, geom, s)
    np.testing.assert_allclose(TorchBackend().backproject(q, geom, s), direct, atol=2e-6)
    assert rel(numba_backend.backproject(q, geom, s), direct) < 0.01
    # general (bilinear) path: a vertical slice through a 3D object, and cone beam
    balls = ball_phantom(0.5)
    ang = np.linspace(0, np.pi, 60, endpoint=False)
    q3 = filtered(parallel_projections(balls, ang, detector_shape=(24, 40)))
    g3 = parallel(angles=ang, shape=(24, 40))
    vertical = Slice.xz(shape=(24, 40), y=1.5)
    np.testing.assert_allclose(
        TorchBackend().backproject(q3, g3, vertical),
        numba_backend.backproject(q3, g3, vertical),
        atol=2e-6,
    )
    gc = cone(angles=36, shape=(24, 40), source_origin=100, origin_detector=50)
    np.testing.assert_allclose(
        TorchBackend().backproject(q3[:36], gc, vertical),
        numba_backend.backproject(q3[:36], gc, vertical),
        atol=2e-6,
    )


@pytest.mark.parametrize("projector, tolerance", [("strip", 0.02), ("linear", 0.03)])
def test_astra_backend_agrees_with_numba(disks, numba_backend, projector, tolerance):
    """ASTRA's CPU BP of the same filtered projections (ROI, zoom and in-plane rotation too)."""
    pytest.importorskip("astra")
    from bluesky_jit.reconstruction.astra_backend import AstraBackend

    q, geom, _, _ = disks
    astra_bp = AstraBackend(projector=projector)
    for s in (
        Slice.axial(shape=(N, N)),
        Slice.axial(shape=(40, 60), pixel_size=1.5, center_xy=(10.0, -5.0)),
        Slice(shape=(N, N), axis_u=(0, 1, 0), axis_v=(-1, 0, 0)),
    ):
        assert (
            rel(astra_bp.backproject(q, geom, s), numba_backend.backproject(q, geom, s)) < tolerance
        )


def test_astra_backend_refuses_3d_without_cuda(disks):
    astra = pytest.importorskip("astra")
    if astra.use_cuda():
        pytest.skip("CUDA available: the 3D path would be taken")
    from bluesky_jit.errors import ConfigError
    from bluesky_jit.reconstruction.astra_backend import AstraBackend

    q, geom, _, _ = disks
    with pytest.raises(ConfigError, match="no GPU"):
        AstraBackend().backproject(q, geom, Slice.xz(shape=(1, N)))
    with pytest.raises(ConfigError, match="not training patches"):
        AstraBackend().backproject_grids(q, geom, np.zeros((1, 3)), Slice.axial(shape=(4, 4)))


def test_slice_turned_by_90_degrees_is_the_transposed_axial_slice(disks, numba_backend):
    """Swapping the in-plane axes transposes; turning them by 90 degrees rotates the image.

    Exact for pixel-driven interpolation; the fast path anchors its tables
    differently for the turned slice and agrees within 0.5 %.
    """
    q, geom, _, _ = disks
    swapped = Slice(shape=(N, N), axis_u=(0, 1, 0), axis_v=(1, 0, 0))
    turned = Slice(shape=(N, N), axis_u=(0, 1, 0), axis_v=(-1, 0, 0))
    for backend, tolerance in ((NumbaBackend(fast_path=False), 1e-6), (numba_backend, 0.005)):
        axial = backend.backproject(q, geom, Slice.axial(shape=(N, N)))
        assert rel(backend.backproject(q, geom, swapped), axial.T) < tolerance
        assert rel(backend.backproject(q, geom, turned), np.rot90(axial)) < tolerance


def test_roi_is_the_crop_of_the_slice(disks, numba_backend):
    q, geom, _, _ = disks
    s = Slice.axial(shape=(N, N))
    full = numba_backend.backproject(q, geom, s)
    roi = numba_backend.backproject(q, geom, s.crop(slice(30, 70), slice(10, 90)))
    assert rel(roi, full[30:70, 10:90]) < 0.005
    exact = NumbaBackend(fast_path=False)
    np.testing.assert_allclose(
        exact.backproject(q, geom, s.crop(slice(30, 70), slice(10, 90))),
        exact.backproject(q, geom, s)[30:70, 10:90],
        atol=1e-6,
    )


def test_even_and_odd_backprojections_sum_to_the_full_one(numba_backend):
    balls = ball_phantom(0.5)
    ang = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    for geom, data in (
        (
            parallel(angles=ang, shape=(16, 40)),
            parallel_projections(balls, ang, detector_shape=(16, 40)),
        ),
        (
            cone(angles=ang, shape=(16, 40), source_origin=150, origin_detector=50),
            cone_projections(
                balls,
                ang,
                detector_shape=(16, 40),
                pixel_size=1.0,
                source_origin=150,
                origin_detector=50,
            ),
        ),
    ):
        q = filtered(data)
        for s in (Slice.axial(shape=(40, 40), z=0.7), Slice.yz(shape=(16, 40), x=-2.0)):
            full = numba_backend.backproject(q, geom, s)
            even = numba_backend.backproject(q[0::2], geom[0::2], s)
            odd = numba_backend.backproject(q[1::2], geom[1::2], s)
            np.testing.assert_allclose((even + odd) / 2, full, atol=1e-5 * np.abs(full).max())


def test_oblique_slice_matches_the_resampled_volume(numba_backend):
    """A slice tilted 30 degrees out of the axial plane equals trilinear resampling of the stack."""
    from scipy.ndimage import map_coordinates

    rows, cols = 32, 48
    ang = np.linspace(0, np.pi, 120, endpoint=False)
    q = filtered(
        parallel_projections(ball_phantom(0.6), ang, detector_shape=(rows, cols)),
        filter_name="hann",
    )
    geom = parallel(angles=ang, shape=(rows, cols))
    volume = np.stack(
        [
            numba_backend.backproject(
                q, geom, Slice.axial(shape=(cols, cols), z=r - (rows - 1) / 2)
            )
            for r in range(rows)
        ]
    )
    a = math.radians(30)
    oblique = Slice(shape=(24, 40), axis_u=(math.cos(a), 0, math.sin(a)), axis_v=(0, 1, 0))
    pts = oblique.points()
    coords = [
        pts[..., 2] + (rows - 1) / 2,
        pts[..., 1] + (cols - 1) / 2,
        pts[..., 0] + (cols - 1) / 2,
    ]
    resampled = map_coordinates(volume, coords, order=1)
    assert rel(numba_backend.backproject(q, geom, oblique), resampled) < 0.025


def test_patches_equal_the_slice_at_the_same_points(disks, numba_backend):
    q, geom, _, _ = disks
    s = Slice.axial(shape=(N, N))
    full = numba_backend.backproject(q, geom, s)
    like = Slice.axial(shape=(20, 20))
    origins = np.array(
        [s.origin + 60 * s.step_u + 30 * s.step_v, s.origin + 5 * s.step_u + 90 * s.step_v]
    )
    patches = numba_backend.backproject_grids(q, geom, origins, like)
    exact = NumbaBackend(fast_path=False).backproject(q, geom, s)
    np.testing.assert_allclose(patches[0], exact[30:50, 60:80], atol=1e-6)
    np.testing.assert_allclose(patches[1], exact[90:110, 5:25], atol=1e-6)
    assert rel(patches[0], full[30:50, 60:80]) < 0.01


def test_make_backend_names_and_errors():
    from bluesky_jit.errors import ConfigError

    assert make_backend("auto").name == "numba"
    assert make_backend("torch").name == "torch"
    with pytest.raises(ConfigError, match="Unknown reconstruction backend 'fast'"):
        make_backend("fast")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        make_backend("numba", device="meta")


@pytest.mark.gpu
@pytest.mark.gpu
def test_torch_cuda_agrees_with_numba(disks, numba_backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, geom, _, _ = disks
    s = Slice.axial(shape=(N, N))
    gpu = TorchBackend(device="cuda").backproject(torch.from_numpy(q).cuda(), geom, s)
    assert rel(gpu, numba_backend.backproject(q, geom, s)) < 0.01


@pytest.mark.gpu
def test_cupy_agrees_with_numba_on_any_slice(numba_backend):
    cp = pytest.importorskip("cupy")
    if cp.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("needs CUDA")
    from bluesky_jit.reconstruction.cupy_backend import CupyBackend

    balls = ball_phantom(0.5)
    ang = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    gc = cone(angles=ang, shape=(16, 40), source_origin=150, origin_detector=50)
    q = filtered(
        cone_projections(
            balls,
            ang,
            detector_shape=(16, 40),
            pixel_size=1.0,
            source_origin=150,
            origin_detector=50,
        )
    )
    gpu = CupyBackend(device="cuda:0")
    exact = NumbaBackend(fast_path=False)
    for s in (Slice.axial(shape=(40, 40), z=0.7), Slice.yz(shape=(16, 40), x=-2.0)):
        np.testing.assert_allclose(
            gpu.backproject(q, gc, s), exact.backproject(q, gc, s), atol=1e-5
        )


def test_cupy_backend_needs_cuda():
    from bluesky_jit.errors import ConfigError

    with pytest.raises(ConfigError, match="cupy"):
        make_backend("cupy")


def test_serial_and_parallel_kernels_agree(disks):
    """One thread uses serial twins of the kernels; results do not depend on the thread count."""
    q, geom, _, _ = disks
    for s in (Slice.axial(shape=(N, N)), Slice.xz(shape=(1, N))):
        np.testing.assert_allclose(
            NumbaBackend(threads=1).backproject(q, geom, s),
            NumbaBackend(threads=2).backproject(q, geom, s),
            atol=1e-6,
        )
    like = Slice.axial(shape=(20, 20))
    origins = np.array([[3.0, -4.0, 0.0], [-30.0, 10.0, 0.0]])
    np.testing.assert_allclose(
        NumbaBackend(threads=1).backproject_grids(q, geom, origins, like),
        NumbaBackend(threads=2, parallel_work=0).backproject_grids(q, geom, origins, like),
        atol=1e-6,
    )


# -- the general kernel at the detector's border, subsets in place, bad shapes ---------------
@pytest.fixture(scope="module")
def small_cone():
    balls = ball_phantom(0.5)
    ang = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    shape = (20, 36)
    geom = cone(angles=ang, shape=shape, pixel_size=1.2, source_origin=90, origin_detector=45)
    q = filtered(
        cone_projections(
            balls,
            ang,
            detector_shape=shape,
            pixel_size=1.2,
            source_origin=90,
            origin_detector=45,
        ),
        pixel_size=0.8,
    )
    return q, geom


def test_cone_slices_across_the_detector_border_match_torch(small_cone, numba_backend):
    """Partly off the detector, tilted, zoomed: the float32 interior + checked border path
    agrees with torch's bilinear sampling."""
    q, geom = small_cone
    tilt = (0.0, 0.8, 0.6)
    for s in (
        Slice.xz(shape=(40, 50), y=2.0, pixel_size=0.9),  # taller and wider than the detector
        Slice(shape=(30, 30), pixel_size=1.1, center=(3.0, -2.0, 4.0), axis_v=tilt),
        Slice.axial(shape=(33, 17), z=-5.5, pixel_size=1.7, center_xy=(-4.0, 6.0)),
    ):
        ours = numba_backend.backproject(q, geom, s)
        ref = TorchBackend().backproject(q, geom, s)
        np.testing.assert_allclose(ours, ref, atol=2e-5 * np.abs(ref).max())
        serial = NumbaBackend(threads=1).backproject(q, geom, s)
        np.testing.assert_allclose(serial, ours, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("beam", ["cone", "parallel"])
def test_backproject_split_equals_each_subset_and_reads_the_ring_in_place(
    small_cone, numba_backend, beam
):
    q, geom = small_cone
    if beam == "parallel":
        geom = parallel(angles=geom.angles[:24], shape=geom.shape)
        q = q[:24]
    n = len(geom)
    ring = np.zeros((2 * n + 5, *q.shape[1:]), dtype=np.float32)
    slots = (np.arange(n) + n + 3) % len(ring)  # wrapped around the ring
    ring[slots] = q
    groups = np.arange(n) % 3  # j::3
    slices = [
        Slice.axial(shape=(24, 24), z=1.0),
        Slice.xz(shape=(20, 24)),
        Slice.yz(shape=(20, 24), x=1.5),
    ]
    got = numba_backend.backproject_split(ring, geom, slices, slots=slots, groups=groups)
    for s, planes in zip(slices, got, strict=True):
        assert planes.shape == (3, *s.shape)
        for j in range(3):
            expected = numba_backend.backproject(q[j::3], geom[j::3], s)
            np.testing.assert_allclose(planes[j], expected, atol=1e-5 * np.abs(expected).max())
    # the Protocol's default (other backends: backproject on every subset) gives the same
    torch_backend = TorchBackend()
    assert numba_backend.split_in_place and not torch_backend.split_in_place
    generic = torch_backend.backproject_split(ring, geom, slices, slots=slots, groups=groups)
    for a, b in zip(got, generic, strict=True):
        # parallel axial: numba's fast path (resampled tables) is within 1 % of bilinear
        assert rel(a, b) < (0.01 if beam == "parallel" else 1e-5)
    sums = numba_backend.backproject_split(
        ring, geom, slices[:1], slots=slots, groups=groups, normalize=False, num_groups=4
    )[0]
    np.testing.assert_allclose(sums[:3] * math.pi / (n // 3), got[0], rtol=1e-5, atol=1e-6)
    assert not sums[3].any()  # an empty subset


def test_projections_that_do_not_fit_the_geometry_are_named(small_cone, numba_backend):
    from bluesky_jit.errors import ScanDataError

    q, geom = small_cone
    s = Slice.axial(shape=(8, 8))
    with pytest.raises(ScanDataError, match=r"35 columns wide.*36 columns.*shape \(20, 36\)"):
        numba_backend.backproject(q[:, :, :35], geom, s)
    with pytest.raises(ScanDataError, match=r"Got 47 filtered projections.*48.*geometry\[0::2\]"):
        numba_backend.backproject(q[:47], geom, s)
    with pytest.raises(ScanDataError, match=r"rows 15\.\.34.*rows 0\.\.19"):
        numba_backend.backproject(q, geom, s, row_offset=15)
    with pytest.raises(ScanDataError, match=r"\(21, 36\) do not match the geometry's detector"):
        numba_backend.backproject_split(np.zeros((48, 21, 36), np.float32), geom, [s])
    with pytest.raises(ScanDataError, match=r"Subsets \[1\] have no projection"):
        numba_backend.backproject_split(q, geom, [s], groups=np.arange(48) % 2 * 2)
    with pytest.raises(ScanDataError, match="columns wide"):
        TorchBackend().backproject(q[:, :, :35], geom, s)
