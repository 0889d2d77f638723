"""The demo: a simulated dynamic scan with live just-in-time denoising.

With ``recording`` set (``--recording FILE.h5``) it replays a recorded DXchange
scan instead, in acquisition order (`simulated_devices.plans.recorded_scan`),
and the summary has no PSNR (a recording has no ground truth).

A real RunEngine runs a continuous multi-rotation scan of the simulated
bubble column (ophyd-async devices writing HDF5); the raw run goes into the
embedded Tiled catalog (container ``raw``) and a
:class:`~bluesky_jit.worker_process.JitProcess` (the JitCallback in a child
process) publishes the derived run (container ``derived``). At the end the derived run
is read back from the catalog and compared with the phantom's ground truth.

Ctrl-C (SIGINT) stops the scan the way bluesky does: the RunEngine's handler
asks for a pause at the next checkpoint (the demo puts one before every
frame, so that is within a frame), the paused run is aborted with a reason
(its stop document says ``abort``), the callback and the embedded catalog
are closed, and :func:`run_demo` raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import JitConfig

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
    recording: Path | None = None
    """A DXchange HDF5 file to replay instead of the simulated bubble column."""
    center_of_rotation: float | None = None
    """Recording only: detector column of the rotation axis (px); default the middle."""
    summary: Path | None = None
    figures: Path | None = None
    progress: bool = True
    config: JitConfig = field(default_factory=JitConfig)
    on_callback: Callable[[Any], None] | None = None
    """Called with the ``JitProcess`` before the scan (e.g. to attach a live view)."""
    on_run_engine: Callable[[Any], None] | None = None
    """Called with the ``RunEngine`` before the scan (e.g. to pause it from another thread)."""


INTERRUPTED_REASON = "interrupted by the user (Ctrl-C or SIGTERM)"
"""``reason`` in the stop document of a raw run stopped by Ctrl-C."""


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the demo scan; return the summary (also written to ``options.summary``).

    Raises
    ------
    KeyboardInterrupt
        Ctrl-C during the scan, once the run is aborted and the callback and the
        catalog are closed (see the module docstring).
    """
    from bluesky import RunEngine
    from bluesky.utils import RunEngineInterrupted
    from tqdm import tqdm

    from simulated_devices import hw

    from .. import catalog as cat
    from ..worker_process import JitProcess, tiled_writer

    phantom, source, plan_of, total = _scene(options)  # a bad recording fails here, first
    data_dir = Path(options.data_dir).resolve()
    raw_dir = data_dir / "raw"
    derived_dir = data_dir / "derived"
    local = None
    jit = None
    writers: list[Any] = []  # closed last: written out before the server stops
    if options.catalog_uri is None:
        local = cat.LocalCatalog(
            data_dir / "catalog", readable_storage=[data_dir], api_key=options.api_key
        )
        client = local.client()
        where = f"embedded Tiled catalog {local.uri} (data in {data_dir})"
    else:
        client = cat.connect(options.catalog_uri, api_key=options.api_key)
        where = f"Tiled catalog {options.catalog_uri}"
    try:
        raw_runs = cat.runs_container(client, "raw")
        derived_runs = cat.runs_container(client, "derived")
        spool = data_dir / "spool"
        writers.append(tiled_writer(derived_runs, spool_dir=spool / "derived"))
        writers.append(tiled_writer(raw_runs, spool_dir=spool / "raw", process=True))
        # The work runs in a child process: the scan keeps its pace (README, "Never slow").
        jit = JitProcess(config=options.config, emit=writers[0], directory=derived_dir)
        if options.on_callback is not None:
            options.on_callback(jit)
        # Ctrl-C handling needs the main thread; with a live view the scan runs in another.
        in_main = threading.current_thread() is threading.main_thread()
        RE = RunEngine({}) if in_main else RunEngine({}, context_managers=[])
        if options.on_run_engine is not None:
            options.on_run_engine(RE)
        RE.subscribe(writers[1])
        RE.subscribe(jit)
        beamline = hw(
            raw_dir,
            source=source,
            frame_rate=options.frame_rate,
            paced=options.paced,
            seed=options.seed,
        )
        plan = plan_of(beamline)
        bar = tqdm(total=total, unit="proj", desc="scan", disable=not options.progress)
        progress = _Progress(bar, jit)  # counts on the RunEngine's thread, draws on its own
        token = RE.subscribe(progress.count)
        t0 = time.monotonic()
        abort_reason: list[str] = []  # filled in on Ctrl-C, for the stop document
        try:
            (raw_uid,) = RE(with_abort_reason(checkpoint_each_frame(plan), abort_reason))
        except RunEngineInterrupted:  # paused by Ctrl-C: end the run, then stop
            progress.close()
            logger.warning("Scan paused by Ctrl-C; aborting the run")
            abort_reason.append(INTERRUPTED_REASON)
            # Not paused when bluesky aborted by itself (a pause it could not take).
            with _abort_without_traceback():
                uids = () if RE.state.is_idle else RE.abort(reason=INTERRUPTED_REASON)
            jit.close(timeout=10)
            raise KeyboardInterrupt(
                f"scan interrupted; run {', '.join(uids) or '(none)'} aborted"
            ) from None
        scan_s = time.monotonic() - t0
        RE.unsubscribe(token)
        if not jit.flush(timeout=600):
            logger.warning("The worker had not finished after 600 s")
        jit.close()
        progress.close()  # after close: the final counts are the summary's
        if not writers[1].flush(timeout=120):
            logger.warning("The raw run is not all in the catalog after 120 s (it is spooled)")
        run = next(s for s in jit.summaries if s.raw_uid == raw_uid)
        result, truth = _evaluate(run, phantom, options, scan_s)
        # every frame the detector took (darks, flats, projections) over the scan's time
        result["frames"] = progress.events
        result["achieved_frame_rate"] = progress.events / scan_s if scan_s > 0 else 0.0
        result["catalog"] = where
        result["catalog_uri"] = local.uri if local else options.catalog_uri
        result["data_dir"] = str(data_dir)
        derived = cat.derived_runs_for(derived_runs, raw_uid)
        result["derived_in_catalog"] = len(derived) == 1
        result["catalog_writes"] = {
            "raw": writers[1].stats.to_dict(),
            "derived": writers[0].stats.to_dict(),
        }
        if options.figures is not None:
            result["figures"] = _figures(run, truth, result, Path(options.figures))
        if options.summary is not None:
            Path(options.summary).parent.mkdir(parents=True, exist_ok=True)
            Path(options.summary).write_text(json.dumps(result, indent=2, default=_jsonable))
        return result
    finally:
        if jit is not None:
            jit.close(timeout=10)  # no-op once closed; stops the worker on any error
        for writer in writers:
            writer.close(timeout=10)  # what is not written by then stays in the spool
        if local is not None:
            local.close()
        if phantom is None:
            source.recording.close()


