"""Plain settings of the just-in-time pipeline.

One frozen dataclass, stored verbatim (``asdict``) in the derived run's start
document so a result can always be traced back to the settings that made it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class JitConfig:
    """Settings of one just-in-time denoising pipeline.

    Defaults follow seed 000 where they carry over to a CPU: 20x20 patches,
    Adam with batch size 32, a capacity queue of 320 pairs (the larger of the
    two buffers in seed 000, Fig. 10), even/odd Noise2Inverse splits. Where
    the CPU trains ~50 steps/s instead of the paper's GPU, the defaults are the
    settings that met the quality targets in ``benchmarks/learning.py``
    (FBP + 6 dB and TV + 1 dB after 60 s): learning rate 2e-3 (seed 000:
    1e-4), random flips and turns of the pairs, an exponential average of the
    weights for inference, bfloat16 where the CPU has it. Build a seed-000
    Table 1 network (``"C16"``, ``"V30"``, ``"Z3"``, ``"T5"``, ...) with
    :meth:`for_variant`.
    """

    # reconstruction
    refresh_every: int = 10
    """Reconstruct a new slice every k projections (from the last full rotation)."""
    slice_row: int | None = None
    """Detector row of the axial slice; ``None`` is the middle row."""
    filter_name: str = "ram-lak"
    device: str = "cpu"
    """Torch device for reconstruction, training and inference ("cpu", "cuda")."""
    backend: str = "auto"
    """Backprojector: "auto" (numba on CPU, torch on CUDA), "numba", "torch", "astra", "cupy"."""
    vertical_slices: bool = True
    """Also reconstruct the two vertical slices (xz, yz through the axis) at each refresh."""

    # Noise2Inverse pairs
    patch_size: int = 20
    pairs_per_refresh: int = 64
    holdout_per_refresh: int = 8
    sampling_radius: float = 1.0
    """Patches lie inside this fraction of the reconstruction circle (1: anywhere in it)."""
    neighbourhood_rows: int = 2
    """Pairs are also drawn from detector rows this far from the slice row."""
    splits: int = 2
    """K, the disjoint projection subsets ``i mod K`` (2: even/odd, seed 000)."""
    n2i_strategy: str = "X:1"
    """"X:1": the mean of K-1 splits in, the other split as target; "1:X" the
    reverse (Noise2Inverse; the two agree for K = 2)."""
    stack: str | None = None
    """Network input stacks for ``model="unet3d"`` (Zx/Tx): "z" nearby slices,
    "t" earlier windows; the depth is ``model_config["frames"]``."""
    frame_step: int | None = None
    """Projections between the windows of a "t" stack; default half a rotation."""

    # learning
    model: str = "unet"
    model_config: dict[str, Any] = field(default_factory=dict)
    buffer_capacity: int = 320
    batch_size: int = 32
    learning_rate: float = 2e-3
    online_strategy: str = "queue"
    """"queue": capacity queue of buffer_capacity pairs (seed 000); "sequential":
    no buffer, each pair trained on once; "frozen": the warm_start network,
    never trained (a pretrained baseline)."""
    trainer_process: bool = False
    """Train in a process of its own (torch.multiprocessing) instead of a thread (CPU only)."""
    train_precision: str = "auto"
    """"float32", "bfloat16" (autocast) or "auto": bfloat16 on a CPU that has it
    (AVX512-BF16/AMX), else float32."""
    infer_precision: str = "auto"
    """As train_precision, for the denoiser's copy of the weights."""
    cpu_threads: int | None = None
    """CPU threads of the plugin (worker and trainer together); None: the cores
    of the process's CPU affinity less those left to the RunEngine and the
    detector. Split between the stages by :class:`~bluesky_jit.budget.CpuBudget`."""
    train_threads: int | None = None
    """Torch threads of the trainer; None: from the CPU budget (1 on 2-4 cores;
    20x20 patches train about as fast on 1 as on 2)."""
    infer_threads: int | None = None
    """Torch threads of the denoiser; None: from the CPU budget (the worker's threads)."""
    augment: bool = True
    """Random flips and quarter turns of the training pairs."""
    average_weights: float | None = 0.99
    """Inference uses an exponential moving average of the weights with this
    decay per step; None uses the newest weights."""
    max_train_steps_per_s: float | None = None
    holdout_size: int = 64
    metrics_every_s: float = 1.0
    seed: int = 0
    train: bool = True
    """Train just in time; False reconstructs (and denoises with a warm start) only."""
    warm_start: str | None = None
    """Checkpoint of an earlier run to start from (same model name and config)."""
    checkpoint_dir: str | None = None
    """Write ``<checkpoint_dir>/<raw uid>.pt`` at intervals and at the end of each run."""
    checkpoint_every_s: float | None = None

    # plumbing
    queue_size: int = 10_000
    """Documents waiting for the worker thread; beyond it events are dropped (and counted)."""
    pause_training_above: int | None = None
    """Frames waiting for the worker above which the trainer pauses (it resumes
    at half of it), so the worker catches up; None: refresh_every."""
    skip_refreshes_above: int | None = None
    """Frames waiting above which a due slice refresh is skipped (there is still
    one per rotation, and always one at the end); None: a rotation."""
    pace_guard: bool = True
    """Training yields the time it would take from the scan: the trainer is
    paused now and then and the scan's frame rate compared with and without
    it (:class:`bluesky_jit.budget.PaceGuard`)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _POSITIVE_INTS and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConfigError(
                    f"JitConfig.{f.name} must be a positive integer; got {value!r}. "
                    f"Pass e.g. {f.name}={f.default!r}."
                )
        if self.batch_size > self.buffer_capacity:
            raise ConfigError(
                f"JitConfig.buffer_capacity ({self.buffer_capacity}) is smaller than "
                f"batch_size ({self.batch_size}); the optimizer could never draw a full "
                "batch. Raise buffer_capacity or lower batch_size."
            )
        if not 0 < self.sampling_radius <= 1:
            raise ConfigError(
                f"JitConfig.sampling_radius must be in (0, 1]; got {self.sampling_radius!r}."
            )
        if not isinstance(self.learning_rate, (int, float)) or self.learning_rate <= 0:
            raise ConfigError(
                f"JitConfig.learning_rate must be a positive number; got {self.learning_rate!r}."
            )
        self._check_learning()

    def _check_learning(self) -> None:
        from .buffers import ONLINE_STRATEGIES
        from .models import resolve_config
        from .noise2inverse import check_strategy
        from .training import PRECISIONS

        model_config = resolve_config(self.model, self.model_config)  # unknown names, bad types
        check_strategy(self.n2i_strategy, self.splits)
        takes_stacks = "frames" in model_config
        if self.stack not in (None, "z", "t"):
            raise ConfigError(f'JitConfig.stack must be None, "z" or "t"; got {self.stack!r}.')
        if takes_stacks and self.stack is None:
            raise ConfigError(
                f"Model {self.model!r} takes stacks of {model_config['frames']} slices: set "
                'stack="z" (nearby slices, Zx) or stack="t" (time frames, Tx), or use '
                'JitConfig.for_variant("Z3").'
            )
        if self.stack is not None and not takes_stacks:
            raise ConfigError(
                f"stack={self.stack!r} needs a network on stacks (model='unet3d'); model "
                f"{self.model!r} takes single slices. Set stack=None."
            )
        for name, choices in (
            ("online_strategy", ONLINE_STRATEGIES),
            ("train_precision", ("auto", *PRECISIONS)),
            ("infer_precision", ("auto", *PRECISIONS)),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"JitConfig.{name} must be one of {choices}; got {getattr(self, name)!r}."
                )
        if self.online_strategy == "frozen" and self.warm_start is None:
            raise ConfigError(
                'online_strategy="frozen" runs a pretrained network: set warm_start to the '
                "checkpoint of an earlier run."
            )
        if self.trainer_process and self.device != "cpu":
            raise ConfigError(
                f"trainer_process=True trains on the CPU; with device={self.device!r} keep the "
                "trainer in a thread (trainer_process=False)."
            )
        for name in (
            "cpu_threads",
            "train_threads",
            "infer_threads",
            "frame_step",
            "pause_training_above",
            "skip_refreshes_above",
        ):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConfigError(
                    f"JitConfig.{name} must be a positive integer or None; got {value!r}."
                )
        average = self.average_weights
        number = isinstance(average, (int, float)) and not isinstance(average, bool)
        if average is not None and not (number and 0 <= average < 1):
            raise ConfigError(
                f"JitConfig.average_weights must be None or a decay in [0, 1); got {average!r}."
            )

    @classmethod
    def for_variant(cls, name: str, **settings: Any) -> JitConfig:
        """Settings for a seed-000 Table 1 network by name ("C16", "V30", "Z3", "T5", ...).

        Sets ``model``, ``model_config``, ``patch_size`` and ``stack``;
        ``settings`` are the other fields.
        """
        from .models import variant

        clash = sorted({"model", "model_config", "stack"} & set(settings))
        if clash:
            raise ConfigError(
                f"for_variant({name!r}) sets model, model_config and stack itself; got {clash} "
                "too. Leave them out, or build JitConfig(...) directly."
            )
        v = variant(name)
        base = {
            "model": v.model,
            "model_config": dict(v.config),
            "patch_size": v.patch_size,
            "stack": v.stack,
        }
        return cls(**(base | settings))

    @property
    def frames(self) -> int:
        """Slices or time frames per network input (1 without a stack)."""
        if self.stack is None:
            return 1
        from .models import resolve_config

        return int(resolve_config(self.model, self.model_config)["frames"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JitConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"Unknown JitConfig setting(s) {unknown}; known settings are {sorted(known)}."
            )
        return cls(**data)

    def replace(self, **changes: Any) -> JitConfig:
        return dataclasses.replace(self, **changes)


_POSITIVE_INTS = {
    "refresh_every",
    "splits",
    "patch_size",
    "pairs_per_refresh",
    "holdout_per_refresh",
    "buffer_capacity",
    "batch_size",
    "holdout_size",
    "queue_size",
}
