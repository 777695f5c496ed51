"""`bnkit export`: a folded, verified model for deployment."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bnkit.cli._app import EXIT_FINDINGS, _epilog, _out, cli
from bnkit.cli._options import _model_options, _remember
from bnkit.cli._run import _check_inputs, _input_shape, _inputs, _load, _open_data


@cli.command(
    "export",
    epilog=_epilog(
        "bnkit export model.keras -o deploy.keras --val val.npz",
        "bnkit export torchvision:resnet18 -o resnet18.onnx --input-shape 3,224,224",
    ),
)
@_model_options
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the export; never the input.",
)
@click.option("--no-fold", is_flag=True, help="Keep every BN layer (frozen) instead of folding.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["keras", "savedmodel", "onnx", "pt2"]),
    help="keras, savedmodel or onnx for Keras; pt2 (torch.export) or onnx for PyTorch "
    "(default: by the output's suffix).",
)
@click.option(
    "--input-shape",
    metavar="C,H,W",
    expose_value=False,
    callback=_remember,
    help="One sample's shape, for random example inputs (PyTorch modules have none).",
)
@click.option(
    "--val",
    "check_data",
    type=click.Path(path_type=Path),
    help="Validation data to verify the export on (.npz or folder); random inputs by default.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output that bnkit wrote before."
)
def export_cmd(
    model: Path,
    output: Path,
    no_fold: bool,
    fmt: str | None,
    check_data: Path | None,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Write MODEL for deployment: BN frozen and folded, then verified (export vs original,
    one sample vs a batch, training=True vs inference). Exit 1 when a check fails."""
    from bnkit.deploy import ExportError, export
    from bnkit.files import (
        check_dir_output,
        check_out_dir,
        check_output,
    )

    inputs = _inputs(model) + ([check_data] if check_data is not None else [])
    shape = _input_shape()
    _check_inputs(model, check_data)
    fmt = fmt or (output.suffix[1:] if output.suffix else "savedmodel")
    if fmt == "savedmodel":  # a folder
        check_out_dir(output, (), *inputs)
        check_dir_output(output, kind="savedmodel", overwrite=overwrite)
    else:
        check_output(output, *inputs, suffix=f".{fmt}", overwrite=overwrite)
    m = _load(model)
    data = None
    if check_data is not None:
        data = _open_data(m, check_data, 8, None, None, None)
    try:
        report = export(
            m, output, fold=not no_fold, format=fmt, check_data=data, input_shape=shape,
            overwrite=overwrite,
        )  # fmt: skip
    except ExportError as err:
        click.echo(f"bnkit: export failed: {err}", err=True)
        sys.exit(EXIT_FINDINGS)
    if as_json:
        click.echo(report.to_json())
        return
    _out.print(str(report), highlight=False)
