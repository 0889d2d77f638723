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

    Defaults follow seed 000 (Hendriksen-style JITLearn set-up): 20x20 patches,
    Adam with learning rate 1e-4, batch size 32, a capacity queue of 320 pairs
    (the larger of the two buffers in seed 000, Fig. 10).
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

    # learning
    model: str = "unet"
    model_config: dict[str, Any] = field(default_factory=dict)
    buffer_capacity: int = 320
    batch_size: int = 32
    learning_rate: float = 1e-4
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
    "patch_size",
    "pairs_per_refresh",
    "holdout_per_refresh",
    "buffer_capacity",
    "batch_size",
    "holdout_size",
    "queue_size",
}
