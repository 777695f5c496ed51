"""Framework adapters, each imported only when a model of its framework is seen."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bnkit.backends.base import Backend
from bnkit.errors import BackendError

KERAS_SUFFIXES = (".keras",)


def get_backend(model: Any) -> Backend:
    """The backend for `model`, chosen among frameworks already imported (never importing
    one the user has not loaded).

    Keras is tried first: under KERAS_BACKEND=torch every Keras layer is also
    a torch.nn.Module.
    """
    if "keras" in sys.modules:
        from bnkit.backends import keras as keras_backend

        if keras_backend.is_model(model):
            return keras_backend.KerasBackend()
    if "torch" in sys.modules:
        from bnkit.backends import torch as torch_backend

        if torch_backend.is_model(model):
            return torch_backend.TorchBackend()
    raise BackendError(
        f"expected a Keras 3 model or a torch.nn.Module, got "
        f"{type(model).__module__}.{type(model).__name__}"
    )


def require_keras(backend: Backend, what: str) -> None:
    """Raises BackendError when `what` is asked of a model that is not a Keras model."""
    if not backend.name.startswith("keras"):
        raise BackendError(
            f"{what} works on Keras 3 models; for PyTorch modules bnkit offers inspect, "
            "freeze, unfreeze, watch, adapt and shift"
        )


def backend_for_file(path: Path) -> Backend:
    """The backend that reads model files with `path`'s suffix."""
    if path.suffix in KERAS_SUFFIXES:
        from bnkit.backends import keras as keras_backend

        return keras_backend.KerasBackend()
    raise BackendError(
        f"{path}: unsupported model file type {path.suffix or '(none)'!r}; "
        "bnkit reads Keras 3 '.keras' archives (re-save with model.save('model.keras'))"
    )
