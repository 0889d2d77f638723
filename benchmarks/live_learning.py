"""The learning benchmark's quality case through the plugin itself: RunEngine + JitCallback.

    python benchmarks/live_learning.py --json benchmarks/results/live_learning.json
    python benchmarks/live_learning.py --variant Z3 --json out.json
    python benchmarks/live_learning.py --set splits=4 --set n2i_strategy=1:X --json out.json

``benchmarks/learning.py`` drives the learning parts directly; this script
runs the same dynamic bubble column (``--size`` columns, ``--rows`` rows,
``--bubbles`` bubbles, ``--photons`` per pixel) as a real scan: the simulated
ophyd-async detector writes HDF5 frames at ``--fps`` in wall-clock time
(paced), a RunEngine runs ``tomo_continuous``, and a ``JitCallback`` with the
default ``JitConfig`` (or ``--variant`` / ``--set``) reconstructs, trains and
denoises on its worker and trainer threads, publishing alpha on
``QualitySignals``. After ``--seconds`` of stream the newest denoised slice
is compared with the phantom's truth of its window, with its FBP, and with
TV (weight tuned against truth on the slice of an earlier rotation, the same
as ``learning.py``'s ``psnr_tv``). Then the slice moves from the bubbles to
the bead bed (``move_slices``) and ``recovery_s`` is the time until the
published alpha is back within 0.05 of its level before the move.

Derived runs are not published (``emit=None``): the numbers are the learning
stage's; the demo shows the catalog path. Writes JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bluesky_jit.baselines import tune_tv, tv_denoise
from bluesky_jit.config import JitConfig
from bluesky_jit.evaluation import disc_mask, psnr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import machine, ssim  # noqa: E402  (the sibling benchmark's helpers)


def parse_value(text: str) -> Any:
    """``--set key=value`` values: JSON where it parses (numbers, true, null), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bluesky import RunEngine

    from bluesky_jit.callbacks import JitCallback
    from bluesky_jit.steering import QualitySignals
    from simulated_devices import hw
    from simulated_devices.phantoms import BubbleColumn
    from simulated_devices.plans import tomo_continuous
    from simulated_devices.sources import PhantomSource

    settings = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    settings.setdefault("slice_row", args.row)
    config = (
        JitConfig.for_variant(args.variant, **settings) if args.variant else JitConfig(**settings)
    )
    phantom = BubbleColumn(
        detector_shape=(args.rows, args.size), seed=args.seed, n_bubbles=args.bubbles
    )
    quality = QualitySignals(name="jit_quality")
    alphas: list[tuple[float, float]] = []  # (monotonic time, alpha) as published
    quality.alpha.subscribe(
        lambda value, **kw: alphas.append((time.monotonic(), float(value))), run=False
    )
    jit = JitCallback(config=config, directory=args.workdir / "derived", quality=quality)
    RE = RunEngine({})
    RE.subscribe(jit)
    beamline = hw(
        args.workdir / "raw",
        source=PhantomSource(phantom, photons=args.photons),
        frame_rate=args.fps,
        paced=True,
        seed=args.seed,
    )
    per_rotation = args.angles
    total_s = args.seconds + args.after_move
    rotations = math.ceil(total_s * args.fps / per_rotation)
    marks: dict[str, Any] = {}
    held_out_at = int(args.held_out_at * args.fps)
    test_at = int(args.seconds * args.fps)

    def capture(key: str, index: int) -> None:
        """Keep a refresh's FBP and denoised slice (same window), then move the slice if due."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            running = jit.progress()
            s = running[0] if running else None
            if s is not None and s.last_indices is not None:
                indices, denoised = s.last_indices, s.last_denoised
                same = denoised is not None and s.last_denoised_indices is indices
                if same or key == "held_out":  # the held-out slice only tunes TV
                    marks[key] = {
                        "slice": s.last_slice,
                        "indices": indices,
                        "denoised": denoised,
                        "steps": s.train_steps,
                        "worker_lag": index - int(indices[-1]),
                        "alpha": quality.alpha.get(),
                    }
                    break
            time.sleep(0.01)
        if key == "test":
            marks["move_time"] = time.monotonic()
            jit.move_slices(slice_row=args.move_row)

    def watch(name: str, doc: dict) -> None:
        """At the two moments, capture on another thread: the RunEngine is never held up."""
        if name == "event" and "rot_stage" in doc["data"]:
            index = doc["seq_num"] - 1
            for key, at in (("held_out", held_out_at), ("test", test_at)):
                if index == at:
                    threading.Thread(target=capture, args=(key, index), daemon=True).start()

    RE.subscribe(watch)
    t0 = time.monotonic()
    RE(
        tomo_continuous(
            *beamline.plan_devices,
            num_angles=per_rotation,
            rotations=rotations,
            sample="bubble column (simulated)",
        )
    )
    scan_s = time.monotonic() - t0
    jit.flush(timeout=600)
    jit.close()
    summary = jit.summaries[0]
    out: dict[str, Any] = {
        "config": config.to_dict(),
        "scan_seconds": scan_s,
        "projections": summary.projections,
        "projections_per_s": summary.projections_per_s,
        "train_steps": summary.train_steps,
        "train_steps_per_s": summary.train_steps_per_s,
        "exit_status": summary.exit_status,
        "problems": summary.problems,
    }
    test, held = marks.get("test"), marks.get("held_out")
    if test is None or held is None:
        out["error"] = (
            "no denoised slice of the newest window at the test moment (training too slow, "
            "or a T stack, whose denoised slice is of an earlier window)"
        )
        return out

    def truth(indices: np.ndarray) -> np.ndarray:
        times = np.asarray(indices) / args.fps
        return phantom.truth_window(float(times[0]), float(times[-1]), args.row, num=8)

    truth_t, truth_h = truth(test["indices"]), truth(held["indices"])
    mask = disc_mask(truth_t.shape[0], 0.85)
    tv = tune_tv([held["slice"]], [truth_h], mask=mask)
    tv_image = tv_denoise(test["slice"], tv.value)
    out.update(
        psnr_fbp=psnr(test["slice"], truth_t, mask),
        psnr_tv=psnr(tv_image, truth_t, mask),
        tv_weight=tv.value,
        psnr_denoised=psnr(test["denoised"], truth_t, mask),
        ssim_fbp=ssim(test["slice"], truth_t, mask),
        ssim_tv=ssim(tv_image, truth_t, mask),
        ssim_denoised=ssim(test["denoised"], truth_t, mask),
        alpha=test["alpha"],
        train_steps_at_test=test["steps"],
        worker_lag_projections=test["worker_lag"],
    )
    move = marks["move_time"]
    before = [a for t, a in alphas if t < move and math.isfinite(a)]
    alpha_before = statistics.median(before[-3:]) if before else math.nan
    after = [(t - move, a) for t, a in alphas if t > move + 0.5 and math.isfinite(a)]
    recovered = next((dt for dt, a in after if a <= alpha_before + 0.05), None)
    out.update(alpha_before_move=alpha_before, recovery_s=recovered)
    out["targets"] = {
        "psnr >= fbp + 6 dB": out["psnr_denoised"] >= out["psnr_fbp"] + 6,
        "psnr >= tv + 1 dB": out["psnr_denoised"] >= out["psnr_tv"] + 1,
        "alpha <= 0.6": test["alpha"] <= 0.6,
        "recovery <= 20 s": recovered is not None and recovered <= 20,
    }
    if args.png is not None:
        from bluesky_jit.apps.figures import save_slices

        images = {
            f"FBP ({out['psnr_fbp']:.1f} dB)": test["slice"],
            f"TV ({out['psnr_tv']:.1f} dB)": tv_image,
            f"JitCallback ({out['psnr_denoised']:.1f} dB)": test["denoised"],
            "truth": truth_t,
        }
        title = f"live, after {args.seconds:.0f} s of stream"
        out["figure"] = str(save_slices(args.png, images, title=title))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None, help="slices figure")
    parser.add_argument(
        "--variant", default=None, help='network of Graas et al. 2023, e.g. "Z3", "C16"'
    )
    parser.add_argument("--set", action="append", default=[], help="JitConfig key=value")
    parser.add_argument("--seconds", type=float, default=60.0, help="stream before the test")
    parser.add_argument("--after-move", type=float, default=25.0)
    parser.add_argument("--held-out-at", type=float, default=30.0, help="TV tuning slice (s)")
    parser.add_argument("--fps", type=float, default=90.0)
    parser.add_argument("--angles", type=int, default=180, help="projections per 180 degrees")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--row", type=int, default=20, help="slice row (bubbles)")
    parser.add_argument("--move-row", type=int, default=56, help="row after the move (bed)")
    parser.add_argument("--bubbles", type=int, default=80)
    parser.add_argument("--photons", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("bluesky_jit_data/live_benchmark"))
    args = parser.parse_args(argv)
    result = run(args)
    out = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, **result}
    text = json.dumps(out, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
