"""Strategy sweep: each BN strategy for each seed from the same saved weights, with a
divergence guard, frozen-prefix caching, and a summary that is honest about noise."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from bnkit.backends import get_backend
from bnkit.backends.base import CHANNELS_FIRST, batch_slices
from bnkit.data import DEFAULT_BATCH_SIZE, DataError, load
from bnkit.errors import BnkitError, BnkitWarning, SelectorError, check_int, check_rate, check_str
from bnkit.policy import Mode, Rule, parse_mode, parse_rule

DEFAULT_STRATEGIES = ("frozen", "affine", "train", "adapt")
LABEL_FREE = ("tent", "robust")
"""strategies that use no labels: test-time adaptation on the validation inputs."""
DEFAULT_EPOCHS = 5
DEFAULT_SEEDS = 3
DEFAULT_LR = 1e-3
OPTIMIZERS = ("adam", "sgd")
EXECUTORS = ("sequential", "ray")


class Progress(Protocol):
    """Receives progress events; the CLI draws bars from them."""

    def run_started(self, label: str, steps: int, index: int, total: int) -> None: ...

    def step(self) -> None: ...

    def run_finished(self, run: Run) -> None: ...


@dataclass(frozen=True)
class Strategy:
    """A named way to treat BN while fine-tuning: a BN mode for the trained part, or rules.

    `adapt` re-estimates every BN layer's statistics on the training inputs first, then
    keeps them frozen. `tent` and `robust` use no labels and do not fine-tune: the
    model adapts at test time to the validation inputs (`bnkit.tta`: TENT with guards,
    or `robust`, the statistics of the stream so far with a label-shift correction;
    the stream ordered by the seed, in batches of 64), then is scored on them.
    """

    name: str
    mode: Mode | None = None
    rules: tuple[Rule, ...] = ()
    test_time: str | None = None
    """`tent` or `robust`: a label-free strategy run by `bnkit.tta` on the validation
    inputs."""

    @classmethod
    def of(cls, spec: str | Strategy | tuple[str, Sequence[str | Rule]]) -> Strategy:
        """From a mode name, a Strategy, or `(name, rules)` with rules as `"SELECTOR=MODE"`."""
        if isinstance(spec, Strategy):
            return spec
        if isinstance(spec, str):
            if spec in LABEL_FREE:
                return cls(spec, test_time=spec)
            try:
                return cls(spec, mode=parse_mode(spec))
            except SelectorError as e:
                raise SelectorError(f"{e}, or the label-free {', '.join(LABEL_FREE)}") from None
        name, rules = spec
        parsed = tuple(r if isinstance(r, Rule) else parse_rule(r) for r in rules)
        return cls(name, rules=parsed)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of one run."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    bn_stats_moved: int
    """BN layers whose running statistics changed during the epoch."""
    bn_stats_delta: float
    """largest change of any running mean or variance during the epoch."""


@dataclass(frozen=True)
class Run:
    """One strategy with one seed."""

    strategy: str
    seed: int
    epochs: tuple[EpochRecord, ...]
    status: str
    """`ok`, `diverged`, or `failed` (the run raised or its Ray worker died)."""
    final_val_loss: float
    final_val_accuracy: float
    seconds: float
    cached_prefix: bool
    diverged_epoch: int | None = None
    diverged_step: int | None = None
    diverged_layer: str | None = None
    """first layer whose output was non-finite on the offending batch (None: only the loss)."""
    bn_stats_kept: int = 0
    bn_layers: int = 0
    plan_problems: tuple[str, ...] = ()
    """differences between the strategy's plan and what `watch` saw."""
    error: str | None = None
    """why a `failed` run did not finish."""


@dataclass(frozen=True)
class Summary:
    """Final validation results of one strategy over seeds."""

    strategy: str
    val_accuracy_mean: float
    val_accuracy_std: float
    val_loss_mean: float
    val_loss_std: float
    runs: int
    """runs that finished (ok or diverged); failed runs are left out of the means."""
    diverged: int
    failed: int = 0


