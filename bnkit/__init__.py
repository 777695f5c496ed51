"""bnkit: BatchNorm made correct, visible and decidable in transfer learning."""

from __future__ import annotations

# _launch before the rest: a Ctrl-C while the command starts exits 130 (see its docstring)
from bnkit import _imports, _launch  # noqa: F401
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

__version__ = "0.2.0"
"""The one place the version is written (pyproject.toml reads it from here)."""

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


_imports.install()
