"""How loosely typed values become numbers: the one rule for whole numbers, for real numbers, and how a number is
written back (a leaf: no torch, no other room)."""

from __future__ import annotations

import math
from typing import Any


def whole_number(name: str, value: Any) -> int:
    """The one rule for whole-number knobs (frames, steps, seed, sizes, shift, fps, mask pixels).

    ``7``, ``7.0`` and ``"7"`` are 7; a fraction (``7.5``), a non-finite value, a boolean or text that is not a
    number is refused with a ``ValueError`` naming ``name`` -- never rounded silently.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    elif isinstance(value, float) or (hasattr(value, "__float__") and not isinstance(value, complex)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    else:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def real_number(name: str, value: Any) -> float:
    """A finite number (``2``, ``2.5``, ``"2.5"``); booleans, text that is not a number, NaN and infinity are
    refused with a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or isinstance(value, complex):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def number_text(value: float) -> str:
    """A number (a range bound as people write it: 4294967295, 0.5 -- never 4.29497e+09."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
