"""Reconstruction speed and accuracy against peers, on analytic phantoms.

    python benchmarks/reconstruction.py --json benchmarks/results/reconstruction.json

Cases (median of ``--repeats`` timings; methods are interleaved within each
repeat so that they share the machine's load; PSNR against the analytic
phantom, area-averaged on each method's own pixel grid, inside the
reconstruction circle):

- ``slice``: a 512 x 512 parallel-beam slice from 180 projections. The
  project's time is the backprojection of already filtered projections (what
  a streaming refresh costs: filtering happens once per frame on arrival);
  ``time_with_filter_s`` adds the ramp filter. Peers reconstruct from the
  sinogram: ASTRA's CPU FBP, scikit-image's ``iradon`` with the same (ramp)
  filter, a naive torch ``grid_sample`` FBP, and diffct when it imports.
- ``patch``: one 20 x 20 patch anywhere in that slice from the 180
  projections (Graas et al. 2023: about 2 ms on a GPU), a Noise2Inverse pair from the
  even/odd halves, and 64 training pairs from the streaming reconstructor as
  the pipeline makes them (``PairMaker.pairs(64)``).
  Peers: ASTRA's FBP on a 20 x 20 region of interest, torch ``grid_sample``
  on the patch points; scikit-image has no region of interest.
- ``cone``: FDK of a 128 x 128 axial slice and of three orthogonal slices from
  360 cone-beam projections (128 x 128 detector) of a 3D ball phantom. Peers:
  a naive torch ``grid_sample`` FDK; ASTRA's FDK needs CUDA (run only when
  ``astra.use_cuda()``).
- ``patch_batch``: a batch of 32 60 x 60 patches (Graas et al. 2023: 64 ms on
  a GPU) from the 150 cone-beam projections of the 647 x 768 detector of Graas
  et al. 2023, on the CPU (the GPU target is in ``cuda``).
- ``cone_graas2023``: the CPU target: three orthogonal 512 x 512 slices (full,
  even and odd halves) from the last 150 cone-beam projections of the 647 x 768
  detector of Graas et al. 2023 over 360 degrees (distances in :data:`GRAAS2023`),
  streamed through ``StreamingReconstructor``: per-frame time (correction,
  FDK weights, ramp filter), sliding refresh time every ``--graas2023-every``
  projections (incremental: the projections that entered and left the
  window), the from-scratch refresh (all 150 projections), refreshes/s and
  sustained rates with the per-frame work included, PSNR of each slice
  against the analytic phantom inside the cone's field of view.
- ``sirt``: streaming SIRT (Liu et al. 2019): refresh time and sustained
  projections/s for windows W in 16..256 and iterations I in 1, 5, 10 on a
  256 x 256 slice, printed in the table layout of Liu et al. 2019.
- ``cuda``: the GPU targets, a 1024 x 1024 slice from 400 projections (under
  5 ms; RECAST3D 31.5 ms) and a batch of 32 60 x 60 patches (under 2 ms), with
  the torch and cupy backends; recorded as "unavailable: no CUDA" without a GPU.

``ratio_vs_astra`` is the project's time over ASTRA's, both medians from the
same run. Timings on a shared machine are noisy: the load average before and
after each case is recorded.

References: A. Graas, S. B. Coban, K. J. Batenburg and F. Lucka, "Just-in-time
deep learning for real-time X-ray computed tomography", Scientific Reports 13
(2023); Z. Liu, T. Bicer, R. Kettimuthu and I. Foster, "Deep learning
accelerated light source experiments", IEEE/ACM Workshop on Deep Learning on
Supercomputers (DLS) (2019).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bluesky_jit import evaluation
from bluesky_jit.geometry import ScanGeometry, Slice, parallel
from bluesky_jit.projections import RampFilter
from bluesky_jit.reconstruction.backends import make_backend
from simulated_devices.cone import (
    Ball,
    ball_phantom,
    ball_truth,
    cone_projections,
    parallel_projections,
)

CASES = ("slice", "patch", "patch_batch", "cone", "cone_graas2023", "sirt", "cuda")

SLICE_BALLS = (
    Ball(80.0, -40.0, 0.0, 60.0, 0.02),
    Ball(-120.0, 100.0, 0.0, 32.0, 0.05),
    Ball(0.0, 0.0, 0.0, 200.0, 0.01),
    Ball(30.0, 120.0, 0.0, 12.0, -0.008),
)


# -- helpers ----------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ("numba", "astra", "skimage"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    return info


def load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def timed(methods: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per method; methods interleaved, one warm-up call each."""
    for f in methods.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, f in methods.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def psnr(
    image: np.ndarray, truth: np.ndarray, mask: np.ndarray, peak: float | None = None
) -> float:
    """PSNR (dB, two decimals) inside ``mask``; the peak is the truth's range there unless given."""
    return round(evaluation.psnr(image, truth, mask, data_range=peak), 2)


