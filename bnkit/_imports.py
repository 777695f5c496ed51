"""The import hooks `import bnkit` installs. bnkit imports no framework itself; these
act only when the user's program (or a model being loaded) imports one.

- Keras: bnkit's BN layer is registered with Keras as soon as `keras` is imported, so
  that a model saved with pinned BN layers reloads with plain `keras.models.load_model`.
- triton after TensorFlow: torch 2.14's bundled triton crashes the process
  (segmentation fault) when it is first imported after TensorFlow 2.21, which happens
  as soon as `torch._dynamo` is imported (by `torch.optim`, `torch.export`, Keras'
  torch backend) in a process that loaded TensorFlow first, as notebooks with both
  frameworks do. Once TensorFlow is loaded, importing triton raises ImportError
  instead; torch then runs as on a machine without triton (CPU code is unaffected;
  `torch.compile` has no GPU kernels in that process).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

TRITON_REFUSED = (
    "triton is not imported after TensorFlow (bnkit): torch 2.14's triton crashes the "
    "process there; import torch._dynamo before TensorFlow to keep it"
)


class _RegisterAfterKerasImport(importlib.abc.MetaPathFinder):
    """Registers bnkit's Keras layers as soon as the user imports keras."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            importlib.import_module("bnkit.backends.keras.core")

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


class _Refused(importlib.abc.Loader):
    def create_module(self, spec: Any) -> ModuleType:
        raise ImportError(TRITON_REFUSED, name=spec.name)

    def exec_module(self, module: ModuleType) -> None:  # pragma: no cover - never reached
        raise ImportError(TRITON_REFUSED)


class _NoTritonAfterTensorFlow(importlib.abc.MetaPathFinder):
    """Refuses the first import of triton once TensorFlow is loaded."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "triton" or "tensorflow" not in sys.modules:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Refused())


def install() -> None:
    """Installs both hooks (once)."""
    if not any(isinstance(f, _NoTritonAfterTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoTritonAfterTensorFlow())
    if "keras" in sys.modules:
        importlib.import_module("bnkit.backends.keras.core")
    elif not any(isinstance(f, _RegisterAfterKerasImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterKerasImport())


def installed(package: str) -> bool:
    """Whether `package` can be imported, known without importing it (a package blocked
    with `sys.modules[name] = None` counts as missing)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False