@dataclass(frozen=True)
class CompareResult:
    """Every run, the per-strategy summary, and the verdict."""

    runs: tuple[Run, ...]
    summaries: tuple[Summary, ...]
    best: str
    decisive: bool
    """False when the best strategy's lead is within the spread over seeds."""
    verdict: str
    head_replaced: bool
    train_from: str | None
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> str:
        """The whole result as a JSON document."""
        doc = {
            "best": self.best,
            "decisive": self.decisive,
            "verdict": self.verdict,
            "head_replaced": self.head_replaced,
            "train_from": self.train_from,
            "notes": list(self.notes),
            "summaries": [asdict(s) for s in self.summaries],
            "runs": [asdict(r) for r in self.runs],
        }
        return json.dumps(doc, indent=2, allow_nan=True)

    def table(self) -> Any:
        """A rich table: mean ± standard deviation over seeds per strategy."""
        from rich.table import Table

        seeds = max(s.runs for s in self.summaries)
        over = f"over {seeds} seeds" if seeds != 1 else "on one seed"
        t = Table(title=f"final validation results, mean ± std {over}")
        t.add_column("strategy", no_wrap=True)
        failed = any(s.failed for s in self.summaries)
        for col in ("val accuracy", "val loss", "runs", "diverged", *(("failed",) * failed)):
            t.add_column(col, justify="right")
        for s in sorted(self.summaries, key=lambda x: -np.nan_to_num(x.val_accuracy_mean, nan=-1)):
            t.add_row(
                s.strategy + (" *" if s.strategy == self.best else ""),
                f"{s.val_accuracy_mean:.1%} ± {s.val_accuracy_std:.1%}",
                f"{s.val_loss_mean:.3f} ± {s.val_loss_std:.3f}",
                str(s.runs),
                str(s.diverged),
                *((str(s.failed),) * failed),
            )
        return t

    def __str__(self) -> str:
        return "\n".join([self.verdict, *(f"note: {n}" for n in self.notes)])