def truth_image(balls, slice_: Slice, supersample: int = 4) -> np.ndarray:
    """Area-averaged attenuation on the slice's pixels."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    acc = np.zeros(slice_.shape)
    base = slice_.points()
    for du in offsets:
        for dv in offsets:
            pts = base + du * slice_.step_u + dv * slice_.step_v
            acc += ball_truth(balls, pts)
    return acc / supersample**2


def circle(slice_: Slice, radius: float) -> np.ndarray:
    pts = slice_.points()
    return (pts[..., 0] ** 2 + pts[..., 1] ** 2) < radius**2


def peer_unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def torch_grid_sample_fbp(filtered, angles, cor, points) -> np.ndarray:
    """Naive FBP: ``grid_sample`` of the filtered sinogram at every (angle, point)."""
    q = torch.as_tensor(filtered, dtype=torch.float32)
    n_ang, cols = q.shape
    pts = torch.as_tensor(points.reshape(-1, 3), dtype=torch.float32)
    out = torch.zeros(pts.shape[0])
    cos = torch.cos(torch.as_tensor(angles, dtype=torch.float32))
    sin = torch.sin(torch.as_tensor(angles, dtype=torch.float32))
    step = max(1, (1 << 22) // pts.shape[0])
    image = q[None, None]
    for k in range(0, n_ang, step):
        c, s = cos[k : k + step, None], sin[k : k + step, None]
        col = cor + pts[None, :, 0] * c + pts[None, :, 1] * s
        gx = 2 * col / (cols - 1) - 1
        rows = torch.arange(k, k + c.shape[0], dtype=torch.float32)[:, None]
        gy = (2 * rows / max(n_ang - 1, 1) - 1).expand_as(gx)
        grid = torch.stack([gx, gy], -1)[None]
        v = torch.nn.functional.grid_sample(
            image, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        out += v[0, 0].sum(0)
    return (out * math.pi / n_ang).reshape(points.shape[:-1]).numpy()


def torch_grid_sample_fdk(filtered, geometry, points) -> np.ndarray:
    """Naive FDK: per projection, ``grid_sample`` at the projected points, times 1 / w**2."""
    q = torch.as_tensor(filtered, dtype=torch.float32)
    n, rows, cols = q.shape
    row, col, w = geometry.project(points.reshape(-1, 3))
    gx = torch.as_tensor(2 * col / (cols - 1) - 1, dtype=torch.float32)
    gy = torch.as_tensor(2 * row / (rows - 1) - 1, dtype=torch.float32)
    weight = torch.as_tensor(1.0 / w**2, dtype=torch.float32)
    grid = torch.stack([gx, gy], -1)[:, None]  # (n, 1, P, 2)
    v = torch.nn.functional.grid_sample(
        q[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    out = (v[:, 0, 0] * weight).sum(0) * math.pi / n
    return out.reshape(points.shape[:-1]).numpy()


def diffct_status() -> dict[str, Any]:
    try:
        import diffct  # noqa: F401
    except ImportError:
        return peer_unavailable("diffct is not installed")
    if not torch.cuda.is_available():
        return peer_unavailable("diffct imports, but needs CUDA (numba.cuda); no GPU here")
    return peer_unavailable("diffct imports; timing it is not wired in this version")


# -- cases ------------------------------------------------------------------------------------
def slice_case(n: int, n_angles: int, repeats: int) -> dict[str, Any]:
    from bluesky_jit.reconstruction.astra_backend import astra_fbp
    from bluesky_jit.reconstruction.numba_backend import NumbaBackend

    cor = n / 2  # a whole pixel: scikit-image's fixed centre
    scale = n / 512
    balls = tuple(Ball(b.x * scale, b.y * scale, 0.0, b.radius * scale, b.mu) for b in SLICE_BALLS)
    angles = np.linspace(0, np.pi, n_angles, endpoint=False)
    sino = parallel_projections(
        balls, angles, detector_shape=(1, n), center_of_rotation=cor, center_row=0.0
    )[:, 0]
    ramp = RampFilter(n)
    sino_t = torch.as_tensor(sino, dtype=torch.float32)
    q = ramp(sino_t).numpy()[:, None, :]
    geom = parallel(angles=angles, shape=(1, n), center_of_rotation=cor)
    ours_slice = Slice.axial(shape=(n, n))
    sk_slice = Slice.axial(shape=(n, n), center_xy=(-0.5, -0.5))  # iradon's centre is n // 2
    numba_all = NumbaBackend()
    numba_one = NumbaBackend(threads=1)
    torch_backend = make_backend("torch")
    images: dict[str, np.ndarray] = {}

    def keep(name, f):
        def run():
            images[name] = f()

        return run

    methods = {
        "project": keep("project", lambda: numba_all.backproject(q, geom, ours_slice)),
        "project_with_filter": keep(
            "project_with_filter",
            lambda: numba_all.backproject(ramp(sino_t).numpy()[:, None, :], geom, ours_slice),
        ),
        "project_1_thread": keep(
            "project_1_thread", lambda: numba_one.backproject(q, geom, ours_slice)
        ),
        "project_torch_backend": keep(
            "project_torch_backend", lambda: torch_backend.backproject(q, geom, ours_slice)
        ),
        "astra_cpu_fbp": keep(
            "astra_cpu_fbp", lambda: astra_fbp(sino, angles, n=n, center_of_rotation=cor)
        ),
        "torch_grid_sample": keep(
            "torch_grid_sample",
            lambda: torch_grid_sample_fbp(ramp(sino_t).numpy(), angles, cor, ours_slice.points()),
        ),
    }
    try:
        from skimage.transform import iradon

        methods["skimage_iradon"] = keep(
            "skimage_iradon",
            lambda: iradon(
                sino.T,
                theta=-np.degrees(angles),
                filter_name="ramp",
                interpolation="linear",
                circle=False,
                output_size=n,
            ),
        )
    except ImportError:
        pass
    before = load()
    times = timed(methods, repeats)
    truth = truth_image(balls, ours_slice)
    sk_truth = truth_image(balls, sk_slice)
    mask = circle(ours_slice, 0.45 * n)
    sk_mask = circle(sk_slice, 0.45 * n)

    def entry(name, *, sk=False):
        return {
            "time_s": times[name],
            "psnr_db": psnr(images[name], sk_truth if sk else truth, sk_mask if sk else mask),
        }

    project = entry("project") | {
        "time_with_filter_s": times["project_with_filter"],
        "time_1_thread_s": times["project_1_thread"],
        "backend": "numba",
    }
    peers = {
        "astra_cpu_fbp": entry("astra_cpu_fbp"),
        "skimage_iradon": entry("skimage_iradon", sk=True)
        if "skimage_iradon" in images
        else peer_unavailable("scikit-image is not installed"),
        "torch_grid_sample": entry("torch_grid_sample"),
        "bluesky_jit_torch_backend": entry("project_torch_backend"),
        "diffct": diffct_status(),
    }
    return {
        "case": "slice",
        "description": f"{n}x{n} parallel-beam slice from {n_angles} projections",
        "project": project,
        "peers": peers,
        "ratio_vs_astra": times["project"] / times["astra_cpu_fbp"],
        "ratio_vs_astra_with_filter": times["project_with_filter"] / times["astra_cpu_fbp"],
        "ratio_vs_astra_1_thread": times["project_1_thread"] / times["astra_cpu_fbp"],
        "load_before": before,
        "load_after": load(),
    }


def astra_roi_fbp(sino, angles, *, cor, window, size) -> np.ndarray:
    """ASTRA CPU FBP on a square region of interest (x0, x1, y0, y1) in pixels."""
    import astra

    from bluesky_jit.reconstruction.astra_backend import centred

    centred_sino, cols = centred(np.asarray(sino, dtype=np.float64), cor)
    x0, x1, y0, y1 = window
    proj_geom = astra.create_proj_geom("parallel", 1.0, cols, angles)
    # ASTRA's row 0 lies at the top (+y): same window, image mirrored after
    vol_geom = astra.create_vol_geom(size, size, x0, x1, y0, y1)
    sino_id = astra.data2d.create("-sino", proj_geom, centred_sino.astype(np.float32))
    rec_id = astra.data2d.create("-vol", vol_geom, 0.0)
    proj_id = astra.create_projector("linear", proj_geom, vol_geom)
    cfg = astra.astra_dict("FBP")
    cfg.update(ProjectionDataId=sino_id, ReconstructionDataId=rec_id, ProjectorId=proj_id)
    cfg["FilterType"] = "ram-lak"
    alg = astra.algorithm.create(cfg)
    try:
        astra.algorithm.run(alg)
        image = astra.data2d.get(rec_id)
    finally:
        astra.algorithm.delete(alg)
        astra.data2d.delete([sino_id, rec_id])
        astra.projector.delete(proj_id)
    return np.flipud(image)


def patch_case(n: int, n_angles: int, size: int, repeats: int) -> dict[str, Any]:
    from bluesky_jit.pairs import PairMaker
    from bluesky_jit.reconstruction.numba_backend import NumbaBackend
    from bluesky_jit.reconstruction.streaming import StreamingReconstructor

    cor = n / 2
    scale = n / 512
    balls = tuple(Ball(b.x * scale, b.y * scale, 0.0, b.radius * scale, b.mu) for b in SLICE_BALLS)
    angles = np.linspace(0, np.pi, n_angles, endpoint=False)
    sino = parallel_projections(
        balls, angles, detector_shape=(1, n), center_of_rotation=cor, center_row=0.0
    )[:, 0]
    ramp = RampFilter(n)
    q = ramp(torch.as_tensor(sino, dtype=torch.float32)).numpy()[:, None, :]
    geom = parallel(angles=angles, shape=(1, n), center_of_rotation=cor)
    centre = (22.0 * scale, -40.0 * scale)  # on the edge of the dense ball
    patch = Slice.axial(shape=(size, size), center_xy=centre)
    like = Slice.axial(shape=(size, size))
    origin = patch.origin[None]
    numba_backend = NumbaBackend()
    even, odd = geom[0::2], geom[1::2]
    images: dict[str, np.ndarray] = {}

    # 64 training pairs from the streaming reconstructor, as the pipeline makes them
    rows = 5
    scan = ScanGeometry(detector_shape=(rows, n), center_of_rotation=cor, num_angles=n_angles)
    rec = StreamingReconstructor(scan, refresh_every=n_angles)
    rec.set_flatfield(np.zeros((1, rows, n)), np.ones((1, rows, n)))
    for i, (s, a) in enumerate(zip(sino, np.degrees(angles), strict=True)):
        rec.add_frame(np.repeat(np.exp(-s)[None], rows, 0), angle_deg=a, index=i)
    maker = PairMaker.from_reconstructor(
        rec, patch_size=size, neighbourhood_rows=2, rng=np.random.default_rng(0)
    )
    half = size / 2
    window = (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)

    def keep(name, f):
        def run():
            images[name] = f()

        return run

    methods = {
        "project": keep(
            "project", lambda: numba_backend.backproject_grids(q, geom, origin, like)[0]
        ),
        "project_pair": lambda: (
            numba_backend.backproject_grids(q[0::2], even, origin, like),
            numba_backend.backproject_grids(q[1::2], odd, origin, like),
        ),
        "pair_maker_64": lambda: maker.pairs(64),
        "astra_cpu_fbp_roi": keep(
            "astra_cpu_fbp_roi",
            lambda: astra_roi_fbp(sino, angles, cor=cor, window=window, size=size),
        ),
        "torch_grid_sample": keep(
            "torch_grid_sample",
            lambda: torch_grid_sample_fbp(
                ramp(torch.as_tensor(sino, dtype=torch.float32)).numpy(),
                angles,
                cor,
                patch.points(),
            ),
        ),
    }
    before = load()
    times = timed(methods, max(repeats, 21))
    truth = truth_image(balls, patch)
    mask = np.ones(patch.shape, dtype=bool)
    full = truth_image(balls, Slice.axial(shape=(n, n)), supersample=1)
    peak = float(full.max() - full.min())  # the slice's range: a patch may be flat
    return {
        "case": "patch",
        "description": f"one {size}x{size} patch from {n_angles} projections of a {n}-wide "
        "detector; a Noise2Inverse pair (even/odd); PairMaker.pairs(64) with 5 rows",
        "project": {
            "time_s": times["project"],
            "psnr_db": psnr(images["project"], truth, mask, peak),
            "pair_time_s": times["project_pair"],
            "pair_maker_64_time_s": times["pair_maker_64"],
            "backend": "numba",
        },
        "peers": {
            "astra_cpu_fbp_roi": {
                "time_s": times["astra_cpu_fbp_roi"],
                "psnr_db": psnr(images["astra_cpu_fbp_roi"], truth, mask, peak),
            },
            "torch_grid_sample": {
                "time_s": times["torch_grid_sample"],
                "psnr_db": psnr(images["torch_grid_sample"], truth, mask, peak),
            },
            "skimage_iradon": peer_unavailable(
                "no region-of-interest reconstruction: only the full slice (see case 'slice')"
            ),
            "diffct": diffct_status(),
        },
        "ratio_vs_astra": times["project"] / times["astra_cpu_fbp_roi"],
        "load_before": before,
        "load_after": load(),
    }


def cone_case(n: int, n_angles: int, repeats: int) -> dict[str, Any]:
    from bluesky_jit.geometry import orthogonal_slices
    from bluesky_jit.reconstruction.numba_backend import NumbaBackend

    so, od, pixel = 3.0 * n, 1.5 * n, 1.5  # magnification 1.5: 1 mm voxels
    scan = ScanGeometry(
        detector_shape=(n, n),
        pixel_size=pixel,
        beam="cone",
        source_origin=so,
        origin_detector=od,
        angular_range=(0, 360),
        num_angles=n_angles,
    )
    balls = ball_phantom(scale=n / 64)
    angles = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    proj = cone_projections(
        balls,
        angles,
        detector_shape=(n, n),
        pixel_size=pixel,
        source_origin=so,
        origin_detector=od,
    )
    from bluesky_jit.projections import ProjectionFilter

    prefilter = ProjectionFilter(scan)
    q = prefilter(torch.as_tensor(proj, dtype=torch.float32)).numpy()
    geom = scan.projection_geometry(angles)
    axial = Slice.axial(shape=(n, n), z=0.3 * n / 4)
    three = orthogonal_slices(scan, center=(0.0, 0.0, 0.3 * n / 4))
    numba_backend = NumbaBackend()
    images: dict[str, Any] = {}

    def keep(name, f):
        def run():
            images[name] = f()

        return run

    methods = {
        "project": keep("project", lambda: numba_backend.backproject(q, geom, axial)),
        "project_three_slices": keep(
            "project_three_slices", lambda: [numba_backend.backproject(q, geom, s) for s in three]
        ),
        "torch_grid_sample": keep(
            "torch_grid_sample", lambda: torch_grid_sample_fdk(q, geom, axial.points())
        ),
    }
    before = load()
    times = timed(methods, repeats)
    mask = circle(axial, 0.4 * n)
    truth = truth_image(balls, axial, supersample=2)
    three_psnr = [
        psnr(img, truth_image(balls, s, supersample=2), circle(s, 0.4 * n))
        for img, s in zip(images["project_three_slices"], three, strict=True)
    ]
    import astra

    astra_peer = (
        peer_unavailable("ASTRA's FDK is CUDA only; astra.use_cuda() is False here")
        if not astra.use_cuda()
        else peer_unavailable("ASTRA FDK_CUDA comparison not wired in this version")
    )
    return {
        "case": "cone",
        "description": f"FDK: {n}x{n} axial slice (and three orthogonal slices) from {n_angles} "
        f"cone-beam projections on a {n}x{n} detector",
        "project": {
            "time_s": times["project"],
            "psnr_db": psnr(images["project"], truth, mask),
            "three_slices_time_s": times["project_three_slices"],
            "three_slices_psnr_db": three_psnr,
            "backend": "numba",
        },
        "peers": {
            "astra_fdk_cuda": astra_peer,
            "torch_grid_sample": {
                "time_s": times["torch_grid_sample"],
                "psnr_db": psnr(images["torch_grid_sample"], truth, mask),
            },
            "skimage": peer_unavailable("scikit-image has no cone-beam reconstruction"),
            "diffct": diffct_status(),
        },
        "ratio_vs_astra": None,
        "load_before": before,
        "load_after": load(),
    }


def sirt_case(n: int, windows, iterations, repeats: int) -> dict[str, Any] | None:
    try:
        from bluesky_jit.reconstruction.sirt import StreamingSIRT
    except ImportError:
        return None
    scale = n / 512
    balls = tuple(Ball(b.x * scale, b.y * scale, 0.0, b.radius * scale, b.mu) for b in SLICE_BALLS)
    rotation = 180
    total = max(windows) * 3
    angles_deg = (np.arange(total) * 180.0 / rotation) % 360
    sino = parallel_projections(
        balls, np.radians(angles_deg), detector_shape=(1, n), center_row=0.0
    )[:, 0]
    scan = ScanGeometry(detector_shape=(1, n), num_angles=rotation)
    s = Slice.axial(shape=(n, n))
    truth = truth_image(balls, s)
    mask = circle(s, 0.45 * n)
    rows = []
    warm = StreamingSIRT(ScanGeometry(detector_shape=(1, 16), num_angles=8), window=4)
    warm.set_flatfield(np.zeros((1, 1, 16)), np.ones((1, 1, 16)))
    for i in range(4):
        warm.add_frame(np.ones((1, 16)), angle_deg=10.0 * i, index=i)
    warm.reconstruct()  # compile or load the kernels before timing
    before = load()
    for w in windows:
        for it in iterations:
            sirt = StreamingSIRT(scan, window=w, iterations=it)
            sirt.set_flatfield(np.zeros((1, 1, n)), np.ones((1, 1, n)))
            refresh: list[float] = []
            t0 = time.perf_counter()
            image = None
            for i, (p, a) in enumerate(zip(sino, angles_deg, strict=True)):
                if sirt.add_frame(np.exp(-p)[None], angle_deg=a, index=i):
                    t1 = time.perf_counter()
                    image = sirt.reconstruct()
                    refresh.append(time.perf_counter() - t1)
            elapsed = time.perf_counter() - t0
            rows.append(
                {
                    "window": w,
                    "iterations": it,
                    "refresh_time_s": statistics.median(refresh),
                    "sustained_projections_per_s": total / elapsed,
                    "refreshes": len(refresh),
                    "psnr_db_last": psnr(image, truth, mask) if image is not None else None,
                }
            )
    return {
        "case": "sirt",
        "description": f"streaming SIRT (Liu et al. 2019) on a {n}x{n} slice, {total} projections "
        f"at {180 / rotation:.1f} degree steps, warm start; refresh every W projections",
        "project": {"grid": rows, "backend": "numba"},
        "peers": {},
        "ratio_vs_astra": None,
        "load_before": before,
        "load_after": load(),
    }


# -- the cone-beam set-up of Graas et al. 2023 -----------------------------------------------
# Graas et al. 2023 (FleX-ray laboratory, Dexela 1512NDT): a 647 x 768 detector, 150
# projections per full rotation. The paper gives no distances; these are typical of that
# laboratory and stated here: detector pixel 0.1496 mm (the Dexela's 74.8 um binned 2 x 2),
# source-axis 400 mm, axis-detector 400 mm (magnification 2, 0.0748 mm at the axis, 57 mm
# field of view).
GRAAS2023 = {
    "detector_shape": (647, 768),
    "pixel_size": 0.1496,
    "source_origin": 400.0,
    "origin_detector": 400.0,
    "num_angles": 150,
}


def graas2023_scan() -> ScanGeometry:
    return ScanGeometry(beam="cone", angular_range=(0, 360), **GRAAS2023)


def graas2023_phantom() -> tuple[Ball, ...]:
    """The 3D ball phantom scaled to fit the cone's field of view (radius 20.8 mm)."""
    return ball_phantom(scale=0.8)


