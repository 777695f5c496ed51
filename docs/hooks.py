"""MkDocs hook: the command-line reference, generated from the click commands at build
time (so it cannot drift from `bnkit --help`). A page holding `<!-- bnkit-cli -->` gets a
section per command: what it does, its usage, every option, and its examples."""

from __future__ import annotations

from typing import Any

import click

MARK = "<!-- bnkit-cli -->"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARK not in markdown:
        return markdown
    return markdown.replace(MARK, cli_reference())


def cli_reference() -> str:
    from bnkit.cli import MODEL_HELP, cli

    parts = [MODEL_HELP, ""]
    for name, command in cli.commands.items():
        parts += _command(name, command)
    return "\n".join(parts)


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
        if not param.is_flag:
            names += f" `{param.make_metavar(ctx)}`".replace("|", "\\|")
        default = ""
        if param.show_default and param.default is not None:
            default = f"`{param.default}`"
        text = (param.help or "").replace("|", "\\|")
        lines.append(f"| {names} | {default} | {text} |")
    lines.append("| `-h`, `--help` | | Show the help and exit. |")
    examples = [
        line.strip()
        for line in (command.epilog or "").splitlines()
        if line.strip().startswith("bnkit ")
    ]
    if examples:
        lines += ["", "Examples:", "", "```", *examples, "```"]
    return [*lines, ""]
