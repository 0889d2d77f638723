"""The uncertainty map of the denoised slice, calibrated against a phantom's truth.

    python benchmarks/uncertainty.py --json benchmarks/results/uncertainty.json
    python benchmarks/uncertainty.py --quick      # fewer training steps, about a minute

Per case (a phantom at a photon count), a rotation of noisy parallel-beam
projections of a bubble column (``simulated_devices.phantoms``, through
``benchmarks/learning.py``'s ``PhantomStream``) is split into K = 2 halves; a
Standard U-Net is trained on their Noise2Inverse patch pairs for ``--steps``
optimizer steps (in the foreground), and the slice is denoised as the pipeline
does it: the mean of the K network outputs. Its error against the
motion-averaged truth of the rotation is compared, inside the container, with
candidate uncertainty maps sigma:

- ``spread_raw``: the per-pixel spread of the K outputs (standard error of their
  mean, :func:`bluesky_jit.noise2inverse.uncertainty` with ``smooth_px=0``);
- ``spread``: the same with the variance averaged over a Gaussian of
  ``UNCERTAINTY_SMOOTH_PX`` pixels (what the pipeline publishes when there is
  no hold-out estimate);
- ``spread_rms``: that map scaled to the slice's own estimate of the RMS error
  (:func:`bluesky_jit.noise2inverse.error_rms`: each output against the split its
  input left out; no truth needed): what the pipeline publishes;
- ``spread_holdout``: the same scaled to the hold-out pairs' estimate instead
  (``sigma_denoised`` of ``bluesky_jit.steering.noise_levels``, 256 pairs);
- ``recon_noise``: the local noise of the reconstruction itself (the same
  estimator on the K split reconstructions), i.e. sigma without the network.

For each: the scale fitted on the pixels of all cases pooled (``|error| <= 2
scale sigma`` for 95 % of them) and the coverage it gives on each case; the
coverage without a scale; the scale each case alone would want; the Spearman
rank correlation of sigma and |error|; and the mean |error| in the top and the
bottom decile of sigma. For ``spread`` and ``spread_rms`` also the coverage
with the pipeline's scales (``UNCERTAINTY_SCALE``, ``UNCERTAINTY_RMS_SCALE``).
Phantoms: ``bubbles`` (the bubbly liquid) and ``bead_bed`` (another column,
sliced through its bed of small dense beads), each at 1000 and 300 photons per
pixel. 2-4 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import PhantomStream, _jsonable, machine  # noqa: E402

from bluesky_jit import noise2inverse  # noqa: E402
from bluesky_jit.buffers import ReplayBuffer  # noqa: E402
from bluesky_jit.evaluation import disc_mask  # noqa: E402
from bluesky_jit.inference import Denoiser  # noqa: E402
from bluesky_jit.models import build_model  # noqa: E402
from bluesky_jit.pairs import PairMaker, SamplingRegion  # noqa: E402
from bluesky_jit.steering import noise_levels  # noqa: E402
from bluesky_jit.training import Trainer  # noqa: E402

PHANTOMS = {
    "bubbles": {"seed": 0, "bubbles": 80, "row": 5},
    "bead_bed": {"seed": 1, "bubbles": 20, "row": 14},
}
"""Phantom name -> BubbleColumn seed, number of bubbles and slice row (16 detector rows;
the bed fills the last 4)."""
ESTIMATORS = ("spread_raw", "spread", "spread_rms", "spread_holdout", "recon_noise")


def denoise_case(phantom: str, photons: float, args: argparse.Namespace) -> dict[str, Any]:
    """Train on one rotation of the phantom; return the K outputs, the splits and the truth."""
    spec = PHANTOMS[phantom]
    stream = PhantomStream(
        rows=args.rows, cols=args.size, angles=args.angles, fps=args.fps, photons=photons,
        seed=spec["seed"], bubbles=spec["bubbles"],
    )  # fmt: skip
    end = args.angles - 1
    stream.advance_to(end)
    maker = PairMaker(
        stream.buffer, stream.backprojector.backproject, window=args.angles, rows=args.rows,
        pixel_size=1.0, row=spec["row"], splits=args.splits, n2i_strategy="X:1",
        patch_size=20, region=SamplingRegion.disc(stream.phantom.inner_radius),
        slice_size=args.size, neighbourhood_rows=2, rng=np.random.default_rng(spec["seed"] + 7),
    )  # fmt: skip
    rng = np.random.default_rng(1)
    trainer = Trainer(
        build_model("unet", seed=0), ReplayBuffer(320, rng=rng), batch_size=32,
        learning_rate=2e-3, train_precision="bfloat16", augment=True, average_weights=0.99,
    )  # fmt: skip
    t0 = time.perf_counter()
    for step in range(args.steps):
        if step % 25 == 0:
            trainer.buffer.push(*maker.pairs(128))
        trainer.step()
    train_s = time.perf_counter() - t0
    trainer.add_holdout(*maker.pairs(256))
    levels = noise_levels(trainer.evaluate_details(), splits=args.splits, strategy="X:1")
    splits = maker.slice_splits(end=end)
    inputs, window = maker.inference_inputs(end=end)
    outputs = Denoiser(build_model("unet"), source=trainer).denoise_each(inputs)
    mask = disc_mask(args.size, 0.97 * stream.phantom.inner_radius / (args.size / 2))
    return {
        "outputs": outputs,
        "inputs": inputs,
        "splits": splits,
        "truth": stream.truth(window, spec["row"]),
        "mask": mask,
        "holdout_rms": levels["sigma_denoised"],
        "train_steps": args.steps,
        "train_s": train_s,
    }


def sigmas(case: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each candidate map, unscaled."""
    unc = noise2inverse.uncertainty
    spread = unc(case["outputs"], "X:1", scale=1.0)
    return {
        "spread_raw": unc(case["outputs"], "X:1", scale=1.0, smooth_px=0.0),
        "spread": spread,
        "spread_rms": unc(case["outputs"], "X:1", inputs=case["inputs"], scale=1.0),
        "spread_holdout": spread * case["holdout_rms"] / np.sqrt(np.mean(spread**2)),
        "recon_noise": unc(case["splits"], "1:X", scale=1.0),
    }


