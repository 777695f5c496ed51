"""`bnkit tta`: adapting to an unlabelled stream at test time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bnkit.cli._app import MAX_TENT_STEPS, _epilog, _out, cli
from bnkit.cli._options import _model_options, _tta_data_options
from bnkit.cli._run import _check_inputs, _inputs, _load, _open_data, _progress, _progress_total


@cli.command(
    "tta",
    epilog=_epilog(
        "bnkit tta model.keras stream.npz --method tent -o adapted.keras --report tta.json",
        "bnkit tta torchvision:resnet18 --weights ckpt.pt photos/ --method adapt",
        "bnkit tta model.keras camera_feed/ --method robust --report tta.json",
    ),
)
@_model_options
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["none", "adapt", "tent", "robust"]),
    default="robust",
    show_default=True,
    help="Predict as is, re-estimate BN statistics first, TENT, or robust (statistics "
    "of the stream so far, predictions corrected for label shift: for streams sorted "
    "by class).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Where to write the adapted model (.keras, or a PyTorch state_dict .pt).",
)
@click.option("--report", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG of the stream.")
@click.option(
    "--tent-steps",
    default=1,
    show_default=True,
    type=click.IntRange(1, MAX_TENT_STEPS),
    help="TENT's optimizer steps on each batch.",
)
@click.option("--lr", default=1e-3, show_default=True, help="TENT's learning rate.")
@click.option("--episodic", is_flag=True, help="Reset to the start before every batch.")
@click.option("--no-guard", is_flag=True, help="No reset on collapse or non-finite values.")
@_tta_data_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs that bnkit wrote before.")
def tta_cmd(
    model: Path,
    data: Path,
    method: str,
    output: Path | None,
    report: Path | None,
    plot: Path | None,
    tent_steps: int,
    lr: float,
    episodic: bool,
    no_guard: bool,
    batch_size: int,
    max_batches: int | None,
    scale: str | None,
    preprocess: str | None,
    channels: str | None,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Adapt MODEL to the unlabelled stream DATA batch by batch, without labels (labels
    in DATA only score the predictions)."""
    from bnkit.backends import model_suffix, save_model
    from bnkit.data import parse_scaling
    from bnkit.files import atomic_path, check_output
    from bnkit.plots import tta_plot
    from bnkit.tta import tta

    parse_scaling(scale, preprocess)
    _check_inputs(model, data)
    inputs = (*_inputs(model), data)
    if output is not None:
        check_output(output, *inputs, suffix=model_suffix(model), overwrite=overwrite)
    if report is not None:
        check_output(report, *inputs, suffix=".json", overwrite=overwrite, json_kind="tta")
    if plot is not None:
        check_output(plot, *inputs, suffix=".png", overwrite=overwrite)
    m = _load(model)
    source = _open_data(m, data, batch_size, scale, preprocess, channels)
    total = _progress_total(source, max_batches)
    baseline = None
    if method != "none" and _labelled(source):  # the model as it stands, for comparison
        with _progress("without adaptation", total) as tick:
            baseline = tta(
                m, source, "none", batch_size=batch_size, max_batches=max_batches,
                on_batch=lambda b: tick(b.index + 1),
            ).accuracy  # fmt: skip
    with _progress(f"{method} on the stream", total) as tick:
        result = tta(
            m, source, method, batch_size=batch_size, steps=tent_steps, lr=lr, episodic=episodic,
            guard=not no_guard, max_batches=max_batches, on_batch=lambda b: tick(b.index + 1),
        )  # fmt: skip
    written = []
    if output is not None:
        save_model(m, output)
        written.append(output)
    if report is not None:
        with atomic_path(report) as tmp:
            tmp.write_text(result.to_json())
        written.append(report)
    if plot is not None:
        tta_plot(result, plot)
        written.append(plot)
    if as_json:
        click.echo(result.to_json())
        return
    _out.print(str(result), highlight=False)
    if baseline is not None:
        _out.print(f"without adaptation: accuracy {baseline:.1%}", highlight=False)
    for k, why in result.resets:
        _out.print(f"reset after batch {k}: {why}", highlight=False)
    for path in written:
        _out.print(f"wrote {path}", highlight=False)


def _labelled(source: Any) -> bool:
    """Whether the data's first batch comes with labels."""
    first = next(iter(source), None)
    return first is not None and first[1] is not None