def compare(
    model: Any,
    train: Any,
    val: Any,
    strategies: Sequence[str | Strategy | tuple[str, Sequence[str | Rule]]] = DEFAULT_STRATEGIES,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seeds: int | Sequence[int] = DEFAULT_SEEDS,
    train_from: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    num_classes: int | None = None,
    head: Any = None,
    optimizer: str = "adam",
    loss: Any = None,
    cache_prefix: bool = True,
    progress: Progress | None = None,
    executor: str = "sequential",
    address: str | None = None,
) -> CompareResult:
    """Fine-tunes `model` once per strategy and seed and compares validation results.

    Every run starts from the same weights, restored from one copy; for a given
    seed every strategy sees the same data order and the same optimiser (Adam at `lr`,
    or SGD with momentum 0.9) and loss (sparse cross-entropy, or `loss`). Layers before
    `train_from` are frozen (BN `frozen`); the rest trains with its BN layers in the
    strategy's mode (every BN layer when `train_from` is None). When the model's output
    does not have one unit per class, it gets a new top: on Keras, global average
    pooling, dropout 0.2 and a Dense layer on the last feature map (or `head`, called on
    it); on PyTorch, dropout 0.2 and a Linear layer in place of the last Linear module
    (or `head`, a module put there), or pooling, dropout and Linear after a model that
    outputs a feature map. A run whose loss or weights turn non-finite stops, gets its
    last finite weights back and is marked `diverged`; the sweep goes on. When
    everything before `train_from` is frozen and deterministic, the prefix runs once
    and training uses its cached outputs.

    With `executor="ray"` every (strategy, seed) run is a Ray task started from the
    packed start model (on the Ray instance already initialised, else one started
    locally, or the cluster at `address`), with the same numbers as run one after the
    other; a run that raises or whose worker dies is marked `failed` and left out of
    the summary, and the other runs are kept. While the runs are on Ray, what is
    printed on stdout goes to stderr (Ray's driver prints its workers' errors on
    stdout, where they would break a JSON report).

    PyTorch runs train as a user's loop does: `model.train()`, then one optimizer step
    per batch over the parameters that require grad; data is (N, C, H, W).

    Args:
        model: a Keras classifier or a PyTorch module (not modified).
        train: labelled training data, anything `bnkit.data.load` reads.
        val: labelled validation data.
        strategies: BN modes (`frozen`, `affine`, `train`, `adapt`), `tent` or
            `robust` (label free, need a model that already outputs the classes), `Strategy`
            objects, or `(name, ["SELECTOR=MODE", ...])` for your own policy.
        epochs: epochs per run.
        seeds: a number of seeds (0, 1, ...) or the seeds themselves.
        train_from: first trained layer, a module path on PyTorch (the whole network
            when None).
        batch_size: training batch size.
        lr: learning rate.
        num_classes: classes in the labels (their maximum + 1 when None).
        head: Keras: a function from the feature tensor to the new output tensor;
            PyTorch: a module that takes the features.
        optimizer: `adam` or `sgd` (momentum 0.9).
        loss: the framework's loss, called on (labels, outputs) by Keras and on
            (outputs, labels) by PyTorch; sparse cross-entropy when None.
        cache_prefix: allow frozen-prefix caching.
        progress: receives run and step events (on Ray, each run as it finishes).
        executor: `sequential` (in this process) or `ray`.
        address: the Ray cluster to use (`ray://host:10001`, `auto`); None: the Ray
            instance already initialised, else a local one.

    Examples:
        >>> import keras, numpy as np, bnkit
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...     keras.layers.BatchNormalization(), keras.layers.Dense(2)])
        >>> x = np.random.rand(32, 4).astype("float32"); y = (x[:, 0] > .5).astype(int)
        >>> r = bnkit.compare(m, (x, y), (x, y), ["frozen", "train"], epochs=1, seeds=1)
        >>> sorted(s.strategy for s in r.summaries)
        ['frozen', 'train']
    """
    lr = check_rate(lr)
    batch_size = check_int(batch_size, "batch_size")
    epochs = check_int(epochs, "epochs")
    if not isinstance(seeds, int):
        seeds = [check_int(s, "a seed", 0) for s in seeds]
    else:
        seeds = check_int(seeds, "seeds")
    if train_from is not None:
        check_str(train_from, "train_from", "layer4")
    if optimizer not in OPTIMIZERS:
        raise BnkitError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if executor not in EXECUTORS:
        raise BnkitError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    if executor == "ray":
        from bnkit.ray_executor import ray_module

        ray_module()  # says how to install it before anything runs
    backend = get_backend(model)
    trainer = backend.trainer()
    first = backend.layout == CHANNELS_FIRST
    train_data = load(train, channels_first=first)
    val_data = load(val, channels_first=first)
    if train_data.class_names and val_data.class_names:  # folders: classes match by name
        val_data = val_data.with_classes(train_data.class_names)
    x, y = _labelled(train_data, "training data")
    xv, yv = _labelled(val_data, "validation data")
    classes = num_classes or _class_count(y, yv)
    for labels, what in ((y, "training"), (yv, "validation")):
        if labels.min() < 0 or labels.max() >= classes:
            raise DataError(f"{what} labels lie outside 0..{classes - 1}: check num_classes")
    plans = [Strategy.of(s) for s in strategies]
    if not plans:
        raise BnkitError("no strategies given: name at least one of frozen, affine, train, adapt")
    names = [p.name for p in plans]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BnkitError(f"strategy {twice[0]!r} is named twice: give each strategy once")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or epochs < 1:
        raise BnkitError("compare needs at least one seed and one epoch")
    start_model = trainer.with_head(model, classes, head, x[:2])
    head_replaced = start_model is not model
    notes: list[str] = []
    if head_replaced and train_from is not None:
        train_from, moved = _train_from_in(backend, model, start_model, train_from)
        notes += moved
    _refuse_identical_sweep(backend, start_model, train_from, plans)
    label_free = [p.name for p in plans if p.test_time is not None]
    if label_free and head_replaced:
        raise BnkitError(
            f"{label_free[0]} uses no labels, so it cannot train a new head: give a model "
            f"whose output has one unit per class ({classes}), or leave {label_free[0]} out"
        )
    logits = trainer.from_logits(start_model)
    runs: list[Run] = []
    features: dict[str, Any] = {}
    # one working copy, independent of the caller's model (a new head shares its layers);
    # each run restores its weights from the one copy of the start state
    settings = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "logits": logits,
        "optimizer": optimizer, "loss": loss, "train_from": train_from,
        "cache_prefix": cache_prefix,
    }  # fmt: skip
    with trainer.working_copy(start_model) as work:
        if executor == "ray":
            from bnkit.ray_executor import ray_runs

            runs = ray_runs(trainer, work, plans, seed_list, (x, y), (xv, yv), settings,
                            progress, address, _one_run, failed_run)  # fmt: skip
        else:
            start = trainer.save_state(work)
            total = len(seed_list) * len(plans)
            for seed in seed_list:
                for strategy in plans:
                    run = _one_run(
                        backend,
                        trainer,
                        work,
                        start,
                        strategy,
                        seed,
                        (x, y),
                        (xv, yv),
                        progress=progress,
                        run_index=(len(runs), total),
                        features=features,
                        **settings,
                    )
                    runs.append(run)
                    if progress is not None:
                        progress.run_finished(run)
    for r in runs:
        if r.status == "failed":
            notes.append(f"{r.strategy} seed {r.seed} failed ({r.error}): left out of the summary")
    if cache_prefix and train_from is not None and not any(r.cached_prefix for r in runs):
        notes.append(
            f"frozen-prefix caching was not possible for train_from={train_from!r}: it needs a "
            "top-level layer with only frozen, deterministic layers before it"
        )
    if head_replaced:
        notes.append(f"the model's top was replaced by a new head with {classes} outputs")
    summaries = tuple(_summarise(p.name, [r for r in runs if r.strategy == p.name]) for p in plans)
    best, decisive, verdict = _verdict(summaries, len(seed_list), len(yv))
    return CompareResult(
        tuple(runs), summaries, best, decisive, verdict, head_replaced, train_from, tuple(notes)
    )


