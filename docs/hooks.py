"""MkDocs hooks. The command-line reference, generated from the click commands at build
time (so it cannot drift from `bnkit --help`): a page holding `<!-- bnkit-cli -->` gets a
section per command, what it does, its usage, every option, and its examples. The demo's
results: a page holding `<!-- bnkit-demo -->` gets the table of the run recorded in
docs/demo/ (`make docs-demo`), and its figures are drawn from that record by bnkit's
own plotting code, so table, figures and code cannot disagree; a record made with other
settings than the demo's stops the build."""

from __future__ import annotations

import html
import json
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

MARK = "<!-- bnkit-cli -->"
DEMO_MARK = "<!-- bnkit-demo -->"
DEMO_RECORD = Path(__file__).parent / "demo"
"""`bnkit demo`'s demo.json (Keras) and demo-torch.json (PyTorch), from `make docs-demo`."""
DEMO_FIGURES = {
    "demo-shift.png": ("demo.json", "shift"),
    "demo-compare.png": ("demo.json", "compare"),
    "demo-compare-torch.png": ("demo-torch.json", "compare"),
}
CONSTANT = re.compile(r"^(DEFAULT_[A-Z_]+|WINDOW|MIN_BATCH_SIZE)$")
"""Module constants that public signatures use as defaults: the reference shows values."""


def on_config(config: Any) -> Any:
    """bnkit's version on every page (the footer), read from the package."""
    import bnkit

    config["copyright"] = f"bnkit {bnkit.__version__}"
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARK in markdown:
        markdown = markdown.replace(MARK, cli_reference())
    if DEMO_MARK in markdown:
        markdown = markdown.replace(DEMO_MARK, demo_section())
    return markdown


def on_files(files: Any, config: Any) -> Any:
    """The demo's figures, drawn from the recorded run, added to the site's files."""
    from mkdocs.structure.files import File

    from bnkit.plots import compare_plot, shift_plot

    folder = Path(tempfile.mkdtemp(prefix="bnkit-docs-"))
    for name, (record, kind) in DEMO_FIGURES.items():
        doc = _demo_record(record)
        if kind == "shift":
            title = f"shift of the target digits from the source, {_framework(doc)} model"
            shift_plot(_namespace(doc["shift"]), folder / name, title=title)
        else:
            compare_plot(_namespace(doc["compare"]), folder / name)
        files.append(File.generated(config, name, abs_src_path=str(folder / name)))
    return files


def _namespace(value: Any) -> Any:
    """A JSON document as objects with attributes, the shape bnkit's plots read."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_namespace(v) for v in value]
    return value


def _framework(doc: dict[str, Any]) -> str:
    return "Keras" if doc["framework"] == "keras" else "PyTorch"


def _demo_record(name: str) -> dict[str, Any]:
    """A recorded demo run, checked to be the demo as it runs now."""
    from bnkit.demo import STORY_EPOCHS, STORY_LABELS_PER_CLASS, STORY_SEEDS

    path = DEMO_RECORD / name
    doc: dict[str, Any] = json.loads(path.read_text())
    want = {"labelled": 10 * STORY_LABELS_PER_CLASS, "epochs": STORY_EPOCHS,
            "seeds": STORY_SEEDS}  # fmt: skip
    got = {key: doc.get(key) for key in want}
    if got != want:
        raise ValueError(
            f"{path} records a demo run with {got}, and the demo now runs with {want}: "
            "run `make docs-demo` to record it again"
        )
    return doc


def demo_section() -> str:
    """The recorded demo runs' final validation accuracy per strategy, both frameworks
    side by side, each run's verdict, and the figures `on_files` draws."""
    keras_doc, torch_doc = _demo_record("demo.json"), _demo_record("demo-torch.json")
    backend = keras_doc["versions"].partition("(")[2].partition(")")[0]
    columns = [(f"Keras, {backend} backend", _accuracies(keras_doc)),
               ("PyTorch", _accuracies(torch_doc))]  # fmt: skip
    order = sorted(columns[0][1], key=lambda s: -columns[0][1][s][0])
    lines = ["| strategy | " + " | ".join(f"val accuracy, {c[0]}" for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]  # fmt: skip
    for strategy in order:
        cells = [f"{c[1][strategy][0]:.1%} ± {c[1][strategy][1]:.1%}" for c in columns]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    keras_version = keras_doc["versions"].partition(" (")[0]
    versions = f"{keras_version}, {torch_doc['versions']}"
    lines += [
        "",
        f"Final validation accuracy, mean ± standard deviation over {keras_doc['seeds']} "
        f"seeds ({keras_doc['labelled']} labelled target images, {keras_doc['epochs']} "
        f"epochs), recorded with {versions}. What `compare` concluded:",
        "",
        *(f"- {_framework(d)}: {d['compare']['verdict']}" for d in (keras_doc, torch_doc)),
        "",
        "![shift of the target from the source statistics, per BN layer, Keras model]"
        "(demo-shift.png)",
        "",
        "![validation curves per strategy, Keras](demo-compare.png)",
        "",
        "![validation curves per strategy, PyTorch](demo-compare-torch.png)",
    ]
    return "\n".join(lines)


def _accuracies(doc: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {
        s["strategy"]: (s["val_accuracy_mean"], s["val_accuracy_std"])
        for s in doc["compare"]["summaries"]
    }


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