_FRAMES: dict[int, np.ndarray] = {}


def graas2023_frame(k: int) -> np.ndarray:
    """Line integrals (647, 768) of projection k of a rotation (k = 0 .. 149), cached."""
    if k not in _FRAMES:
        scan = graas2023_scan()
        _FRAMES[k] = cone_projections(
            graas2023_phantom(),
            [2 * np.pi * k / scan.num_angles],
            detector_shape=scan.detector_shape,
            pixel_size=scan.pixel_size,
            source_origin=scan.source_origin,
            origin_detector=scan.origin_detector,
        )[0].astype(np.float32)
    return _FRAMES[k]


def graas2023_slices(size: int) -> tuple[Slice, Slice, Slice]:
    """Three orthogonal size x size slices through (0, 0, 2 mm) spanning the field of view."""
    scan = graas2023_scan()
    pixel = scan.cols * scan.voxel_size / size
    centre = (0.0, 0.0, 2.0)
    return (
        Slice.axial(shape=(size, size), pixel_size=pixel, z=centre[2]),
        Slice(
            shape=(size, size),
            pixel_size=pixel,
            center=centre,
            axis_u=(1.0, 0.0, 0.0),
            axis_v=(0.0, 0.0, 1.0),
        ),
        Slice(
            shape=(size, size),
            pixel_size=pixel,
            center=centre,
            axis_u=(0.0, 1.0, 0.0),
            axis_v=(0.0, 0.0, 1.0),
        ),
    )