def needed_scale(sigma: np.ndarray, error: np.ndarray) -> float:
    """The scale that puts 95 % of the pixels within 2 scaled sigma."""
    return float(np.quantile(error / np.maximum(sigma, 1e-12), 0.95) / 2)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's of the ranks)."""
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def rate(sigma: np.ndarray, error: np.ndarray, scale: float) -> dict[str, float]:
    """Coverage within 2 scaled sigma, the scale wanted, and how sigma ranks the error."""
    order = np.argsort(sigma)
    decile = max(1, len(order) // 10)
    return {
        "coverage_2sigma": float(np.mean(error <= 2 * scale * sigma)),
        "coverage_2sigma_unscaled": float(np.mean(error <= 2 * sigma)),
        "scale_needed": needed_scale(sigma, error),
        "spearman": rank_correlation(sigma, error),
        "pearson": float(np.corrcoef(sigma, error)[0, 1]),
        "mean_error_top_decile": float(error[order[-decile:]].mean()),
        "mean_error_bottom_decile": float(error[order[:decile]].mean()),
        "mean_sigma": float(scale * sigma.mean()),
        "rms_error": float(np.sqrt(np.mean(error**2))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--quick", action="store_true", help="300 training steps per case")
    parser.add_argument("--steps", type=int, default=1200, help="training steps per case")
    parser.add_argument("--photons", default="1000,300", help="photons per pixel, comma-separated")
    parser.add_argument("--phantoms", default=",".join(PHANTOMS), help=f"of {list(PHANTOMS)}")
    parser.add_argument("--splits", type=int, default=2, help="Noise2Inverse K")
    parser.add_argument("--size", type=int, default=128, help="detector width = slice size")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--angles", type=int, default=180, help="projections per 180 degrees")
    parser.add_argument("--fps", type=float, default=90.0, help="projections per second")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 300)
    torch.set_num_threads(1)
    cases = {}
    for phantom in args.phantoms.split(","):
        for photons in (float(p) for p in args.photons.split(",")):
            name = f"{phantom}@{photons:g}"
            print(f"[{name}] training {args.steps} steps ...", file=sys.stderr, flush=True)
            cases[name] = denoise_case(phantom, photons, args)
    errors, maps = {}, {}
    for name, case in cases.items():
        mask = case["mask"]
        errors[name] = np.abs(case["outputs"].mean(axis=0) - case["truth"])[mask]
        maps[name] = {key: value[mask] for key, value in sigmas(case).items()}
    pooled = np.concatenate(list(errors.values()))
    scales = {
        key: needed_scale(np.concatenate([maps[name][key] for name in cases]), pooled)
        for key in ESTIMATORS
    }
    results = {
        name: {
            "train_s": cases[name]["train_s"],
            **{key: rate(maps[name][key], errors[name], scales[key]) for key in ESTIMATORS},
        }
        for name in cases
    }
    for name, result in results.items():
        result["holdout_rms"] = cases[name]["holdout_rms"]
        result["self_rms"] = noise2inverse.error_rms(
            cases[name]["inputs"], cases[name]["outputs"], "X:1"
        )
        pipeline = {
            "spread": noise2inverse.UNCERTAINTY_SCALE,
            "spread_rms": noise2inverse.UNCERTAINTY_RMS_SCALE,
        }
        for key, scale in pipeline.items():
            covered = errors[name] <= 2 * scale * maps[name][key]
            result[key]["coverage_2sigma_pipeline"] = float(np.mean(covered))
    out = {
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fitted_on": "all cases pooled",
        "scales": scales,
        "pipeline": {
            "scale": noise2inverse.UNCERTAINTY_SCALE,
            "rms_scale": noise2inverse.UNCERTAINTY_RMS_SCALE,
            "smooth_px": noise2inverse.UNCERTAINTY_SMOOTH_PX,
        },
        "cases": results,
    }
    print(table(out))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=_jsonable))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def table(out: dict[str, Any]) -> str:
    """Markdown: coverage (scale fitted on the first case), scale wanted, rank correlation."""
    lines = [
        f"scales fitted on {out['fitted_on']}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in out["scales"].items()),
        "",
        "| case | map | coverage 2 sigma | unscaled | scale wanted | Spearman "
        "| mean abs error top/bottom decile |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, case in out["cases"].items():
        for key in ESTIMATORS:
            r = case[key]
            ratio = r["mean_error_top_decile"] / max(r["mean_error_bottom_decile"], 1e-12)
            lines.append(
                f"| {name} | {key} | {r['coverage_2sigma']:.3f} | "
                f"{r['coverage_2sigma_unscaled']:.3f} | {r['scale_needed']:.2f} | "
                f"{r['spearman']:.2f} | {ratio:.1f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
