"""One run's pipeline: arrays in, derived run out.

A :class:`RunPipeline` is what a :class:`~bluesky_jit.callbacks.JitCallback`
builds for each tomography run (the ingest feeds it frames): streaming
reconstruction, Noise2Inverse pairs, the trainer (its own thread), inference
with the newest weights, and the derived run. It runs on the callback's
worker thread; :class:`RunSummary` is what it reports.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import JitConfig
from .errors import BlueskyJitError, ConfigError, GeometryError
from .geometry import ScanGeometry, Slice
from .memory import MemoryPlan, binned, cropped

logger = logging.getLogger(__name__)

_KEEP = object()
VERTICAL_STREAMS = ("reconstruction_xz", "reconstruction_yz")
_ACROSS = {1: 1, 2: 0}
"""Vertical slice (1: xz, 2: yz) -> the coordinate (y, x) that says where it lies."""


@dataclass
class RunSummary:
    """What one run produced; handed to ``on_run_finished`` and kept on the callback."""

    raw_uid: str
    derived_uid: str | None = None
    exit_status: str = "success"
    reason: str = ""
    projections: int = 0
    projections_per_s: float = 0.0
    slices: int = 0
    denoised: int = 0
    train_steps: int = 0
    train_steps_per_s: float = 0.0
    final_alpha: float = math.nan
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    geometry: ScanGeometry | None = None
    last_indices: np.ndarray | None = None
    last_denoised_indices: np.ndarray | None = None
    images: dict[str, np.ndarray] = field(default_factory=dict)
    """The newest image of each image stream of the derived run, by stream name."""
    positions: dict[str, float] = field(default_factory=dict)
    """Where those images lie: the axial slice's detector row (``reconstruction``),
    y (``reconstruction_xz``) and x (``reconstruction_yz``) in mm."""
    derived_path: str | None = None
    budget: dict[str, Any] | None = None
    """The CPU budget used (:meth:`bluesky_jit.budget.CpuBudget.to_dict`, with the
    backlog thresholds)."""
    duplicates: int = 0
    """Documents that came a second time (same uid) and were ignored."""
    train_paused_s: float = 0.0
    """Seconds the trainer paused because frames waited for the worker."""
    refreshes_skipped: int = 0
    """Due slice refreshes skipped because frames waited for the worker."""

    @property
    def last_slice(self) -> np.ndarray | None:
        """The newest axial reconstruction (``images["reconstruction"]``)."""
        return self.images.get("reconstruction")

    @property
    def last_denoised(self) -> np.ndarray | None:
        """The newest denoised slice (``images["denoised"]``)."""
        return self.images.get("denoised")

    @property
    def last_uncertainty(self) -> np.ndarray | None:
        """Standard deviation of :attr:`last_denoised` per pixel (``images["uncertainty"]``)."""
        return self.images.get("uncertainty")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able numbers (arrays and geometry left out)."""
        keys = (
            "raw_uid derived_uid exit_status reason projections projections_per_s slices "
            "denoised train_steps train_steps_per_s final_alpha elapsed_s problems derived_path "
            "budget train_paused_s refreshes_skipped duplicates"
        ).split()
        return {k: getattr(self, k) for k in keys}


