"""`bnkit adapt` and `bnkit shift`: re-estimating BN statistics on new data, and
measuring how far the data is from them."""

from __future__ import annotations

from pathlib import Path

import click

from bnkit.cli._app import _epilog, _out, cli
from bnkit.cli._options import SELECT_OPTION, _data_options, _model_options
from bnkit.cli._run import (
    _check_inputs,
    _inputs,
    _load,
    _on_ranks,
    _open_data,
    _save_and_render,
    _world,
)


@cli.command(
    "adapt",
    epilog=_epilog(
        "bnkit adapt model.keras target.npz -o adapted.keras",
        "bnkit adapt torchvision:resnet18 --weights ckpt.pt photos/ -o adapted.pt --scale 1/255",
    ),
)
@_model_options
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the adapted model (.keras, or a PyTorch state_dict .pt); never the input.",
)
@_data_options
@SELECT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer summary as JSON.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output that bnkit wrote before."
)
def adapt_cmd(
    model: Path,
    data: Path,
    output: Path,
    batch_size: int,
    max_batches: int | None,
    scale: str | None,
    preprocess: str | None,
    channels: str | None,
    select: str | None,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Re-estimate BN statistics on DATA: an .npz with array x, or a folder of class
    sub-folders of images (resized to the model's input). Labels are unused."""
    from bnkit.backends import model_suffix
    from bnkit.data import parse_scaling
    from bnkit.files import check_output
    from bnkit.policy import parse_selector
    from bnkit.stats import adapt

    parse_scaling(scale, preprocess)
    selector = parse_selector(select) if select is not None else None
    _world()
    _check_inputs(model, data)
    check_output(output, *_inputs(model), data, suffix=model_suffix(model), overwrite=overwrite)
    m = _load(model)
    source = _open_data(m, data, batch_size, scale, preprocess, channels)
    rank, report = _on_ranks(adapt, m, source, max_batches, "re-estimating BN statistics",
                             selector)  # fmt: skip
    if rank == 0:  # every rank holds the combined statistics; one writes them
        _save_and_render(m, output, report, as_json)


@cli.command(
    "shift",
    epilog=_epilog(
        "bnkit shift model.keras target.npz --plot shift.png",
        "bnkit shift model.keras target.npz --select 're:^conv5'",
    ),
)
@_model_options
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@_data_options
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG of shift by depth.")
@SELECT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output that bnkit wrote before."
)
def shift_cmd(
    model: Path,
    data: Path,
    batch_size: int,
    max_batches: int | None,
    scale: str | None,
    preprocess: str | None,
    channels: str | None,
    plot: Path | None,
    select: str | None,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Measure how far DATA is from each BN layer's stored statistics, and say what to do:
    keep BN frozen, re-estimate it (adapt, no labels), or collect labels and compare."""
    from bnkit.data import parse_scaling
    from bnkit.files import check_output
    from bnkit.plots import shift_plot
    from bnkit.policy import parse_selector
    from bnkit.stats import shift

    parse_scaling(scale, preprocess)
    selector = parse_selector(select) if select is not None else None
    _world()
    _check_inputs(model, data)
    if plot is not None:
        check_output(plot, model, data, suffix=".png", overwrite=overwrite)
    m = _load(model)
    source = _open_data(m, data, batch_size, scale, preprocess, channels)
    rank, report = _on_ranks(shift, m, source, max_batches, "measuring BN input statistics",
                             selector)  # fmt: skip
    if rank != 0:  # every rank holds the combined measure; one reports it
        return
    if plot is not None:
        shift_plot(report, plot)
    if as_json:
        click.echo(report.to_json())
        return
    _out.print(report.table())
    _out.print(f"scaling: {source.scaling}", highlight=False)
    _out.print(str(report), highlight=False)
    if plot is not None:
        _out.print(f"wrote {plot}", highlight=False)
