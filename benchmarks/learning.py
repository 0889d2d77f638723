"""Just-in-time learning benchmark: quality against the phantom's truth, and speed.

    python benchmarks/learning.py --json benchmarks/results/learning.json
    python benchmarks/learning.py --models unet,msdnet --seconds 60 --json out.json
    python benchmarks/learning.py --quick --json out.json      # about 2 minutes

Quality (per model): a dynamic bubble column (``simulated_devices.phantoms``)
is scanned continuously in parallel beam at ``--photons`` per pixel (Poisson
noise), in real time: projection ``i`` is taken at virtual time ``i / fps``
and becomes available when the wall clock passes it. Projections go through
``bluesky_jit.projections`` (flat field, ramp filter, ring buffer); a
:class:`bluesky_jit.pairs.PairMaker` reconstructs Noise2Inverse patch pairs
from the newest rotation every ``--refresh`` seconds into the trainer's
capacity queue (and hold-out pairs, never trained on, from the same newest
window: "later" than everything trained before) while the one
:class:`bluesky_jit.training.Trainer` trains in its thread. After
``--seconds`` of stream the slice of the newest rotation is denoised (the
mean of the network on both Noise2Inverse halves) and compared with the
motion-averaged truth of that rotation: ``psnr_fbp``, ``psnr_tv`` (TV
weight tuned against truth on a held-out slice from earlier in the scan),
``psnr_tv_oracle`` (tuned on the test slice itself: the best any TV weight
does), ``psnr_tv_n2i`` (tuned without truth on the halves), ``psnr_bm3d``
(if installed), ``psnr_denoised``, SSIM, and ``alpha``. Then the slice moves
from the bubbles to the bead bed (Graas et al. 2023, Fig. 7a / 10: repositioning) and
``recovery_s`` is the time until hold-out alpha is back within 0.05 of its
level before the move. The noise (and so FBP, TV and BM3D) is the same in
every model's run: it is seeded per projection index.

Speed (per model): optimizer steps/s on batches of 32 20x20 patches (the
trainer's settings: bfloat16 autocast, channels-last, fused Adam, on 1 and 2
threads; and float32 for reference) and ms per denoised 512^2 and 1024^2
slice (bfloat16 and float32 weights), medians of repeats. Then, for the
Standard U-Net, what each speed-up is worth (``speed_ablation``: plain
float32 step, + channels_last, + fused Adam, + bfloat16, + torch.compile; the
same for inference), as ratios measured turn about. Timings on a shared
2-core machine are noisy: the JSON keeps every repeat.

Writes the JSON (per model, plus the machine), a Markdown table on stdout and
``learning_curve.png`` next to the JSON (``--png`` to choose).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bluesky_jit import noise2inverse
from bluesky_jit.baselines import (
    bm3d_available,
    bm3d_denoise,
    noise_sigma,
    tune_bm3d,
    tune_tv,
    tv_denoise,
)
from bluesky_jit.buffers import ReplayBuffer, make_buffer
from bluesky_jit.evaluation import disc_mask, psnr
from bluesky_jit.inference import Denoiser
from bluesky_jit.models import build_model
from bluesky_jit.pairs import PairMaker, SamplingRegion
from bluesky_jit.projections import FlatField, ProjectionBuffer, RampFilter
from bluesky_jit.reconstruction import TorchBackprojector
from bluesky_jit.training import Normalizer, Trainer

# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Spec:
    """One benchmarked network and how it is fed."""

    name: str
    model: str
    config: dict[str, Any] = field(default_factory=dict)
    stack: str | None = None
    frames: int = 1
    online_strategy: str = "queue"  # or "sequential" (the no-buffer baseline)


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("unet", "unet"),  # the Standard U-Net of Graas et al. 2023
        Spec("unet_nobuffer", "unet", online_strategy="sequential"),  # Graas et al. 2023, Fig. 10
        # Dilated networks, dilations fitted to 20x20 patches. With the papers' dilations
        # (up to 10 or 16) most taps of a patch fall into the zero padding, and the network
        # fails on full slices (17.3 and 12.3 dB here, worse than TV, at a fine hold-out
        # alpha); those configs are msdnet_l10 and smsnet_dlsia. 100 layers (Pelt and Sethian 2018)
        # train at ~7 steps/s on this CPU, hence depth 30.
        Spec("msdnet", "msdnet", {"depth": 30, "dilations": [1, 2, 3, 4]}),
        Spec("msdnet_l10", "msdnet", {"depth": 30}),
        Spec("tunet", "tunet", {"batch_norm": False}),
        Spec("smsnet", "smsnet", {"dilations": [1, 2, 4]}),
        Spec("smsnet_dlsia", "smsnet"),
        Spec("Z3", "unet3d", {"frames": 3}, stack="z", frames=3),
        Spec("T3", "unet3d", {"frames": 3}, stack="t", frames=3),
    )
}
DEFAULT_MODELS = ["unet", "msdnet", "tunet", "smsnet", "Z3", "T3", "unet_nobuffer"]


def build(spec: Spec, seed: int = 0) -> torch.nn.Module:
    return build_model(spec.model, spec.config, seed=seed)


# ----------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "note": "shared machine: other processes ran during the measurements",
    }


# ----------------------------------------------------------------------------- speed


def _trainer(spec: Spec, precision: str, channels_last: bool | None = None) -> Trainer:
    """A Trainer with the pipeline's settings on batches of 32 random 20x20 pairs."""
    rng = np.random.default_rng(0)
    item = (1, spec.frames, 20, 20) if spec.stack else (1, 20, 20)
    target = (1, 1, 20, 20) if spec.stack else (1, 20, 20)
    buffer = ReplayBuffer(320, rng=rng, item_ndim=len(item))
    clean = rng.normal(size=(320, *target)).astype(np.float32)
    u = np.broadcast_to(clean, (320, *item)) if spec.stack else clean
    buffer.push(u + rng.normal(size=(320, *item)), clean + rng.normal(size=clean.shape))
    return Trainer(
        build(spec), buffer, batch_size=32, learning_rate=2e-3, train_precision=precision,
        channels_last=channels_last, augment=True, average_weights=0.99,
    )  # fmt: skip


