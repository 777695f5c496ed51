"""The `bnkit` command: parse, call one library function, render. One module per
command (or per small group of commands), the option sets and helpers they share
declared once (`_options`, `_run`), the group in `_app`, the entry point in `_main`."""

from __future__ import annotations

from bnkit.cli import adapt, check, compare, demo, export, freeze, inspect, tta  # noqa: F401
from bnkit.cli._app import MODEL_HELP, cli
from bnkit.cli._main import RENAMED, _renamed, main

__all__ = ["MODEL_HELP", "RENAMED", "_renamed", "cli", "main"]
