"""The `bnkit` command group, its consoles (stdout and stderr), exit codes, the bounds
of counts and sizes, and the epilog of examples every command shows."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click
from rich.console import Console

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


PIPE_WIDTH = 160  # rich assumes 80 columns when stdout is not a terminal


_out = Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


_err = Console(stderr=True)


MODES = ["frozen", "affine", "train", "adapt"]


FRAMEWORK_CHOICE = click.Choice(["keras", "torch", "both"])


def _epilog(*examples: str, model: bool = True) -> str:
    """A command's --help epilog: its examples (kept as written), then what MODEL is."""
    lines = "\n".join(f"  {e}" for e in examples)
    text = f"\b\nExamples:\n{lines}"
    return f"{text}\n\n{MODEL_HELP}" if model else text


MAX_TENT_STEPS = 1000
"""TENT takes one step a batch; a thousand is already beyond any published setting."""


MAX_EPOCHS = 10_000


MAX_SEEDS = 1000


MAX_DIGITS_SIZE = 1024
"""The embedded digits are 8x8 images: beyond this side they only cost memory."""


MODEL_HELP = (
    "MODEL is a '.keras' file or a PyTorch model spec: torchvision:NAME, timm:NAME, "
    "package.module:factory or path/to/file.py:factory. A spec runs Python code, as "
    "`python -c` does (the module is imported and the factory called with --args): give "
    "only specs you trust. A factory that never returns keeps bnkit waiting: stop it with "
    "Ctrl-C, or give --timeout SECONDS."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnkit")
def cli() -> None:
    """BatchNorm made correct, visible and decidable in transfer learning."""