def _scene(options: DemoOptions) -> tuple[Any, Any, Callable[[Any], Any], int]:
    """The phantom (None for a recording), the frame source, the plan for a beamline and
    its number of projections."""
    from simulated_devices.phantoms import BubbleColumn
    from simulated_devices.plans import recorded_scan, tomo_continuous
    from simulated_devices.recordings import DXchangeRecording
    from simulated_devices.sources import PhantomSource, RecordingSource

    if options.recording is not None:
        recording = DXchangeRecording.open(options.recording, lazy=True)
        source = RecordingSource(recording, center_of_rotation=options.center_of_rotation)
        return None, source, lambda b: recorded_scan(*b.plan_devices), int(recording.data.shape[0])
    phantom = BubbleColumn(detector_shape=(options.rows, options.size), seed=options.seed)
    source = PhantomSource(phantom, photons=options.photons)

    def plan(b: Any) -> Any:
        return tomo_continuous(
            *b.plan_devices,
            num_angles=options.num_angles,
            rotations=options.rotations,
            sample="bubble column (simulated)",
        )

    return phantom, source, plan, options.num_angles * options.rotations


class _Progress:
    """The demo's progress bar, kept off the RunEngine's thread.

    ``count`` (subscribed to the RunEngine) only adds one per projection; a
    thread of its own redraws the bar five times a second with the slices and
    training steps of the run in progress.
    """

    def __init__(self, bar: Any, jit: Any) -> None:
        self.bar = bar
        self.jit = jit
        self.frames = 0
        self.events = 0
        self._primary: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw, name="bluesky-jit-progress", daemon=True)
        self._thread.start()

    def count(self, name: str, doc: dict) -> None:
        """Subscribe to the RunEngine: counts events, and those of the ``primary`` stream."""
        if name == "event":
            self.events += 1
            if doc["descriptor"] in self._primary:
                self.frames += 1
        elif name == "descriptor" and doc.get("name") == "primary":
            self._primary.add(doc["uid"])

    def _draw(self) -> None:
        while not self._stop.wait(0.2):
            self._update()

    def _update(self) -> None:
        running = self.jit.progress()
        summary = running[-1] if running else (self.jit.summaries or [None])[-1]
        if summary is not None:
            self.bar.set_postfix(
                slices=summary.slices, train_steps=summary.train_steps, refresh=False
            )
        self.bar.update(min(self.frames, self.bar.total) - self.bar.n)

    def close(self) -> None:
        """Draw the final counts once and close the bar."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(1.0)
        self._update()
        self.bar.close()


@contextlib.contextmanager
def _abort_without_traceback() -> Iterator[None]:
    """Log bluesky's "Run aborted" as one line: the traceback of an asked-for abort says nothing."""

    def strip(record: logging.LogRecord) -> bool:
        if record.exc_info and type(record.exc_info[1]).__name__ == "RequestAbort":
            record.exc_info = None
        return True

    bluesky_logger = logging.getLogger("bluesky")
    bluesky_logger.addFilter(strip)
    try:
        yield
    finally:
        bluesky_logger.removeFilter(strip)