class RunPipeline:
    """Arrays in, derived run out: one run's stages (a :class:`~bluesky_jit.ingest.FrameSink`).

    Runs on the callback's worker thread; the trainer runs in its own thread.

    CPU: the threads of each stage come from one
    :class:`~bluesky_jit.budget.CpuBudget` (:attr:`budget`). When the scan
    outruns the worker, training yields first: while more than
    ``pause_training_above`` frames wait (``backlog()``), the trainer
    pauses, and resumes once half of them are left. If more than
    ``skip_refreshes_above`` still wait at a due refresh, that refresh is
    skipped (the next one shows the newer window), but never so that a
    rotation passes without a refresh, and the last projections are always
    reconstructed at the stop. Frames are never dropped for this. The time
    paused and the refreshes skipped are in the summary and in every metric row.

    Parameters
    ----------
    config : JitConfig
    emit : callable or None
        Receives the derived run's documents.
    directory : path
        Where the derived run's HDF5 file goes.
    dropped : callable
        Returns (and forgets) the frame documents dropped for this run.
    duplicates : callable
        Returns (and forgets) the documents of this run that came twice (ignored).
    quality : bluesky_jit.steering.QualitySignals, optional
    backlog : callable
        Frames waiting for the worker; cheap, called once per projection.
    arrivals : collections.deque of float, optional
        Arrival times of frame documents on the RunEngine's thread, for the
        :class:`~bluesky_jit.budget.PaceGuard` (``config.pace_guard``).
    beside_scan : bool
        A scan runs in this process (a RunEngine): training and refreshes
        yield to it. False for replays and listeners (no pauses, no skipped
        refreshes, no pace guard).
    cores : int, optional
        Cores for the budget; by default those of the process's CPU affinity.
    """

    def __init__(
        self,
        *,
        config: JitConfig,
        emit: Callable[[str, dict], None] | None,
        directory: Path,
        dropped: Callable[[], int] = lambda: 0,
        duplicates: Callable[[], int] = lambda: 0,
        quality: Any = None,
        backlog: Callable[[], int] = lambda: 0,
        arrivals: Any = None,
        beside_scan: bool = True,
        cores: int | None = None,
    ) -> None:
        from .budget import CpuBudget

        self.config = config
        self.budget = CpuBudget.decide(config, cores=cores)
        self.backlog = backlog
        run = config.runtime
        self._pause_above = run.pause_training_above or config.reconstruction.refresh_every
        self._skip_above: int | None = run.skip_refreshes_above  # None: a rotation (_build)
        self._yielding = False
        self._last_slices: Any = None
        self.arrivals = arrivals if beside_scan else None
        self.beside_scan = beside_scan
        self._guard: Any = None
        self._targets: Any = None  # supervised: the thread that makes pairs (SIRT) until
        self._making: Any = None  # the run ends, and its pairs in the making
        self._holds: set[str] = set()
        self._holds_lock = threading.Lock()
        self.quality = quality
        self.emit = emit
        self.directory = Path(directory)
        self.dropped = dropped
        self.duplicates = duplicates
        self.rng = np.random.default_rng(run.seed)
        self.derived = None
        self.recon = None
        self.vertical = None
        """The reconstructor of binned frames for the vertical slices (memory budget), or None."""
        self.plan: MemoryPlan | None = None
        self.pairs = None
        self.trainer = None
        self.denoiser = None
        self.summary: RunSummary | None = None
        self._t0 = time.monotonic()
        self._first_projection: float | None = None
        self._unrefreshed = 0
        self._moves: dict = {}
        self._moves_lock = threading.Lock()
        self._summary_lock = threading.Lock()
        """Held while the worker changes fields of :attr:`summary` that go together."""

    # -- FrameSink -------------------------------------------------------------------
    def begin(self, start: Mapping[str, Any], geometry: ScanGeometry | None) -> None:
        self.summary = RunSummary(
            raw_uid=start["uid"], geometry=geometry, budget=self._budget_record(geometry)
        )
        tomo = start.get("tomo")
        if isinstance(tomo, Mapping) and tomo.get("role") == "dark_flat":
            return  # a calibration run: its fields are kept by the ingest, nothing to derive
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # the derived run still starts, and its stop says why
            self.problem(
                ConfigError(
                    f"Cannot create the derived runs' directory {self.directory}: "
                    f"{error.strerror or error}. Pass a writable directory= (--data-dir)."
                )
            )
            geometry = None
        if geometry is not None and self.supervised and geometry.beam != "parallel":
            self.problem(  # before anything is allocated: the stop says what to change
                ConfigError(
                    f'target="supervised" computes its SIRT target for parallel beam; this '
                    f'scan is {geometry.beam} beam. Use target="noise2inverse" for it.'
                )
            )
            geometry = None
        if geometry is not None:
            try:
                self.plan = self._plan_memory(geometry)
                if self.plan.reduced:
                    logger.warning("bluesky_jit run %s: %s", start["uid"], self.plan.reduced)
            except ConfigError as error:  # nothing allocated: the stop says what to change
                self.problem(error)
                geometry = None
        if self.emit is not None:
            from .emit import DerivedRun

            n, extra = 1, {}
            if geometry is not None:
                from .geometry import default_slices

                rc = self.config.reconstruction
                axial, _, _ = default_slices(
                    geometry,
                    slice_row=rc.slice_row,
                    slice_size=rc.slice_size,
                    slice_center=rc.slice_center,
                )
                n = axial.shape[0]
                vertical = self._vertical_geometry(geometry)
                if vertical is not None:
                    binning = max(self.plan.binning, 1)
                    _, xz, yz = default_slices(
                        vertical, **self._binned_slices(self._row(geometry), binning)
                    )
                    extra = {VERTICAL_STREAMS[0]: xz.shape, VERTICAL_STREAMS[1]: yz.shape}
            self.derived = DerivedRun(
                raw_start=start,
                emit=self.emit,
                directory=self.directory,
                image_shape=(n, n),
                metadata=self._metadata(geometry),
                extra_images=extra,
                copy_keys=self.config.runtime.copy_keys,
            )
            self.derived.start()
            self.summary.derived_uid = self.derived.uid
            self.summary.derived_path = str(self.derived.path)
        if geometry is None:
            return
        self._build(geometry)

    def _build(self, geometry: ScanGeometry) -> None:
        """The stages, each from its section of the settings (same names) and what the run knows."""
        from .inference import Denoiser
        from .models import build_model
        from .pairs import PairMaker
        from .reconstruction.streaming import StreamingReconstructor

        cfg, device, plan = self.config, self.config.runtime.device, self.plan
        settings = cfg.reconstruction.model_dump()
        if plan.rows is not None:  # the rows of the axial slice alone (the memory budget)
            settings["slice_row"] = self._row(geometry) - plan.rows[0]
            settings["vertical_slices"] = False
            geometry = cropped(geometry, plan.rows)
            vertical = self._vertical_geometry(None)
            if vertical is not None:  # through the axial slice's centre, in binned pixels
                binned_slices = self._binned_slices(self._row(self.summary.geometry), plan.binning)
                self.vertical = StreamingReconstructor(
                    vertical,
                    **{**settings, **binned_slices, "vertical_slices": True},
                    device=device,
                    capacity=vertical.num_angles + cfg.reconstruction.refresh_every,
                    threads=self.budget.recon_threads_arg,
                )
        self.recon = StreamingReconstructor(
            geometry,
            **settings,
            device=device,
            capacity=self._capacity(geometry),
            threads=self.budget.recon_threads_arg,
        )
        window = geometry.num_angles
        if getattr(self.recon.backend, "name", None) == "numba":
            self.budget.apply_worker()  # numba's thread count is per thread: this worker's
        if self._skip_above is None:
            self._skip_above = window
        logger.info("bluesky_jit CPU budget: %s", "; ".join(self.budget.reasons))
        self.pairs = PairMaker.from_reconstructor(
            self.recon, **cfg.pairs.model_dump(), frames=cfg.frames, rng=self.rng
        )
        self.trainer = self._make_trainer()
        if self.supervised:
            self._targets = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="bluesky-jit-target"
            )
        self.denoiser = Denoiser(
            build_model(cfg.training.model, cfg.training.model_config),
            source=self.trainer,
            **cfg.inference.model_dump(),
            device=device,
            num_threads=self.budget.infer_threads,
        )

    @property
    def supervised(self) -> bool:
        """Whether the network learns the SIRT target (``pairs.target="supervised"``)."""
        return self.config.pairs.target == "supervised"

    def _capacity(self, geometry: ScanGeometry) -> int:
        """Filtered projections kept: two rotations, more for T stacks (they look back)."""
        cfg, window = self.config, geometry.num_angles
        frame_step = cfg.pairs.frame_step or max(1, window // 2)
        reach = (cfg.frames - 1) * frame_step if cfg.pairs.stack == "t" else 0
        return max(2 * window, window + reach + cfg.reconstruction.refresh_every)

    def _row(self, geometry: ScanGeometry) -> int:
        row = self.config.reconstruction.slice_row
        return geometry.rows // 2 if row is None else row

    def _plan_memory(self, geometry: ScanGeometry) -> Any:
        """What the run keeps within the memory budget (:func:`~.memory.plan_memory`)."""
        from .memory import budget_bytes, plan_memory

        cfg = self.config
        stack = cfg.frames // 2 + 1 if cfg.pairs.stack == "z" else 0
        return plan_memory(
            geometry,
            capacity=self._capacity(geometry),
            extra=cfg.reconstruction.refresh_every,
            row=self._row(geometry),
            reach=cfg.pairs.neighbourhood_rows + stack,
            vertical=cfg.reconstruction.vertical_slices,
            budget=budget_bytes(cfg.runtime.memory_budget_gb),
        )

    def _binned_slices(self, row: int, binning: int) -> dict[str, Any]:
        """The slice settings in the pixels of frames binned ``binning`` x ``binning``."""
        rc = self.config.reconstruction
        rows = self.summary.geometry.rows // binning
        return {
            "slice_row": min(row // binning, rows - 1),
            "slice_size": None if rc.slice_size is None else max(2, rc.slice_size // binning),
            "slice_center": tuple(c / binning for c in rc.slice_center),
        }

    def _vertical_geometry(self, geometry: ScanGeometry | None) -> ScanGeometry | None:
        """The geometry the vertical slices come from; None without vertical slices."""
        plan = self.plan
        geometry = geometry if geometry is not None else self.summary.geometry
        if not self.config.reconstruction.vertical_slices or plan.binning == 0:
            return None
        return geometry if plan.binning == 1 else binned(geometry, plan.binning)

    def _make_trainer(self) -> Any:
        """The trainer of the training settings, in a thread or (``trainer_process``) a process.

        Either follows :class:`~bluesky_jit.training.OnlineTrainer`.
        """
        from .process_trainer import ProcessTrainer
        from .training import make_trainer

        cfg, run = self.config, self.config.runtime
        settings = cfg.training.model_dump()
        if settings["checkpoint_dir"] is not None:
            settings["checkpoint_dir"] = Path(settings["checkpoint_dir"]) / self.summary.raw_uid
        settings |= {
            "seed": run.seed,
            "num_threads": self.budget.train_threads,
            "nice": self.budget.train_nice if self.beside_scan else None,
            "cores": self.budget.train_cores if self.beside_scan else None,
        }
        if run.trainer_process:
            return ProcessTrainer(**settings, interop_threads=self.budget.interop_threads)
        return make_trainer(**settings, device=run.device)

    def _metadata(self, geometry: ScanGeometry | None) -> dict[str, Any]:
        cfg, t, device = self.config, self.config.training, self.config.runtime.device
        from .models import resolve_config
        from .training import resolve_precision

        return {
            "config": cfg.to_dict(),
            "geometry": geometry.to_dict() if geometry is not None else None,
            "model": {"name": t.model, "config": resolve_config(t.model, t.model_config)},
            "backend": {"reconstruction": cfg.reconstruction.backend, "device": device},
            "buffer_capacity": t.buffer_capacity,
            "noise2inverse": None
            if self.supervised
            else {
                "splits": cfg.pairs.splits,
                "strategy": cfg.pairs.n2i_strategy,
                "stack": cfg.pairs.stack,
                "frames": cfg.frames,
            },
            "target": {
                "kind": cfg.pairs.target,
                "windows": cfg.pairs.target_windows if self.supervised else None,
                "iterations": cfg.pairs.target_iterations if self.supervised else None,
            },
            "precision": {
                "train": resolve_precision(t.train_precision, device),
                "inference": resolve_precision(cfg.inference.infer_precision, device),
            },
            "budget": self._budget_record(geometry),
            "memory": self.plan.to_dict() if self.plan is not None else None,
        }

    def _budget_record(self, geometry: ScanGeometry | None) -> dict[str, Any]:
        """The CPU budget and the backlog thresholds, for the start document and the summary."""
        skip = self._skip_above
        if skip is None and geometry is not None:
            skip = geometry.num_angles
        return {
            **self.budget.to_dict(),
            "pause_training_above": self._pause_above,
            "skip_refreshes_above": skip,
        }

    def calibration(self, darks: np.ndarray, flats: np.ndarray) -> None:
        if self.recon is None:
            return
        plan = self.plan
        plan.check(darks, "Dark fields")
        plan.check(flats, "Flat fields")
        self.recon.set_flatfield(plan.crop(darks), plan.crop(flats))
        if self.vertical is not None:
            self.vertical.set_flatfield(plan.bin(darks), plan.bin(flats))

    def projection(self, frame: np.ndarray, *, angle_deg: float, index: int) -> None:
        if self.recon is None:
            return
        if self._first_projection is None:
            self._first_projection = time.monotonic()
        plan = self.plan
        plan.check(frame, "A frame")
        due = self.recon.add_frame(plan.crop(frame), angle_deg=angle_deg, index=index)
        if self.vertical is not None:
            self.vertical.add_frame(plan.bin(frame), angle_deg=angle_deg, index=index)
        self.summary.projections += 1
        self._unrefreshed += 1
        waiting = self._watch_backlog()
        if due:
            # skip only if the next chance still keeps a refresh in every rotation
            keeps_pace = self._unrefreshed + self.recon.refresh_every <= self.recon.window
            if waiting > self._skip_above and keeps_pace:
                self.summary.refreshes_skipped += 1
            else:
                self.refresh()

    def _watch_backlog(self) -> int:
        """Pause the trainer while too many frames wait; resume once half of them are left.

        Only ``beside_scan``: a replay or a listener has no scan to yield to,
        and its backlog is by design.
        """
        if not self.beside_scan:
            return 0
        waiting = int(self.backlog())
        if not self._yielding and waiting > self._pause_above:
            self._hold("backlog", True)
            self._yielding = True
        elif self._yielding and waiting <= self._pause_above // 2:
            self._hold("backlog", False)
            self._yielding = False
        return waiting

    def _hold(self, reason: str, on: bool) -> None:
        """Pause the trainer while any reason holds it ("backlog", "pace"); any thread."""
        pause = getattr(self.trainer, "pause", None)
        if pause is None:
            return
        with self._holds_lock:
            (self._holds.add if on else self._holds.discard)(reason)
            (pause.set if self._holds else pause.clear)()

    def _stop_yielding(self) -> None:
        if self._guard is not None:
            self._guard.stop()
        self._hold("backlog", False)
        self._yielding = False

    def snapshot(self) -> RunSummary | None:
        """A copy of :attr:`summary` that the worker does not change: safe from any thread."""
        with self._summary_lock:
            summary = self.summary
            if summary is None:
                return None
            copy = dataclasses.replace(
                summary,
                metrics=list(summary.metrics),
                problems=list(summary.problems),
                images=dict(summary.images),
                positions=dict(summary.positions),
            )
        if self.trainer is not None:
            copy.train_steps = self.trainer.steps
        return copy

    def problem(self, error: Exception) -> None:
        if self.summary is not None:
            self.summary.problems.append(str(error))

    def end(self, stop: Mapping[str, Any]) -> None:
        """The raw run stopped: last refresh, last metrics, then the derived stop document.

        The stop document is written whatever fails before it (as bluesky's
        ``run_wrapper`` does): ``fail`` with the reason.
        """
        summary = self.summary
        if summary is None:
            return
        try:
            self._stop_yielding()
            self._stop_making_pairs()
            if self.recon is not None and self.recon.ready and self._unrefreshed:
                self.refresh()  # the last slice shows the last projections, however far behind
            elif self.recon is not None and not summary.slices and len(self.recon.buffer):
                self._refresh_short()
        except Exception as error:  # noqa: BLE001 - recorded in the stop document below
            logger.exception("bluesky_jit: the last refresh of run %s failed", summary.raw_uid)
            self.problem(_in_context("the last refresh at the stop", error))
        try:
            if self.trainer is not None:
                self.trainer.stop()
                if self.trainer.error is not None:
                    self.problem(self.trainer.error)
                rated = self.trainer.steps or self.config.training.online_strategy == "frozen"
                if self.recon is not None and self.recon.ready and rated:
                    self._emit_metrics(final=True)
                    if not self.summary.denoised and self._last_slices is not None:
                        # a short run (or one whose training yielded to the scan): the network
                        # learnt enough only by the end, so its last slice is denoised now
                        if self.pairs.ready and self._network_useful():
                            self._denoise(self._last_slices)
        except Exception as error:  # noqa: BLE001
            logger.exception("bluesky_jit: the last metrics of run %s failed", summary.raw_uid)
            self.problem(_in_context("the last metrics at the stop", error))
        finally:
            self._finish(stop)

    # -- the work ---------------------------------------------------------------------
    def refresh(self) -> None:
        """Reconstruct the slice, feed the trainer, denoise, and publish."""
        run, recon, trainer, pairs = self.config.runtime, self.recon, self.trainer, self.pairs
        self._apply_moves()
        slices = self._last_slices = recon.reconstruct()
        self._unrefreshed = 0
        if run.train and pairs.ready and self.supervised:
            self._make_pairs_beside()
        elif run.train and pairs.ready:  # T stacks wait for their earlier windows
            self._feed_trainer()
        if run.train and not trainer.running and len(trainer.buffer) >= trainer.batch_size:
            trainer.start()
            if run.pace_guard and self.arrivals is not None and self._guard is None:
                from .budget import PaceGuard

                self._guard = PaceGuard(self.arrivals, lambda on: self._hold("pace", on))
                self._guard.start()
        first, last = int(slices.indices[0]), int(slices.indices[-1])
        common = {"projection_index": last, "first_projection_index": first}
        row = slices.row + (self.plan.rows[0] if self.plan.rows else 0)  # on the detector
        with self._summary_lock:
            self.summary.slices += 1
            self.summary.last_indices = slices.indices
            self.summary.images["reconstruction"] = slices.full
            self.summary.positions["reconstruction"] = row
        if self.derived is not None:
            self.derived.add_reconstruction(
                slices.full, num_projections=len(slices.indices), slice_row=row, **common
            )
        vertical = self.vertical if self.vertical is not None else recon
        if vertical.vertical_slices:
            for index, name in enumerate(VERTICAL_STREAMS, start=1):
                plane = vertical.slices[index]
                image = vertical.reconstruct_slice(plane).full
                with self._summary_lock:
                    self.summary.images[name] = image
                    self.summary.positions[name] = plane.center[_ACROSS[index]]
                if self.derived is not None:
                    self.derived.add_image(name, image, **common)
        self._emit_metrics()
        if pairs.ready and self._network_useful():
            self._denoise(slices)

    def _feed_trainer(self) -> None:
        pairs, trainer = self.pairs, self.trainer
        trainer.buffer.push(*pairs.pairs(pairs.pairs_per_refresh))
        trainer.add_holdout(*pairs.pairs(pairs.holdout_per_refresh))

    def _make_pairs_beside(self) -> None:
        """Supervised pairs (their SIRT takes seconds) on a thread of their own, one batch
        at a time, so the worker keeps up with the scan; a refresh while one is in the
        making makes none."""
        if (self._making is not None and not self._making.done()) or self._targets is None:
            return  # still busy, or the run ends
        self._check_made()
        self._making = self._targets.submit(self._feed_trainer)

    def _stop_making_pairs(self) -> None:
        """Wait for the pairs in the making; make no more (the run ends)."""
        if self._targets is not None:
            self._targets.shutdown(wait=True)
            self._check_made()
        self._targets = None

    def _check_made(self) -> None:
        if self._making is not None and self._making.exception() is not None:
            self.problem(_in_context("the supervised target", self._making.exception()))
        self._making = None

    def _refresh_short(self) -> None:
        """At the stop, less than a rotation arrived (a frame rejected, say): reconstruct
        what came if its angles still cover the range (the gap rule of
        :meth:`~bluesky_jit.geometry.ScanGeometry.check_angles`), else say why not."""
        recon = self.recon
        have, window = len(recon.buffer), recon.window
        try:
            recon.geometry.check_angles(recon.buffer.angles_of(recon.window_indices()))
        except GeometryError as error:
            self.problem(
                RuntimeError(
                    f"No slice was reconstructed: {have} of the {window} projections of a "
                    f"rotation arrived, too few to cover the range: {error}"
                )
            )
            return
        self.problem(
            RuntimeError(
                f"{have} of the {window} projections of a rotation arrived: the slice at the "
                "stop is reconstructed from them (their angles still cover the range)"
            )
        )
        self.refresh()

    def _denoise(self, slices: Any) -> None:
        """The Noise2Inverse estimate (the mean of the network over its K inputs) and its
        uncertainty (:func:`~bluesky_jit.noise2inverse.uncertainty`: where from their
        spread, how much from the outputs against the splits their inputs left out).
        Supervised: the network on the window's FBP, one output, so no uncertainty."""
        from .noise2inverse import uncertainty

        inputs, window = self.pairs.inference_inputs(refresh=slices)
        outputs = self.denoiser.denoise_each(inputs)
        denoised = outputs.mean(axis=0)
        sigma = uncertainty(outputs, self.pairs.n2i_strategy, inputs=inputs)
        with self._summary_lock:
            self.summary.denoised += 1
            self.summary.last_denoised_indices = window
            self.summary.images["denoised"] = denoised
            if sigma is None:  # fewer than two splits: no spread to measure
                self.summary.images.pop("uncertainty", None)
            else:
                self.summary.images["uncertainty"] = sigma
        if self.derived is not None:
            scalars = {
                "train_step": int(self.denoiser.weights_version or 0),
                "projection_index": int(window[-1]),
                "first_projection_index": int(window[0]),
            }
            self.derived.add_denoised(denoised, **scalars)
            if sigma is not None:
                self.derived.add_image("uncertainty", sigma, **scalars)

    def move(self, *, slice_row: int | None = None, vertical: dict | None = None) -> None:
        """Ask for slices elsewhere from the next refresh on (any thread).

        ``slice_row`` moves the axial (denoised) slice; ``vertical`` maps 1
        (xz) or 2 (yz) to a new :class:`~bluesky_jit.geometry.Slice` of the
        same shape, or to a number: the y (xz) or x (yz) in mm to move it to.
        """
        with self._moves_lock:
            if slice_row is not None:
                self._moves["row"] = slice_row
            for index, plane in (vertical or {}).items():
                self._moves[index] = plane

    def set_center(self, center_of_rotation: float) -> None:
        """Reconstruct about another rotation axis from the next refresh on (any thread).

        ``center_of_rotation``: the detector column (px) of the axis, as in the
        scan's metadata; the projections already kept are used again.
        """
        with self._moves_lock:
            self._moves["center"] = float(center_of_rotation)

    def set_sampling(self, *, patch_size: int | None = None, region: Any = _KEEP) -> None:
        """Change the training patches from the next refresh on (any thread).

        ``patch_size``: the patch side in pixels; ``region``: a
        :class:`~bluesky_jit.pairs.SamplingRegion` (mm, slice coordinates)
        where patch centres may lie, or ``None`` for the whole reconstruction
        circle. Pairs of the old size leave the buffer, and hold-out pairs are
        renewed so alpha rates the new patches.
        """
        with self._moves_lock:
            if patch_size is not None:
                self._moves["patch_size"] = patch_size
            if region is not _KEEP:
                self._moves["region"] = region

    def _apply_moves(self) -> None:
        with self._moves_lock:
            moves, self._moves = self._moves, {}
        if "row" in moves and self._making is not None:  # its SIRT reads the rows kept now
            concurrent.futures.wait([self._making])
        for key, value in moves.items():
            try:
                if key == "row":
                    row = self._kept_row(int(value))
                    self.recon.row = row
                    self.pairs.set_row(row)
                    self.trainer.clear_holdout()  # re-rate alpha (Graas et al. 2023, Fig. 7a)
                elif key == "patch_size":
                    self.pairs.set_patch_size(value)
                    self.trainer.clear_holdout()
                elif key == "region":
                    self.pairs.set_region(value)
                elif key == "center":
                    self.recon.set_center(value)
                    if self.vertical is not None:  # the binned frames' column
                        b = self.plan.binning
                        self.vertical.set_center((value - (b - 1) / 2) / b)
                    self.trainer.clear_holdout()  # alpha rates the new reconstruction
                    with self._summary_lock:
                        self.summary.geometry = self.recon.geometry
                    logger.info("bluesky_jit: centre of rotation now column %g", value)
                else:
                    recon = self.vertical if self.vertical is not None else self.recon
                    old = recon.slices[key]
                    if not isinstance(value, Slice):  # a position across the plane, mm
                        center = list(old.center)
                        center[_ACROSS[key]] = float(value)
                        value = old.moved(center=center)
                    if value.shape != old.shape:
                        raise ConfigError(
                            f"A moved vertical slice must keep its shape {old.shape} (the derived "
                            f"run's stream has it); got {value.shape}."
                        )
                    recon.move_slice(key, value)
            except (BlueskyJitError, IndexError, TypeError, AttributeError) as error:
                self.problem(error)

    def _kept_row(self, row: int) -> int:
        """A detector row as a row of the frames kept; ConfigError outside them."""
        rows = self.summary.geometry.rows
        first, stop = self.plan.rows or (0, rows)
        if not 0 <= row < rows:
            raise ConfigError(f"slice_row {row} is outside the detector rows 0..{rows - 1}.")
        if not first <= row < stop:
            raise ConfigError(
                f"slice_row {row} is outside the detector rows {first}..{stop - 1} kept within "
                "the memory budget; raise runtime.memory_budget_gb to move the slice further, "
                "or start the scan with slice_row there."
            )
        return row - first

    def _network_useful(self) -> bool:
        """Denoise once the network beats doing nothing on hold-out pairs (alpha < 1).

        An untrained network is worse than the identity (Graas et al. 2023, eq. 3), so
        the denoised stream starts with the first metric row whose alpha is
        below 1; a warm-started network is used from the start.
        """
        if self.trainer.normalizer is None:
            return False
        if self.config.training.warm_start is not None:
            return True
        alphas = [m["alpha"] for m in self.summary.metrics if math.isfinite(m["alpha"])]
        return bool(alphas) and min(alphas) < 1.0

    def _emit_metrics(self, final: bool = False) -> None:
        rows = self.trainer.pop_metrics()
        if final:
            rows.append(self.trainer.final_row(elapsed_s=time.monotonic() - self._t0))
        levels = self._publish_quality() if rows else {}
        for row in rows:
            row.pop("time", None)
            row["sigma_fbp"] = levels.get("sigma_fbp", math.nan)
            row["sigma_denoised"] = levels.get("sigma_denoised", math.nan)
            row["train_paused_s"] = float(getattr(self.trainer, "paused_s", 0.0))
            row["train_duty"] = float(self._guard.duty) if self._guard is not None else 1.0
            row["refreshes_skipped"] = self.summary.refreshes_skipped
            self.summary.metrics.append(row)
            if self.derived is not None:
                self.derived.add_metrics(**row)

    def _publish_quality(self) -> dict[str, float]:
        """Noise estimates of the newest hold-out evaluation; put them on the ophyd signals."""
        from .steering import noise_levels

        details = self.trainer.latest_quality
        if "mse_input" not in details:
            return {}
        if self.supervised:  # the noise estimates need independent split noise: alpha only
            details = {"alpha": details["alpha"]}
        n2i = {"splits": self.pairs.splits, "strategy": self.pairs.n2i_strategy}
        if self.quality is not None:
            try:
                self.quality.publish(details, step=self.trainer.steps, **n2i)
            except Exception as error:  # noqa: BLE001 - a signal must not stop the pipeline
                logger.warning("Could not publish the quality signals: %s", error)
        return noise_levels(details, **n2i)

    def _finish(self, stop: Mapping[str, Any]) -> None:
        summary = self.summary
        now = time.monotonic()
        summary.elapsed_s = now - self._t0
        if self._first_projection is not None and summary.projections > 1:
            summary.projections_per_s = summary.projections / max(
                now - self._first_projection, 1e-9
            )
        if self.trainer is not None:
            summary.train_steps = self.trainer.steps
            summary.train_paused_s = float(getattr(self.trainer, "paused_s", 0.0))
            rates = [m["steps_per_second"] for m in summary.metrics if m.get("steps_per_second")]
            summary.train_steps_per_s = float(np.median(rates)) if rates else 0.0
            alphas = [
                m["alpha"] for m in summary.metrics if math.isfinite(m.get("alpha", math.nan))
            ]
            summary.final_alpha = alphas[-1] if alphas else math.nan
        summary.duplicates = self.duplicates()
        dropped = self.dropped()
        if dropped:
            self.problem(
                RuntimeError(
                    f"{dropped} frame documents were dropped because the worker fell more than "
                    f"{self.config.runtime.queue_size} documents behind the scan; lower the "
                    "detector frame rate, refresh less often (refresh_every) or use a GPU "
                    "(device='cuda')."
                )
            )
        raw_status = stop.get("exit_status") or "success"
        if raw_status != "success":
            summary.exit_status = "abort"
            summary.reason = (
                f"the raw run ended with exit_status={raw_status!r}"
                + (f" ({stop.get('reason')})" if stop.get("reason") else "")
                + ("; " + "; ".join(_unique(summary.problems)) if summary.problems else "")
            )[:4000]
        elif self.recon is not None and summary.slices == 0 and not summary.problems:
            self.problem(
                RuntimeError(
                    f"No slice was reconstructed: {summary.projections} projections arrived but "
                    f"a full rotation needs {self.recon.window}."
                )
            )
        if summary.problems and summary.exit_status == "success":
            summary.exit_status = "fail"
            summary.reason = "; ".join(_unique(summary.problems))[:4000]
        if self.derived is not None:
            try:
                self.derived.close(exit_status=summary.exit_status, reason=summary.reason)
            except Exception as error:  # noqa: BLE001 - the summary must not claim success
                logger.exception("bluesky_jit could not write the stop of %s", summary.raw_uid)
                summary.exit_status = "fail"
                summary.reason = f"the derived run's stop document was not written: {error}"


def _in_context(where: str, error: Exception) -> Exception:
    """``error`` with where it happened and its type, for a stop document's reason."""
    return RuntimeError(f"{where}: {type(error).__name__}: {error}")


def _unique(items: list[str]) -> list[str]:
    counts = collections.Counter(items)
    return [f"{item} (x{counts[item]})" if counts[item] > 1 else item for item in counts]