def _steps_per_s(trainer: Trainer, steps: int) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        return steps / (time.perf_counter() - t0)

    return run


def _ms_per_slice(denoiser: Denoiser, image: np.ndarray) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        denoiser(image)
        return 1000 * (time.perf_counter() - t0)

    return run


def _turn_about(
    runners: dict[Any, Callable[[], float]], threads: dict[Any, int], rounds: int
) -> dict[Any, list[float]]:
    """Each runner once per round, in turn (with its thread count): drift hits all alike."""
    samples: dict[Any, list[float]] = {key: [] for key in runners}
    before = torch.get_num_threads()
    try:
        for _ in range(rounds):
            for key, run in runners.items():
                torch.set_num_threads(threads[key])
                samples[key].append(run())
    finally:
        torch.set_num_threads(before)
    return samples


def speed(spec: Spec, *, quick: bool) -> dict[str, Any]:
    """Training and inference speed, bfloat16 and float32, on 1 and 2 threads.

    Training: optimizer steps/s of the :class:`Trainer` (the pipeline's
    settings) on batches of 32 20x20 patches (stacks: frames deep).
    Inference: ms per denoised 512^2 and 1024^2 slice (stacks: a frames-deep
    stack in). The settings take turns within every round. The headline keys
    (``train_it_per_s``, ``infer_ms_512``, ``infer_ms_1024``) are bfloat16
    with the better thread count (by median); every setting and repeat is
    kept. On a shared machine 2 threads are fastest when the other core is
    idle and fall behind 1 thread when it is busy.
    """
    rounds, steps = (3, 20) if quick else (6, 30)
    settings = [(p, s, t) for p, s in (("bfloat16", ""), ("float32", "_fp32")) for t in (1, 2)]
    threads = {key: key[2] for key in settings}

    trainers = {key: _trainer(spec, key[0]) for key in settings}
    for key, trainer in trainers.items():
        torch.set_num_threads(key[2])
        for _ in range(5):
            trainer.step()

    runners = {k: _steps_per_s(t, steps) for k, t in trainers.items()}
    rates = _turn_about(runners, threads, rounds)
    del trainers

    rng = np.random.default_rng(0)
    times: dict[Any, list[float]] = {}
    for size in (512, 1024):
        shape = (spec.frames, size, size) if spec.stack else (size, size)
        image = rng.normal(size=shape).astype(np.float32)
        denoisers = {
            key: Denoiser(build(spec), normalizer=Normalizer(), infer_precision=key[0])
            for key in settings
        }
        for key, denoiser in denoisers.items():
            torch.set_num_threads(key[2])
            denoiser(image)
        runners = {(*k, size): _ms_per_slice(d, image) for k, d in denoisers.items()}
        times.update(_turn_about(runners, {k: k[2] for k in runners}, rounds))

    out: dict[str, Any] = {}
    for precision, suffix, t in settings:
        tag = f"{suffix}_{t}t"
        out[f"train_it_per_s{tag}"] = statistics.median(rates[precision, suffix, t])
        out[f"train_it_per_s{tag}_repeats"] = rates[precision, suffix, t]
        for size in (512, 1024):
            out[f"infer_ms_{size}{tag}"] = statistics.median(times[precision, suffix, t, size])
            out[f"infer_ms_{size}{tag}_repeats"] = times[precision, suffix, t, size]
    for suffix in ("", "_fp32"):
        out[f"train_it_per_s{suffix}"] = max(out[f"train_it_per_s{suffix}_{t}t"] for t in (1, 2))
        for size in (512, 1024):
            out[f"infer_ms_{size}{suffix}"] = min(
                out[f"infer_ms_{size}{suffix}_{t}t"] for t in (1, 2)
            )
    return out


