"""`bnkit inspect`: every layer's trainability and each BN layer's mode."""

from __future__ import annotations

from pathlib import Path

import click

from bnkit.cli._app import _epilog, _out, cli
from bnkit.cli._options import _model_options
from bnkit.cli._run import _load


@cli.command(
    "inspect",
    epilog=_epilog(
        "bnkit inspect model.keras --bn-only", "bnkit inspect torchvision:resnet18 --json"
    ),
)
@_model_options
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--bn-only", is_flag=True, help="List only the BatchNorm layers.")
def inspect_cmd(model: Path, as_json: bool, bn_only: bool) -> None:
    """Show every layer's trainability and each BN layer's effective mode in fit."""
    from bnkit.report import inspect

    report = inspect(_load(model))
    if as_json:
        click.echo(report.to_json())
        return
    _out.print(report.table(bn_only=bn_only))
    _out.print(report.summary(), highlight=False)