MAX_CLASSES = 100_000
"""The largest head compare builds from the labels alone (give num_classes for more)."""
SPARE_CLASSES = 100
"""Labels may reach this many times the classes seen (a subset of a larger label set)."""


def _class_count(y: np.ndarray, yv: np.ndarray) -> int:
    """The number of classes the labels imply (their maximum + 1), refused when far above
    the classes they hold: a stray label of 10**9 would build a head of 10**9 outputs."""
    classes = int(max(y.max(), yv.max())) + 1
    seen = len(np.unique(np.concatenate([y, yv])))
    if classes > MAX_CLASSES or classes > SPARE_CLASSES * seen:
        top = int(max(y.max(), yv.max()))
        raise DataError(
            f"the labels reach {top} but hold only {seen} classes: a head of {classes} "
            "outputs would be mostly unused (a stray or mis-encoded label?); give class "
            "indices 0..N-1, or num_classes for a larger label set"
        )
    return classes


def _train_from_in(
    backend: Any, model: Any, start_model: Any, train_from: str
) -> tuple[str, list[str]]:
    """`train_from` in the model with its new head: a layer of the replaced top (the old
    `head`, named nowhere now) means the first layer of the new top."""
    from bnkit.policy import FromLayer
    from bnkit.records import leaf_records

    _, new = leaf_records(backend.records(start_model))
    try:
        FromLayer(train_from).match(new)
        return train_from, []
    except SelectorError:
        pass
    _, old = leaf_records(backend.records(model))
    FromLayer(train_from).match(old)  # raises, naming the closest layers, when it is nowhere
    old_paths = {i.path for i in old}
    added = [i for i in new if i.path not in old_paths]
    if not added:
        raise SelectorError(f"no layer named {train_from!r} in the model with its new head")
    return added[0].name, [
        f"train_from {train_from!r} was in the replaced top: training from the new head's "
        f"first layer, {added[0].name!r}"
    ]


