"""Argument checks shared by the rules: each raises InvalidOptionError naming the argument and value."""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.errors import InvalidOptionError
from runtime.options import is_int


def require_int(name: str, value: Any, minimum: int, off_hint: str = "") -> int:
    """Return `value` as an int, or raise if it is not an integer >= minimum."""
    if not is_int(value) or value < minimum:
        raise InvalidOptionError(f"{name}={value!r}: expected an integer >= {minimum}{off_hint}")
    return int(value)


def require_positive_float(name: str, value: Any, off_hint: str = "") -> float:
    """Return `value` as a float, or raise if it is not a finite number > 0."""
    if (is_int(value) or isinstance(value, (float, np.floating))) and np.isfinite(value) and value > 0:
        return float(value)
    raise InvalidOptionError(f"{name}={value!r}: expected a number > 0{off_hint}")


def require_token_ids(name: str, value: Any) -> np.ndarray:
    """Return token ids as a [n] int64 array, or raise if any is not an integer >= 0 (or none is given)."""
    ids = (value,) if is_int(value) else tuple(value)
    if not ids or not all(is_int(t) and t >= 0 for t in ids):
        raise InvalidOptionError(f"{name}={value!r}: expected one or more token ids (integers >= 0)")
    return np.asarray(ids, dtype=np.int64)
