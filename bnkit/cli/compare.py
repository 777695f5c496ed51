"""`bnkit compare`: BN strategies run side by side on labelled data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from bnkit.cli._app import _epilog, _err, _out, cli
from bnkit.cli._options import _model_options, _runs_options
from bnkit.cli._run import _check_inputs, _load, _open_data
from bnkit.errors import BnkitError


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
@_runs_options(epochs=5)
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
