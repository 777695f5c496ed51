"""The `bnkit` command: parse, call one library function, render."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click
from rich.console import Console

from bnkit._launch import EXIT_INTERRUPTED, INTERRUPTED, release, started_as_command
from bnkit.errors import BnkitError, BnkitWarning

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

DEMO_LEGEND_TORCH = """\
Each row starts from the same weights and trains with the usual loop: model.train(), then
SGD over the parameters that require grad.
- requires_grad=False stops gamma/beta, not the statistics: train() still updates them.
- bn.eval() is undone by the next model.train().
- Lightning's BaseFinetuning.freeze keeps the statistics by setting track_running_stats=False,
  so BN normalises every training batch with its own statistics, unlike inference.
- timm's freeze and torchvision's FrozenBatchNorm2d swap the modules: frozen for good, and
  no mode but frozen (bnkit reports them as frozen).
- bnkit's modes are pinned through model.train() and verified by watch."""
FRAMEWORK_CHOICE = click.Choice(["keras", "torch", "both"])


def _with_options(fn: Any, options: list[Any]) -> Any:
    """`fn` decorated with `options`, listed in the order --help shows them."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[f"bnkit.{param.name}"] = value
    return value


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


def _load(model: Path) -> Any:
    """The model MODEL names: a '.keras' file, or a PyTorch spec built with --args and
    its --weights loaded."""
    from bnkit.backends import framework_of, load_model

    meta = click.get_current_context().meta
    _check_inputs(model)
    _framework_start(framework_of(model))
    with _deadline(meta.get("bnkit.factory_timeout"), f"{model}: the factory"):
        loaded = load_model(model, meta.get("bnkit.factory_args"), meta.get("bnkit.weights"))
    _note_random_weights(model, meta)
    return loaded


@contextlib.contextmanager
def _deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Gives up on the block after `seconds` (none: waits as long as it takes), in one
    line naming `what` and --timeout."""
    if seconds is None:
        yield
        return
    import signal

    def expired(signum: int, frame: Any) -> None:
        raise BnkitError(f"{what} did not return within {seconds:g} s (--timeout)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _note_random_weights(model: Path, meta: dict[str, Any]) -> None:
    """One line on stderr when a torchvision or timm spec is built with random weights
    (bnkit passes weights=None / pretrained=False: nothing is downloaded)."""
    from bnkit.backends.torch import files as torch_files

    if meta.get("bnkit.weights") is not None or not torch_files.is_spec(str(model)):
        return
    spec = torch_files.parse(str(model))
    args = json.loads(meta.get("bnkit.factory_args") or "{}")
    if spec.source not in ("torchvision", "timm") or args.get("weights") or args.get("pretrained"):
        return
    click.echo(
        f"note: {model} has random weights (bnkit builds it with "
        f"{'weights=None' if spec.source == 'torchvision' else 'pretrained=False'}); give "
        "--weights FILE, a state_dict, for trained ones",
        err=True,
    )


def _check_inputs(model: Path, *data: Path | None) -> None:
    """Refuses a bad model (file, spec, --args, --weights) or data path before any
    framework starts (seconds of imports)."""
    from bnkit.backends import check_model
    from bnkit.data import check_source

    meta = click.get_current_context().meta
    check_model(model, meta.get("bnkit.factory_args"), meta.get("bnkit.weights"))
    for path in data:
        if path is not None:
            check_source(path)


START_CHATTER = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)
"""What TensorFlow 2.21 prints to the process's stderr whenever it starts, whatever
TF_CPP_MIN_LOG_LEVEL says: dropped, so that an error stays one line."""


def _framework_start(framework: str) -> None:
    """Starts `framework` (Keras with its backend, or torch) after checking that it can
    start here, with the process's stderr captured: what it wrote there is printed again
    except TensorFlow's start-up chatter."""
    from bnkit.backends import check_framework

    if framework in sys.modules:
        return
    check_framework(framework)
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            __import__(framework)
        except Exception as err:  # a broken install raises anything
            raise BnkitError(
                f"{framework} failed to start ({type(err).__name__}: {_first_line(err)}); "
                "check its installation"
            ) from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
    kept = [line for line in text.splitlines() if not any(c in line for c in START_CHATTER)]
    if kept:
        print("\n".join(kept), file=sys.stderr)


