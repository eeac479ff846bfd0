"""The numbers gradguard's arguments take, read alike everywhere: a real Python/numpy number, or
a zero-dimensional numpy array of one (torch's clip takes those: it calls ``float()`` on them),
never a bool; and its float value, an integer beyond float's range refused by name (``float``
raised a bare ``OverflowError``)."""
from __future__ import annotations

import math
import numbers

from gradguard.errors import ArgumentTypeError


def is_bool(value) -> bool:
    """A bool, or numpy's (np.True_), not 0/1 or a string: bool("false") is True."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def real_number(value):
    """`value` as a real number (a 0-dim numpy array unwrapped), or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return value
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and value.dtype.kind in "fiu":
        return value.item()
    return None


def float_or_inf(value) -> float:
    """float(value) of a real number, an integer beyond float's range as +-inf (above any bound)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def to_float(value, what: str) -> float:
    """float(value) of a real number; `what` names the argument in the error."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{what} is too large for a float, got an integer of {int(value).bit_length()} bits") from None


def check_int(value, what: str, low: int, high: int | None = None, why: str = "") -> int:
    """An integer argument (numpy integers too, never a bool) in [low, high]: the wrong kind of
    object is an ArgumentTypeError (a TypeError, and a ValueError as before), a value out of
    range a ValueError. `what` names the argument in the error."""
    want = f">= {low}" if high is None else f"in [{low}, {high}]{why}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{what} must be an int {want}, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{what} must be an int {want}, got {value!r}")
    return int(value)