def checkpoint_each_frame(plan: Any) -> Any:
    """``plan`` with a checkpoint before every ``trigger``.

    The RunEngine's first Ctrl-C asks for a pause at the next checkpoint, and
    a plan without any (such as ``tomo_continuous``) would never pause: with
    one before each frame, one Ctrl-C pauses within a frame. None is put
    inside an event bundle (``create`` .. ``save``), where bluesky forbids them.
    """
    from bluesky.preprocessors import plan_mutator
    from bluesky.utils import Msg

    bundling = False

    def insert(msg: Any) -> tuple[Any, None]:
        nonlocal bundling
        if msg.command == "create":
            bundling = True
        elif msg.command in ("save", "drop"):
            bundling = False
        if msg.command != "trigger" or bundling:
            return None, None

        def head() -> Any:
            yield Msg("checkpoint")
            return (yield msg)

        return head(), None

    return plan_mutator(plan, insert)


def with_abort_reason(plan: Any, reason: list[str]) -> Any:
    """``plan`` whose aborted run's stop document gets ``reason[0]`` when it has none.

    ``RunEngine.abort(reason)`` does not reach the stop document of a plan that
    closes its run itself (``run_wrapper`` closes it with the reason of the
    exception thrown in, empty for an abort); the caller fills ``reason``
    before aborting.
    """
    from bluesky.preprocessors import msg_mutator

    def fill(msg: Any) -> Any:
        kwargs = msg.kwargs
        if (
            reason
            and msg.command == "close_run"
            and kwargs.get("exit_status") == "abort"
            and not kwargs.get("reason")
        ):
            return msg._replace(kwargs={**kwargs, "reason": reason[0]})
        return msg

    return msg_mutator(plan, fill)


def _evaluate(run, phantom, options: DemoOptions, scan_s: float) -> tuple[dict[str, Any], Any]:
    from ..evaluation import disc_mask, psnr

    scene = ("size", "rows", "num_angles", "rotations", "photons", "frame_rate", "paced", "seed")
    result: dict[str, Any] = {
        **run.to_dict(),
        "scan_seconds": scan_s,
        "settings": {
            **{name: getattr(options, name) for name in scene},
            "recording": None if options.recording is None else str(options.recording),
            "config": options.config.to_dict(),
        },
        "machine": machine_description(),
        "psnr_fbp": math.nan,
        "psnr_denoised": math.nan,
    }
    truth = None
    if phantom is not None and run.last_slice is not None and run.last_indices is not None:
        times = np.asarray(run.last_indices) / options.frame_rate
        row = options.config.reconstruction.slice_row
        row = run.geometry.rows // 2 if row is None else row
        truth = phantom.truth_window(float(times[0]), float(times[-1]), row)
        mask = disc_mask(truth.shape[0], 0.85)
        result["psnr_fbp"] = psnr(run.last_slice, truth, mask)
        if run.last_denoised is not None:
            result["psnr_denoised"] = psnr(run.last_denoised, truth, mask)
        if run.last_uncertainty is not None:  # and how well it says where the errors are
            sigma, error = run.last_uncertainty[mask], np.abs(run.last_denoised - truth)[mask]
            result["mean_uncertainty"] = float(sigma.mean())
            result["within_2_sigma"] = float(np.mean(error <= 2 * sigma))
    return result, truth


