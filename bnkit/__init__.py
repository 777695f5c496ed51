"""bnkit: BatchNorm made correct, visible and decidable in transfer learning."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

from bnkit.check import CheckReport, Finding, check
from bnkit.compare import CompareResult, Strategy, compare
from bnkit.deploy import ExportError, ExportReport, FoldResult, export, fold
from bnkit.errors import BackendError, BnkitError, BnkitWarning, ModelFileError, SelectorError
from bnkit.freeze import freeze, recompile, unfreeze
from bnkit.policy import (
    AllBN,
    AllLayers,
    Block,
    BNState,
    Depth,
    FromLayer,
    Glob,
    IndexRange,
    LayerType,
    Mode,
    Plan,
    Policy,
    Regex,
    Rule,
)
from bnkit.report import Report, inspect
from bnkit.stats import AdaptReport, ShiftReport, adapt, shift
from bnkit.tta import TTAReport, tta
from bnkit.watch import WatchReport, watch

__version__ = "0.1.0"

__all__ = [
    "AdaptReport",
    "AllBN",
    "AllLayers",
    "BNState",
    "CheckReport",
    "CompareResult",
    "BackendError",
    "Block",
    "BnkitError",
    "BnkitWarning",
    "ExportError",
    "ExportReport",
    "Finding",
    "FoldResult",
    "Depth",
    "FromLayer",
    "Glob",
    "IndexRange",
    "LayerType",
    "Mode",
    "ModelFileError",
    "Plan",
    "Policy",
    "Regex",
    "Report",
    "Rule",
    "SelectorError",
    "Strategy",
    "ShiftReport",
    "TTAReport",
    "WatchReport",
    "adapt",
    "check",
    "compare",
    "export",
    "fold",
    "freeze",
    "inspect",
    "shift",
    "tta",
    "recompile",
    "unfreeze",
    "watch",
]


class _RegisterAfterKerasImport(importlib.abc.MetaPathFinder):
    """Registers bnkit's Keras layers as soon as the user imports keras.

    bnkit never imports a framework the user has not loaded, yet a model saved
    with pinned BN layers must reload with plain `keras.models.load_model`.
    """

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


if "keras" in sys.modules:
    importlib.import_module("bnkit.backends.keras.core")
else:
    sys.meta_path.insert(0, _RegisterAfterKerasImport())
