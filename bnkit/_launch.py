"""Ctrl-C while the `bnkit` command starts.

`import bnkit` runs before any line of the command (`bnkit ...` and `python -m bnkit.cli`
both import the package first), and importing NumPy and the rest takes a noticeable
fraction of a second, more on a busy machine. A Ctrl-C then would raise KeyboardInterrupt
in an import, outside the command's handler: a traceback, and the process killed by
SIGINT instead of exit 130. So `import bnkit`, only when it starts the command, answers
Ctrl-C with the command's own line and exit 130 until `bnkit.cli.main` takes over. Nothing
has been written yet at that point, so nothing is left behind. A program or notebook that
imports bnkit is not affected. Importing this module installs the handler; `bnkit/__init__.py`
imports it first.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

INTERRUPTED = "bnkit: interrupted; no partial output was left"
EXIT_INTERRUPTED = 130
"""128 + SIGINT, the shell's convention for a command stopped by Ctrl-C (SIGTERM: 143)."""

_OPTIONS_WITH_A_VALUE = {"-X", "-W", "--check-hash-based-pycs"}
_previous: Any = None


def started_as_command(argv: list[str], orig_argv: list[str]) -> bool:
    """Whether this process is the `bnkit` command: its console script, or `python -m
    bnkit.cli` (found in the interpreter's own arguments, `sys.orig_argv`)."""
    if argv and os.path.splitext(os.path.basename(argv[0]))[0] == "bnkit":
        return True
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None) == "bnkit.cli"
        if arg.startswith("-m"):
            return arg[2:] == "bnkit.cli"
        if arg in _OPTIONS_WITH_A_VALUE:
            next(args, None)
        elif arg == "-" or arg.startswith("-c") or not arg.startswith("-"):
            return False  # a program from a string, stdin or a file
    return False


def _interrupted(signum: int, frame: Any) -> None:
    os.write(2, f"{INTERRUPTED}\n".encode())
    raise SystemExit(EXIT_INTERRUPTED)


def install() -> None:
    """Answers Ctrl-C with exit 130 from now until `release()`, when this process is the
    bnkit command and Python's own handler is in place (not one the caller chose)."""
    global _previous
    if not started_as_command(sys.argv, getattr(sys, "orig_argv", sys.argv)):
        return
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            _previous = signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread
        pass


def release() -> None:
    """Gives Ctrl-C back to the handler that was there before `install()`: from here the
    command turns KeyboardInterrupt into exit 130 after removing its temporary outputs."""
    global _previous
    if _previous is not None:
        signal.signal(signal.SIGINT, _previous)
        _previous = None


install()
