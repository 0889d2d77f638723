"""Typed settings of the just-in-time pipeline: one section per stage.

:class:`JitConfig` is a frozen pydantic model with the sections
``reconstruction``, ``pairs``, ``training``, ``inference`` and ``runtime``.
Each setting has one name, from the settings file to the constructor that
uses it: a stage is built as ``Stage(**cfg.<section>.model_dump())`` (plus
what only the run knows), and the derived run's start document stores
:meth:`JitConfig.to_dict` so a result can be traced back to its settings.

Every setting name belongs to exactly one section, so flat keys still work
wherever settings come in (``JitConfig(refresh_every=10, model="unet")``, a
settings file's ``[jit]`` section); nested ones too
(``JitConfig(training={"learning_rate": 1e-3})``, ``[jit.training]``).
Settings are read nested: ``cfg.training.learning_rate``.

The sections are pydantic dataclasses rather than models because a training
setting is called ``model_config``, a name pydantic models keep for
themselves; they validate, freeze and forbid unknown keys the same way.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic import model_validator as _model_validator
from pydantic.dataclasses import dataclass

from .errors import ConfigError

PositiveInt = Annotated[int, Field(ge=1, strict=True)]
"""A whole number >= 1 (booleans and floats refused)."""
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
Bool = Annotated[bool, Field(strict=True)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PathStr = Annotated[
    str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)
]
"""A file or directory, kept as a string (JSON in the start document)."""

N2IStrategy = Literal["X:1", "1:X"]
"""Noise2Inverse strategies (Hendriksen et al. 2020): ``"X:1"`` trains on input
``mean(r_i, i != j)`` and target ``r_j``; ``"1:X"`` the reverse."""
OnlineStrategy = Literal["queue", "sequential", "frozen"]
"""Online-learning strategies (Graas et al. 2023, Fig. 10): ``queue``, the
capacity queue of N_buffer pairs; ``sequential``, no buffer, every pair trained
on once; ``frozen``, a pretrained network that is never trained."""
Precision = Literal["float32", "bfloat16"]
"""Training / inference precisions (bfloat16: autocast for training, bf16 weights
for inference)."""
Stack = Literal["z", "t"]
Target = Literal["noise2inverse", "supervised"]
"""Training targets: ``noise2inverse``, the K splits of the window are each other's
targets (Hendriksen et al. 2020); ``supervised``, the window's FBP in and a many-iteration
SIRT over more projections as target (as TomoGAN, Liu et al. 2020)."""
"""Network input stacks: nearby slices (Zx) or earlier windows (Tx)."""

_SECTION = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class _Section:
    def model_dump(self) -> dict[str, Any]:
        """The settings by name, as the stage's constructor takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Reconstruction(_Section):
    """:class:`~bluesky_jit.reconstruction.streaming.StreamingReconstructor` settings."""

    refresh_every: PositiveInt = 10
    """Reconstruct a new slice every k projections (from the last full rotation)."""
    slice_row: Annotated[int, Field(ge=0, strict=True)] | None = None
    """Detector row of the axial slice; None is the middle row."""
    slice_size: Annotated[int, Field(ge=2, strict=True)] | None = None
    """Side of the reconstructed slices (pixels of the detector's scale); None is the detector
    width."""
    slice_center: tuple[FiniteFloat, FiniteFloat] = (0.0, 0.0)
    """Centre (x, y) of the slices, pixels from the rotation axis: with slice_size, the region
    reconstructed (a zoom on part of the sample)."""
    filter_name: str = "ram-lak"
    """Filter of the filtered backprojection."""
    backend: str = "auto"
    """Backprojector: auto (numba on CPU, torch on CUDA), numba, torch, astra, cupy."""
    vertical_slices: Bool = True
    """Also reconstruct the two vertical slices (xz, yz through the axis) at each refresh."""


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Pairs(_Section):
    """:meth:`~bluesky_jit.pairs.PairMaker.from_reconstructor` settings."""

    patch_size: PositiveInt = 20
    """Side of the training patches (pixels; 20 in Graas et al. 2023)."""
    pairs_per_refresh: PositiveInt = 64
    """Training pairs made at each refresh."""
    holdout_per_refresh: PositiveInt = 8
    """Hold-out pairs (never trained on, they rate the network) made at each refresh."""
    sampling_radius: Annotated[float, Field(gt=0, le=1, strict=True)] = 1.0
    """Patches lie inside this fraction of the reconstruction circle (1: anywhere in it)."""
    neighbourhood_rows: Annotated[int, Field(ge=0, strict=True)] = 2
    """Pairs are also drawn from detector rows this far from the slice row."""
    splits: Annotated[int, Field(ge=2, strict=True)] = 2
    """K, the disjoint projection subsets i mod K (2: even/odd, Graas et al. 2023)."""
    n2i_strategy: Annotated[N2IStrategy, Field(title="Noise2Inverse strategy")] = "X:1"
    """X:1: the mean of K-1 splits in, the other split as target; 1:X the reverse
    (the two agree for K = 2)."""
    stack: Stack | None = None
    """Network input stacks for model unet3d (Zx/Tx): z nearby slices, t earlier
    windows; the depth is model_config["frames"]."""
    frame_step: PositiveInt | None = None
    """Projections between the windows of a t stack; default half a rotation."""
    target: Annotated[Target, Field(title="training target")] = "noise2inverse"
    """noise2inverse: the window's K splits train each other; supervised: the window's FBP
    in, target_iterations of SIRT over the last target_windows windows as target."""
    target_windows: PositiveInt = 2
    """Supervised target: SIRT over the projections of this many most recent windows."""
    target_iterations: PositiveInt = 100
    """Supervised target: SIRT iterations (from zero, at each refresh)."""


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Training(_Section):
    """:func:`~bluesky_jit.training.make_trainer` / ProcessTrainer settings."""

    model: str = "unet"
    """Denoiser by registry name (bluesky_jit.models)."""
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Settings of the network (its defaults filled in by name)."""
    online_strategy: Annotated[OnlineStrategy, Field(title="online-learning strategy")] = "queue"
    """queue: capacity queue of buffer_capacity pairs (Graas et al. 2023); sequential: no
    buffer, each pair trained on once; frozen: the warm_start network, never trained."""
    buffer_capacity: PositiveInt = 320
    """N_buffer, the pairs kept for training (Graas et al. 2023: 32 or 320)."""
    batch_size: PositiveInt = 32
    """Pairs per optimizer step."""
    learning_rate: PositiveFloat = 2e-3
    """Adam's learning rate (Graas et al. 2023: 1e-4 on a GPU)."""
    train_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """float32, bfloat16 (autocast) or auto: bfloat16 on a CPU that has it
    (AVX512-BF16/AMX), else float32."""
    augment: Bool = True
    """Random flips and quarter turns of the training pairs."""
    average_weights: Annotated[float, Field(ge=0, lt=1, strict=True)] | None = 0.99
    """Inference uses an exponential moving average of the weights with this
    decay per step; None uses the newest weights."""
    max_train_steps_per_s: PositiveFloat | None = None
    """Throttle training to this many steps per second; None runs flat out."""
    holdout_size: PositiveInt = 64
    """Most recent hold-out pairs kept for the network's rating (alpha)."""
    metrics_every_s: PositiveFloat = 1.0
    """Seconds between two metric rows."""
    warm_start: PathStr | None = None
    """Checkpoint of an earlier run to start from (same model name and config)."""
    checkpoint_dir: PathStr | None = None
    """Write <checkpoint_dir>/<raw uid>/ checkpoints at intervals and at the end of each run."""
    checkpoint_every_s: PositiveFloat | None = None
    """Seconds between checkpoints; None writes only at the end."""


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Inference(_Section):
    """:class:`~bluesky_jit.inference.Denoiser` settings."""

    infer_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """As train_precision, for the denoiser's copy of the weights."""


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Runtime(_Section):
    """Where and how the run executes: device, seed, threads, backlog (the pipeline's own)."""

    device: str = "cpu"
    """Torch device for reconstruction, training and inference (cpu, cuda)."""
    seed: Annotated[int, Field(strict=True)] = 0
    """Random seed (same seed and settings, same results)."""
    train: Bool = True
    """Train just in time; false reconstructs (and denoises with a warm start) only."""
    trainer_process: Bool = False
    """Train in a process of its own (torch.multiprocessing) instead of a thread (CPU only)."""
    cpu_threads: PositiveInt | None = None
    """CPU threads of the plugin (worker and trainer together); None: the cores of
    the process's CPU affinity less those left to the RunEngine and the detector."""
    train_threads: PositiveInt | None = None
    """Torch threads of the trainer; None: from the CPU budget."""
    borrow_idle_cores: Bool = True
    """In a child process (JitProcess), the trainer (at nice 19) may also run on the
    cores left to the scan, in the time the scan leaves them idle; false keeps it off."""
    infer_threads: PositiveInt | None = None
    """Torch threads of the denoiser; None: from the CPU budget (the worker's threads)."""
    queue_size: PositiveInt = 10_000
    """Documents waiting for the worker thread; beyond it events are dropped (and counted)."""
    pause_training_above: PositiveInt | None = None
    """Frames waiting for the worker above which the trainer pauses (it resumes at
    half of it), so the worker catches up; None: refresh_every."""
    skip_refreshes_above: PositiveInt | None = None
    """Frames waiting above which a due slice refresh is skipped (there is still one
    per rotation, and always one at the end); None: a rotation."""
    pace_guard: Bool = True
    """Training yields the time it would take from the scan (bluesky_jit.budget.PaceGuard)."""
    memory_budget_gb: PositiveFloat | None = None
    """Memory (GB) a run's frames may take; None: a quarter of the machine's memory. Whole
    frames that do not fit are cut to the rows the axial slice needs (binned frames for
    the vertical slices); a scan that does not fit even so is refused."""
    run_timeout_s: PositiveFloat | None = 3600.0
    """Seconds without a document after which an open run is closed as aborted (its
    trainer stopped, its derived stop written); None: wait for the stop forever."""
    copy_keys: tuple[Annotated[str, Field(min_length=1, strict=True)], ...] = (
        "data_session",
        "proposal_id",
        "beamline_id",
    )
    """Keys of the raw run's start document copied into the derived run's (when present),
    so a facility catalog applies the raw run's access rules (data_session) to the results."""


