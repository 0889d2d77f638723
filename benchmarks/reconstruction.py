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
  projections (seed 000: about 2 ms on a GPU), a Noise2Inverse pair from the
  even/odd halves, and ``patch_pairs(64)`` of the streaming reconstructor.
  Peers: ASTRA's FBP on a 20 x 20 region of interest, torch ``grid_sample``
  on the patch points; scikit-image has no region of interest.
- ``cone``: FDK of a 128 x 128 axial slice and of three orthogonal slices from
  360 cone-beam projections (128 x 128 detector) of a 3D ball phantom. Peers:
  a naive torch ``grid_sample`` FDK; ASTRA's FDK needs CUDA (run only when
  ``astra.use_cuda()``).
- ``sirt``: streaming SIRT (seed 001): refresh time and sustained
  projections/s for windows W and iterations I on a 256 x 256 slice.

``ratio_vs_astra`` is the project's time over ASTRA's, both medians from the
same run. Timings on a shared machine are noisy: the load average before and
after each case is recorded.
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
    """PSNR (dB) inside ``mask``; the peak is the truth's range there unless given."""
    a, b = np.asarray(image, dtype=np.float64)[mask], truth[mask]
    mse = float(np.mean((a - b) ** 2))
    peak = float(b.max() - b.min()) if peak is None else peak
    return round(10 * math.log10(peak**2 / mse), 2)


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
    return peer_unavailable("diffct imports, but needs CUDA (numba.cuda); no GPU here")


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

    # the streaming reconstructor's patch_pairs: 64 pairs as the pipeline draws them
    rows = 5
    scan = ScanGeometry(detector_shape=(rows, n), center_of_rotation=cor, num_angles=n_angles)
    rec = StreamingReconstructor(scan, refresh_every=n_angles)
    rec.set_flatfield(np.zeros((1, rows, n)), np.ones((1, rows, n)))
    for i, (s, a) in enumerate(zip(sino, np.degrees(angles), strict=True)):
        rec.add_frame(np.repeat(np.exp(-s)[None], rows, 0), angle_deg=a, index=i)
    rng = np.random.default_rng(0)
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
        "patch_pairs_64": lambda: rec.patch_pairs(64, size=size, rng=rng, neighbourhood=2),
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
        "detector; a Noise2Inverse pair (even/odd); patch_pairs(64) with 5 rows",
        "project": {
            "time_s": times["project"],
            "psnr_db": psnr(images["project"], truth, mask, peak),
            "pair_time_s": times["project_pair"],
            "patch_pairs_64_time_s": times["patch_pairs_64"],
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
        "description": f"streaming SIRT (seed 001) on a {n}x{n} slice, {total} projections "
        f"at {180 / rotation:.1f} degree steps, warm start; refresh every W projections",
        "project": {"grid": rows, "backend": "numba"},
        "peers": {},
        "ratio_vs_astra": None,
        "load_before": before,
        "load_after": load(),
    }


# -- output -----------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    lines = []
    for case in results["cases"]:
        lines.append(f"\n== {case['case']}: {case['description']} (load {case['load_before']})")
        if case["case"] == "sirt":
            lines.append(f"{'W':>5} {'I':>4} {'refresh ms':>11} {'proj/s':>8} {'PSNR dB':>8}")
            for row in case["project"]["grid"]:
                lines.append(
                    f"{row['window']:>5} {row['iterations']:>4} "
                    f"{row['refresh_time_s'] * 1e3:>11.1f} "
                    f"{row['sustained_projections_per_s']:>8.1f} {row['psnr_db_last']!s:>8}"
                )
            continue
        lines.append(f"{'method':<28} {'time ms':>10} {'PSNR dB':>8}")
        p = case["project"]
        lines.append(
            f"{'bluesky_jit (' + p['backend'] + ')':<28} {p['time_s'] * 1e3:>10.2f} "
            f"{p['psnr_db']:>8}"
        )
        for key in (
            "time_with_filter_s",
            "time_1_thread_s",
            "pair_time_s",
            "patch_pairs_64_time_s",
            "three_slices_time_s",
        ):
            if key in p:
                label = "  " + key.removesuffix("_s").replace("_", " ")
                lines.append(f"{label:<28} {p[key] * 1e3:>10.2f}")
        for name, peer in case["peers"].items():
            if peer.get("available") is False:
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
    parser.add_argument(
        "--cases", default="slice,patch,cone,sirt", help="comma-separated subset of the cases"
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
    if "sirt" in wanted:
        case = sirt_case(args.sirt_size, (16, 32, 64, 128), (1, 5, 10), max(1, args.repeats // 3))
        if case is not None:
            results["cases"].append(case)
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