@contextlib.contextmanager
def _ranks(model: Any) -> Iterator[tuple[int, int]]:
    """(rank, world) of this process: under torchrun (WORLD_SIZE > 1 in the environment)
    it is one rank of the job for the command's duration; alone it is (0, 1)."""
    from bnkit.backends import get_backend

    world = _world()
    if world < 2:
        yield 0, 1
        return
    with get_backend(model).launched_job(world, on_wait=_say) as ranks:
        yield ranks


def _say(line: str) -> None:
    """One line on stderr."""
    _err.print(line, highlight=False, soft_wrap=True)


LAUNCH_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets besides WORLD_SIZE, and a process group needs."""


def _world() -> int:
    """WORLD_SIZE, checked with the launcher's other variables before anything starts."""
    text = os.environ.get("WORLD_SIZE", "").strip()
    if not text:
        return 1
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        raise BnkitError(
            f"WORLD_SIZE={text!r} is not a number of processes: unset it, or start bnkit with "
            "torchrun, which sets it"
        )
    if world == 1:
        return 1
    missing = [v for v in LAUNCH_VARIABLES if not os.environ.get(v, "").strip()]
    if missing:
        raise BnkitError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start bnkit with torchrun "
            f"(torchrun --nproc-per-node {world} -m bnkit.cli ...), which sets them, or "
            "unset WORLD_SIZE to run in one process"
        )
    rank, port = os.environ["RANK"].strip(), os.environ["MASTER_PORT"].strip()
    if not rank.isdigit() or int(rank) >= world:
        raise BnkitError(f"RANK={rank!r} is not a rank of a job of {world} (0..{world - 1})")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BnkitError(f"MASTER_PORT={port!r} is not a port number (1..65535)")
    return world


def _on_ranks(
    measure: Any, model: Any, source: Any, max_batches: int | None, label: str, select: Any
) -> tuple[int, Any]:
    """`measure` (adapt or shift) over the data with a progress bar, and this process's
    rank; under torchrun each process reads its share of the batches."""
    with _ranks(model) as (rank, world):
        if world > 1:
            source = source.sharded(rank, world)
        total = None if world > 1 else _progress_total(source, max_batches)
        with _progress(label, total) as tick:
            report = measure(model, source, select=select, max_batches=max_batches, on_batch=tick)
            return rank, report


def _input_shape() -> tuple[int, ...] | None:
    """--input-shape as a tuple of positive ints."""
    text = click.get_current_context().meta.get("bnkit.input_shape")
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in str(text).replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise BnkitError(f"--input-shape {text!r}: give positive sizes such as 3,224,224")
    from bnkit.data import EXAMPLE_BATCH, check_fits_memory

    check_fits_memory((EXAMPLE_BATCH, *shape), f"--input-shape {text}: a batch of {EXAMPLE_BATCH}")
    return shape


def _inputs(model: Path) -> list[Path]:
    """The files MODEL reads, which no output may replace."""
    weights = click.get_current_context().meta.get("bnkit.weights")
    return [model] + ([weights] if weights is not None else [])


def _epilog(*examples: str, model: bool = True) -> str:
    """A command's --help epilog: its examples (kept as written), then what MODEL is."""
    lines = "\n".join(f"  {e}" for e in examples)
    text = f"\b\nExamples:\n{lines}"
    return f"{text}\n\n{MODEL_HELP}" if model else text


MAX_TENT_STEPS = 1000
"""TENT takes one step a batch; a thousand is already beyond any published setting."""
MAX_EPOCHS = 10_000
MAX_SEEDS = 1000
MAX_DIGITS_SIZE = 1024
"""The embedded digits are 8x8 images: beyond this side they only cost memory."""