TRAIN_STEPS = {
    # name: (precision, channels_last, Adam's implementation, torch.compile)
    "plain": ("float32", False, "for-loop", False),
    "+ channels_last": ("float32", True, "for-loop", False),
    "+ fused Adam": ("float32", True, "fused", False),
    "+ bfloat16 autocast (Trainer)": ("bfloat16", True, "fused", False),
    "+ torch.compile": ("bfloat16", True, "fused", True),
}
INFERENCE = {
    # name: (precision, channels_last, torch.compile)
    "plain": ("float32", False, False),
    "+ channels_last": ("float32", True, False),
    "+ bfloat16 weights (Denoiser)": ("bfloat16", True, False),
    "float32 + torch.compile": ("float32", True, True),
    "bfloat16 + torch.compile": ("bfloat16", True, True),
}


def speed_ablation(*, quick: bool, threads: int = 2) -> dict[str, Any]:
    """What each speed-up is worth for the Standard U-Net, as ratios to a plain step.

    Training (batches of 32 20x20 patches, augmentation and weight averaging
    on, as in the pipeline) and inference of a 1024x1024 slice, one setting
    added at a time. The settings take turns within every repeat, so a
    neighbour that slows the machine down slows them all alike and the ratios
    hold even when the absolute rates drift. ``compile_s``: the first steps
    (or first slice) with ``torch.compile``, compilation included.
    """
    rounds, steps = (4, 20) if quick else (10, 25)
    unet = SPECS["unet"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainers, compile_s = {}, {}
        for name, (precision, channels_last, adam, compiled) in TRAIN_STEPS.items():
            trainer = _trainer(unet, precision, channels_last)
            if adam == "for-loop":
                trainer.optimizer = torch.optim.Adam(
                    trainer.model.parameters(), lr=2e-3, foreach=False, fused=False
                )
            t0 = time.perf_counter()
            if compiled:
                trainer.model.compile()
            for _ in range(5):
                trainer.step()
            if compiled:
                compile_s[name] = time.perf_counter() - t0
            trainers[name] = trainer

        image = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
        denoisers = {}
        for name, (precision, channels_last, compiled) in INFERENCE.items():
            denoiser = Denoiser(
                build(unet), normalizer=Normalizer(), infer_precision=precision,
                channels_last=channels_last,
            )  # fmt: skip
            t0 = time.perf_counter()
            if compiled:
                denoiser.model.compile()
            denoiser(image)
            if compiled:
                compile_s[name] = time.perf_counter() - t0
            denoisers[name] = denoiser
    finally:
        torch.set_num_threads(before)
    train = _turn_about(
        {name: _steps_per_s(t, steps) for name, t in trainers.items()},
        dict.fromkeys(trainers, threads),
        rounds,
    )
    infer = _turn_about(
        {name: _ms_per_slice(d, image) for name, d in denoisers.items()},
        dict.fromkeys(denoisers, threads),
        max(3, rounds // 2),
    )

    def rows(samples: dict[str, list[float]], key: str, better: str) -> dict[str, Any]:
        plain = statistics.median(samples["plain"])
        out = {}
        for name, values in samples.items():
            median = statistics.median(values)
            ratio = median / plain if better == "higher" else plain / median
            out[name] = {key: median, "speed_up": ratio, "repeats": values}
        return out

    return {
        "threads": threads,
        "train_it_per_s": rows(train, "it_per_s", "higher"),
        "infer_ms_1024": rows(infer, "ms", "lower"),
        "compile_s": compile_s,
    }


def ablation_table(ablation: dict[str, Any]) -> str:
    lines = [
        f"| Standard U-Net, {ablation['threads']} threads | train it/s | speed-up |",
        "|---|---|---|",
    ]
    for name, r in ablation["train_it_per_s"].items():
        lines.append(f"| {name} | {r['it_per_s']:.1f} | {r['speed_up']:.2f}x |")
    lines += ["", "| 1024x1024 inference | ms | speed-up |", "|---|---|---|"]
    for name, r in ablation["infer_ms_1024"].items():
        lines.append(f"| {name} | {r['ms']:.0f} | {r['speed_up']:.2f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stream


class PhantomStream:
    """Noisy parallel-beam projections of a bubble column, as a real-time stream."""

    def __init__(
        self,
        *,
        rows: int,
        cols: int,
        angles: int,
        fps: float,
        photons: float,
        seed: int,
        bubbles: int = 80,
    ):
        from simulated_devices.phantoms import BubbleColumn

        self.phantom = BubbleColumn(detector_shape=(rows, cols), seed=seed, n_bubbles=bubbles)
        self.rows, self.cols, self.angles, self.fps = rows, cols, angles, fps
        self.photons, self.seed = photons, seed
        self.flat = FlatField(np.zeros((1, rows, cols)), np.full((1, rows, cols), photons))
        self.ramp = RampFilter(cols, pixel_size=1.0)
        self.buffer = ProjectionBuffer(3 * angles, (rows, cols))
        self.backprojector = TorchBackprojector(
            cols=cols, center_of_rotation=(cols - 1) / 2, pixel_size=1.0
        )
        self.next_index = 0

    def angle(self, index: int) -> float:
        return 180.0 * index / self.angles  # continuous rotation, 180 degrees per window

    def time_of(self, index: int) -> float:
        return index / self.fps

    def take(self, index: int) -> None:
        rng = np.random.default_rng([self.seed, index])  # same noise in every run
        p = self.phantom.project(self.angle(index), self.time_of(index))
        counts = rng.poisson(self.photons * np.exp(-p)).astype(np.float32)
        filtered = self.ramp(torch.from_numpy(self.flat(counts)))
        self.buffer.append(filtered, angle=math.radians(self.angle(index)), index=index)

    def advance_to(self, index: int) -> None:
        while self.next_index <= index:
            self.take(self.next_index)
            self.next_index += 1

    def truth(self, window: np.ndarray, row: int) -> np.ndarray:
        t0, t1 = self.time_of(int(window[0])), self.time_of(int(window[-1]))
        return self.phantom.truth_window(t0, t1, row, num=8)


@dataclass
class Snapshot:
    """What is needed to score one moment of a run afterwards."""

    t: float
    row: int
    window: np.ndarray
    inputs: np.ndarray  # the Noise2Inverse network inputs (K, [frames,] n, n)
    fbp: np.ndarray
    halves: np.ndarray  # the middle frame's two halves (for self-supervised TV tuning)
    version: int
    state: dict[str, torch.Tensor]
    normalizer: Normalizer | None
    alpha: float


def run_stream(spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    """Stream for args.seconds, snapshot, move the slice, stream until recovered."""
    torch.set_num_threads(1)
    stream = PhantomStream(
        rows=args.rows,
        cols=args.size,
        angles=args.angles,
        fps=args.fps,
        photons=args.photons,
        seed=args.seed,
        bubbles=args.bubbles,
    )
    inner = stream.phantom.inner_radius
    region = SamplingRegion.disc(inner)  # patches inside the container (Graas et al. 2023)
    maker = PairMaker(
        stream.buffer,
        stream.backprojector.backproject,
        window=args.angles,
        rows=args.rows,
        pixel_size=1.0,
        row=args.row,
        splits=2,
        n2i_strategy="X:1",
        patch_size=args.patch,
        region=region,
        slice_size=args.size,
        neighbourhood_rows=args.neighbourhood,
        stack=spec.stack,
        frames=spec.frames,
        frame_step=args.angles // 2,
        rng=np.random.default_rng(args.seed + 7),
    )
    item_ndim = 4 if spec.stack else 3
    rng = np.random.default_rng(1)
    buffer = make_buffer(spec.online_strategy, args.buffer, rng=rng, item_ndim=item_ndim)
    trainer = Trainer(
        build(spec),
        buffer,
        batch_size=32,
        learning_rate=args.lr,
        holdout_size=args.holdout,
        metrics_every_s=1.0,
        train_precision="bfloat16",
        num_threads=1,
        augment=not args.no_augment,
        average_weights=args.average or None,
        max_train_steps_per_s=args.max_steps_per_s,
    )
    stop = threading.Event()
    produced = {"pairs": 0, "refreshes": 0, "pair_s": 0.0}
    errors: list[BaseException] = []
    t_start = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t_start

    def produce() -> None:
        torch.set_num_threads(1)
        try:
            while not stop.is_set():
                tick = time.monotonic()
                stream.advance_to(int(clock() * args.fps))
                if maker.ready:
                    t0 = time.perf_counter()
                    u, v = maker.pairs(args.pairs)
                    hu, hv = maker.pairs(args.holdout_pairs)
                    produced["pair_s"] += time.perf_counter() - t0
                    trainer.buffer.push(u, v)
                    trainer.add_holdout(hu, hv)
                    produced["pairs"] += len(u)
                    produced["refreshes"] += 1
                    if not trainer.running and len(trainer.buffer) >= trainer.batch_size:
                        trainer.start()
                stop.wait(max(0.0, args.refresh - (time.monotonic() - tick)))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def snapshot(t_mark: float) -> Snapshot:
        """Freeze the state at virtual time t_mark (the newest window ends there)."""
        end = int(t_mark * args.fps)
        while stream.next_index <= end and not errors:
            time.sleep(0.01)
        # the window(s) ending exactly at `end`: the same data in every model's run
        splits = maker.slice_splits(end=end)
        windows = maker.windows(end=end)
        mid = spec.frames // 2
        halves = splits[:, mid] if spec.stack else splits
        snap = trainer.snapshot()
        return Snapshot(
            t=t_mark,
            row=maker.row,
            window=windows[mid if spec.stack == "t" else 0],
            inputs=noise2inverse.inputs(splits, "X:1"),
            fbp=halves.mean(axis=0),
            halves=halves,
            version=snap.version,
            state={k: t.clone() for k, t in snap.state_dict.items()},
            normalizer=snap.normalizer,
            alpha=trainer.evaluate(),
        )

    producer = threading.Thread(target=produce, name="stream", daemon=True)
    producer.start()
    marks = sorted({*np.arange(args.eval_every, args.seconds, args.eval_every), args.seconds})
    snaps: list[Snapshot] = []
    try:
        for mark in marks:
            while clock() < mark and not errors:
                time.sleep(0.02)
            snaps.append(snapshot(float(mark)))
        rows_before = trainer.metrics()
        alpha_before_rows = [r["alpha"] for r in rows_before if math.isfinite(r["alpha"])]
        alpha_before = statistics.median(alpha_before_rows[-3:]) if alpha_before_rows else math.nan
        weights_at_move = snaps[-1]
        # -- discontinuity: move the slice to the bead bed -----------------------------
        move_wall = time.time()
        maker.set_row(args.move_row)
        trainer.holdout.clear()  # hold-out pairs from the new position only
        recovered_at = None
        while time.time() - move_wall < args.after_move and not errors:
            time.sleep(0.25)
            after = [
                r
                for r in trainer.metrics()
                if r["time"] > move_wall + 0.5 and math.isfinite(r["alpha"])
            ]
            if recovered_at is None and after and after[-1]["alpha"] <= alpha_before + 0.05:
                recovered_at = after[-1]["time"] - move_wall
            if recovered_at is not None and time.time() - move_wall > recovered_at + args.linger:
                break
        final_holdout = trainer.holdout.snapshot() if len(trainer.holdout) else None
    finally:
        stop.set()
        producer.join(30)
        trainer.stop()
    if errors:
        raise errors[0]
    rows = trainer.metrics()
    frozen_alpha = math.nan
    if final_holdout is not None and weights_at_move.normalizer is not None:
        frozen_alpha = holdout_alpha(spec, weights_at_move, final_holdout)
    return {
        "snapshots": snaps,
        "rows": rows,
        "t_start_wall": time.time() - clock(),
        "move_wall": move_wall,
        "alpha_before_move": alpha_before,
        "recovery_s": recovered_at,
        "alpha_frozen_after_move": frozen_alpha,
        "alpha_after_move_final": trainer.evaluate(),
        "train_steps": trainer.steps,
        "pairs_pushed": produced["pairs"],
        "pair_refreshes": produced["refreshes"],
        "pair_seconds": produced["pair_s"],
        "stream": stream,
    }


def holdout_alpha(spec: Spec, snap: Snapshot, holdout: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Alpha of frozen weights (the pretrained baseline) on hold-out pairs."""
    from bluesky_jit.training import alpha, middle_frame

    model = build(spec)
    model.load_state_dict(snap.state)
    model.eval()
    norm = snap.normalizer
    u, v = (norm(t) for t in holdout)
    with torch.inference_mode():
        out = torch.cat([model(b) for b in u.split(128)])
    return alpha(out, middle_frame(u, like=v), v)


def score(
    spec: Spec,
    snap: Snapshot,
    truth: np.ndarray,
    mask: np.ndarray,
    precision: str,
    self_ensemble: bool = False,
) -> np.ndarray:
    model = build(spec)
    model.load_state_dict(snap.state)
    denoiser = Denoiser(
        model, normalizer=snap.normalizer, infer_precision=precision, self_ensemble=self_ensemble
    )
    if snap.normalizer is None:
        return snap.fbp
    return denoiser.denoise_mean(snap.inputs)


def ssim(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    lo, hi = float(truth[mask].min()), float(truth[mask].max())
    _, smap = structural_similarity(
        truth.astype(np.float64), image.astype(np.float64), data_range=hi - lo, full=True
    )
    return float(smap[mask].mean())


# ----------------------------------------------------------------------------- baselines


_BASELINE_CACHE: dict[tuple, dict[str, Any]] = {}


def baselines(
    stream: PhantomStream, test: Snapshot, held_out: Snapshot, mask: np.ndarray, args
) -> dict[str, Any]:
    """TV (three tunings) and BM3D on the test slice; cached per window (same in every run)."""
    key = (int(test.window[-1]), test.row, int(held_out.window[-1]))
    if key in _BASELINE_CACHE:
        return _BASELINE_CACHE[key]
    truth = stream.truth(test.window, test.row)
    truth_h = stream.truth(held_out.window, held_out.row)
    out: dict[str, Any] = {"psnr_fbp": psnr(test.fbp, truth, mask)}
    out["ssim_fbp"] = ssim(test.fbp, truth, mask)
    tv = tune_tv([held_out.fbp], [truth_h], mask=mask)
    den = tv_denoise(test.fbp, tv.value)
    out.update(psnr_tv=psnr(den, truth, mask), ssim_tv=ssim(den, truth, mask), tv_weight=tv.value)
    oracle = tune_tv([test.fbp], [truth], mask=mask)
    out.update(psnr_tv_oracle=psnr(tv_denoise(test.fbp, oracle.value), truth, mask))
    out["tv_weight_oracle"] = oracle.value
    # self-supervised: TV on one half against the other, applied to the full FBP with the
    # weight scaled to its halved noise variance (the weight scales with the noise std)
    halves = test.halves
    n2i = tune_tv([halves[0], halves[1]], [halves[1], halves[0]], mask=mask)
    w = n2i.value / math.sqrt(2)
    out.update(psnr_tv_n2i=psnr(tv_denoise(test.fbp, w), truth, mask), tv_weight_n2i=w)
    if bm3d_available() and not args.no_bm3d:
        sigma = noise_sigma(held_out.halves[0], held_out.halves[1], mask=mask) / math.sqrt(2)
        tb = tune_bm3d([held_out.fbp], [truth_h], sigma=sigma, mask=mask, factors=(0.5, 1, 2))
        den = bm3d_denoise(test.fbp, tb.value)
        out.update(psnr_bm3d=psnr(den, truth, mask), ssim_bm3d=ssim(den, truth, mask))
        out["bm3d_sigma"] = tb.value
    else:
        out["psnr_bm3d"] = None
        out["bm3d_note"] = "bm3d not installed" if not bm3d_available() else "skipped (--no-bm3d)"
    out["_truth"] = truth
    _BASELINE_CACHE[key] = out
    return out


# ----------------------------------------------------------------------------- per model


def benchmark_model(spec: Spec, args: argparse.Namespace) -> tuple[dict[str, Any], dict]:
    print(f"[{spec.name}] speed ...", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"model": spec.model, "config": spec.config, "stack": spec.stack}
    result["strategy"] = spec.online_strategy
    if not args.quality_only:
        result.update(speed(spec, quick=args.quick))
    if args.speed_only:
        return result, {}
    print(f"[{spec.name}] stream {args.seconds:.0f} s + move ...", file=sys.stderr, flush=True)
    run = run_stream(spec, args)
    snaps: list[Snapshot] = run["snapshots"]
    mask = disc_mask(args.size, 0.97 * run["stream"].phantom.inner_radius / (args.size / 2))
    test, held_out = snaps[-1], snaps[len(snaps) // 2 - 1] if len(snaps) > 1 else snaps[0]
    base = baselines(run["stream"], test, held_out, mask, args)
    truth = base["_truth"]
    result.update({k: v for k, v in base.items() if not k.startswith("_")})
    den = score(spec, test, truth, mask, "bfloat16")
    den32 = score(spec, test, truth, mask, "float32")
    ensemble = score(spec, test, truth, mask, "bfloat16", self_ensemble=True)
    result.update(
        psnr_denoised=psnr(den, truth, mask),
        psnr_denoised_fp32=psnr(den32, truth, mask),
        psnr_denoised_self_ensemble=psnr(ensemble, truth, mask),
        ssim_denoised_self_ensemble=ssim(ensemble, truth, mask),
        ssim_denoised=ssim(den, truth, mask),
        alpha=test.alpha,
        train_steps_at_eval=test.version,
    )
    curve = []
    for s in snaps:
        t_truth = truth if s is test else run["stream"].truth(s.window, s.row)
        d = score(spec, s, t_truth, mask, "bfloat16")
        curve.append(
            {
                "t": s.t,
                "alpha": s.alpha,
                "steps": s.version,
                "psnr_fbp": psnr(s.fbp, t_truth, mask),
                "psnr_tv": psnr(tv_denoise(s.fbp, base["tv_weight"]), t_truth, mask),
                "psnr_denoised": psnr(d, t_truth, mask),
                "bias_denoised": float(np.mean((d - t_truth)[mask])),
                "bias_fbp": float(np.mean((s.fbp - t_truth)[mask])),
            }
        )
    t0 = run["t_start_wall"]
    alpha_curve = [
        {"t": r["time"] - t0, "alpha": r["alpha"], "step": r["step"], "loss": r["loss"]}
        for r in run["rows"]
    ]
    result.update(
        recovery_s=run["recovery_s"],
        alpha_before_move=run["alpha_before_move"],
        alpha_after_move_final=run["alpha_after_move_final"],
        alpha_frozen_after_move=run["alpha_frozen_after_move"],
        move_s=run["move_wall"] - t0,
        train_steps=run["train_steps"],
        stream_train_it_per_s=(
            statistics.median([r["steps_per_second"] for r in run["rows"] if r["steps_per_second"]])
            if run["rows"]
            else 0.0
        ),
        pairs_pushed=run["pairs_pushed"],
        pairs_per_s=run["pairs_pushed"] / max(args.seconds, 1e-9),
        pair_seconds=run["pair_seconds"],
        curve=curve,
        alpha_curve=alpha_curve,
    )
    result["targets"] = targets(result)
    images = {"fbp": test.fbp, "denoised": den, "truth": truth}
    return result, images


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, evaluated (None: not measured)."""

    def ge(a, b):
        return None if a is None or b is None else bool(a >= b)

    out = {
        "psnr_ge_fbp_plus_6": ge(r.get("psnr_denoised"), (r.get("psnr_fbp") or math.nan) + 6),
        "psnr_ge_tv_plus_1": ge(
            r.get("psnr_denoised"),
            max(r.get("psnr_tv") or -math.inf, r.get("psnr_tv_oracle") or -math.inf) + 1,
        ),
        "alpha_le_0.6": None if r.get("alpha") is None else bool(r["alpha"] <= 0.6),
        "recovery_le_20s": None
        if "recovery_s" not in r
        else (r["recovery_s"] is not None and r["recovery_s"] <= 20),
        "train_ge_60_it_per_s": None
        if "train_it_per_s" not in r
        else bool(r["train_it_per_s"] >= 60),
        "infer_1024_le_200ms": None
        if "infer_ms_1024" not in r
        else bool(r["infer_ms_1024"] <= 200),
    }
    return out


# ----------------------------------------------------------------------------- report


def table(results: dict[str, dict[str, Any]]) -> str:
    cols = [
        ("psnr_fbp", "FBP dB", "{:.2f}"),
        ("psnr_tv", "TV dB", "{:.2f}"),
        ("psnr_tv_oracle", "TV* dB", "{:.2f}"),
        ("psnr_bm3d", "BM3D dB", "{:.2f}"),
        ("psnr_denoised", "denoised dB", "{:.2f}"),
        ("psnr_denoised_self_ensemble", "x8 dB", "{:.2f}"),
        ("alpha", "alpha", "{:.3f}"),
        ("recovery_s", "recovery s", "{:.1f}"),
        ("train_it_per_s_1t", "train it/s 1t", "{:.1f}"),
        ("train_it_per_s_2t", "train it/s 2t", "{:.1f}"),
        ("train_it_per_s_fp32", "fp32 it/s", "{:.1f}"),
        ("infer_ms_512", "512^2 ms", "{:.0f}"),
        ("infer_ms_1024", "1024^2 ms", "{:.0f}"),
        ("infer_ms_1024_fp32", "1024^2 fp32 ms", "{:.0f}"),
    ]
    lines = [
        "| model | " + " | ".join(c[1] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, r in results.items():
        cells = []
        for key, _, fmt in cols:
            value = r.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: dict[str, dict[str, Any]], images: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_alpha, ax_psnr, ax_img = axes
    for name, r in results.items():
        curve = r.get("alpha_curve") or []
        if curve:
            line = ax_alpha.plot([c["t"] for c in curve], [c["alpha"] for c in curve], label=name)[
                0
            ]
            if r.get("move_s") is not None:
                ax_alpha.axvline(r["move_s"], color=line.get_color(), ls=":", lw=0.8)
        pts = r.get("curve") or []
        if pts:
            ax_psnr.plot([p["t"] for p in pts], [p["psnr_denoised"] for p in pts], "o-", label=name)
    first = next((r for r in results.values() if r.get("curve")), None)
    if first is not None:
        pts = first["curve"]
        ax_psnr.plot([p["t"] for p in pts], [p["psnr_fbp"] for p in pts], "k--", label="FBP")
        ax_psnr.plot(
            [p["t"] for p in pts],
            [p["psnr_tv"] for p in pts],
            "s-.",
            color="gray",
            label="TV (weight tuned on held-out slice)",
        )
    ax_alpha.axhline(0.5, color="gray", lw=0.5)
    ax_alpha.set(xlabel="time (s)", ylabel="hold-out alpha", title="alpha; dotted: slice moved")
    ax_alpha.set_ylim(0.3, 1.3)
    ax_alpha.legend(fontsize=7)
    ax_psnr.set(xlabel="time (s)", ylabel="PSNR (dB)", title="PSNR vs truth")
    ax_psnr.legend(fontsize=7)
    name, imgs = next(iter(images.items()), (None, None))
    if imgs:
        n = imgs["fbp"].shape[0]
        crop = slice(n // 4, 3 * n // 4)
        strip = np.concatenate([imgs[k][crop, crop] for k in ("fbp", "denoised", "truth")], 1)
        lo, hi = np.percentile(imgs["truth"], [1, 99])
        ax_img.imshow(strip, cmap="gray", vmin=lo, vmax=hi)
        ax_img.set_title(f"FBP | {name} | truth (centre crop, t = end of stream)")
        ax_img.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--png", type=Path, default=None, help="learning-curve figure")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of {list(SPECS)}")
    parser.add_argument("--quick", action="store_true", help="20 s of stream, fewer repeats")
    parser.add_argument("--seconds", type=float, default=60.0, help="stream before the move")
    parser.add_argument("--after-move", type=float, default=30.0, help="max stream after it")
    parser.add_argument("--linger", type=float, default=5.0, help="stream after recovery")
    parser.add_argument("--eval-every", type=float, default=10.0)
    parser.add_argument("--photons", type=float, default=1000.0)
    parser.add_argument("--bubbles", type=int, default=80, help="bubbles in the column")
    parser.add_argument("--size", type=int, default=256, help="detector width = slice size")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--row", type=int, default=20, help="slice row (bubbles)")
    parser.add_argument("--move-row", type=int, default=56, help="row after the move (bed)")
    parser.add_argument("--angles", type=int, default=180, help="projections per 180 degrees")
    parser.add_argument("--fps", type=float, default=90.0, help="projections per second")
    parser.add_argument("--refresh", type=float, default=0.5, help="s between pair batches")
    parser.add_argument("--pairs", type=int, default=128, help="training pairs per refresh")
    parser.add_argument("--holdout-pairs", type=int, default=8)
    parser.add_argument("--holdout", type=int, default=64, help="hold-out pairs kept")
    parser.add_argument("--buffer", type=int, default=320, help="N_buffer")
    parser.add_argument("--patch", type=int, default=20)
    parser.add_argument("--neighbourhood", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-steps-per-s", type=float, default=None, help="throttle training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--quality-only", action="store_true")
    parser.add_argument("--no-bm3d", action="store_true")
    parser.add_argument(
        "--no-ablation", action="store_true", help="skip the one-at-a-time speed-ups"
    )
    parser.add_argument("--no-augment", action="store_true", help="no random flips/turns")
    parser.add_argument(
        "--average", type=float, default=0.99, help="weight averaging decay (0: newest weights)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 20.0)
        args.after_move = min(args.after_move, 15.0)
        args.eval_every = min(args.eval_every, 10.0)
        args.linger = min(args.linger, 2.0)
        if args.models == ",".join(DEFAULT_MODELS):
            args.models = "unet"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {list(SPECS)}")
    results: dict[str, dict[str, Any]] = {}
    images: dict[str, dict] = {}
    for name in names:
        results[name], imgs = benchmark_model(SPECS[name], args)
        if imgs:
            images[name] = imgs
        print(table({name: results[name]}).splitlines()[-1], file=sys.stderr, flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = {"machine": machine(), "settings": settings, "models": results}
    if not args.quality_only and not args.no_ablation:
        print("[unet] speed-ups, one at a time ...", file=sys.stderr, flush=True)
        out["speed_ablation"] = speed_ablation(quick=args.quick)
        print(ablation_table(out["speed_ablation"]))
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=_jsonable))
        print(f"wrote {args.json}", file=sys.stderr)
    if not args.speed_only:
        png = args.png or (args.json.with_name("learning_curve.png") if args.json else None)
        if png is not None:
            figure(results, images, png)
            print(f"wrote {png}", file=sys.stderr)
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
