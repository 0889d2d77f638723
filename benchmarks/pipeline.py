"""Throughput of the live pipeline: ingest, training and inference.

    python benchmarks/pipeline.py --json benchmarks/results/pipeline.json

Cases (medians of repeats, written to JSON with the machine's description):

- ``scan_only``: projections/s of the simulated scan through a real RunEngine
  with no callback (the rate the pipeline has to keep up with here);
- ``ingest``: projections/s that ``JitCallback``'s worker sustains, fed the
  recorded documents of that scan as fast as it takes them, training running
  alongside as it does live; with and without the trainer;
- ``training``: optimizer steps/s of the Standard U-Net on batches of 32
  20x20 patches (Graas et al. 2023: 141 it/s for the T3 network on an RTX
  2080 Ti);
- ``inference``: ms per denoised slice, 512x512 and 1024x1024 (Graas et al.
  2023: 45 ms for a 1000x1000 slab on an RTX 2080 Ti).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bluesky_jit.apps.demo import machine_description
from bluesky_jit.config import JitConfig


def record_scan(directory: Path, *, shape, num_angles: int, rotations: int):
    """Run the simulated scan once; return its documents and the scan rate."""
    from bluesky import RunEngine

    from simulated_devices import hw
    from simulated_devices.phantoms import BubbleColumn
    from simulated_devices.plans import tomo_continuous
    from simulated_devices.sources import PhantomSource

    RE = RunEngine({})
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    source = PhantomSource(BubbleColumn(detector_shape=shape), photons=1000)
    beamline = hw(directory, source=source, frame_rate=30.0)
    t0 = time.perf_counter()
    RE(
        tomo_continuous(
            *beamline.plan_devices,
            num_angles=num_angles,
            rotations=rotations,
            num_darks=5,
            num_flats=5,
        )
    )
    seconds = time.perf_counter() - t0
    return docs, num_angles * rotations / seconds


def ingest_rate(docs, *, config: JitConfig, train: bool, directory: Path) -> dict:
    from bluesky_jit.callbacks import JitCallback

    config = config.replace(train=train)
    jit = JitCallback(config=config, directory=directory)
    t0 = time.perf_counter()
    for name, doc in docs:
        jit(name, doc)
    jit.flush()
    seconds = time.perf_counter() - t0
    jit.close()
    summary = jit.summaries[-1]
    return {
        "projections": summary.projections,
        "seconds": seconds,
        "projections_per_s": summary.projections / seconds,
        "slices": summary.slices,
        "train_steps": summary.train_steps,
    }


def training_rate(*, steps: int = 200, patch: int = 20, batch: int = 32) -> float:
    from bluesky_jit.buffers import ReplayBuffer
    from bluesky_jit.models import build_model
    from bluesky_jit.training import Trainer

    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(320, rng=rng)
    clean = rng.normal(size=(320, 1, patch, patch)).astype(np.float32)
    buffer.push(clean + rng.normal(size=clean.shape), clean + rng.normal(size=clean.shape))
    trainer = Trainer(build_model("unet", {}), buffer, batch_size=batch)
    for _ in range(10):  # warm up
        trainer.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    return steps / (time.perf_counter() - t0)


def inference_ms(size: int, repeats: int = 5) -> float:
    from bluesky_jit.inference import Denoiser
    from bluesky_jit.models import build_model
    from bluesky_jit.training import Normalizer

    image = np.random.default_rng(0).normal(size=(size, size)).astype(np.float32)
    denoiser = Denoiser(build_model("unet", {}), normalizer=Normalizer.fit(image[None, None]))
    denoiser(image)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        denoiser(image)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--size", type=int, default=256, help="detector width (px)")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--angles", type=int, default=180, help="projections per rotation")
    parser.add_argument("--rotations", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    results: dict = {"machine": machine_description(), "settings": vars(args) | {"json": None}}
    config = JitConfig(refresh_every=10)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs, scan_rate = record_scan(
            tmp / "raw", shape=(args.rows, args.size), num_angles=args.angles,
            rotations=args.rotations,
        )  # fmt: skip
        results["scan_only"] = {"projections_per_s": scan_rate}
        for train in (False, True):
            runs = [
                ingest_rate(docs, config=config, train=train, directory=tmp / f"d{train}{k}")
                for k in range(args.repeats)
            ]
            best = sorted(runs, key=lambda r: r["projections_per_s"])[len(runs) // 2]
            results["ingest_with_training" if train else "ingest"] = best
    results["training"] = {
        "model": "unet",
        "batch": 32,
        "patch": 20,
        "steps_per_s": statistics.median(training_rate() for _ in range(args.repeats)),
    }
    results["inference"] = {f"ms_{n}": inference_ms(n) for n in (512, 1024)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