def _figures(run, truth, result: dict[str, Any], directory: Path) -> list[str]:
    from .figures import save_learning_curve, save_slices

    paths = []
    if run.last_slice is not None:
        error = None if run.last_denoised is None else np.abs(run.last_denoised - truth)
        maps = ("uncertainty (sigma)", "|denoised - truth|")
        images = {
            _titled("FBP", result["psnr_fbp"]): run.last_slice,
            _titled("denoised", result["psnr_denoised"]): run.last_denoised,
            maps[0]: run.last_uncertainty,
            maps[1]: error if run.last_uncertainty is not None else None,
            "truth": truth,
        }
        paths.append(save_slices(directory / "slices.png", images, title="last slice", maps=maps))
    if run.metrics:
        paths.append(save_learning_curve(directory / "learning_curve.png", run.metrics))
    return [str(p) for p in paths]


def _titled(name: str, psnr: float) -> str:
    return f"{name} ({psnr:.1f} dB)" if math.isfinite(psnr) else name


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


def _psnr_line(result: dict[str, Any]) -> str:
    """PSNR of the last FBP and denoised slices, or why there is none (never ``nan dB``)."""
    fbp, denoised = result["psnr_fbp"], result["psnr_denoised"]
    if result["settings"].get("recording"):
        return "not measured: a recording has no ground truth"
    if not math.isfinite(fbp):
        return f"not measured: {why_not_denoised(result)}"
    line = f"FBP {fbp:.2f} dB, "
    if math.isfinite(denoised):
        line += f"denoised {denoised:.2f} dB"
    else:
        line += f"nothing was denoised: {why_not_denoised(result)}"
    return line + " (against the phantom's ground truth)"


def why_not_denoised(result: dict[str, Any]) -> str:
    """Why a demo run has no denoised slice, from its summary dict."""
    settings = result["settings"]["config"]
    if not result["slices"]:
        because = f": {result['reason']}" if result.get("reason") else ""
        return (
            f"no slice was reconstructed{because} (a slice needs a full rotation of "
            f"projections; {result['projections']} were ingested)"
        )
    if not settings["runtime"]["train"] and settings["training"]["warm_start"] is None:
        return "training is off (train = false) and there is no warm_start network"
    if not result["train_steps"]:
        return (
            "the network never trained: too few training pairs before the scan ended "
            "(scan longer, --rotations, or lower batch_size)"
        )
    alpha = result["final_alpha"]
    rated = f"alpha {alpha:.3f}" if math.isfinite(alpha) else "alpha was never measured"
    return (
        f"after {result['train_steps']} training steps the network did not yet beat the plain "
        f"reconstruction on hold-out pairs ({rated}; denoising starts below 1): "
        "scan longer (--rotations) or train faster (--device cuda)"
    )


def format_summary(result: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of the demo."""
    settings = result["settings"]
    asked = f" of {settings['frame_rate']:g} asked" if settings["paced"] else " (unpaced)"
    lines = [
        f"raw run       {result['raw_uid']}",
        f"derived run   {result['derived_uid']}  ({result['exit_status']}"
        + (f": {result['reason']}" if result["reason"] else "")
        + ")",
        f"catalog       {result['catalog']}",
        f"scan          {result['frames']} frames in {result['scan_seconds']:.1f} s: "
        f"{result['achieved_frame_rate']:.1f} frames/s{asked}",
        f"projections   {result['projections']} ingested, {result['projections_per_s']:.1f}/s",
        f"slices        {result['slices']} reconstructed, {result['denoised']} denoised",
        f"training      {result['train_steps']} steps, {result['train_steps_per_s']:.1f} steps/s",
        "alpha         "
        + (
            f"{result['final_alpha']:.3f} (1 = no denoising, ~0.5 = ideal)"
            if math.isfinite(result["final_alpha"])
            else "not measured (no hold-out pairs were rated)"
        ),
        "PSNR          " + _psnr_line(result),
    ]
    if "within_2_sigma" in result:
        lines.append(
            f"uncertainty   mean sigma {result['mean_uncertainty']:.2g} 1/mm; "
            f"{result['within_2_sigma']:.0%} of the pixels within 2 sigma of the truth"
        )
    writes = result.get("catalog_writes")
    if writes:
        raw, derived = writes["raw"], writes["derived"]
        back = raw["written_back"] + derived["written_back"]
        total_raw, total_derived = (w["written"] + w["written_back"] for w in (raw, derived))
        line = f"written       {total_raw} raw + {total_derived} derived documents"
        if back:
            line += f" ({back} spooled during an outage and written back)"
        pending = raw["runs_pending"] + derived["runs_pending"]
        if pending or raw["lost"] or derived["lost"]:
            line += f"; {pending} run(s) still in the spool, {raw['lost'] + derived['lost']} lost"
        lines.append(line)
    for path in result.get("figures", []):
        lines.append(f"figure        {path}")
    return "\n".join(lines)
