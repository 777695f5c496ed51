"""MkDocs hook: the command-line reference, generated from the click commands at build
time (so it cannot drift from `bnkit --help`). A page holding `<!-- bnkit-cli -->` gets a
section per command: what it does, its usage, every option, and its examples."""

from __future__ import annotations

import html
import re
from typing import Any

import click

MARK = "<!-- bnkit-cli -->"
CONSTANT = re.compile(r"^(DEFAULT_[A-Z_]+|WINDOW|MIN_BATCH_SIZE)$")
"""Module constants that public signatures use as defaults: the reference shows values."""


def on_config(config: Any) -> Any:
    """bnkit's version on every page (the footer), read from the package."""
    import bnkit

    config["copyright"] = f"bnkit {bnkit.__version__}"
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARK not in markdown:
        return markdown
    return markdown.replace(MARK, cli_reference())


def on_page_content(content: str, page: Any, config: Any, files: Any) -> str:
    """On the reference pages, each constant a signature names as a default is shown as
    its value (`batch_size: int = 32`, not `DEFAULT_BATCH_SIZE`)."""
    if not page.file.src_uri.startswith("reference/"):
        return content
    values = _constants()
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, values)) + r")\b")
    return pattern.sub(lambda m: html.escape(values[m.group(1)]), content)


def _constants() -> dict[str, str]:
    import importlib

    found: dict[str, str] = {}
    for name in ("bnkit.data", "bnkit.stats", "bnkit.compare", "bnkit.tta"):
        module = importlib.import_module(name)
        for key, value in vars(module).items():
            if CONSTANT.match(key) and isinstance(value, (int, float, str, tuple)):
                found[key] = repr(value)
    return found


def cli_reference() -> str:
    from bnkit.cli import MODEL_HELP, cli

    parts = [MODEL_HELP, ""]
    for name, command in cli.commands.items():
        parts += _command(name, command)
    return "\n".join(parts)


def _default(param: click.Option, ctx: click.Context) -> str:
    """The option's default as the reader meets it: a value, `off` for a flag,
    `required`, or `none` (not given; what that means, its help says)."""
    value = param.get_default(ctx, call=False)
    if param.is_flag:
        return "on" if value is True else "off"
    if param.required:
        return "required"
    if value is None or value is getattr(click.core, "UNSET", None) or value == ():
        return "none"
    if callable(value):
        return ""
    return f"`{value}`"


def _command(name: str, command: click.Command) -> list[str]:
    ctx = click.Context(command, info_name=f"bnkit {name}")
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## bnkit {name}", "", (command.help or "").replace("\n", " "), ""]
    lines += ["```", f"bnkit {name} {usage}", "```", ""]
    lines += ["| option | default | what it does |", "|---|---|---|"]
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        names = ", ".join(f"`{o}`" for o in param.opts)
        text = (param.help or "").replace("|", "&#124;")
        if isinstance(param.type, click.Choice):
            names += " `CHOICE`"
            text += " One of " + ", ".join(f"`{c}`" for c in param.type.choices) + "."
        elif not param.is_flag:
            names += f" `{param.make_metavar(ctx)}`"
        lines.append(f"| {names} | {_default(param, ctx)} | {text} |")
    lines.append("| `-h`, `--help` | off | Show the help and exit. |")
    examples = [
        line.strip()
        for line in (command.epilog or "").splitlines()
        if line.strip().startswith("bnkit ")
    ]
    if examples:
        lines += ["", "Examples:", "", "```", *examples, "```"]
    return [*lines, ""]
