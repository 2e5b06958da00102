"""Argument checks shared by the diffusion modules: fail at construction, name the parameter."""

from __future__ import annotations

import math
from typing import Any


def check_finite(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise naming ``name`` if it is not a finite real."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def check_positive(name: str, value: Any, *, allow_zero: bool = False, allow_inf: bool = False) -> float:
    """Return ``value`` as a float that is > 0 (>= 0 with ``allow_zero``), or raise naming ``name``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if out < 0 or (out == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return out


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (YAML's true/false), or raise naming ``name`` (a string such as
    ``maybe`` or ``0`` would otherwise read as a truth value)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum``, or raise naming ``name``."""
    ok = not isinstance(value, bool)
    try:
        ok = ok and float(value).is_integer()
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
