"""Framework backends, each imported only when a model of its framework is seen."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bnkit._imports import installed
from bnkit.backends.base import Backend
from bnkit.backends.torch import files as torch_files
from bnkit.errors import BackendError, BnkitError, ModelFileError
from bnkit.files import atomic_path

_FILE_FORMATS = {".keras": "keras"}
"""Model-file suffix -> the backend package that reads it."""
_MODEL_SUFFIX = {"keras": ".keras", "torch": ".pt"}
"""Backend package -> the suffix of the model files the command line writes for it."""


def get_backend(model: Any) -> Backend:
    """The backend for `model`, chosen among frameworks already imported (never importing
    one the user has not loaded).

    Keras is tried first: under KERAS_BACKEND=torch every Keras layer is also
    a torch.nn.Module.
    """
    if "keras" in sys.modules:
        from bnkit.backends.keras import backend as keras_backend
        from bnkit.backends.keras.core import is_model as is_keras_model

        if is_keras_model(model):
            return keras_backend.backend()
    if "torch" in sys.modules:
        from bnkit.backends.torch import backend as torch_backend
        from bnkit.backends.torch.modules import is_model

        if is_model(model):
            return torch_backend.backend()
    if _exported_program(model):
        raise BackendError(
            "got a torch.export ExportedProgram: bnkit.check and bnkit.inspect read it; "
            "adapt, shift and fold take its graph, program.module(); freeze, tta and "
            "compare need the module it was exported from"
        )
    raise BackendError(
        f"expected a Keras 3 model or a torch.nn.Module, got "
        f"{type(model).__module__}.{type(model).__name__}"
    )


def _exported_program(model: Any) -> bool:
    exported = sys.modules.get("torch.export.exported_program")
    return exported is not None and isinstance(model, exported.ExportedProgram)


def readable(model: Any) -> Any:
    """`model`, or for a `torch.export` program the module it runs as
    (`ExportedProgram.module()`), where `check` and `inspect` read its BN operators."""
    return model.module() if _exported_program(model) else model


def _files(path: Path) -> ModuleType:
    package = _FILE_FORMATS.get(path.suffix)
    if package is None and torch_files.is_spec(str(path)):
        package = "torch"
    if package is None:
        if not path.exists():
            raise ModelFileError(
                f"{path}: no such file; give a '.keras' file or a PyTorch model spec "
                "(torchvision:resnet18, timm:NAME, package.module:factory, file.py:factory)"
            )
        legacy = (
            " (a legacy HDF5 Keras model: load it with Keras and re-save it as '.keras')"
            if path.suffix == ".h5"
            else ""
        )
        raise BackendError(
            f"{path}: unsupported model file type {path.suffix or '(none)'!r}{legacy}; bnkit "
            "reads Keras 3 '.keras' archives and PyTorch model specs (torchvision:resnet18 "
            "--weights ckpt.pt)"
        )
    return importlib.import_module(f"bnkit.backends.{package}.files")


def framework_of(path: Path) -> str:
    """The framework that reads the model `path` names (`keras` or `torch`), known without
    importing it."""
    return _files(path).__name__.rsplit(".", 2)[-2]


KERAS_BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy"}
"""Keras backends bnkit can run on, and the package each needs."""
_PIP = {"tensorflow": "tensorflow", "jax": "'jax[cpu]'", "torch": "torch", "keras": "keras"}


def keras_backend_choice() -> tuple[str, str]:
    """The Keras backend a new process will pick, and where the choice comes from
    (KERAS_BACKEND, keras.json, or Keras' default), known without importing Keras."""
    import json
    import os

    name = os.environ.get("KERAS_BACKEND")
    if name:
        return name, "KERAS_BACKEND"
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        chosen = json.loads((home / "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        chosen = None
    if isinstance(chosen, str) and chosen:
        return chosen, str(home / "keras.json")
    return "tensorflow", "Keras' default with KERAS_BACKEND unset"


def check_framework(framework: str) -> None:
    """Raises BackendError, in one line naming the package or variable to set, when the
    framework that reads a model (`keras` with its backend, or `torch`) cannot start here."""

    def missing(package: str) -> bool:
        return not installed(package)

    if framework == "torch" and missing("torch"):
        raise BackendError(
            "PyTorch model specs need torch, which is not installed: pip install torch"
        )
    if framework != "keras":
        return
    if missing("keras"):
        raise BackendError(
            "'.keras' models need Keras 3, which is not installed: pip install keras"
        )
    name, source = keras_backend_choice()
    if "keras" in sys.modules:
        return
    available = [b for b, pkg in KERAS_BACKENDS.items() if b != "numpy" and not missing(pkg)]
    choose = f"set KERAS_BACKEND to an installed one ({', '.join(available) or 'none'})"
    if name not in KERAS_BACKENDS:
        raise BackendError(
            f"Keras backend {name!r} (from {source}) is not one bnkit runs on: {choose}"
        )
    if missing(KERAS_BACKENDS[name]):
        raise BackendError(
            f"Keras' backend is {name} ({source}), which is not installed: pip install "
            f"{_PIP.get(name, name)}, or {choose}"
        )


def check_model_file(path: Path) -> Path:
    """Checks a model file without importing any framework; raises ModelFileError."""
    return _files(path).check(path)  # type: ignore[no-any-return]


def layer_names(path: Path) -> set[str] | None:
    """The layer names a model file holds, read without importing any framework (None
    when only building the model tells)."""
    return _files(path).layer_names(path)  # type: ignore[no-any-return]


def model_suffix(path: Path) -> str:
    """The suffix of the model file the command line writes for the model `path` names
    (`.keras`, or `.pt` for a PyTorch state_dict), known without importing a framework."""
    return _MODEL_SUFFIX[framework_of(path)]


def backend_for_file(path: Path) -> Backend:
    """The backend that reads model files with `path`'s suffix (imports its framework)."""
    module = importlib.import_module(f"bnkit.backends.{framework_of(path)}.backend")
    return module.backend()  # type: ignore[no-any-return]


def check_model(
    path: Path, args: str | None = None, weights: Path | None = None
) -> dict[str, Any] | None:
    """Checks the model `path` names, its factory's arguments (JSON) and its weights file
    as far as can be done without importing a framework; returns the parsed arguments
    (None for a model file)."""
    files = _files(path)
    if (args is not None or weights is not None) and not hasattr(files, "parse_args"):
        raise BackendError(
            f"{path}: --args and --weights are for PyTorch model specs; a Keras file holds "
            "its weights"
        )
    files.check(path)
    if args is None and weights is None:
        return None
    if weights is not None:
        files.check_weights(weights)
    return files.parse_args(args)  # type: ignore[no-any-return]


def load_model(path: Path, args: str | None = None, weights: Path | None = None) -> Any:
    """Checks, then loads or builds, the model `path` names: a model file, or a PyTorch
    model spec with its factory's arguments (JSON) and a state_dict file."""
    kwargs = check_model(path, args, weights)
    if kwargs is None:
        return backend_for_file(path).load(path)
    return backend_for_file(path).load(path, kwargs, weights)  # type: ignore[call-arg]


def save_model(model: Any, out: Path, sidecars: dict[Path, str] | None = None) -> None:
    """Saves `model` to `out` atomically with its backend, after checking that every
    weight and statistic is finite (bnkit never writes a model holding NaN or inf).
    `sidecars` (path: text, such as a plan beside a state_dict) are written with it: all
    of them are in place, or none."""
    backend = get_backend(model)
    check_finite_model(backend, model)
    with contextlib.ExitStack() as stack:
        staged = {path: stack.enter_context(atomic_path(path)) for path in sidecars or {}}
        for path, text in (sidecars or {}).items():
            staged[path].write_text(text)
        with atomic_path(out) as tmp:
            backend.save(model, tmp)


def check_finite_model(backend: Any, model: Any) -> None:
    """Raises BnkitError naming the first layer holding a NaN or inf weight or statistic."""
    snap = backend.snapshot(model)
    for group in (snap.weights, snap.stats):
        for path, values in group.items():
            for name, value in values.items():
                if not np.isfinite(value).all():
                    raise BnkitError(
                        f"{path}: {name} holds {int((~np.isfinite(value)).sum())} NaN or inf "
                        "values; bnkit will not write this model (check the data's scale and "
                        "the learning rate)"
                    )
