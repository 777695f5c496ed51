"""Option sets several commands share, declared once: a PyTorch spec's --args,
--weights and --timeout; the data options; the BN selector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bnkit.cli._app import MAX_EPOCHS, MAX_SEEDS


def _with_options(fn: Any, options: list[Any]) -> Any:
    """`fn` decorated with `options`, listed in the order --help shows them."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[f"bnkit.{param.name}"] = value
    return value


def _runs_options(epochs: int) -> Any:
    """--epochs (defaulting to `epochs`) and --seeds, for the commands that run `compare`."""

    def decorate(fn: Any) -> Any:
        return _with_options(fn, [
            click.option("--epochs", default=epochs, show_default=True,
                         type=click.IntRange(1, MAX_EPOCHS), help="Epochs per run."),
            click.option("--seeds", default=3, show_default=True,
                         type=click.IntRange(1, MAX_SEEDS),
                         help="How many seeds: each strategy runs with seeds 0..N-1."),
        ])  # fmt: skip

    return decorate


def _model_options(fn: Any) -> Any:
    """--args and --weights, for PyTorch model specs; read back by `_load`."""
    options = [
        click.option(
            "--args",
            "factory_args",
            metavar="JSON",
            expose_value=False,
            callback=_remember,
            help="PyTorch spec: the factory's keyword arguments, e.g. '{\"num_classes\": 10}'.",
        ),
        click.option(
            "--weights",
            type=click.Path(path_type=Path),
            expose_value=False,
            callback=_remember,
            help="PyTorch spec: a state_dict file to load (read with weights_only=True).",
        ),
        click.option(
            "--timeout",
            "factory_timeout",
            type=click.FloatRange(min=0, min_open=True),
            metavar="SECONDS",
            expose_value=False,
            callback=_remember,
            help="PyTorch spec: give up when the factory has not returned after this long.",
        ),
    ]
    return _with_options(fn, options)


def _data_options(fn: Any, batch_size: int = 32) -> Any:
    """The options every command that reads data shares."""
    options = [
        click.option(
            "--batch-size",
            default=batch_size,
            show_default=True,
            type=click.IntRange(min=1),
            help="Images per batch.",
        ),
        click.option(
            "--max-batches", type=click.IntRange(min=1), help="Stop after this many batches."
        ),
        click.option(
            "--scale",
            metavar="FACTOR",
            help="Multiply inputs by FACTOR, e.g. 1/255 for 0-255 pixels into 0-1.",
        ),
        click.option(
            "--preprocess",
            metavar="NAME",
            help="keras.applications preprocessing by module (resnet_v2, mobilenet_v2, "
            "densenet, resnet50, ...) or mode (tf, torch, caffe), after --scale.",
        ),
        click.option(
            "--channels", type=click.Choice(["1", "3"]), help="Convert images to 1 or 3 channels."
        ),
        click.option(
            "--image-size",
            type=click.IntRange(min=1),
            expose_value=False,
            callback=_remember,
            help="Resize images to this side (default: the model's input size, when known).",
        ),
    ]
    return _with_options(fn, options)


def _tta_data_options(fn: Any) -> Any:
    """The data options with the TENT paper's batch of 64, as `bnkit.tta` has."""
    return _data_options(fn, batch_size=64)


SELECT_OPTION = click.option(
    "--select",
    metavar="SELECTOR",
    help="Only the BN layers this selector picks (bn, re:REGEX, glob:PATTERN, block:NAME, ...).",
)
