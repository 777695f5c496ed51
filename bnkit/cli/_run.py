"""What the commands share while they run: loading the model MODEL names (checked
before any framework starts), the framework's start-up chatter kept off stderr, the
ranks of a torchrun job, the data opened with the options given, progress bars."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from bnkit.cli._app import _err, _out
from bnkit.cli._main import _first_line
from bnkit.errors import BnkitError


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


@contextlib.contextmanager
def _progress(label: str, total: int | None) -> Iterator[Any]:
    """A transient progress bar on stderr; yields the callback that advances it."""
    from rich.progress import Progress

    with Progress(console=_err, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda k: progress.update(task, completed=k)


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