def cone_mask(scan: ScanGeometry, slice_: Slice, margin: float = 0.95) -> np.ndarray:
    """Pixels every projection sees (inside the detector with a margin), analytically."""
    pts = slice_.points()
    r = np.hypot(pts[..., 0], pts[..., 1])
    sdd = scan.source_origin + scan.origin_detector
    half_w = (scan.cols - 1) / 2 * scan.pixel_size
    half_h = (scan.rows - 1) / 2 * scan.pixel_size
    r_fov = scan.source_origin * half_w / math.hypot(sdd, half_w)
    z_max = half_h * (scan.source_origin - r) / sdd
    return (r < margin * r_fov) & (np.abs(pts[..., 2]) < margin * z_max)


def cone_graas2023_case(size: int, every: int, refreshes: int, repeats: int) -> dict[str, Any]:
    """Three orthogonal slices from the last 150 projections of Graas et al. 2023's detector."""
    from bluesky_jit.reconstruction.streaming import StreamingReconstructor

    scan = graas2023_scan()
    slices = graas2023_slices(size)
    n_rot = scan.num_angles
    balls = graas2023_phantom()
    shape = scan.detector_shape
    darks, flats = np.zeros((1, *shape)), np.full((1, *shape), 1000.0)
    incremental = StreamingReconstructor(scan, refresh_every=every, slices=slices)
    full = StreamingReconstructor(scan, refresh_every=every, slices=slices, incremental=False)
    for rec in (incremental, full):
        rec.set_flatfield(darks, flats)
    frame_times: list[float] = []
    incremental_times: list[float] = []
    full_times: list[float] = []
    incremental_cpu: list[float] = []  # CPU seconds of all threads: the load-independent cost
    full_cpu: list[float] = []
    results = None
    before = load()
    total = n_rot + every * refreshes
    for i in range(total):
        # 1 % denser every rotation: a frame entering the window differs from the one
        # leaving it (a static object would make the sliding update trivially exact)
        growth = 1.0 + 0.01 * (i // n_rot)
        frame = (1000.0 * np.exp(-growth * graas2023_frame(i % n_rot))).astype(np.float32)
        angle = 360.0 * i / n_rot
        t0 = time.perf_counter()
        due = incremental.add_frame(frame, angle_deg=angle, index=i)
        frame_times.append(time.perf_counter() - t0)
        full.add_frame(frame, angle_deg=angle, index=i)
        if not due:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        results = incremental.reconstruct_slices()
        incremental_times.append(time.perf_counter() - t0)
        incremental_cpu.append(time.process_time() - c0)
        if len(full_times) < repeats:
            t0, c0 = time.perf_counter(), time.process_time()
            full.reconstruct_slices()
            full_times.append(time.perf_counter() - t0)
            full_cpu.append(time.process_time() - c0)
    after = load()
    if results is None:
        raise RuntimeError("no refresh happened; raise --graas2023-refreshes")
    reference = full.reconstruct_slices()  # the same window as the last incremental refresh
    # the first refresh of the incremental reconstructor builds its sums from scratch
    steady = incremental_times[1:] or incremental_times
    agreement = max(
        float(np.abs(a.full - b.full).max() / np.abs(b.full).max())
        for a, b in zip(results, reference, strict=True)
    )
    truths = [truth_image(balls, s, supersample=2) for s in slices]
    masks = [cone_mask(scan, s) for s in slices]
    # one peak for the three slices: the phantom's range (a slice may miss the dense balls)
    peak = max(float(t[m].max() - t[m].min()) for t, m in zip(truths, masks, strict=True))
    psnrs = [psnr(r.full, t, m, peak) for r, t, m in zip(results, truths, masks, strict=True)]
    frame_s = statistics.median(frame_times)
    refresh_s = statistics.median(steady)
    full_s = statistics.median(full_times)
    import astra

    return {
        "case": "cone_graas2023",
        "description": f"three orthogonal {size}x{size} slices (axial, xz, yz; full, even and "
        f"odd) from the last {n_rot} cone-beam projections of the {shape[0]}x{shape[1]} "
        f"detector of Graas et al. 2023 over 360 degrees; refresh every {every} projections",
        "geometry": {**GRAAS2023, "slice_pixel_mm": slices[0].pixel_size},
        "project": {
            "time_s": refresh_s,
            "refreshes_per_s": 1.0 / refresh_s,
            "psnr_db": min(psnrs),
            "three_slices_psnr_db": psnrs,
            "cpu_time_s": statistics.median(incremental_cpu[1:] or incremental_cpu),
            "full_refresh_time_s": full_s,
            "full_refresh_cpu_time_s": statistics.median(full_cpu),
            "full_refreshes_per_s": 1.0 / full_s,
            "incremental_vs_full_max_rel_diff": agreement,
            "refresh_every": every,
            "refreshes_timed": len(steady),
            "frame_time_s": frame_s,
            "sustained_projections_per_s": 1.0 / (frame_s + refresh_s / every),
            "sustained_refreshes_per_s": 1.0 / (every * frame_s + refresh_s),
            "backend": "numba",
            "notes": "*_cpu_time_s: CPU seconds of all threads (process_time), less "
            "sensitive to other users of the machine than the wall times. "
            "sustained_*: one thread doing both the per-frame work and the "
            "refreshes, as the pipeline does. "
            "time_s: a sliding refresh, which adds the projections that entered "
            "the window and subtracts those that left it (FDK is linear); "
            "full_refresh_time_s: all 150 projections backprojected again (the cost of the "
            "first refresh, of a moved slice, and of every refresh with incremental=False). "
            "frame_time_s: per-frame work on arrival (dark/flat, FDK pre-weights, ramp "
            "filter, buffer), not part of a refresh.",
        },
        "peers": {
            "astra_fdk_cuda": peer_unavailable(
                "ASTRA's FDK is CUDA only; astra.use_cuda() is False here"
                if not astra.use_cuda()
                else "ASTRA FDK_CUDA comparison not wired in this version"
            ),
            "diffct": diffct_status(),
        },
        "ratio_vs_astra": None,
        "load_before": before,
        "load_after": after,
    }


def patch_batch_case(size: int, batch: int, repeats: int) -> dict[str, Any]:
    """A batch of ``batch`` size x size axial patches from 150 cone projections (Graas et al.
    2023)."""
    from bluesky_jit.projections import ProjectionFilter
    from bluesky_jit.reconstruction.numba_backend import NumbaBackend

    scan = graas2023_scan()
    prefilter = ProjectionFilter(scan)
    q = np.stack(
        [prefilter(torch.from_numpy(graas2023_frame(k))).numpy() for k in range(scan.num_angles)]
    )
    geom = scan.projection_geometry()
    voxel = scan.voxel_size
    like = Slice.axial(shape=(size, size), pixel_size=voxel)
    rng = np.random.default_rng(0)
    radius = 0.8 * scan.field_of_view[0] - size * voxel
    r = radius * np.sqrt(rng.uniform(size=batch))
    phi = rng.uniform(0, 2 * np.pi, size=batch)
    z = rng.uniform(-2.0, 2.0, size=batch)
    offset = (size - 1) / 2 * voxel
    origins = np.stack([r * np.cos(phi) - offset, r * np.sin(phi) - offset, z], 1)
    backend = NumbaBackend()
    images: dict[str, Any] = {}
    before = load()
    times = timed(
        {
            "project": lambda: images.update(
                project=backend.backproject_grids(q, geom, origins, like)
            )
        },
        repeats,
    )
    balls = graas2023_phantom()
    values = []
    for g, patch in enumerate(images["project"]):
        s = Slice(
            shape=like.shape,
            pixel_size=voxel,
            center=tuple(origins[g] + like.center - like.origin),
        )
        values.append((patch, truth_image(balls, s, supersample=2)))
    got = np.stack([v[0] for v in values])
    truth = np.stack([v[1] for v in values])
    peak = float(truth.max() - truth.min())
    return {
        "case": "patch_batch",
        "description": f"a batch of {batch} {size}x{size} axial patches from {scan.num_angles} "
        f"cone-beam projections of the {scan.rows}x{scan.cols} detector of Graas et al. 2023 "
        "(theirs: 64 ms on a GPU)",
        "project": {
            "time_s": times["project"],
            "psnr_db": psnr(got, truth, np.ones(got.shape, dtype=bool), peak),
            "backend": "numba",
        },
        "peers": {"diffct": diffct_status()},
        "ratio_vs_astra": None,
        "load_before": before,
        "load_after": load(),
    }


def cuda_case(repeats: int, device: str = "cuda") -> dict[str, Any]:
    """GPU targets: a 1024 x 1024 slice from 400 projections (< 5 ms; RECAST3D 31.5 ms) and
    a batch of 32 60 x 60 patches (< 2 ms; Graas et al. 2023: 64 ms), torch and cupy backends."""
    description = (
        "CUDA: 1024x1024 parallel-beam slice from 400 projections (target < 5 ms, RECAST3D "
        "31.5 ms); batch of 32 60x60 cone-beam patches from the detector of Graas et al. 2023 "
        "(target < 2 ms, theirs: 64 ms)"
    )
    from bluesky_jit.projections import ProjectionFilter
    from bluesky_jit.reconstruction.numba_backend import NumbaBackend

    before = load()
    n, n_angles = 1024, 400
    balls = tuple(
        Ball(b.x * n / 512, b.y * n / 512, 0.0, b.radius * n / 512, b.mu) for b in SLICE_BALLS
    )
    angles = np.linspace(0, np.pi, n_angles, endpoint=False)
    sino = parallel_projections(balls, angles, detector_shape=(1, n), center_row=0.0)
    q_cpu = RampFilter(n)(torch.as_tensor(sino, dtype=torch.float32))
    geom = parallel(angles=angles, shape=(1, n))
    slice_ = Slice.axial(shape=(n, n))
    truth = truth_image(balls, slice_)
    mask = circle(slice_, 0.45 * n)
    numba_backend = NumbaBackend()
    cpu_image: dict[str, np.ndarray] = {}
    cpu_time = timed(
        {"numba": lambda: cpu_image.update(numba=numba_backend.backproject(q_cpu, geom, slice_))},
        repeats,
    )["numba"]
    cpu_reference = {
        "numba_cpu_slice_1024_time_s": cpu_time,
        "numba_cpu_slice_1024_psnr_db": psnr(cpu_image["numba"], truth, mask),
        "notes": "this machine's CPU, for reference; the 32 60x60 patches on the CPU are the "
        "case 'patch_batch'",
    }
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        return {
            "case": "cuda",
            "description": description,
            "project": {"available": False, "reason": "unavailable: no CUDA"},
            "cpu_reference": cpu_reference,
            "peers": {},
            "ratio_vs_astra": None,
            "load_before": before,
            "load_after": load(),
        }

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def gpu_timed(f: Callable[[], Any]) -> float:
        f()
        sync()
        ts = []
        for _ in range(max(repeats, 11)):
            t0 = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    q_gpu = q_cpu.to(device)
    scan = graas2023_scan()
    prefilter = ProjectionFilter(scan)
    cone_q = torch.stack(
        [prefilter(torch.from_numpy(graas2023_frame(k))) for k in range(scan.num_angles)]
    ).to(device)
    cone_geom = scan.projection_geometry()
    like = Slice.axial(shape=(60, 60), pixel_size=scan.voxel_size)
    rng = np.random.default_rng(0)
    origins = np.stack(
        [rng.uniform(-15, 11, 32), rng.uniform(-15, 11, 32), rng.uniform(-2, 2, 32)], 1
    )
    entries: dict[str, Any] = {}
    for name in ("torch", "cupy"):
        try:
            backend = make_backend(name, device=device)
        except Exception as error:  # noqa: BLE001 - record why a backend is missing
            entries[name] = peer_unavailable(f"{type(error).__name__}: {error}")
            continue
        image = backend.backproject(q_gpu, geom, slice_)
        entries[name] = {
            "slice_1024_time_s": gpu_timed(lambda b=backend: b.backproject(q_gpu, geom, slice_)),
            "slice_1024_psnr_db": psnr(image, truth, mask),
            "patches_32x60x60_time_s": gpu_timed(
                lambda b=backend: b.backproject_grids(cone_q, cone_geom, origins, like)
            ),
            "device": torch.cuda.get_device_name(0) if on_gpu else device,
            "notes": "times include copying the result back to the host",
        }
    return {
        "case": "cuda",
        "description": description,
        "project": entries,
        "cpu_reference": cpu_reference,
        "peers": {"recast3d_slice_1024_ms": 31.5, "graas2023_patch_batch_ms": 64.0},
        "ratio_vs_astra": None,
        "load_before": before,
        "load_after": load(),
    }


# -- output -----------------------------------------------------------------------------------
def sirt_table(grid: list[dict[str, Any]]) -> list[str]:
    """Liu et al. 2019's layout: one column per (I, W), rows refresh time and sustained rate."""
    cols = sorted(grid, key=lambda r: (r["iterations"], r["window"]))
    head = f"{'':<26}" + "".join(f"{'I=' + str(r['iterations']):>8}" for r in cols)
    return [
        head,
        f"{'Window size, W':<26}" + "".join(f"{r['window']:>8}" for r in cols),
        f"{'Refresh time (ms)':<26}" + "".join(f"{r['refresh_time_s'] * 1e3:>8.1f}" for r in cols),
        f"{'Sustained rate (p/s)':<26}"
        + "".join(f"{r['sustained_projections_per_s']:>8.0f}" for r in cols),
        f"{'W / refresh time (p/s)':<26}"
        + "".join(f"{r['window'] / r['refresh_time_s']:>8.0f}" for r in cols),
        f"{'Rotations R (refreshes)':<26}" + "".join(f"{r['refreshes']:>8}" for r in cols),
        f"{'PSNR of the last (dB)':<26}" + "".join(f"{r['psnr_db_last']!s:>8}" for r in cols),
    ]


def table(results: dict[str, Any]) -> str:
    lines = []
    for case in results["cases"]:
        lines.append(f"\n== {case['case']}: {case['description']} (load {case['load_before']})")
        p = case["project"]
        if case["case"] == "sirt":
            lines.extend(sirt_table(p["grid"]))
            continue
        if case["case"] == "cuda":
            ref = case.get("cpu_reference")
            if ref:
                lines.append(
                    f"{'numba on this CPU':<28} 1024x1024: "
                    f"{ref['numba_cpu_slice_1024_time_s'] * 1e3:.2f} ms "
                    f"({ref['numba_cpu_slice_1024_psnr_db']} dB)"
                )
            if p.get("available") is False:
                lines.append(f"{'GPU (torch, cupy)':<28} {p['reason']}")
                continue
            for name, entry in p.items():
                if entry.get("available") is False:
                    lines.append(f"{name:<28} unavailable ({entry['reason']})")
                    continue
                lines.append(
                    f"{name:<28} 1024x1024: {entry['slice_1024_time_s'] * 1e3:.2f} ms "
                    f"({entry['slice_1024_psnr_db']} dB); 32x60x60 patches: "
                    f"{entry['patches_32x60x60_time_s'] * 1e3:.2f} ms"
                )
            continue
        lines.append(f"{'method':<28} {'time ms':>10} {'PSNR dB':>8}")
        lines.append(
            f"{'bluesky_jit (' + p['backend'] + ')':<28} {p['time_s'] * 1e3:>10.2f} "
            f"{p['psnr_db']:>8}"
        )
        for key in (
            "time_with_filter_s",
            "time_1_thread_s",
            "pair_time_s",
            "pair_maker_64_time_s",
            "three_slices_time_s",
            "cpu_time_s",
            "full_refresh_time_s",
            "full_refresh_cpu_time_s",
            "frame_time_s",
        ):
            if key in p:
                label = "  " + key.removesuffix("_s").replace("_", " ")
                lines.append(f"{label:<28} {p[key] * 1e3:>10.2f}")
        if case["case"] == "cone_graas2023":
            lines.append(
                f"  refreshes/s: {p['refreshes_per_s']:.1f} sliding (every "
                f"{p['refresh_every']}), {p['full_refreshes_per_s']:.2f} from scratch; "
                f"sustained with the per-frame work: {p['sustained_refreshes_per_s']:.1f} "
                f"refreshes/s, {p['sustained_projections_per_s']:.0f} projections/s; PSNR per "
                f"slice {p['three_slices_psnr_db']}"
            )
        for name, peer in case["peers"].items():
            if not isinstance(peer, dict):
                lines.append(f"{name:<28} {peer!s:>10}")
            elif peer.get("available") is False:
                lines.append(f"{name:<28} {'-':>10} {'-':>8}  ({peer['reason']})")
            else:
                lines.append(f"{name:<28} {peer['time_s'] * 1e3:>10.2f} {peer['psnr_db']:>8}")
        if case.get("ratio_vs_astra") is not None:
            lines.append(f"ratio_vs_astra {case['ratio_vs_astra']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=512, help="slice side (slice, patch)")
    parser.add_argument("--angles", type=int, default=180)
    parser.add_argument("--patch", type=int, default=20)
    parser.add_argument("--cone-size", type=int, default=128)
    parser.add_argument("--cone-angles", type=int, default=360)
    parser.add_argument("--sirt-size", type=int, default=256)
    parser.add_argument("--graas2023-size", type=int, default=512, help="side of the three slices")
    parser.add_argument(
        "--graas2023-every", type=int, default=10, help="refresh every k projections"
    )
    parser.add_argument(
        "--graas2023-refreshes", type=int, default=8, help="sliding refreshes timed"
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated subset of the cases ({', '.join(CASES)})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and numba threads (default: all cores); peers ASTRA and scikit-image "
        "are single-threaded",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        import numba

        from bluesky_jit.reconstruction.numba_backend import _prefer_workqueue

        _prefer_workqueue()  # before set_num_threads starts numba's threads
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    wanted = set(args.cases.split(","))
    unknown = sorted(wanted - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cases": [],
    }
    if "slice" in wanted:
        results["cases"].append(slice_case(args.size, args.angles, args.repeats))
    if "patch" in wanted:
        results["cases"].append(patch_case(args.size, args.angles, args.patch, args.repeats))
    if "cone" in wanted:
        results["cases"].append(cone_case(args.cone_size, args.cone_angles, args.repeats))
    if "patch_batch" in wanted:
        results["cases"].append(patch_batch_case(60, 32, args.repeats))
    if "cone_graas2023" in wanted:
        results["cases"].append(
            cone_graas2023_case(
                args.graas2023_size, args.graas2023_every, args.graas2023_refreshes, args.repeats
            )
        )
    if "sirt" in wanted:
        case = sirt_case(
            args.sirt_size, (16, 32, 64, 128, 256), (1, 5, 10), max(1, args.repeats // 3)
        )
        if case is not None:
            results["cases"].append(case)
    if "cuda" in wanted:
        results["cases"].append(cuda_case(args.repeats))
    try:  # asked only now: asking starts numba's threads and fixes its threading layer
        import numba

        results["machine"]["numba_threads"] = numba.get_num_threads()
        results["machine"]["numba_threading_layer"] = numba.threading_layer()
    except (ImportError, ValueError):
        pass
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
