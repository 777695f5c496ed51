"""`bnkit check`: the BN pitfalls of a model, before training."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bnkit.cli._app import EXIT_FINDINGS, _epilog, _out, cli
from bnkit.cli._options import _model_options, _remember
from bnkit.cli._run import _check_inputs, _input_shape, _load, _open_data


@cli.command(
    "check",
    epilog=_epilog(
        "bnkit check model.keras --batch-size 8 --train-steps 300",
        "bnkit check torchvision:resnet18 --input-shape 3,64,64 --batch-size 1",
    ),
)
@_model_options
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="The training batch size you plan (small-batch check).",
)
@click.option(
    "--train-steps",
    "steps",
    type=click.IntRange(min=1),
    help="The training steps you plan (momentum check).",
)
@click.option(
    "--select", metavar="SELECTOR", help="A BN selector you plan to use (coverage check)."
)
@click.option(
    "--val",
    "example",
    type=click.Path(path_type=Path),
    help="Validation inputs (.npz or folder) for one inference pass: call counts and values "
    "per channel of a PyTorch module's BN layers.",
)
@click.option(
    "--input-shape",
    metavar="C,H,W",
    expose_value=False,
    callback=_remember,
    help="One sample's shape, for random example inputs (PyTorch modules have none).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option(
    "--verbose", is_flag=True, help="One row per layer, not one per cause (JSON has both)."
)
def check_cmd(
    model: Path,
    batch_size: int | None,
    steps: int | None,
    select: str | None,
    example: Path | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """Find BN pitfalls in MODEL; exit 1 when an error-level finding is present."""
    from bnkit.check import check
    from bnkit.policy import parse_selector

    if select is not None:
        parse_selector(select)
    shape = _input_shape()
    _check_inputs(model, example)
    m = _load(model)
    data = None if example is None else _open_data(m, example, 8, None, None, None)
    report = check(
        m, batch_size=batch_size, steps=steps, select=select, example=data, input_shape=shape
    )
    if as_json:
        click.echo(report.to_json())
    else:
        if report.findings:
            _out.print(report.table(verbose=verbose))
        _out.print(str(report).splitlines()[0], highlight=False)
    if report.errors:
        sys.exit(EXIT_FINDINGS)