MODEL_HELP = (
    "MODEL is a '.keras' file or a PyTorch model spec: torchvision:NAME, timm:NAME, "
    "package.module:factory or path/to/file.py:factory. A spec runs Python code, as "
    "`python -c` does (the module is imported and the factory called with --args): give "
    "only specs you trust. A factory that never returns keeps bnkit waiting: stop it with "
    "Ctrl-C, or give --timeout SECONDS."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnkit")
def cli() -> None:
    """BatchNorm made correct, visible and decidable in transfer learning."""


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


def _open_data(
    model: Any,
    data: Path,
    batch_size: int,
    scale: str | None,
    preprocess: str | None,
    channels: str | None,
) -> Any:
    """DATA (an .npz or a folder of class sub-folders) as batches sized for the model, laid
    out as its framework takes images (channels-last for Keras, channels-first for PyTorch)."""
    from bnkit.backends import get_backend
    from bnkit.backends.base import CHANNELS_FIRST
    from bnkit.data import load

    backend = get_backend(model)
    first = backend.layout == CHANNELS_FIRST
    shape = backend.input_shape(model)
    size = None
    if shape is not None and len(shape) == 3:
        size = tuple(shape[1:]) if first else tuple(shape[:2])
    image_size = size if size is not None and None not in size else None
    given = click.get_current_context().meta.get("bnkit.image_size")
    if given is not None:
        image_size = (given, given)
    return load(
        data,
        batch_size=batch_size,
        image_size=image_size,  # type: ignore[arg-type]
        channels=int(channels) if channels else None,
        scale=scale,
        preprocess=preprocess,
        channels_first=first,
    )


def _progress_total(data: Any, max_batches: int | None) -> int | None:
    total = None if data.size is None else -(-data.size // data.batch_size)
    if max_batches is not None:
        return max_batches if total is None else min(total, max_batches)
    return total


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


@contextlib.contextmanager
def _progress(label: str, total: int | None) -> Iterator[Any]:
    """A transient progress bar on stderr; yields the callback that advances it."""
    from rich.progress import Progress

    with Progress(console=_err, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda k: progress.update(task, completed=k)


@cli.command(
    "compare",
    epilog=_epilog(
        "bnkit compare model.keras train.npz --val val.npz -o results/",
        "bnkit compare model.keras train.npz --val val.npz --strategies frozen,train,tent",
    ),
)
@_model_options
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("train_data", type=click.Path(path_type=Path))
@click.option(
    "--val",
    "val_data",
    type=click.Path(path_type=Path),
    required=True,
    help="Labelled validation data (.npz with x and y, or a folder).",
)
@click.option(
    "--strategies",
    default="frozen,affine,train,adapt",
    show_default=True,
    help="Comma-separated BN modes, or tent or robust (label-free, on the validation "
    "inputs); "
    "NAME:RULE;RULE for your own policy, e.g. "
    "'preact:bn=train;re:preact_bn$=frozen'.",
)
@click.option(
    "--epochs",
    default=5,
    show_default=True,
    type=click.IntRange(1, MAX_EPOCHS),
    help="Epochs per run.",
)
@click.option(
    "--seeds",
    default=3,
    show_default=True,
    type=click.IntRange(1, MAX_SEEDS),
    help="How many seeds: each strategy runs with seeds 0..N-1.",
)
@click.option("--train-from", metavar="NAME", help="First trained layer (default: all).")
@click.option("--lr", default=1e-3, show_default=True, help="Learning rate.")
@click.option(
    "--optimizer",
    type=click.Choice(["adam", "sgd"]),
    default="adam",
    show_default=True,
    help="Adam, or SGD with momentum 0.9.",
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per training batch.",
)
@click.option("--scale", metavar="FACTOR", help="Multiply inputs by FACTOR (e.g. 1/255).")
@click.option("--preprocess", metavar="NAME", help="keras.applications preprocessing.")
@click.option(
    "--executor",
    type=click.Choice(["sequential", "ray"]),
    default="sequential",
    show_default=True,
    help="Run the runs one after the other here, or as Ray tasks.",
)
@click.option(
    "--address",
    metavar="ADDRESS",
    help="The Ray cluster for --executor ray (ray://HOST:10001, auto); default: a local one.",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Write compare.json and compare.png into this folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--overwrite", is_flag=True, help="Replace compare.json and compare.png from an earlier run."
)
def compare_cmd(
    model: Path,
    train_data: Path,
    val_data: Path,
    strategies: str,
    epochs: int,
    seeds: int,
    train_from: str | None,
    lr: float,
    optimizer: str,
    batch_size: int,
    scale: str | None,
    preprocess: str | None,
    executor: str,
    address: str | None,
    out_dir: Path | None,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Fine-tune MODEL on TRAIN_DATA once per BN strategy and seed; compare on --val."""
    from bnkit.compare import Strategy, compare
    from bnkit.data import parse_scaling
    from bnkit.files import check_out_dir

    specs = _parse_strategies(strategies)
    for spec in specs:
        Strategy.of(spec)
    if address is not None and executor != "ray":
        raise BnkitError("--address names a Ray cluster: give it with --executor ray")
    if executor == "ray":
        from bnkit.ray_executor import check_address

        check_address(address)
    parse_scaling(scale, preprocess)
    _check_inputs(model, train_data, val_data)
    if out_dir is not None:  # checked before the sweep, not after it
        check_out_dir(out_dir, COMPARE_FILES, model, train_data, val_data, overwrite=overwrite)
    m = _load(model)
    train = _open_data(m, train_data, batch_size, scale, preprocess, None)
    val = _open_data(m, val_data, batch_size, scale, preprocess, None)
    with _CompareProgress() as bars:
        result = compare(
            m, train, val, specs, epochs=epochs, seeds=seeds,
            train_from=train_from, batch_size=batch_size, lr=lr, optimizer=optimizer,
            progress=bars, executor=executor, address=address,
        )  # fmt: skip
    if out_dir is not None:
        _write_compare(result, out_dir)
    if as_json:
        click.echo(result.to_json())
        return
    _out.print(result.table())
    _out.print(str(result), highlight=False)
    if out_dir is not None:
        _out.print(f"wrote {out_dir / 'compare.json'} and {out_dir / 'compare.png'}")


COMPARE_FILES = ("compare.json", "compare.png")


def _parse_strategies(text: str) -> list[Any]:
    specs: list[Any] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if ":" in item and item.split(":", 1)[0] not in (
            "re",
            "glob",
            "type",
            "index",
            "from",
            "depth",
            "block",
        ):
            name, rules = item.split(":", 1)
            specs.append((name, [r for r in rules.split(";") if r]))
        else:
            specs.append(item)
    return specs


def _write_compare(result: Any, out_dir: Path) -> None:
    """compare.json and compare.png, moved into place together."""
    from bnkit.files import atomic_files
    from bnkit.plots import compare_plot

    with atomic_files(out_dir, COMPARE_FILES) as paths:
        paths["compare.json"].write_text(result.to_json())
        compare_plot(result, paths["compare.png"])


class _CompareProgress:
    """An overall bar and one bar per run, on stderr."""

    def __enter__(self) -> _CompareProgress:
        from rich.progress import Progress

        self._progress = Progress(console=_err, transient=True)
        self._progress.__enter__()
        self._overall = self._progress.add_task("runs", total=None)
        self._task: Any = None
        self._done = 0
        self._total: int | None = None
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def run_started(self, label: str, steps: int, index: int, total: int) -> None:
        self._total = total
        self._progress.update(self._overall, total=total, completed=index)
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(label, total=steps)

    def step(self) -> None:
        self._progress.advance(self._task)

    def run_finished(self, run: Any) -> None:
        self._done += 1
        self._progress.update(
            self._overall, completed=self._done, description=f"runs done: {self._done}"
        )
        what = f"val accuracy {run.final_val_accuracy:.1%}"
        if run.status != "ok":
            what = f"{run.status}" + (f": {run.error}" if run.error else "")
        self._progress.console.print(
            f"{run.strategy} seed {run.seed}: {what} ({run.seconds:.0f} s){self._left()}",
            highlight=False,
        )

    def _left(self) -> str:
        """'; run 3 of 12, about 25 min left' from the runs so far (also in a log file,
        where the bars are not drawn)."""
        if not self._total:
            return ""
        left = (time.monotonic() - self._start) / self._done * (self._total - self._done)
        when = f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left"
        return f"; run {self._done} of {self._total}, {when}" if left > 0 else ""


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


@cli.command(
    "digits", epilog=_epilog("bnkit digits -o digits/", "bnkit digits -o d16/ --image-size 16",
                             model=False)
)  # fmt: skip
@click.option(
    "-o",
    "--output",
    "folder",
    type=click.Path(path_type=Path),
    default=Path("bnkit-digits"),
    show_default=True,
    help="The folder to write the data and the model into.",
)
@click.option("--seed", default=0, show_default=True, help="Split, patches and training seed.")
@click.option(
    "--image-size",
    "size",
    default=32,
    show_default=True,
    type=click.IntRange(8, MAX_DIGITS_SIZE),
    help="Image side in pixels.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace the files an earlier bnkit digits wrote there."
)
def digits_cmd(folder: Path, seed: int, size: int, overwrite: bool) -> None:
    """Write the embedded digits (source and MNIST-M-style target, train/val/test .npz) and
    the model pretrained on the source into FOLDER; print the shift and AdaBN evidence."""
    from bnkit.backends import save_model
    from bnkit.files import atomic_files, check_out_dir
    from bnkit.pretrain import DIGITS_FILES, adabn_evidence, pretrained_digits, write_digits

    model_name = "digits-resnet.keras"
    check_out_dir(folder, (model_name, *DIGITS_FILES), overwrite=overwrite)
    with _err.status("pretraining on the source digits (cached after the first run)..."):
        net = pretrained_digits(size=size, seed=seed)
    with atomic_files(folder, (model_name, *DIGITS_FILES)) as paths:
        save_model(net.model, paths[model_name])
        written = write_digits(paths[model_name].parent, size=size, seed=seed)
        with _err.status("measuring shift and the effect of adapt..."):
            evidence = adabn_evidence(net.model, size=size, seed=seed)
    _out.print(str(evidence), highlight=False)
    _out.print(
        f"wrote {folder / model_name} and {len(written)} .npz files "
        f"({', '.join(p.name for p in written)}) into {folder}",
        highlight=False,
    )


@cli.command(
    "demo", epilog=_epilog("bnkit demo", "bnkit demo --framework torch --skip-traps --epochs 5",
                           model=False)
)  # fmt: skip
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("bnkit-demo"),
    show_default=True,
    help="Folder for the figures and JSON.",
)
@click.option(
    "--labels-per-class",
    default=20,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Labelled target images per class for the fine-tunes.",
)
@click.option(
    "--epochs",
    default=10,
    show_default=True,
    type=click.IntRange(1, MAX_EPOCHS),
    help="Epochs per run.",
)
@click.option(
    "--seeds",
    default=3,
    show_default=True,
    type=click.IntRange(1, MAX_SEEDS),
    help="How many seeds: each strategy runs with seeds 0..N-1.",
)
@click.option("--skip-traps", is_flag=True, help="Leave out the traps tables.")
@click.option(
    "--overwrite", is_flag=True, help="Replace the figures and JSON an earlier demo wrote there."
)
@click.option(
    "--framework",
    type=FRAMEWORK_CHOICE,
    default="both",
    show_default=True,
    help="Tell the story with Keras, with PyTorch, or with both.",
)
def demo_cmd(
    out_dir: Path,
    labels_per_class: int,
    epochs: int,
    seeds: int,
    skip_traps: bool,
    overwrite: bool,
    framework: str,
) -> None:
    """The whole story on the embedded data, in Keras and in PyTorch: the traps, a model
    pretrained on the source digits, inspect and shift on the target, and compare of the
    BN strategies."""
    from bnkit.demo import story_files
    from bnkit.files import check_out_dir

    frameworks = ["keras", "torch"] if framework == "both" else [framework]
    names = tuple(n for f in frameworks for n in story_files(f))
    check_out_dir(out_dir, names, overwrite=overwrite)
    if "torch" in frameworks:
        # torch 2.14's first import of torch._dynamo (torch.optim makes it) crashes once
        # TensorFlow is loaded (its bundled triton): import it before Keras loads TF
        import torch._dynamo  # noqa: F401
    for f in frameworks:
        _story(f, out_dir, labels_per_class, epochs, seeds, skip_traps, overwrite)


def _story(
    framework: str,
    out_dir: Path,
    labels_per_class: int,
    epochs: int,
    seeds: int,
    skip: bool,
    overwrite: bool,
) -> None:
    from bnkit.demo import digits_story, kit

    name = "Keras 3" if framework == "keras" else "PyTorch"
    if not skip:
        _out.rule(
            f"{name} 1. What each way of freezing BN really does ({kit(framework).TRAPS_TITLE})"
        )
        _traps(steps=2, input_size=32, framework=framework)
    _out.rule(f"{name} 2. Transfer to a shifted domain: digits -> MNIST-M-style digits")
    with _CompareProgress() as bars:
        story = digits_story(
            out_dir, labels_per_class=labels_per_class, epochs=epochs, seeds=seeds,
            progress=bars, on_status=lambda msg: _err.print(msg), framework=framework,
            overwrite=overwrite,
        )  # fmt: skip
    cached = "loaded from the cache" if story.pretrained_cached else "trained now, then cached"
    _out.print(
        f"pretrained residual CNN ({cached}): {story.source_accuracy:.1%} on held-out source "
        "digits",
        highlight=False,
    )
    _out.print(f"inspect: {story.inspect.summary().splitlines()[0]}", highlight=False)
    _out.print(story.shift.table())
    _out.print(f"shift: {story.shift}", highlight=False)
    ev = story.evidence
    _out.print(
        f"without labels: target accuracy {ev.accuracy_target:.1%} with the source statistics, "
        f"{ev.accuracy_adapted:.1%} after adapt on unlabelled target images "
        f"({ev.accuracy_adapted - ev.accuracy_target:+.1%})",
        highlight=False,
    )
    _out.print(
        f"compare: whole network fine-tuned on {story.labelled} labelled target images, "
        f"{epochs} epochs, validated on the target validation split",
        highlight=False,
    )
    _out.print(story.compare.table())
    _out.print(str(story.compare), highlight=False)
    _out.print(f"wrote {', '.join(story.files)}", highlight=False)


@cli.command(
    "traps", epilog=_epilog("bnkit traps", "bnkit traps --framework torch --json", model=False)
)
@click.option(
    "--train-steps",
    "steps",
    default=2,
    show_default=True,
    type=click.IntRange(1, MAX_EPOCHS),
    help="Training steps per approach.",
)
@click.option(
    "--image-size",
    "input_size",
    default=32,
    show_default=True,
    type=click.IntRange(min=32),
    help="Image side in pixels (ResNet50V2 and ResNet-50 need 32 or more).",
)
@click.option(
    "--framework",
    type=click.Choice(["keras", "torch"]),
    default="keras",
    show_default=True,
    help="Keras 3's ResNet50V2, or torchvision's ResNet-50 with PyTorch's, Lightning's, "
    "timm's and PEFT's ways.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def traps_cmd(steps: int, input_size: int, framework: str, as_json: bool) -> None:
    """Show what each way of freezing BN really does, in Keras 3 or in PyTorch."""
    _traps(steps, input_size, as_json, framework)


def _traps(steps: int, input_size: int, as_json: bool = False, framework: str = "keras") -> None:
    from bnkit.demo import kit, seed_demo

    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing chatter per approach
    with _err.status(f"training {kit(framework).TRAPS_TITLE} once per approach..."):
        result = seed_demo(input_size=input_size, steps=steps, framework=framework)
    if as_json:
        click.echo(result.to_json())
        return
    _out.print(result.table())
    _out.print(DEMO_LEGEND if framework == "keras" else DEMO_LEGEND_TORCH, highlight=False)


def _save_and_render(
    model: Any, output: Path, result: Any, as_json: bool, sidecars: dict[Path, str] | None = None
) -> None:
    """Writes the model (and its sidecar files) atomically, then prints the result (JSON or
    text)."""
    from bnkit.backends import save_model

    save_model(model, output, sidecars)
    if as_json:
        click.echo(result.to_json())
        return
    _out.print(str(result), highlight=False)
    _out.print(f"wrote {output}", highlight=False)


RENAMED = {
    "check": {"--example": "--val", "--steps": "--train-steps"},
    "export": {"--check": "--val"},
    "compare": {"--out": "--output"},
    "demo": {"--out": "--output"},
    "digits": {"--size": "--image-size"},
    "traps": {"--input-size": "--image-size", "--steps": "--train-steps"},
    "tta": {"--steps": "--tent-steps"},
}
"""Option spellings of bnkit 0.1, per command, and their names since 0.2: still accepted,
with a warning, until 0.3 (CHANGELOG.md)."""


def _renamed(argv: list[str]) -> tuple[list[str], list[str]]:
    """`argv` with 0.1 spellings replaced by today's (and `digits FOLDER` by `digits -o
    FOLDER`), and a note for each."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None:
        return argv, []
    names = RENAMED.get(command, {})
    out, notes = [], []
    after = argv.index(command) + 1
    for i, arg in enumerate(argv):
        old, eq, value = arg.partition("=")
        if i >= after and old in names:
            notes.append(f"{old} is now {names[old]} (the old name works until bnkit 0.3)")
            arg = names[old] + eq + value
        out.append(arg)
    if command == "digits" and len(out) > after and not out[after].startswith("-"):
        notes.append("bnkit digits FOLDER is now bnkit digits -o FOLDER")
        out.insert(after, "-o")
    return out, notes


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _one_line(text: str) -> str:
    """`text` with control characters escaped (a newline in a file name), so that a message
    is always one line."""
    import unicodedata

    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in text.strip())


def _warning_text(w: warnings.WarningMessage) -> str:
    category = "" if issubclass(w.category, BnkitWarning) else f"{w.category.__name__}: "
    return _one_line(f"{category}{w.message}")


def _fail(message: str, caught: list[warnings.WarningMessage], code: int = EXIT_USAGE) -> None:
    """Prints the one error line (with the warnings that came before it) and exits."""
    seen = list(dict.fromkeys(_warning_text(w) for w in caught))
    caught.clear()
    after = f" (after the warning: {'; '.join(seen)})" if seen else ""
    click.echo(f"bnkit: error: {_one_line(message)}{after}", err=True)
    sys.exit(code)


def _exit_interrupted() -> None:
    """Exit 130 after Ctrl-C. The command (not a program calling `main`) leaves at once,
    its outputs already removed: tearing down an interpreter that Ray's core worker
    threads ran in after a Ctrl-C crashed it (segmentation fault after the line)."""
    if started_as_command(sys.argv, getattr(sys, "orig_argv", [])):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)


def _reconfigure_streams() -> None:
    """stdout line-buffered: in a log of stdout and stderr together, progress and
    warnings (stderr) land in the section of stdout they belong to. Both streams write
    what their encoding lacks as backslash escapes (a file named 'sortie ü.keras' under
    PYTHONIOENCODING=ascii or LANG=C), never a UnicodeEncodeError."""
    for stream, line_buffering in ((sys.stdout, True), (sys.stderr, None)):
        with contextlib.suppress(AttributeError, ValueError):  # replaced or closed
            stream.reconfigure(  # type: ignore[union-attr]
                errors="backslashreplace", line_buffering=line_buffering
            )


def main() -> None:
    """Entry point: runs the CLI and turns bnkit errors into one line and exit status 2.

    Warnings are collected and printed after the command, one line each, or folded into
    the error line; Ctrl-C exits 130 and SIGTERM 143, in both cases after every
    temporary output is removed."""
    from bnkit.files import terminate_cleanly

    release()  # Ctrl-C from here: KeyboardInterrupt, caught below
    terminate_cleanly()
    _reconfigure_streams()
    args, notes = _renamed(sys.argv[1:])
    with warnings.catch_warnings(record=True) as caught:
        for note in notes:
            warnings.warn(note, BnkitWarning, stacklevel=1)
        try:
            cli.main(args, prog_name="bnkit", standalone_mode=False)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo(INTERRUPTED, err=True)
            _exit_interrupted()
        except click.ClickException as err:
            _fail(f"{err.format_message()} (see bnkit --help)", caught)
        except BnkitError as err:
            _fail(str(err), caught)
        except OSError as err:  # a file system refusal not foreseen by the checks: one line
            where = f"{err.filename}: " if err.filename else ""
            _fail(f"{where}{err.strerror or err}", caught)
        except click.exceptions.Exit as err:
            sys.exit(err.exit_code)
        finally:  # also on exit 1 (findings) and SIGTERM
            for text in dict.fromkeys(_warning_text(w) for w in caught):
                click.echo(f"bnkit: warning: {text}", err=True)


if __name__ == "__main__":
    main()