def _refuse_identical_sweep(
    backend: Any, model: Any, train_from: str | None, plans: Sequence[Strategy]
) -> None:
    """With no BN layer at or after `train_from`, the modes frozen, affine and train give
    the same run: say so instead of sweeping them."""
    from bnkit.policy import FromLayer
    from bnkit.records import leaf_records

    same = [p.name for p in plans if p.mode in (Mode.FROZEN, Mode.AFFINE, Mode.TRAIN)]
    if train_from is None or len(same) < 2:
        return
    _, infos = leaf_records(backend.records(model))
    if any(infos[i].is_bn for i in FromLayer(train_from).match(infos)):
        return
    raise BnkitError(
        f"no BN layer is at or after {train_from!r}: every BN layer is frozen whatever the "
        f"strategy, so {', '.join(same)} are the same run by construction; compare frozen "
        "with adapt (which re-estimates the frozen statistics), or train from an earlier layer"
    )


def _labelled(data: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = load(data).arrays()
    if y is None:
        raise DataError(f"{what} has no labels: compare needs (x, y), an .npz with y, or a folder")
    if y.ndim == 2 and y.shape[1] > 1:
        y = y.argmax(axis=1)
    y = y.reshape(len(y))
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise DataError(
            f"{what} has non-integer labels (e.g. {y[np.mod(y, 1) != 0][0]:g}): give class "
            "indices 0..N-1 or one-hot rows"
        )
    if len(x) != len(y):
        raise DataError(f"{what} has {len(x)} inputs but {len(y)} labels")
    return x, y.astype(np.int64)


def failed_run(strategy: str, seed: int, why: str) -> Run:
    """The record of a run that did not come back (its worker died, its task failed)."""
    return Run(strategy=strategy, seed=seed, epochs=(), status="failed",
               final_val_loss=float("nan"), final_val_accuracy=float("nan"), seconds=0.0,
               cached_prefix=False, error=why[:300])  # fmt: skip


def _one_run(
    backend: Any,
    trainer: Any,
    model: Any,
    start: Any,
    strategy: Strategy,
    seed: int,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    logits: bool,
    optimizer: str,
    loss: Any,
    train_from: str | None,
    cache_prefix: bool,
    progress: Progress | None,
    run_index: tuple[int, int],
    features: dict[str, Any],
) -> Run:
    import time

    from bnkit.freeze import freeze
    from bnkit.stats import adapt
    from bnkit.watch import watch

    t0 = time.perf_counter()
    backend.unfreeze(model)
    trainer.restore_state(model, start)
    if strategy.test_time is not None:
        return _test_time_run(trainer, model, strategy, seed, val, lr, optimizer, logits,
                              loss, progress, run_index, t0)  # fmt: skip
    x, y = train
    if strategy.mode is Mode.ADAPT:
        adapt(model, x, batch_size=batch_size)
    mode = strategy.mode.value if strategy.mode is not None else None
    with warnings.catch_warnings():  # the run compiles afresh right after
        warnings.simplefilter("ignore", BnkitWarning)
        plan = freeze(model, train_from=train_from, bn=mode, rules=strategy.rules)
    split = trainer.frozen_prefix(model, train_from) if cache_prefix else None
    target, xs, vs = model, x, val
    if split is not None:
        target = split.suffix
        key = trainer.fingerprint(split.prefix)  # runs whose prefix is the same share outputs
        if key not in features:
            features[key] = (
                trainer.predict(split.prefix, x),
                trainer.predict(split.prefix, val[0]),
            )
        xs, vs = features[key][0], (features[key][1], val[1])
    trainer.prepare(target, lr, logits, optimizer, loss)
    records: list[EpochRecord] = []
    stats = [backend.snapshot(model, weights_too=False).stats]

    def on_epoch(log: Any) -> None:
        now = backend.snapshot(model, weights_too=False).stats
        moved, delta = _drift(stats[-1], now)
        stats.append(now)
        records.append(EpochRecord(**asdict(log), bn_stats_moved=moved, bn_stats_delta=delta))

    if progress is not None:
        progress.run_started(
            f"{strategy.name} seed {seed}",
            epochs * len(batch_slices(np.arange(len(x)), batch_size)),
            *run_index,
        )
    with watch(model, plan) as w:
        diverged = trainer.guarded_fit(
            target, model, xs, y, vs,
            epochs=epochs, batch_size=batch_size, seed=seed,
            on_step=progress.step if progress is not None else None, on_epoch=on_epoch,
        )  # fmt: skip
    val_loss, val_acc = trainer.evaluate(target, *vs)
    report = w.report
    if report is None:
        raise BnkitError("internal: watch gave no report")
    counts = report.counts()
    return Run(
        strategy=strategy.name,
        seed=seed,
        epochs=tuple(records),
        status="ok" if diverged is None else "diverged",
        final_val_loss=val_loss,
        final_val_accuracy=val_acc,
        seconds=time.perf_counter() - t0,
        cached_prefix=split is not None,
        diverged_epoch=None if diverged is None else diverged.epoch,
        diverged_step=None if diverged is None else diverged.step,
        diverged_layer=None if diverged is None else diverged.layer,
        bn_stats_kept=counts["bn_stats_kept"],
        bn_layers=counts["bn_layers"],
        plan_problems=tuple(report.problems()) if diverged is None else (),
    )


def _test_time_run(
    trainer: Any,
    model: Any,
    strategy: Strategy,
    seed: int,
    val: tuple[np.ndarray, np.ndarray],
    lr: float,
    optimizer: str,
    logits: bool,
    loss: Any,
    progress: Progress | None,
    run_index: tuple[int, int],
    t0: float,
) -> Run:
    """A label-free run: `tta` on the validation inputs in the seed's order, in batches
    of 64 (TENT's, not the training batch size), then scored on them in inference mode
    (the statistics re-estimated on the stream)."""
    import time

    from bnkit.tta import DEFAULT_BATCH_SIZE, tta

    xv, yv = val
    order = np.random.default_rng(seed).permutation(len(xv))
    stream = DEFAULT_BATCH_SIZE  # the test-time batch, not the training batch
    if progress is not None:
        progress.run_started(f"{strategy.name} seed {seed}",
                             len(batch_slices(order, stream)), *run_index)  # fmt: skip
    on_batch = (lambda _: progress.step()) if progress is not None else None
    report = tta(model, xv[order], str(strategy.test_time), batch_size=stream, lr=lr,
                 optimizer=optimizer, on_batch=on_batch)  # fmt: skip
    trainer.prepare(model, lr, logits, optimizer, loss)
    val_loss, val_acc = trainer.evaluate(model, xv, yv)
    return Run(
        strategy=strategy.name,
        seed=seed,
        epochs=(),
        status="ok",
        final_val_loss=val_loss,
        final_val_accuracy=val_acc,
        seconds=time.perf_counter() - t0,
        cached_prefix=False,
        plan_problems=tuple(f"reset at batch {k}: {why}" for k, why in report.resets),
    )


def _drift(
    before: Mapping[str, Mapping[str, np.ndarray]], after: Mapping[str, Mapping[str, np.ndarray]]
) -> tuple[int, float]:
    moved, delta = 0, 0.0
    for path, old in before.items():
        d = max(float(np.max(np.abs(after[path][k] - old[k]))) for k in old)
        moved += d > 0
        delta = max(delta, d)
    return moved, delta


def _summarise(name: str, every: list[Run]) -> Summary:
    runs = [r for r in every if r.status != "failed"]
    acc = np.array([r.final_val_accuracy for r in runs]) if runs else np.array([np.nan])
    loss = np.array([r.final_val_loss for r in runs]) if runs else np.array([np.nan])
    ddof = 1 if len(runs) > 1 else 0
    return Summary(
        strategy=name,
        val_accuracy_mean=float(acc.mean()),
        val_accuracy_std=float(acc.std(ddof=ddof)),
        val_loss_mean=float(loss.mean()),
        val_loss_std=float(loss.std(ddof=ddof)),
        runs=len(runs),
        diverged=sum(r.status == "diverged" for r in runs),
        failed=len(every) - len(runs),
    )


def sampling_error(p1: float, p2: float, n: int) -> float:
    """Standard error of the difference of two accuracies measured on the same `n`
    validation samples, as independent binomials (an upper bound for paired runs), with
    the Laplace correction so that 0% and 100% keep their uncertainty.

    Examples:
        >>> round(sampling_error(0.6, 0.5, 10), 2)
        0.22
    """
    a, b = (p1 * n + 1) / (n + 2), (p2 * n + 1) / (n + 2)
    return float(np.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1)))


