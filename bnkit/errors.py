"""The one exception family bnkit raises, and its warning."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BnkitError(Exception):
    """Base class of every error bnkit raises on bad input or a failed check."""


class SelectorError(BnkitError):
    """A policy selector matched nothing, or named a layer that does not exist."""


class ModelFileError(BnkitError):
    """A model file is missing, corrupt, or not a model bnkit can read."""


class BackendError(BnkitError):
    """The object given is not a model of a supported framework."""


class BnkitWarning(UserWarning):
    """A situation that works but probably not as intended (for example a stale compile)."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Returns 'closest: a, b, c' naming the choices nearest to `word`, or ''."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.4)
    if not matches:
        return ""
    return "closest: " + ", ".join(matches)


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """`value` as an int of at least `minimum`; BnkitError naming `name` otherwise (a
    string such as '32' is refused, not compared with numbers deep inside)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BnkitError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})")
    if int(value) < minimum:
        raise BnkitError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_str(value: object, name: str, example: str) -> str:
    """`value` as a str; BnkitError naming `name` otherwise."""
    if not isinstance(value, str):
        raise BnkitError(
            f"{name} must be a string, got {value!r} ({type(value).__name__}); e.g. "
            f"{name}={example!r}"
        )
    return value


def check_rate(value: object, name: str = "the learning rate") -> float:
    """`value` as a positive, finite float; BnkitError otherwise."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BnkitError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise BnkitError(f"{name} must be a positive number, got {value}")
    return float(value)
