"""Denoising networks, chosen by name with a plain-dict config.

Each network family lives in its own module, which defines ``DEFAULTS`` (the
full config with its default values) and ``build(config) -> nn.Module``. The
registry below names the families; importing this package imports neither
torch nor any family module (they load on first use).

Examples
--------
>>> from bluesky_jit.models import build_model
>>> model = build_model("unet", {"features": 16}, seed=0)  # the C16 network of Graas et al. 2023
>>> model.model_name, model.model_config["features"]
('unet', 16)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ScanDataError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "MODELS",
    "VARIANTS",
    "ModelFamily",
    "Variant",
    "available_models",
    "build_model",
    "check_batch",
    "check_counts",
    "check_dilations",
    "check_reals",
    "default_config",
    "describe_model",
    "resolve_config",
    "variant",
]


@dataclass(frozen=True)
class ModelFamily:
    """One registered network family.

    Parameters
    ----------
    name : str
        Registry name, as in ``JitConfig.model``.
    module : str
        Importable module defining ``DEFAULTS`` and ``build(config)``.
    summary : str
        One line for ``bluesky-jit`` help texts.
    """

    name: str
    module: str
    summary: str

    def load(self) -> ModuleType:
        """Import the family module."""
        return importlib.import_module(self.module)


MODELS: Mapping[str, ModelFamily] = MappingProxyType(
    {
        "unet": ModelFamily(
            "unet",
            "bluesky_jit.models.unet",
            "Standard U-Net of Graas et al. 2023: 3 levels, 8 features doubling per level, "
            "strided-conv down, transposed-conv up",
        ),
        "unet3d": ModelFamily(
            "unet3d",
            "bluesky_jit.models.unet3d",
            "Zx / Tx networks of Graas et al. 2023: the Standard U-Net with 3D convolutions on a "
            "stack of `frames` slices or time frames, predicting the middle one",
        ),
        "msdnet": ModelFamily(
            "msdnet",
            "bluesky_jit.models.msdnet",
            "Mixed-scale dense network (Pelt and Sethian 2018): dilated 3x3 layers, each "
            "fed by all earlier ones",
        ),
        "tunet": ModelFamily(
            "tunet",
            "bluesky_jit.models.tunable_unet",
            "Tunable U-Net of DLSIA (Roberts et al. 2024): depth, base channels, growth rate, "
            "hidden rate",
        ),
        "smsnet": ModelFamily(
            "smsnet",
            "bluesky_jit.models.smsnet",
            "Sparse mixed-scale network of DLSIA (Roberts et al. 2024): a random sparse graph of "
            "dilated convolutions, drawn from graph_seed",
        ),
    }
)
"""Registered network families by name."""


@dataclass(frozen=True)
class Variant:
    """A named network of Table 1 of Graas et al. 2023: a model and how its pairs are made.

    Parameters
    ----------
    model : str
        Registry name.
    config : mapping
        Model settings that differ from the family defaults.
    patch_size : int
        Side of the training patches (Vx: ``x``).
    stack : {None, "z", "t"}
        Input stack: None for single slices, ``"z"`` for nearby slices (Zx),
        ``"t"`` for time frames (Tx); the target is the middle one.
    frames : int
        Slices or frames in the stack (1 without a stack).
    """

    model: str
    config: Mapping[str, Any]
    patch_size: int = 20
    stack: str | None = None
    frames: int = 1


VARIANTS: Mapping[str, Variant] = MappingProxyType(
    {
        # Graas et al. 2023, Table 1 and "Results II": the Standard network trains on 20x20 patches;
        # Cx: x feature maps after the first layer; Vx: x-by-x patches; Zx: x nearby
        # slices; Tx: x time frames, middle frame as target (3D convolutions for both).
        "standard": Variant("unet", {}),
        "C16": Variant("unet", {"features": 16}),
        "C32": Variant("unet", {"features": 32}),
        "V30": Variant("unet", {}, patch_size=30),
        "V60": Variant("unet", {}, patch_size=60),
        "V150": Variant("unet", {}, patch_size=150),
        "Z3": Variant("unet3d", {"frames": 3}, stack="z", frames=3),
        "Z5": Variant("unet3d", {"frames": 5}, stack="z", frames=5),
        "Z7": Variant("unet3d", {"frames": 7}, stack="z", frames=7),
        "T3": Variant("unet3d", {"frames": 3}, stack="t", frames=3),
        "T5": Variant("unet3d", {"frames": 5}, stack="t", frames=5),
        "T7": Variant("unet3d", {"frames": 7}, stack="t", frames=7),
    }
)
"""The Table 1 networks of Graas et al. 2023 by name (``variant("Z7")``)."""


def variant(name: str) -> Variant:
    """A Table 1 network of Graas et al. 2023 by name (see :data:`VARIANTS`).

    Raises
    ------
    ConfigError
        For an unknown name.
    """
    found = VARIANTS.get(name) if isinstance(name, str) else None
    if found is None:
        raise ConfigError(
            f"Unknown variant {name!r} (Table 1 of Graas et al. 2023); "
            f"known variants are {list(VARIANTS)}."
        )
    return found


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(MODELS)


def default_config(name: str) -> dict[str, Any]:
    """The full default config of a family (a fresh copy)."""
    return dict(_family(name).load().DEFAULTS)


def resolve_config(name: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fill in defaults and check the types of a plain-dict model config.

    Parameters
    ----------
    name : str
        A name from :func:`available_models`.
    config : mapping, optional
        Settings to override; unknown keys and wrong types are errors.

    Returns
    -------
    dict
        Every setting of the family, ready to store in a checkpoint or a start
        document.

    Raises
    ------
    ConfigError
        For an unknown name, an unknown key or a value of the wrong type.
    """
    defaults = default_config(name)
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"The config of model {name!r} must be a dict; got {type(config).__name__}. "
            f"Pass e.g. {defaults!r}."
        )
    unknown = sorted(str(k) for k in config if k not in defaults)
    if unknown:
        raise ConfigError(
            f"Unknown setting(s) {unknown} for model {name!r}; known settings are "
            f"{sorted(defaults)}."
        )
    resolved = dict(defaults)
    for key, value in config.items():
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(
                f"Model {name!r} setting {key!r} must be of type {type(default).__name__}; got "
                f"{value!r} ({type(value).__name__}). The default is {default!r}."
            )
        resolved[key] = value
    return resolved