def _verdict(summaries: Sequence[Summary], n_seeds: int, n_val: int) -> tuple[str, bool, str]:
    ranked = sorted(
        (s for s in summaries if s.diverged == 0 and np.isfinite(s.val_accuracy_mean)),
        key=lambda s: -s.val_accuracy_mean,
    )
    if not ranked:
        return (
            "",
            False,
            "no strategy finished every run without diverging or failing: lower the "
            "learning rate, check the data's scale, then compare again",
        )
    best = ranked[0]
    dropped = [s.strategy for s in summaries if s not in ranked]
    if dropped:
        why = {s.strategy: "failed" if s.runs == 0 else "diverged" for s in summaries}
        note = "".join(f" ({d} left out: runs {why[d]})" for d in dropped)
        best_s, decisive, verdict = _verdict(ranked, n_seeds, n_val)
        return best_s, decisive, verdict + note
    if len(ranked) == 1:
        return best.strategy, True, f"only one strategy: {best.strategy}"
    second = ranked[1]
    lead = best.val_accuracy_mean - second.val_accuracy_mean
    sampling = 2 * sampling_error(best.val_accuracy_mean, second.val_accuracy_mean, n_val)
    if n_seeds < 2:
        return (
            best.strategy,
            False,
            f"{best.strategy} leads {second.strategy} by {lead:.1%} on one seed, which gives "
            "no measure of noise: run with more seeds before deciding",
        )
    spread = max(best.val_accuracy_std, second.val_accuracy_std)
    if lead <= sampling:
        return (
            best.strategy,
            False,
            f"{best.strategy} leads {second.strategy} by {lead:.1%}, within the sampling "
            f"error of {n_val} validation samples (± {sampling:.1%}, two standard errors): "
            "no reliable difference; validate on more data",
        )
    if lead <= spread:
        return (
            best.strategy,
            False,
            f"{best.strategy} leads {second.strategy} by {lead:.1%}, within the spread over "
            f"{n_seeds} seeds (± {spread:.1%}): no reliable difference; run more seeds or "
            "more validation data",
        )
    return (
        best.strategy,
        True,
        f"best: {best.strategy}, ahead of {second.strategy} by {lead:.1%}, more than the "
        f"spread over {n_seeds} seeds (± {spread:.1%}) and the sampling error of {n_val} "
        f"validation samples (± {sampling:.1%})",
    )