SECTIONS: dict[str, type[_Section]] = {
    "reconstruction": Reconstruction,
    "pairs": Pairs,
    "training": Training,
    "inference": Inference,
    "runtime": Runtime,
}
SECTION_OF: dict[str, str] = {
    f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
}
"""The section of each setting (every name is in exactly one)."""

# What JitConfig.for_dynamic sets, by dose. On the dynamic phantoms the defaults were not
# tuned on, pairs from more rows helped at every dose; at a few hundred photons per pixel,
# 40x40 patches in batches of 16 beat the 20x20 patches in batches of 32 (wider context
# where the noise is strong), and at 1000 photons they lost (README, Measured: dynamic
# phantoms).
DYNAMIC_SETTINGS: dict[str, dict[str, Any]] = {
    "normal": {"neighbourhood_rows": 4},
    "low": {"neighbourhood_rows": 4, "patch_size": 40, "batch_size": 16},
}
DYNAMIC_CHOICES: tuple[str, ...] = ("off", *DYNAMIC_SETTINGS)
"""The ``dynamic`` setting of the command line and settings file: off, or a dose."""


def nest(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Settings given flat, by section, or both, by section (flat keys win).

    Raises
    ------
    ConfigError
        For a name that is no setting, or a section that is not a table.
    """
    out: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for name in SECTIONS:
        value = data.get(name, {})
        if isinstance(value, _Section):
            value = value.model_dump()
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"JitConfig.{name} takes a table of settings ({sorted(_names(name))}); "
                f"got {value!r}."
            )
        out[name].update(value)
    unknown = sorted(k for k in data if k not in SECTIONS and k not in SECTION_OF)
    if unknown:
        raise ConfigError(
            f"Unknown JitConfig setting(s) {unknown}; known settings are {sorted(SECTION_OF)}."
        )
    for key, value in data.items():
        if key in SECTION_OF:
            out[SECTION_OF[key]][key] = value
    return out


def _names(section: str) -> list[str]:
    return [k for k, s in SECTION_OF.items() if s == section]


class JitConfig(BaseModel):
    """Settings of one just-in-time denoising pipeline, a section per stage.

    Defaults follow Graas et al. 2023 where they carry over to a CPU: 20x20 patches,
    Adam with batch size 32, a capacity queue of 320 pairs (the larger of the
    two buffers in Graas et al. 2023, Fig. 10), even/odd Noise2Inverse splits. Where
    the CPU trains ~50 steps/s instead of the paper's GPU, the defaults are the
    settings that met the quality targets in ``benchmarks/learning.py``
    (FBP + 6 dB and TV + 1 dB after 60 s): learning rate 2e-3 (Graas et al. 2023:
    1e-4), random flips and turns of the pairs, an exponential average of the
    weights for inference, bfloat16 where the CPU has it. Build a Table 1
    network of Graas et al. 2023 (``"C16"``, ``"V30"``, ``"Z3"``, ``"T5"``, ...) with
    :meth:`for_variant`.

    Raises
    ------
    ConfigError
        For any bad setting (pydantic's errors are turned into one, naming the
        setting, what came and what is expected).

    Examples
    --------
    >>> cfg = JitConfig(refresh_every=5, training={"learning_rate": 1e-3})
    >>> cfg.reconstruction.refresh_every, cfg.training.learning_rate
    (5, 0.001)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    reconstruction: Reconstruction = Field(default_factory=Reconstruction)
    pairs: Pairs = Field(default_factory=Pairs)
    training: Training = Field(default_factory=Training)
    inference: Inference = Field(default_factory=Inference)
    runtime: Runtime = Field(default_factory=Runtime)

    def __init__(self, **settings: Any) -> None:
        try:
            super().__init__(**settings)
        except ValidationError as error:
            raise _config_error(error) from None

    @_model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        return nest(data) if isinstance(data, Mapping) else data

    @_model_validator(mode="after")
    def _check(self) -> JitConfig:
        from .models import resolve_config  # the registry's tables (no torch)

        t, p = self.training, self.pairs
        if t.batch_size > t.buffer_capacity:
            raise ConfigError(
                f"JitConfig.buffer_capacity ({t.buffer_capacity}) is smaller than "
                f"batch_size ({t.batch_size}); the optimizer could never draw a full "
                "batch. Raise buffer_capacity or lower batch_size."
            )
        model_config = resolve_config(t.model, t.model_config)  # unknown names, bad types
        takes_stacks = "frames" in model_config
        if takes_stacks and p.stack is None:
            raise ConfigError(
                f"Model {t.model!r} takes stacks of {model_config['frames']} slices: set "
                'stack="z" (nearby slices, Zx) or stack="t" (time frames, Tx), or use '
                'JitConfig.for_variant("Z3").'
            )
        if p.stack is not None and not takes_stacks:
            raise ConfigError(
                f"stack={p.stack!r} needs a network on stacks (model='unet3d'); model "
                f"{t.model!r} takes single slices. Set stack=None."
            )
        if p.target == "supervised" and p.stack is not None:
            raise ConfigError(
                f'target="supervised" trains on single slices; got stack={p.stack!r}. Set '
                'stack=None (a 2D network), or use target="noise2inverse" for Zx/Tx stacks.'
            )
        if t.online_strategy == "frozen" and t.warm_start is None:
            raise ConfigError(
                'online_strategy="frozen" runs a pretrained network: set warm_start to the '
                "checkpoint of an earlier run."
            )
        if self.runtime.trainer_process and self.runtime.device != "cpu":
            raise ConfigError(
                f"trainer_process=True trains on the CPU; with device={self.runtime.device!r} "
                "keep the trainer in a thread (trainer_process=False)."
            )
        return self

    def check_here(self) -> None:
        """Raise a ConfigError unless the settings can run on this machine: the
        ``runtime.device`` is there and the ``training.warm_start`` file exists.

        Called where the work is set up (``JitCallback``, ``JitProcess``), so a
        scan never starts with settings that would lose every slice.
        """
        warm_start = self.training.warm_start
        if warm_start is not None and not Path(warm_start).is_file():
            raise ConfigError(
                f"training.warm_start {str(warm_start)!r} is not a file here; expected the "
                "checkpoint of an earlier run (CHECKPOINT_DIR/RAW_UID/latest.pt, written when "
                "checkpoint_dir is set). Check the path, or unset warm_start."
            )
        name = self.runtime.device
        if name == "cpu":
            return  # without importing torch (not in the RunEngine's process)
        import torch

        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(
                f"runtime.device {name!r} is not a torch device; expected 'cpu' or 'cuda' "
                "(or 'cuda:N')."
            ) from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"runtime.device={name!r}, but torch sees no CUDA device on this machine; "
                "use device='cpu' (--device cpu), or a machine with a GPU and a CUDA build of "
                "torch."
            )
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"runtime.device {name!r}: only 'cpu' and 'cuda' are supported.")

    @classmethod
    def for_variant(cls, name: str, **settings: Any) -> JitConfig:
        """Settings for a Table 1 network of Graas et al. 2023 ("C16", "V30", "Z3", "T5", ...).

        Sets ``model``, ``model_config``, ``patch_size`` and ``stack``;
        ``settings`` are the other settings (flat or by section).
        """
        from .models import variant

        given = nest(settings)
        clash = sorted({"model", "model_config", "stack"} & {*given["training"], *given["pairs"]})
        if clash:
            raise ConfigError(
                f"for_variant({name!r}) sets model, model_config and stack itself; got {clash} "
                "too. Leave them out, or build JitConfig(...) directly."
            )
        v = variant(name)
        given["training"] |= {"model": v.model, "model_config": dict(v.config)}
        given["pairs"] = {"patch_size": v.patch_size, **given["pairs"], "stack": v.stack}
        return cls(**given)

    @classmethod
    def for_dynamic(cls, dose: str = "normal", **settings: Any) -> JitConfig:
        """Settings for a sample that changes during the scan (foams, flows, growth).

        ``dose``: ``"normal"`` (pairs from four rows either side of the slice) or
        ``"low"``, for noisy frames (a few hundred photons per pixel): also 40x40
        patches in batches of 16. :data:`DYNAMIC_SETTINGS` holds both; ``settings``
        (flat or by section) win over them. Plan the scan in half turns as well
        (README, "Dynamic samples").
        """
        if dose not in DYNAMIC_SETTINGS:
            raise ConfigError(
                f"for_dynamic(dose={dose!r}): expected one of {list(DYNAMIC_SETTINGS)} "
                "(low: frames of a few hundred photons per pixel)."
            )
        given = nest(settings)
        for key, value in DYNAMIC_SETTINGS[dose].items():
            given[SECTION_OF[key]].setdefault(key, value)
        return cls(**given)

    @property
    def frames(self) -> int:
        """Slices or time frames per network input (1 without a stack)."""
        if self.pairs.stack is None:
            return 1
        from .models import resolve_config

        return int(resolve_config(self.training.model, self.training.model_config)["frames"])

    def to_dict(self) -> dict[str, Any]:
        """The settings by section, JSON-able (the derived run's ``start["config"]``)."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JitConfig:
        """The inverse of :meth:`to_dict`; flat keys (older start documents) work too."""
        return cls(**data)

    def replace(self, **changes: Any) -> JitConfig:
        """A copy with ``changes`` (flat keys or sections, merged into this one's)."""
        base, changes = nest(self.to_dict()), nest(changes)
        return type(self)(**{name: base[name] | changes[name] for name in SECTIONS})


def _config_error(error: ValidationError) -> ConfigError:
    """One ConfigError for pydantic's first error: the setting, what came, what is expected."""
    first = error.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    loc = [str(part) for part in first["loc"] if isinstance(part, str)]
    name = "JitConfig." + ".".join(loc)
    ctx, kind, value = first.get("ctx") or {}, first["type"], first.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return ConfigError(
            f"Unknown JitConfig setting {'.'.join(loc)!r}; known settings of "
            f"[{loc[0]}] are {sorted(_names(loc[0]))}."
        )
    if kind == "literal_error":
        title = _field_title(loc)
        if title is not None:
            return ConfigError(
                f"Unknown {title} {value!r} ({name}); expected one of {ctx.get('expected')}."
            )
    expected = {
        "greater_than_equal": "a positive integer"
        if ctx.get("ge") == 1
        else f"at least {ctx.get('ge')}",
        "greater_than": f"greater than {ctx.get('gt')}",
        "less_than": f"less than {ctx.get('lt')}",
        "less_than_equal": f"at most {ctx.get('le')}",
        "literal_error": f"one of {ctx.get('expected')}",
    }.get(kind) or first["msg"].removeprefix("Input should be ")
    return ConfigError(f"{name} must be {expected}; got {value!r}.")


def _field_title(loc: list[str]) -> str | None:
    if len(loc) != 2 or loc[0] not in SECTIONS:
        return None
    info = SECTIONS[loc[0]].__pydantic_fields__.get(loc[1])
    return info.title if info is not None else None


ONLINE_STRATEGIES: tuple[str, ...] = get_args(OnlineStrategy)
N2I_STRATEGIES: tuple[str, ...] = get_args(N2IStrategy)
PRECISIONS: tuple[str, ...] = get_args(Precision)
