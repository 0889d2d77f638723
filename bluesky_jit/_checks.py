"""Argument checks of the classes a user may build directly (settings files and
flags are validated by :mod:`bluesky_jit.config`): one message per constraint."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from .errors import ConfigError


def check_int(
    owner: str, key: str, value: Any, low: int = 1, *, high: int | None = None, none: bool = False
) -> None:
    """Raise a ConfigError unless ``value`` is an integer in ``[low, high]`` (or None, with
    ``none``)."""
    if none and value is None:
        return
    if (
        not isinstance(value, Integral)
        or isinstance(value, bool)
        or not low <= value <= (high if high is not None else value)
    ):
        limits = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(
            f"{owner} {key} must be an integer {limits}{' or None' if none else ''}; got {value!r}."
        )


def check_positive(owner: str, key: str, value: Any, *, none: bool = False) -> None:
    """Raise a ConfigError unless ``value`` is a finite number > 0 (or None, with ``none``)."""
    if none and value is None:
        return
    if (
        not isinstance(value, Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{owner} {key} must be a positive number{' or None' if none else ''}; got {value!r}."
        )
