"""Checkpoints: registry name + config + weights, loaded safely.

A checkpoint is a plain dict written with :func:`torch.save`::

    {"format": "bluesky_jit.checkpoint/1", "name": "unet", "config": {...},
     "state_dict": {...}, "extra": {...}}

and read back with ``torch.load(..., weights_only=True)``, which unpickles
only tensors and plain containers, so a checkpoint from elsewhere cannot run
code. The network is rebuilt from ``name`` and ``config`` through the model
registry; ``extra`` carries plain data such as the trainer's normaliser and
step count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from . import build_model, resolve_config

FORMAT = "bluesky_jit.checkpoint/1"
_KEYS = ("format", "name", "config", "state_dict", "extra")


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    name: str,
    config: Mapping[str, Any],
    model: nn.Module | Mapping[str, torch.Tensor],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (a temporary file, then a rename).

    Parameters
    ----------
    path : path-like
        File to write; parent folders are created.
    name : str
        Registry name of the network (see :func:`bluesky_jit.models.available_models`).
    config : mapping
        Its plain-dict config; stored resolved (defaults filled in).
    model : torch.nn.Module or mapping of str to Tensor
        The network, or a state dict of it. Tensors are stored on the CPU.
    extra : mapping, optional
        Plain data only: None, bool, int, float, str, tensors, and lists,
        tuples and str-keyed dicts of these.

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    ConfigError
        For an unknown name, an invalid config, or ``extra`` that is not plain data.
    """
    resolved = resolve_config(name, config)
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    state = model.state_dict() if isinstance(model, nn.Module) else model
    payload = {
        "format": FORMAT,
        "name": name,
        "config": resolved,
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in state.items()},
        "extra": extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    expected_name: str | None = None,
    expected_config: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network from a checkpoint (weights only, no code unpickled).

    Parameters
    ----------
    path : path-like
    expected_name : str, optional
        Refuse checkpoints of another network family.
    expected_config : mapping, optional
        Refuse checkpoints whose resolved config differs (e.g. another
        ``features``), as when warm-starting a configured pipeline.
    map_location : str or torch.device
        Where the weights are loaded.

    Returns
    -------
    model : torch.nn.Module
        Built with :func:`bluesky_jit.models.build_model` and the stored weights.
    extra : dict
        The checkpoint's plain extra data.

    Raises
    ------
    CheckpointError
        If the file is missing, not a bluesky_jit checkpoint (garbage, tampered,
        another format), or for another architecture than expected.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint file at {str(path)!r}; expected a file written by "
            "save_checkpoint() or Trainer.save(). Check the path."
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable bluesky_jit checkpoint ({type(exc).__name__}: "
            f"{_first_line(exc)}). Expected a file written by save_checkpoint(); it may be "
            "truncated, from another program, or contain objects other than weights."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a {FORMAT!r} checkpoint (got format {got!r}). Expected a "
            "dict written by bluesky_jit's save_checkpoint()."
        )
    missing = [key for key in _KEYS if key not in payload]
    if missing:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} lacks {missing}; expected the keys {list(_KEYS)}. "
            "The file was altered or written by an incompatible version."
        )
    name, config, state, extra = (payload[k] for k in ("name", "config", "state_dict", "extra"))
    if expected_name is not None and name != expected_name:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds a {name!r} network; expected {expected_name!r}. "
            f"Use a {expected_name!r} checkpoint, or set the model to {name!r}."
        )
    if not isinstance(state, dict) or not isinstance(extra, dict):
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has a state_dict of type {type(state).__name__} and "
            f"extra of type {type(extra).__name__}; expected two dicts. The file was altered."
        )
    try:
        resolved = resolve_config(name, config)
        model = build_model(name, resolved)
    except ConfigError as exc:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} names a network this version cannot build: {exc}"
        ) from exc
    if expected_config is not None:
        wanted = resolve_config(name, expected_config)
        if wanted != resolved:
            diff = {k: (resolved[k], wanted[k]) for k in wanted if resolved.get(k) != wanted[k]}
            raise CheckpointError(
                f"Checkpoint {str(path)!r} was trained with another {name!r} config; "
                f"(checkpoint, expected) differ in {diff}. Use a matching checkpoint or "
                "configure the model like the checkpoint."
            )
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"The weights in {str(path)!r} do not fit the {name!r} network of config "
            f"{resolved}: {_first_line(exc)}. The checkpoint was altered or is for "
            "another architecture."
        ) from exc
    return model.to(map_location), extra


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"Checkpoint {where} has a key {key!r} of type {type(key).__name__}; "
                    "expected str keys."
                )
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise ConfigError(
        f"Checkpoint {where} is a {type(value).__name__}; expected plain data (None, bool, int, "
        "float, str, Tensor, list, tuple, dict), which loads with weights_only=True. Convert "
        "it, e.g. with .tolist() or float()."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
