"""Wiring: the callback you subscribe, and the per-run pipeline it builds.

``RE.subscribe(JitCallback(...))`` is all a user writes. On the RunEngine's
thread the callback only puts ``(name, doc)`` on a queue and returns; one
worker thread takes documents off the queue and routes them per run (an
``event_model.RunRouter``) to a :class:`~bluesky_jit.ingest.TomoIngest`, which
feeds a :class:`RunPipeline`: streaming reconstruction, Noise2Inverse pairs,
the trainer (its own thread), inference with the newest weights, and the
derived run. Threads live here and nowhere else but in the trainer, the
catalog writer and the pace guard. Training yields to the scan beside it (its
thread at nice 19, pauses while frames wait, :class:`~bluesky_jit.budget.PaceGuard`).

Failure policy: the RunEngine never sees an exception from here, and its
thread spends microseconds per document here (a queue put; the worker polls,
so no thread is woken: ``benchmarks/overhead.py``). Frame documents beyond
``JitConfig.queue_size`` waiting are dropped (counted and reported in the
derived run); run boundaries, descriptors and
asset documents are never dropped. A run's problems are logged and recorded
in its derived run's stop document (``exit_status``, ``reason``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import event_model
import numpy as np

from .config import JitConfig
from .errors import BlueskyJitError, ConfigError
from .geometry import ScanGeometry
from .ingest import CalibrationStore, TomoIngest

logger = logging.getLogger(__name__)

FRAME_DOCUMENTS = frozenset({"event", "event_page", "stream_datum"})
_KEEP = object()
VERTICAL_STREAMS = ("reconstruction_xz", "reconstruction_yz")


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
    last_slice: np.ndarray | None = None
    last_denoised: np.ndarray | None = None
    last_indices: np.ndarray | None = None
    last_denoised_indices: np.ndarray | None = None
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able numbers (arrays and geometry left out)."""
        keys = (
            "raw_uid derived_uid exit_status reason projections projections_per_s slices "
            "denoised train_steps train_steps_per_s final_alpha elapsed_s problems derived_path "
            "budget train_paused_s refreshes_skipped duplicates"
        ).split()
        return {k: getattr(self, k) for k in keys}


