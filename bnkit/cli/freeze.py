"""`bnkit freeze`: a freeze policy applied and the model written with its plan."""

from __future__ import annotations

from pathlib import Path

import click

from bnkit.cli._app import MODES, _epilog, cli
from bnkit.cli._options import _model_options
from bnkit.cli._run import _check_inputs, _inputs, _load, _save_and_render


@cli.command(
    "freeze",
    epilog=_epilog(
        "bnkit freeze model.keras -o frozen.keras --train-from conv5_block1_1_conv --bn affine",
        "bnkit freeze torchvision:resnet18 --weights ckpt.pt -o frozen.pt --bn frozen",
    ),
)
@_model_options
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the frozen model: .keras, or for PyTorch a state_dict .pt (and "
    "the plan beside it as .plan.json, for bnkit.freeze(model, Plan.from_json(...)));"
    " never the input.",
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
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output that bnkit wrote before."
)
def freeze_cmd(
    model: Path,
    output: Path,
    train_from: str | None,
    bn: str | None,
    rules: tuple[str, ...],
    as_json: bool,
    overwrite: bool,
) -> None:
    """Apply a freeze policy and save the model with its BN modes pinned."""
    from bnkit.backends import layer_names, model_suffix
    from bnkit.files import check_output
    from bnkit.freeze import freeze
    from bnkit.policy import find_layer_name, parse_rule

    parsed = [parse_rule(r) for r in rules]  # checked before any framework starts
    _check_inputs(model)
    names = layer_names(model)
    if train_from is not None and names is not None:
        find_layer_name(train_from, names)
    suffix = model_suffix(model)
    check_output(output, *_inputs(model), suffix=suffix, overwrite=overwrite)
    plan_path = output.with_suffix(".plan.json") if suffix != ".keras" else None
    if plan_path is not None:
        check_output(
            plan_path, *_inputs(model), suffix=".json", overwrite=overwrite, json_kind="plan"
        )
    m = _load(model)
    plan = freeze(m, train_from=train_from, bn=bn, rules=parsed)
    # a state_dict does not carry the modes: the plan beside it does, written with it
    sidecars = {plan_path: plan.to_json()} if plan_path is not None else None
    _save_and_render(m, output, plan, as_json, sidecars)