def build_model(
    name: str, config: Mapping[str, Any] | None = None, *, seed: int | None = None
) -> nn.Module:
    """Build a network by registry name from a plain-dict config.

    Parameters
    ----------
    name : str
        A name from :func:`available_models`.
    config : mapping, optional
        Settings overriding the family defaults (see :func:`default_config`).
    seed : int, optional
        Seed of the weight initialisation, applied in a forked RNG so the
        global torch RNG is left untouched.

    Returns
    -------
    torch.nn.Module
        With attributes ``model_name`` and ``model_config`` (the resolved
        config), which checkpoints record.

    Raises
    ------
    ConfigError
        For an unknown name or an invalid config.
    """
    resolved = resolve_config(name, config)
    family = _family(name)
    module = family.load()
    if seed is None:
        model = module.build(resolved)
    else:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = module.build(resolved)
    model.model_name = name
    model.model_config = resolved
    return model


def describe_model(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The registry name and resolved config of a model made by :func:`build_model`.

    Raises
    ------
    ConfigError
        If the model was not made by :func:`build_model`.
    """
    name = getattr(model, "model_name", None)
    config = getattr(model, "model_config", None)
    if not isinstance(name, str) or not isinstance(config, dict):
        raise ConfigError(
            f"The {type(model).__name__} carries no registry name and config; expected a "
            "model made by bluesky_jit.models.build_model(name, config), which checkpoints "
            "need to rebuild it."
        )
    return name, dict(config)


def check_counts(model: str, defaults: Mapping[str, Any], low: int = 1, **values: Any) -> None:
    """Raise a ConfigError unless every value is an integer >= ``low`` (layers, channels, ...)."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(
                f"{model} {key} must be an integer >= {low}; got {value!r}. "
                f"The default is {defaults.get(key, 1)!r}."
            )


def check_reals(
    model: str, defaults: Mapping[str, Any], low: float, high: float, **values: Any
) -> None:
    """Raise a ConfigError unless every value is a number in ``[low, high]`` (``low`` < 0:
    any number > 0)."""
    for key, value in values.items():
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not real or not (value > 0 if low < 0 else low <= value <= high):
            expected = "> 0" if low < 0 else f"in [{low}, {high}]"
            raise ConfigError(
                f"{model} {key} must be a number {expected}; got {value!r}. "
                f"The default is {defaults[key]!r}."
            )


def check_dilations(model: str, dilations: Any, hint: str = "") -> None:
    """Raise a ConfigError unless ``dilations`` is a non-empty list of integers >= 1."""
    if (
        not isinstance(dilations, (list, tuple))
        or not dilations
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilations)
    ):
        raise ConfigError(
            f"{model} dilations must be a non-empty list of integers >= 1; got {dilations!r}."
            + hint
        )


def check_batch(model: str, x: torch.Tensor, in_channels: int) -> None:
    """Raise a ScanDataError unless ``x`` is a batch of shape (B, in_channels, H, W)."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ScanDataError(
            f"{model} got an input of shape {tuple(x.shape)}; expected (B, {in_channels}, H, W)."
        )


def _family(name: str) -> ModelFamily:
    family = MODELS.get(name) if isinstance(name, str) else None
    if family is None:
        raise ConfigError(
            f"Unknown model {name!r}; known models are {available_models()}. "
            "Pass one of them as JitConfig(model=...)."
        )
    return family
