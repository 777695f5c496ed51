"""The entry point: runs the command group, turns bnkit's errors into one line and
exit 2, warnings into lines after the command, Ctrl-C into exit 130."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import click

from bnkit._launch import EXIT_INTERRUPTED, INTERRUPTED, release, started_as_command
from bnkit.cli._app import EXIT_USAGE, cli
from bnkit.errors import BnkitError, BnkitWarning

RENAMED = {
    "check": {"--example": "--val", "--steps": "--train-steps"},
    "export": {"--check": "--val"},
    "compare": {"--out": "--output"},
    "demo": {"--out": "--output"},
    "digits": {"--size": "--image-size"},
    "traps": {"--input-size": "--image-size", "--steps": "--train-steps"},
    "tta": {"--steps": "--tent-steps"},
}
"""Option spellings of bnkit 0.1, per command, and their names since 0.2: still accepted,
with a warning, until 0.3 (CHANGELOG.md)."""


def _renamed(argv: list[str]) -> tuple[list[str], list[str]]:
    """`argv` with 0.1 spellings replaced by today's (and `digits FOLDER` by `digits -o
    FOLDER`), and a note for each."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None:
        return argv, []
    names = RENAMED.get(command, {})
    out, notes = [], []
    after = argv.index(command) + 1
    for i, arg in enumerate(argv):
        old, eq, value = arg.partition("=")
        if i >= after and old in names:
            notes.append(f"{old} is now {names[old]} (the old name works until bnkit 0.3)")
            arg = names[old] + eq + value
        out.append(arg)
    if command == "digits" and len(out) > after and not out[after].startswith("-"):
        notes.append("bnkit digits FOLDER is now bnkit digits -o FOLDER")
        out.insert(after, "-o")
    return out, notes


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _one_line(text: str) -> str:
    """`text` with control characters escaped (a newline in a file name), so that a message
    is always one line."""
    import unicodedata

    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in text.strip())


def _warning_text(w: warnings.WarningMessage) -> str:
    category = "" if issubclass(w.category, BnkitWarning) else f"{w.category.__name__}: "
    return _one_line(f"{category}{w.message}")


def _fail(message: str, caught: list[warnings.WarningMessage], code: int = EXIT_USAGE) -> None:
    """Prints the one error line (with the warnings that came before it) and exits."""
    seen = list(dict.fromkeys(_warning_text(w) for w in caught))
    caught.clear()
    after = f" (after the warning: {'; '.join(seen)})" if seen else ""
    click.echo(f"bnkit: error: {_one_line(message)}{after}", err=True)
    sys.exit(code)


def _exit_interrupted() -> None:
    """Exit 130 after Ctrl-C. The command (not a program calling `main`) leaves at once,
    its outputs already removed: tearing down an interpreter that Ray's core worker
    threads ran in after a Ctrl-C crashed it (segmentation fault after the line)."""
    if started_as_command(sys.argv, getattr(sys, "orig_argv", [])):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)


def _reconfigure_streams() -> None:
    """stdout line-buffered: in a log of stdout and stderr together, progress and
    warnings (stderr) land in the section of stdout they belong to. Both streams write
    what their encoding lacks as backslash escapes (a file named 'sortie ü.keras' under
    PYTHONIOENCODING=ascii or LANG=C), never a UnicodeEncodeError."""
    for stream, line_buffering in ((sys.stdout, True), (sys.stderr, None)):
        with contextlib.suppress(AttributeError, ValueError):  # replaced or closed
            stream.reconfigure(  # type: ignore[union-attr]
                errors="backslashreplace", line_buffering=line_buffering
            )


def main() -> None:
    """Entry point: runs the CLI and turns bnkit errors into one line and exit status 2.

    Warnings are collected and printed after the command, one line each, or folded into
    the error line; Ctrl-C exits 130 and SIGTERM 143, in both cases after every
    temporary output is removed."""
    from bnkit.files import terminate_cleanly

    release()  # Ctrl-C from here: KeyboardInterrupt, caught below
    terminate_cleanly()
    _reconfigure_streams()
    args, notes = _renamed(sys.argv[1:])
    with warnings.catch_warnings(record=True) as caught:
        for note in notes:
            warnings.warn(note, BnkitWarning, stacklevel=1)
        try:
            cli.main(args, prog_name="bnkit", standalone_mode=False)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo(INTERRUPTED, err=True)
            _exit_interrupted()
        except click.ClickException as err:
            _fail(f"{err.format_message()} (see bnkit --help)", caught)
        except BnkitError as err:
            _fail(str(err), caught)
        except OSError as err:  # a file system refusal not foreseen by the checks: one line
            where = f"{err.filename}: " if err.filename else ""
            _fail(f"{where}{err.strerror or err}", caught)
        except click.exceptions.Exit as err:
            sys.exit(err.exit_code)
        finally:  # also on exit 1 (findings) and SIGTERM
            for text in dict.fromkeys(_warning_text(w) for w in caught):
                click.echo(f"bnkit: warning: {text}", err=True)
