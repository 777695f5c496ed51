"""Framework backends, each imported only when a model of its framework is seen."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from bnkit.backends.base import Backend
from bnkit.errors import BackendError, ModelFileError

_FILE_FORMATS = {".keras": "keras"}
"""Model-file suffix -> the backend package that reads it."""


def get_backend(model: Any) -> Backend:
    """The backend for `model`, chosen among frameworks already imported (never importing
    one the user has not loaded).

    Keras is tried first: under KERAS_BACKEND=torch every Keras layer is also
    a torch.nn.Module.
    """
    if "keras" in sys.modules:
        from bnkit.backends.keras import core as keras_core

        if keras_core.is_model(model):
            return keras_core.KerasBackend()
    if "torch" in sys.modules:
        from bnkit.backends.torch import core as torch_core

        if torch_core.is_model(model):
            return torch_core.TorchBackend()
    raise BackendError(
        f"expected a Keras 3 model or a torch.nn.Module, got "
        f"{type(model).__module__}.{type(model).__name__}"
    )


def _files(path: Path) -> ModuleType:
    package = _FILE_FORMATS.get(path.suffix)
    if package is None:
        if not path.exists():
            raise ModelFileError(f"{path}: no such file; check the path")
        raise BackendError(
            f"{path}: unsupported model file type {path.suffix or '(none)'!r}; bnkit reads "
            "Keras 3 '.keras' archives (re-save with model.save('model.keras'))"
        )
    return importlib.import_module(f"bnkit.backends.{package}.files")


def check_model_file(path: Path) -> Path:
    """Checks a model file without importing any framework; raises ModelFileError."""
    return _files(path).check(path)  # type: ignore[no-any-return]


def layer_names(path: Path) -> set[str]:
    """The layer names a model file holds, read without importing any framework."""
    return _files(path).layer_names(path)  # type: ignore[no-any-return]


def backend_for_file(path: Path) -> Backend:
    """The backend that reads model files with `path`'s suffix (imports its framework)."""
    package = _files(path).__name__.rsplit(".", 2)[-2]
    core = importlib.import_module(f"bnkit.backends.{package}.core")
    return core.backend()  # type: ignore[no-any-return]