def is_tomography(start: Mapping[str, Any]) -> bool:
    """Whether a run's start document describes a tomography scan.

    True with a ``tomo`` block, or with the NSLS-II FXI keys ``num_angles``
    and ``num_bkg_images``; other runs are left alone.
    """
    return start.get("tomo") is not None or ("num_angles" in start and "num_bkg_images" in start)


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
        self._pause_above = config.pause_training_above or config.refresh_every
        self._skip_above: int | None = config.skip_refreshes_above  # None: a rotation (_build)
        self._yielding = False
        self._last_slices: Any = None
        self.arrivals = arrivals if beside_scan else None
        self.beside_scan = beside_scan
        self._guard: Any = None
        self._holds: set[str] = set()
        self._holds_lock = threading.Lock()
        self.quality = quality
        self.emit = emit
        self.directory = Path(directory)
        self.dropped = dropped
        self.duplicates = duplicates
        self.rng = np.random.default_rng(config.seed)
        self.derived = None
        self.recon = None
        self.pairs = None
        self.trainer = None
        self.denoiser = None
        self.summary: RunSummary | None = None
        self._t0 = time.monotonic()
        self._first_projection: float | None = None
        self._unrefreshed = 0
        self._moves: dict = {}
        self._moves_lock = threading.Lock()

    # -- FrameSink -------------------------------------------------------------------
    def begin(self, start: Mapping[str, Any], geometry: ScanGeometry | None) -> None:
        self.summary = RunSummary(
            raw_uid=start["uid"], geometry=geometry, budget=self._budget_record(geometry)
        )
        if (start.get("tomo") or {}).get("role") == "dark_flat":
            return  # a calibration run: its fields are kept by the ingest, nothing to derive
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.emit is not None:
            from .emit import DerivedRun

            n = geometry.slice_size if geometry is not None else 1
            extra = {}
            if geometry is not None and self.config.vertical_slices:
                from .geometry import orthogonal_slices

                _, xz, yz = orthogonal_slices(geometry)
                extra = {VERTICAL_STREAMS[0]: xz.shape, VERTICAL_STREAMS[1]: yz.shape}
            self.derived = DerivedRun(
                raw_start=start,
                emit=self.emit,
                directory=self.directory,
                image_shape=(n, n),
                metadata=self._metadata(geometry),
                extra_images=extra,
            )
            self.derived.start()
            self.summary.derived_uid = self.derived.uid
            self.summary.derived_path = str(self.derived.path)
        if geometry is None:
            return
        self._build(geometry)

    def _build(self, geometry: ScanGeometry) -> None:
        from .inference import Denoiser
        from .models import build_model
        from .pairs import PairMaker, SamplingRegion
        from .reconstruction.streaming import StreamingReconstructor
        from .training import resolve_precision

        cfg = self.config
        window = geometry.num_angles
        frame_step = cfg.frame_step or max(1, window // 2)
        reach = (cfg.frames - 1) * frame_step if cfg.stack == "t" else 0  # T stacks look back
        self.recon = StreamingReconstructor(
            geometry,
            refresh_every=cfg.refresh_every,
            slice_row=cfg.slice_row,
            filter_name=cfg.filter_name,
            device=cfg.device,
            backend=cfg.backend,
            capacity=max(2 * window, window + reach + cfg.refresh_every),
            threads=self.budget.recon_threads_arg,
        )
        if getattr(self.recon.backend, "name", None) == "numba":
            self.budget.apply_worker()  # numba's thread count is per thread: this worker's
        if self._skip_above is None:
            self._skip_above = window
        logger.info("bluesky_jit CPU budget: %s", "; ".join(self.budget.reasons))
        voxel = geometry.voxel_size
        region = SamplingRegion.disc(cfg.sampling_radius * self.recon.n * voxel / 2)
        region.check_fits(cfg.patch_size, voxel)
        self.pairs = PairMaker.from_reconstructor(
            self.recon,
            splits=cfg.splits,
            n2i_strategy=cfg.n2i_strategy,
            patch_size=cfg.patch_size,
            region=region,
            neighbourhood=cfg.neighbourhood_rows,
            stack=cfg.stack,
            frames=cfg.frames,
            frame_step=frame_step,
            rng=self.rng,
        )
        self.trainer = self._make_trainer()
        self.denoiser = Denoiser(
            build_model(cfg.model, cfg.model_config),
            source=self.trainer,
            device=cfg.device,
            precision=resolve_precision(cfg.infer_precision, cfg.device),
            num_threads=self.budget.infer_threads,
        )

    def _make_trainer(self) -> Any:
        """The trainer of ``config.online_strategy``, in a thread or its own process.

        Either follows :class:`~bluesky_jit.training.OnlineTrainer`.
        """
        from .process_trainer import ProcessTrainer
        from .training import make_trainer, resolve_precision

        cfg = self.config
        checkpoint_dir = None
        if cfg.checkpoint_dir is not None:
            checkpoint_dir = Path(cfg.checkpoint_dir) / self.summary.raw_uid
        settings = {
            "learning_rate": cfg.learning_rate,
            "batch_size": cfg.batch_size,
            "holdout_size": cfg.holdout_size,
            "metrics_every_s": cfg.metrics_every_s,
            "max_steps_per_s": cfg.max_train_steps_per_s,
            "precision": resolve_precision(cfg.train_precision, cfg.device),
            "augment": cfg.augment,
            "average": cfg.average_weights,
            "checkpoint_dir": checkpoint_dir,
            "checkpoint_every_s": cfg.checkpoint_every_s,
            "nice": self.budget.train_nice if self.beside_scan else None,
        }
        if cfg.trainer_process:
            return ProcessTrainer(
                cfg.model,
                cfg.model_config,
                capacity=cfg.buffer_capacity,
                online_strategy=cfg.online_strategy,
                warm_start=cfg.warm_start,
                num_threads=self.budget.train_threads,
                interop_threads=self.budget.interop_threads,
                seed=cfg.seed,
                **settings,
            )
        return make_trainer(
            cfg.online_strategy,
            model=cfg.model,
            model_config=cfg.model_config,
            capacity=cfg.buffer_capacity,
            checkpoint=cfg.warm_start,
            seed=cfg.seed,
            device=cfg.device,
            num_threads=self.budget.train_threads,
            **settings,
        )

    def _metadata(self, geometry: ScanGeometry | None) -> dict[str, Any]:
        cfg = self.config
        from .models import resolve_config
        from .training import resolve_precision

        return {
            "config": cfg.to_dict(),
            "geometry": geometry.to_dict() if geometry is not None else None,
            "model": {"name": cfg.model, "config": resolve_config(cfg.model, cfg.model_config)},
            "backend": {"reconstruction": cfg.backend, "device": cfg.device},
            "buffer_capacity": cfg.buffer_capacity,
            "noise2inverse": {
                "splits": cfg.splits,
                "strategy": cfg.n2i_strategy,
                "stack": cfg.stack,
                "frames": cfg.frames,
            },
            "precision": {
                "train": resolve_precision(cfg.train_precision, cfg.device),
                "inference": resolve_precision(cfg.infer_precision, cfg.device),
            },
            "budget": self._budget_record(geometry),
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
        if self.recon is not None:
            self.recon.set_flatfield(darks, flats)

    def projection(self, frame: np.ndarray, *, angle_deg: float, index: int) -> None:
        if self.recon is None:
            return
        if self._first_projection is None:
            self._first_projection = time.monotonic()
        due = self.recon.add_frame(frame, angle_deg=angle_deg, index=index)
        self.summary.projections += 1
        self._unrefreshed += 1
        waiting = self._watch_backlog()
        if due:
            # skip only if the next chance still keeps a refresh in every rotation
            keeps_pace = self._unrefreshed + self.config.refresh_every <= self.recon.window
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
            if self._holds:
                pause.set()
            else:
                pause.clear()

    def _stop_yielding(self) -> None:
        if self._guard is not None:
            self._guard.stop()
        self._hold("backlog", False)
        self._yielding = False

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
            if self.recon is not None and self.recon.ready and self._unrefreshed:
                self.refresh()  # the last slice shows the last projections, however far behind
        except Exception as error:  # noqa: BLE001 - recorded in the stop document below
            logger.exception("bluesky_jit: the last refresh of run %s failed", summary.raw_uid)
            self.problem(_in_context("the last refresh at the stop", error))
        try:
            if self.trainer is not None:
                self.trainer.stop()
                if self.trainer.error is not None:
                    self.problem(self.trainer.error)
                rated = self.trainer.steps or self.config.online_strategy == "frozen"
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
        cfg, recon, trainer, pairs = self.config, self.recon, self.trainer, self.pairs
        self._apply_moves()
        slices = self._last_slices = recon.reconstruct()
        self._unrefreshed = 0
        if cfg.train and pairs.ready:  # T stacks wait for their earlier windows
            trainer.buffer.push(*pairs.pairs(cfg.pairs_per_refresh))
            trainer.add_holdout(*pairs.pairs(cfg.holdout_per_refresh))
        if cfg.train and not trainer.running and len(trainer.buffer) >= cfg.batch_size:
            trainer.start()
            if cfg.pace_guard and self.arrivals is not None and self._guard is None:
                from .budget import PaceGuard

                self._guard = PaceGuard(self.arrivals, lambda on: self._hold("pace", on))
                self._guard.start()
        first, last = int(slices.indices[0]), int(slices.indices[-1])
        common = {"projection_index": last, "first_projection_index": first}
        self.summary.slices += 1
        self.summary.last_slice = slices.full
        self.summary.last_indices = slices.indices
        if self.derived is not None:
            self.derived.add_reconstruction(
                slices.full, num_projections=len(slices.indices), slice_row=slices.row, **common
            )
            if cfg.vertical_slices:
                for name, plane in zip(VERTICAL_STREAMS, recon.slices[1:3], strict=True):
                    image = recon.reconstruct_slice(plane).full
                    self.derived.add_image(name, image, **common)
        self._emit_metrics()
        if pairs.ready and self._network_useful():
            self._denoise(slices)

    def _denoise(self, slices: Any) -> None:
        """The Noise2Inverse estimate: the mean of the network over its K inputs."""
        inputs, window = self.pairs.inference_inputs(refresh=slices)
        denoised = self.denoiser.denoise_mean(inputs)
        self.summary.denoised += 1
        self.summary.last_denoised = denoised
        self.summary.last_denoised_indices = window
        if self.derived is not None:
            self.derived.add_denoised(
                denoised,
                train_step=int(self.denoiser.weights_version or 0),
                projection_index=int(window[-1]),
                first_projection_index=int(window[0]),
            )

    def move(self, *, slice_row: int | None = None, vertical: dict | None = None) -> None:
        """Ask for slices elsewhere from the next refresh on (any thread).

        ``slice_row`` moves the axial (denoised) slice; ``vertical`` maps 1 or
        2 to a new :class:`~bluesky_jit.geometry.Slice` of the same shape.
        """
        with self._moves_lock:
            if slice_row is not None:
                self._moves["row"] = slice_row
            for index, plane in (vertical or {}).items():
                self._moves[index] = plane

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
        for key, value in moves.items():
            try:
                if key == "row":
                    if not 0 <= int(value) < self.recon.geometry.rows:
                        raise ConfigError(
                            f"slice_row {value} is outside the detector rows "
                            f"0..{self.recon.geometry.rows - 1}."
                        )
                    self.recon.row = int(value)
                    self.pairs.set_row(int(value))
                    self.trainer.clear_holdout()  # alpha rates the new place (seed 000 Fig. 7a)
                elif key == "patch_size":
                    self.pairs.set_patch_size(value)
                    self.trainer.clear_holdout()
                elif key == "region":
                    self.pairs.set_region(value)
                else:
                    old = self.recon.slices[key]
                    if value.shape != old.shape:
                        raise ConfigError(
                            f"A moved vertical slice must keep its shape {old.shape} (the derived "
                            f"run's stream has it); got {value.shape}."
                        )
                    self.recon.move_slice(key, value)
            except (BlueskyJitError, IndexError, TypeError, AttributeError) as error:
                self.problem(error)

    def _network_useful(self) -> bool:
        """Denoise once the network beats doing nothing on hold-out pairs (alpha < 1).

        An untrained network is worse than the identity (seed 000, eq. 3), so
        the denoised stream starts with the first metric row whose alpha is
        below 1; a warm-started network is used from the start.
        """
        if self.trainer.normalizer is None:
            return False
        if self.config.warm_start is not None:
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
        n2i = {"splits": self.config.splits, "strategy": self.config.n2i_strategy}
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
                    f"{self.config.queue_size} documents behind the scan; lower the detector "
                    "frame rate, refresh less often (refresh_every) or use a GPU (device='cuda')."
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


def _warm_up() -> None:
    """Import the learning stage before the first run (torch.optim alone took 2 s here)."""
    try:
        import torch.optim  # noqa: F401

        from . import inference, pairs, process_trainer, training  # noqa: F401
        from .reconstruction import streaming  # noqa: F401
    except Exception:  # noqa: BLE001 - the run itself will report it
        logger.exception("bluesky_jit could not import its learning stage")


def _frames_in(name: str, doc: Mapping[str, Any]) -> int:
    """Frames (event rows, stream-datum indices) of one frame document; 1 if unclear."""
    try:
        if name == "event_page":
            return len(doc["seq_num"])
        if name == "stream_datum":
            return max(1, int(doc["seq_nums"]["stop"]) - int(doc["seq_nums"]["start"]))
    except (KeyError, TypeError, ValueError):
        pass
    return 1


def _which_frames(name: str, doc: Any) -> str:
    """``event seq_num 12`` / ``stream_datum frames 10-19``: which frames a document held."""
    if not isinstance(doc, dict):
        return f"a {name!r} document"
    if name == "stream_datum":
        indices = doc.get("indices") or {}
        return f"stream_datum frames {indices.get('start')}-{indices.get('stop')}"
    seq = doc.get("seq_num")
    if isinstance(seq, list):  # an event page (the router hands events on as pages)
        seq = seq[0] if len(seq) == 1 else f"{seq[0]}-{seq[-1]}" if seq else None
    return f"event seq_num {seq}"


def _in_context(where: str, error: Exception) -> Exception:
    """``error`` with where it happened and its type, for a stop document's reason."""
    return RuntimeError(f"{where}: {type(error).__name__}: {error}")


def _unique(items: list[str]) -> list[str]:
    counts = collections.Counter(items)
    return [f"{item} (x{counts[item]})" if counts[item] > 1 else item for item in counts]


class _Guard:
    """Feed one run's documents to its ingest; no exception escapes, the run always ends."""

    def __init__(self, ingest: TomoIngest, pipeline: RunPipeline, finished: Callable) -> None:
        self.ingest = ingest
        self.pipeline = pipeline
        self.finished = finished
        self.frame_errors = 0

    def __call__(self, name: str, doc: dict) -> None:
        try:
            self.ingest(name, doc)
        except Exception as error:  # noqa: BLE001 - recorded in the derived run
            if name in FRAME_DOCUMENTS:
                # one bad frame (a complex array, strings for angles, a MemoryError) costs
                # that frame only: say which, go on with the next
                self.frame_errors += 1
                if self.frame_errors <= 5:
                    logger.exception("bluesky_jit rejected %s", _which_frames(name, doc))
                self.pipeline.problem(
                    _in_context(f"{_which_frames(name, doc)} rejected", error)
                )
                return
            logger.exception("bluesky_jit failed on a %r document", name)
            self.ingest.dead = True
            self.pipeline.problem(_in_context(f"a {name!r} document", error))
            if name == "stop":
                try:
                    self.pipeline.end(doc)
                except Exception:  # noqa: BLE001
                    logger.exception("bluesky_jit could not close the derived run")
        if name == "stop":
            self.finished(self.pipeline.summary)


class JitCallback:
    """Live just-in-time denoising of tomography runs: ``RE.subscribe(JitCallback(...))``.

    Parameters
    ----------
    config : JitConfig, optional
    emit : callable, optional
        Receives the derived runs' ``(name, doc)`` pairs, e.g. a
        ``bluesky_tiled_plugins.TiledWriter``. ``None`` computes without publishing.
    directory : path
        Where derived runs' HDF5 files are written.
    geometry_overrides : mapping, optional
        Geometry values that win over the start document.
    handler_registry : mapping, optional
        Extra Resource spec -> handler classes (``AD_HDF5`` is built in).
    root_map : mapping, optional
        Rewrites detector file paths (``{old_root: new_root}``).
    on_run_finished : callable, optional
        Called on the worker thread with each run's :class:`RunSummary`.
    keep_summaries : int
        How many recent :class:`RunSummary` objects :attr:`summaries` keeps.
    quality : bluesky_jit.steering.QualitySignals, optional
        Ophyd signals that get alpha and the noise estimates after every
        metric row, for plans that stop or adapt a scan
        (:func:`bluesky_jit.steering.until_quality`).
    run_engine_here : bool
        The documents come from a RunEngine in this process, whose pace
        training must not take (``JitConfig.pace_guard``). False for replays
        and listeners, where nothing runs beside the callback.

    Notes
    -----
    Runs without a ``tomo`` start-document block (nor the FXI keys
    ``num_angles`` and ``num_bkg_images``) are not tomography scans and are
    ignored. Call :meth:`flush` to wait until every document received so far is
    processed, and :meth:`close` at the end.
    """

    def __init__(
        self,
        *,
        config: JitConfig | None = None,
        emit: Callable[[str, dict], None] | None = None,
        directory: str | Path = "bluesky_jit_data/derived",
        geometry_overrides: Mapping[str, Any] | None = None,
        handler_registry: Mapping[str, Any] | None = None,
        root_map: Mapping[str, str] | None = None,
        on_run_finished: Callable[[RunSummary], None] | None = None,
        keep_summaries: int = 20,
        quality: Any = None,
        run_engine_here: bool = True,
    ) -> None:
        self.quality = quality
        self.run_engine_here = run_engine_here
        self.config = config or JitConfig()
        self.emit = emit
        self.directory = Path(directory)
        self.geometry_overrides = dict(geometry_overrides or {})
        self.handler_registry = dict(handler_registry or {})
        self.root_map = dict(root_map or {})
        self.on_run_finished = on_run_finished
        self.calibrations = CalibrationStore()
        self.summaries: collections.deque[RunSummary] = collections.deque(maxlen=keep_summaries)
        """The most recent runs' summaries (a listener runs for hours: old ones go)."""
        self.pipelines: dict[str, RunPipeline] = {}
        self._router = event_model.RunRouter([self._factory], handler_registry={})
        self._queue: queue.Queue = queue.Queue()
        self._frames_waiting = 0
        self._behind = [0, 0]  # frames waiting: in events (rows), in stream datums
        self._arrivals = (collections.deque(maxlen=2048), collections.deque(maxlen=2048))
        """When frame documents reached the RunEngine's thread (for the PaceGuard)."""
        self._count_lock = threading.Lock()
        self._run_of_descriptor: dict[str, str] = {}
        self._dropped: collections.Counter[str] = collections.Counter()
        self._duplicates: collections.Counter[str] = collections.Counter()
        self._seen: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self._run_of_descriptor_seen: dict[str, str] = {}
        self._worker = threading.Thread(target=self._work, name="bluesky-jit-worker", daemon=True)
        self._closed = False
        self._worker.start()

    # -- RunEngine side: never blocks, never raises -------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        try:
            if self._closed:
                return
            if name == "descriptor":
                self._run_of_descriptor[doc["uid"]] = doc["run_start"]
            elif name == "stop":
                run = doc["run_start"]
                for uid in [d for d, r in self._run_of_descriptor.items() if r == run]:
                    del self._run_of_descriptor[uid]
            if name in FRAME_DOCUMENTS:
                with self._count_lock:
                    if self._frames_waiting >= self.config.queue_size:
                        run = self._run_of_descriptor.get(doc.get("descriptor", ""), "")
                        self._dropped[run] += 1
                        return
                    self._frames_waiting += 1
                    self._behind[name == "stream_datum"] += _frames_in(name, doc)
                self._arrivals[name == "stream_datum"].append(time.monotonic())
            self._queue.put_nowait((name, doc))
        except Exception:  # noqa: BLE001 - the RunEngine must not see our failures
            logger.exception("bluesky_jit could not queue a %r document", name)

    def _frames_behind(self) -> int:
        """Frames queued and not yet taken by the worker (two reads, no lock).

        Counted in event rows and in stream-datum frames: ophyd-async step
        scans send both for one frame, ophyd v1 only events, fly scans only
        stream datums, so the larger of the two is the frames waiting.
        """
        return max(self._behind)

    # -- worker side -----------------------------------------------------------------
    def _work(self) -> None:
        _warm_up()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                # Polled, not a blocking get(): the RunEngine's put() then has no thread
                # to wake, which would cost it a context switch on a busy machine.
                time.sleep(0.005)
                continue
            try:
                if item is None:
                    return
                name, doc = item
                if name in FRAME_DOCUMENTS:
                    with self._count_lock:
                        self._frames_waiting -= 1
                        self._behind[name == "stream_datum"] -= _frames_in(name, doc)
                if self._duplicate(name, doc):
                    continue
                self._router(name, doc)
            except Exception:  # noqa: BLE001 - e.g. a document of a run we never saw start
                logger.exception("bluesky_jit worker failed on a document")
            finally:
                self._queue.task_done()

    def _duplicate(self, name: str, doc: Any) -> bool:
        """Whether this document came before (same uid): then it is counted and ignored.

        A bus that delivers twice (a replayed Kafka partition, a doubled
        subscription) would otherwise feed every frame twice.
        """
        if not isinstance(doc, dict):
            return False
        key = doc.get("uid", doc.get("datum_id"))
        if isinstance(key, list):  # a page: a duplicate only if all of it came before
            key = tuple(key) if key else None
        if not isinstance(key, (str, tuple)):
            return False
        if name == "descriptor":
            self._run_of_descriptor_seen[doc["uid"]] = doc.get("run_start", "")
        if (name, key) not in self._seen:
            self._seen[(name, key)] = None
            if len(self._seen) > 100_000:  # hours of runs: forget the oldest
                self._seen.popitem(last=False)
            return False
        run = doc.get("run_start") or self._run_of_descriptor_seen.get(doc.get("descriptor", ""))
        run = doc["uid"] if name == "start" else run
        if name != "stop":  # a second stop comes after its run's summary: only logged
            self._duplicates[run or ""] += 1
        if name == "stop" or self._duplicates[run or ""] == 1:
            logger.warning("bluesky_jit ignores a second %r document with uid %s", name, key)
        return True

    def _factory(self, name: str, start: dict) -> tuple[list, list]:
        if not is_tomography(start):
            logger.info(
                "Run %s is not a tomography scan (no 'tomo' block in its start document); "
                "bluesky_jit ignores it.",
                start.get("uid"),
            )
            return [], []
        uid = start["uid"]
        pipeline = RunPipeline(
            config=self.config,
            emit=self.emit,
            directory=self.directory,
            dropped=lambda: self._dropped.pop(uid, 0),
            duplicates=lambda: self._duplicates.pop(uid, 0),
            quality=self.quality,
            backlog=self._frames_behind,
            arrivals=self._arrivals,
            beside_scan=self.run_engine_here,
        )
        ingest = TomoIngest(
            pipeline,
            calibrations=self.calibrations,
            geometry_overrides=self.geometry_overrides,
            handler_registry=self.handler_registry,
            root_map=self.root_map,
        )
        self.pipelines[uid] = pipeline
        return [_Guard(ingest, pipeline, self._finished)], []

    def _finished(self, summary: RunSummary | None) -> None:
        if summary is None:
            return
        self.pipelines.pop(summary.raw_uid, None)
        self.summaries.append(summary)
        level = logging.INFO if summary.exit_status == "success" else logging.WARNING
        logger.log(
            level,
            "bluesky_jit finished run %s -> derived run %s (%s%s): %d projections, %d slices, "
            "%d training steps, alpha %.3f",
            summary.raw_uid,
            summary.derived_uid,
            summary.exit_status,
            f": {summary.reason}" if summary.reason else "",
            summary.projections,
            summary.slices,
            summary.train_steps,
            summary.final_alpha,
        )
        if self.on_run_finished is not None:
            try:
                self.on_run_finished(summary)
            except Exception:  # noqa: BLE001
                logger.exception("on_run_finished raised")

    # -- control ---------------------------------------------------------------------
    def move_slices(self, *, slice_row: int | None = None, vertical: dict | None = None) -> None:
        """Move the slices of the runs in progress from their next refresh on.

        ``slice_row`` moves the axial (denoised) slice to another detector row
        (seed 000, Fig. 7a: the network then meets new data and recovers);
        ``vertical`` maps 1 (xz) or 2 (yz) to a new
        :class:`~bluesky_jit.geometry.Slice` of the same shape. Later runs
        use ``JitConfig.slice_row``.
        """
        for pipeline in list(self.pipelines.values()):
            pipeline.move(slice_row=slice_row, vertical=vertical)

    def set_sampling(self, *, patch_size: int | None = None, region: Any = _KEEP) -> None:
        """Change the training patches of the runs in progress (seed 000: "the
        patch-sampling region is adjustable during the experiment").

        ``patch_size`` in pixels; ``region`` a
        :class:`~bluesky_jit.pairs.SamplingRegion` (e.g. a disc inside the
        container, or a mask), ``None`` for the whole reconstruction circle.
        A bad value is recorded in the run's derived stop document.
        """
        for pipeline in list(self.pipelines.values()):
            pipeline.set_sampling(patch_size=patch_size, region=region)

    def progress(self) -> list[RunSummary]:
        """Snapshots of the runs in progress, oldest first (safe to read from any thread)."""
        out = []
        for pipeline in list(self.pipelines.values()):
            summary = pipeline.summary
            if summary is None:
                continue
            snapshot = dataclasses.replace(
                summary, metrics=list(summary.metrics), problems=list(summary.problems)
            )
            if pipeline.trainer is not None:
                snapshot.train_steps = pipeline.trainer.steps
            out.append(snapshot)
        return out

    @property
    def backlog(self) -> int:
        """Documents waiting for the worker."""
        return self._queue.qsize()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document received so far is processed and its derived
        documents are written (when ``emit`` has a ``flush``, as
        :class:`~bluesky_jit.writer.CatalogWriter` does); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        emit_flush = getattr(self.emit, "flush", None)
        if callable(emit_flush):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return bool(emit_flush(left))
        return True

    def close(self, timeout: float | None = None) -> None:
        """Process what is queued, then stop the worker (and any trainer still running)."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)
        for pipeline in list(self.pipelines.values()):
            pipeline._stop_yielding()
            if pipeline.trainer is not None:
                pipeline.trainer.stop()
