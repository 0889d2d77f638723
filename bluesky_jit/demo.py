"""The demo: a simulated dynamic scan with live just-in-time denoising.

A real RunEngine runs a continuous multi-rotation scan of the simulated
bubble column (ophyd-async devices writing HDF5); the raw run goes into the
embedded Tiled catalog (container ``raw``) and :class:`~bluesky_jit.JitCallback`
publishes the derived run (container ``derived``). At the end the derived run
is read back from the catalog and compared with the phantom's ground truth.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import JitConfig

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DemoOptions:
    """Settings of :func:`run_demo` (the command line's ``demo`` flags)."""

    data_dir: Path = Path("bluesky_jit_data")
    catalog_uri: str | None = None
    api_key: str | None = None
    size: int = 128
    rows: int = 16
    num_angles: int = 90
    rotations: int = 3
    photons: float = 1000.0
    frame_rate: float = 15.0
    paced: bool = True
    seed: int = 0
    summary: Path | None = None
    figures: Path | None = None
    progress: bool = True
    config: JitConfig = field(default_factory=JitConfig)
    on_callback: Callable[[Any], None] | None = None
    """Called with the ``JitCallback`` before the scan (e.g. to attach a live view)."""


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the demo scan; return the summary (also written to ``options.summary``)."""
    from bluesky import RunEngine
    from tqdm import tqdm

    from simulated_devices import hw
    from simulated_devices.phantoms import BubbleColumn
    from simulated_devices.plans import tomo_continuous
    from simulated_devices.sources import PhantomSource

    from . import catalog as cat
    from .callbacks import JitCallback

    data_dir = Path(options.data_dir).resolve()
    raw_dir = data_dir / "raw"
    derived_dir = data_dir / "derived"
    local = None
    if options.catalog_uri is None:
        local = cat.LocalCatalog(data_dir / "catalog", readable_storage=[data_dir])
        client = local.client()
        where = f"embedded Tiled catalog {local.uri} (data in {data_dir})"
    else:
        client = cat.connect(options.catalog_uri, api_key=options.api_key)
        where = f"Tiled catalog {options.catalog_uri}"
    try:
        raw_runs = cat.runs_container(client, "raw")
        derived_runs = cat.runs_container(client, "derived")
        jit = JitCallback(
            config=options.config, emit=cat.tiled_writer(derived_runs), directory=derived_dir
        )
        if options.on_callback is not None:
            options.on_callback(jit)
        # Ctrl-C handling needs the main thread; with a live view the scan runs in another.
        in_main = threading.current_thread() is threading.main_thread()
        RE = RunEngine({}) if in_main else RunEngine({}, context_managers=[])
        RE.subscribe(cat.tiled_writer(raw_runs))
        RE.subscribe(jit)
        phantom = BubbleColumn(detector_shape=(options.rows, options.size), seed=options.seed)
        source = PhantomSource(phantom, photons=options.photons)
        beamline = hw(
            raw_dir,
            source=source,
            frame_rate=options.frame_rate,
            paced=options.paced,
            seed=options.seed,
        )
        total = options.num_angles * options.rotations
        bar = tqdm(total=total, unit="proj", desc="scan", disable=not options.progress)

        def progress(name: str, doc: dict) -> None:
            if name == "event" and doc.get("seq_num") and bar.n < total:
                summaries = jit.pipelines.values()
                p = next(iter(summaries), None)
                if p is not None and p.summary is not None:
                    steps = p.trainer.steps if p.trainer is not None else 0
                    bar.set_postfix(slices=p.summary.slices, train_steps=steps, refresh=False)
                bar.update(1)

        token = RE.subscribe(progress, "event")
        t0 = time.monotonic()
        (raw_uid,) = RE(
            tomo_continuous(
                beamline.det,
                beamline.rot_stage,
                beamline.shutter,
                beamline.sample_stage,
                num_angles=options.num_angles,
                rotations=options.rotations,
                sample="bubble column (simulated)",
            )
        )
        scan_s = time.monotonic() - t0
        RE.unsubscribe(token)
        bar.close()
        if not jit.flush(timeout=600):
            logger.warning("The worker had not finished after 600 s")
        jit.close()
        run = next(s for s in jit.summaries if s.raw_uid == raw_uid)
        result, truth = _evaluate(run, phantom, options, scan_s)
        result["catalog"] = where
        result["catalog_uri"] = local.uri if local else options.catalog_uri
        result["data_dir"] = str(data_dir)
        derived = cat.derived_runs_for(derived_runs, raw_uid)
        result["derived_in_catalog"] = len(derived) == 1
        if options.figures is not None:
            result["figures"] = _figures(run, truth, result, Path(options.figures))
        if options.summary is not None:
            Path(options.summary).parent.mkdir(parents=True, exist_ok=True)
            Path(options.summary).write_text(json.dumps(result, indent=2, default=_jsonable))
        return result
    finally:
        if local is not None:
            local.close()


def _evaluate(run, phantom, options: DemoOptions, scan_s: float) -> tuple[dict[str, Any], Any]:
    from .evaluation import disc_mask, psnr

    result: dict[str, Any] = {
        **run.to_dict(),
        "scan_seconds": scan_s,
        "settings": {
            "size": options.size,
            "rows": options.rows,
            "num_angles": options.num_angles,
            "rotations": options.rotations,
            "photons": options.photons,
            "frame_rate": options.frame_rate,
            "paced": options.paced,
            "seed": options.seed,
            "config": options.config.to_dict(),
        },
        "machine": machine_description(),
        "psnr_fbp": math.nan,
        "psnr_denoised": math.nan,
    }
    truth = None
    if run.last_slice is not None and run.last_indices is not None:
        times = np.asarray(run.last_indices) / options.frame_rate
        row = options.config.slice_row
        row = run.geometry.rows // 2 if row is None else row
        truth = phantom.truth_window(float(times[0]), float(times[-1]), row)
        mask = disc_mask(truth.shape[0], 0.85)
        result["psnr_fbp"] = psnr(run.last_slice, truth, mask)
        if run.last_denoised is not None:
            result["psnr_denoised"] = psnr(run.last_denoised, truth, mask)
    return result, truth


def _figures(run, truth, result: dict[str, Any], directory: Path) -> list[str]:
    from .figures import save_learning_curve, save_slices

    paths = []
    if run.last_slice is not None:
        images = {
            f"FBP ({result['psnr_fbp']:.1f} dB)": run.last_slice,
            f"denoised ({result['psnr_denoised']:.1f} dB)": run.last_denoised,
            "truth": truth,
        }
        paths.append(save_slices(directory / "slices.png", images, title="last slice"))
    if run.metrics:
        paths.append(save_learning_curve(directory / "learning_curve.png", run.metrics))
    return [str(p) for p in paths]


def machine_description() -> dict[str, Any]:
    """The machine a figure was measured on."""
    import os

    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def format_summary(result: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of the demo."""
    lines = [
        f"raw run       {result['raw_uid']}",
        f"derived run   {result['derived_uid']}  ({result['exit_status']}"
        + (f": {result['reason']}" if result["reason"] else "")
        + ")",
        f"catalog       {result['catalog']}",
        f"projections   {result['projections']} ingested, {result['projections_per_s']:.1f}/s",
        f"slices        {result['slices']} reconstructed, {result['denoised']} denoised",
        f"training      {result['train_steps']} steps, {result['train_steps_per_s']:.1f} steps/s",
        f"alpha         {result['final_alpha']:.3f} (1 = no denoising, ~0.5 = ideal)",
        f"PSNR          FBP {result['psnr_fbp']:.2f} dB, denoised {result['psnr_denoised']:.2f} dB"
        " (against the phantom's ground truth)",
    ]
    for path in result.get("figures", []):
        lines.append(f"figure        {path}")
    return "\n".join(lines)
