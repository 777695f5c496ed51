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
