"""The `bnkit` command: parse, call one library function, render."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click
from rich.console import Console

from bnkit.errors import BnkitError

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2

PIPE_WIDTH = 160  # rich assumes 80 columns when stdout is not a terminal

_out = Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)
_err = Console(stderr=True)

MODES = ["frozen", "affine", "train", "adapt"]

DEMO_LEGEND = """\
Each row starts from the same weights and trains the whole network for the same steps.
- Keras' own bn.trainable = False works, until the usual base.trainable = True undoes it.
- base(x, training=False) freezes nothing once the base is trainable: fit overrides it.
- Selecting BN by name misses layers: no Keras 3 BN name starts with 'bn'.
- bnkit's modes are pinned and verified by watch: frozen keeps everything, affine trains
  only gamma/beta, train trains all four, adapt stays frozen until re-estimated."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnkit")
def cli() -> None:
    """BatchNorm made correct, visible and decidable in transfer learning."""


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--bn-only", is_flag=True, help="List only the BatchNorm layers.")
def inspect_cmd(model: Path, as_json: bool, bn_only: bool) -> None:
    """Show every layer's trainability and each BN layer's effective mode in fit."""
    from bnkit.files import load_model
    from bnkit.report import inspect

    report = inspect(load_model(model))
    if as_json:
        click.echo(report.to_json())
        return
    _out.print(report.table(bn_only=bn_only))
    _out.print(report.summary(), highlight=False)


@cli.command("freeze")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the frozen model (.keras); never the input.",
)
@click.option(
    "--train-from",
    metavar="NAME",
    help="Freeze every layer before NAME; train NAME and everything after it.",
)
@click.option(
    "--bn",
    type=click.Choice(MODES),
    help="Mode of the BN layers that --train-from trains (all BN without it).",
)
@click.option(
    "--rule",
    "rules",
    multiple=True,
    metavar="SELECTOR=MODE",
    help="Extra rule, applied in order after the others: bn=frozen, glob:conv5_*=train, "
    "re:preact_bn$=affine, index:0:10=frozen, from:NAME=train, depth:0.8=train, "
    "block:conv5_block3=train, type:Dense=train.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def freeze_cmd(
    model: Path,
    output: Path,
    train_from: str | None,
    bn: str | None,
    rules: tuple[str, ...],
    as_json: bool,
) -> None:
    """Apply a freeze policy and save the model with its BN modes pinned."""
    from bnkit.files import check_output, load_model
    from bnkit.freeze import freeze

    check_output(output, model, suffix=".keras")
    m = load_model(model)
    plan = freeze(m, train_from=train_from, bn=bn, rules=list(rules))
    _save_and_render(m, output, plan, as_json)


@cli.command("adapt")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the adapted model (.keras); never the input.",
)
@click.option("--max-batches", type=int, help="Stop after this many batches.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer summary as JSON.")
def adapt_cmd(
    model: Path, data: Path, output: Path, max_batches: int | None, batch_size: int, as_json: bool
) -> None:
    """Re-estimate BN statistics on DATA (an .npz with array x; labels unused)."""
    from rich.progress import Progress

    from bnkit.data import load_npz
    from bnkit.files import check_output, load_model
    from bnkit.stats import adapt

    check_output(output, model, data, suffix=".keras")
    x, _ = load_npz(data)
    m = load_model(model)
    total = -(-len(x) // batch_size)
    total = min(total, max_batches) if max_batches else total
    with Progress(console=_err, transient=True) as progress:
        task = progress.add_task("re-estimating BN statistics", total=total)
        report = adapt(
            m,
            x,
            batch_size=batch_size,
            max_batches=max_batches,
            on_batch=lambda k: progress.update(task, completed=k),
        )
    _save_and_render(m, output, report, as_json)


@cli.command("demo")
@click.option("--steps", default=2, show_default=True, help="Training steps per approach.")
@click.option("--input-size", default=32, show_default=True, help="Image side in pixels.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo_cmd(steps: int, input_size: int, as_json: bool) -> None:
    """Show what each way of freezing BN really does to ResNet50V2 in Keras 3."""
    from bnkit.demo import seed_demo

    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing chatter per approach
    with _err.status("training ResNet50V2 once per approach..."):
        result = seed_demo(input_size=input_size, steps=steps)
    if as_json:
        click.echo(result.to_json())
        return
    _out.print(result.table())
    _out.print(DEMO_LEGEND, highlight=False)


def _save_and_render(model: Any, output: Path, result: Any, as_json: bool) -> None:
    """Writes the model atomically, then prints the result (JSON or text)."""
    from bnkit.files import save_model

    save_model(model, output)
    if as_json:
        click.echo(result.to_json())
        return
    _out.print(str(result), highlight=False)
    _out.print(f"wrote {output}", highlight=False)


def main() -> None:
    """Entry point: runs the CLI and turns bnkit errors into one line and exit status 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _err.print("bnkit: aborted")
        sys.exit(EXIT_USAGE)
    except click.ClickException as err:
        err.show()
        sys.exit(EXIT_USAGE)
    except BnkitError as err:
        click.echo(f"bnkit: error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
