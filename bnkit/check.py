"""The pitfall finder: what will go wrong with a model's BN layers in training or
deployment, each finding with a stable code, a severity, the layer, and the fix."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bnkit.backends import get_backend, readable
from bnkit.data import EXAMPLE_BATCH, load
from bnkit.errors import SelectorError, check_int
from bnkit.policy import STATS_ONLY, Selector, no_match_message, parse_selector
from bnkit.records import (
    BATCH_STATS_AT_TRAINING_ONLY,
    CUMULATIVE_AVERAGE,
    EVAL_UNDONE_BY_TRAIN,
    EXPORTED_BATCH_STATS,
    NO_RUNNING_STATS,
    PEFT_UNSAVED_STATS,
    QAT_STATS_UPDATE,
    STATS_WITHOUT_AFFINE,
    SYNC_WITHOUT_GROUP,
    TRAINING_OVERRIDDEN,
    leaf_records,
)

SMALL_BATCH = 16
"""Below this many images, batch statistics are noisy enough to hurt (Wu & He, 2018)."""
STALE_SHARE = 0.5
"""Momentum finding when more than this share of the old statistics survives the steps."""
TINY_VARIANCE = 1e-5
"""moving variance + epsilon below this scales a channel by more than 1/sqrt of it."""
SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One pitfall found in a model."""

    code: str
    severity: str
    """`error` (the model will not do what you think), `warning` or `info`."""
    path: str
    """the layer (or container) concerned; the model's name for model-wide findings."""
    problem: str
    fix: str


@dataclass(frozen=True)
class FindingGroup:
    """Findings with one cause: the same code, problem and fix (the 52 BN layers of a
    nested model called with training=False are one cause)."""

    code: str
    severity: str
    where: str
    """the innermost container holding every one of the layers ('' for the model)."""
    paths: tuple[str, ...]
    problem: str
    fix: str

    @property
    def layers(self) -> str:
        """The layers, named: one, or how many with the first and the last."""
        if len(self.paths) == 1:
            return self.paths[0]
        where = f" in '{self.where}'" if self.where else ""
        return f"{len(self.paths)} layers{where}: {self.paths[0]} ... {self.paths[-1]}"


@dataclass(frozen=True)
class CheckReport:
    """Every finding, errors first."""

    model: str
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        """The error-level findings (the CLI exits 1 when there is one)."""
        return tuple(f for f in self.findings if f.severity == "error")

    def groups(self) -> tuple[FindingGroup, ...]:
        """The findings grouped by cause, in the report's order: one group per code,
        severity, problem and fix."""
        grouped: dict[tuple[str, str, str, str], list[str]] = {}
        for f in self.findings:
            grouped.setdefault((f.code, f.severity, f.problem, f.fix), []).append(f.path)
        return tuple(
            FindingGroup(code, severity, _container(paths), tuple(paths), problem, fix)
            for (code, severity, problem, fix), paths in grouped.items()
        )

    def to_json(self) -> str:
        """The report as a JSON document: every finding, and the groups by cause."""
        return json.dumps(
            {
                "model": self.model,
                "findings": [asdict(f) for f in self.findings],
                "groups": [asdict(g) for g in self.groups()],
            },
            indent=2,
        )

    def table(self, verbose: bool = False) -> Any:
        """A rich table of the findings: one row per cause, or per layer with `verbose`."""
        from rich.table import Table

        t = Table(title=f"bnkit check: {self.model}", show_lines=True)
        for col in ("code", "severity", "layer", "problem", "fix"):
            t.add_column(col, overflow="fold")
        if verbose:
            for f in self.findings:
                t.add_row(f.code, f.severity, f.path, f.problem, f.fix)
            return t
        for g in self.groups():
            t.add_row(g.code, g.severity, g.layers, g.problem, g.fix)
        return t

    def __str__(self) -> str:
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        groups = self.groups()
        causes = (
            f" ({len(groups)} {'cause' if len(groups) == 1 else 'causes'})"
            if len(groups) < len(self.findings)
            else ""
        )
        return (
            f"{counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes"
            + causes
            + "".join(f"\n{g.code} {g.severity} {g.layers}: {g.problem}" for g in self.groups())
        )


def check(
    model: Any,
    batch_size: int | None = None,
    steps: int | None = None,
    select: Selector | str | None = None,
    *,
    example: Any = None,
    input_shape: tuple[int, ...] | None = None,
    source: Any = None,
) -> CheckReport:
    """Finds the BN pitfalls in `model` as it would train in `fit` or run in deployment.

    Findings (code, severity): BN001 error, a nested model called with
    `training=False` whose BN layers `fit` still updates; BN002 info, BN layers in
    `train` mode after frozen layers; BN003 warning, momentum so close to 1 that after
    `steps` training steps most of the old statistics remain; BN004, a train-mode BN
    with too small a `batch_size` (error when each channel sees one value); BN005,
    non-finite, negative or near-zero moving variance (a cause of NaN); BN006, a BN
    layer called at several places; BN007, BN layers whose modes differ in one trained
    block (a name pattern that caught only some), or a `select` that covers only some
    BN layers; BN008 error, trainable flags changed since `compile`; BN009 info, no BN
    layer at all. PyTorch's own pitfalls: BN010 warning, a BN in `eval()` that
    `model.train()` puts back in training mode; BN011 warning, gamma/beta fixed
    (`requires_grad=False`, or a non-trainable Keras parent) while the statistics
    still update; BN012 error, `track_running_stats=False` without running statistics
    (batch statistics in inference too); BN013 warning, `track_running_stats=False`
    with running statistics kept (Lightning's `BaseFinetuning.freeze`): batch
    statistics in training, stored ones in inference; BN014 warning, `momentum=None`
    (a cumulative average); BN015 warning, a `SyncBatchNorm` that cannot synchronise
    (no process group: a plain BN; a group on CPU: its training forward raises);
    BN016 info, a BN layer that no inference pass calls (GoogLeNet's and Inception v3's
    auxiliary classifiers); BN017 warning, an Ultralytics YOLO model whose leading
    blocks are frozen by `requires_grad=False` while their BN statistics still update;
    BN018 info, fused Conv+BN modules of eager-mode quantization-aware training
    (`prepare_qat`) whose BN statistics still update (no `freeze_bn_stats` yet);
    BN019 error, a `torch.export` graph exported in training mode; BN020 error, a PEFT
    model whose BN statistics update in training but are not saved by its adapter;
    BN021 warning, BN statistics still at their initial values (mean 0, variance 1)
    while gamma/beta were trained (the statistics never saw data); BN022 error, with
    `source`, a BN whose eps or momentum differs from the source model's (torchao's PT2E
    resets them).

    Keras models are read from their graph. A PyTorch module has none: the module
    feeding each BN comes from a `torch.fx` trace where the model traces, and call
    counts and values per channel from one inference pass on `example` (or on random
    inputs of `input_shape`), which leaves the model as it was.

    Args:
        model: a Keras model or a PyTorch module.
        batch_size: the training batch size you plan (enables BN004).
        steps: the training steps you plan (enables BN003).
        select: a selector (or its CLI form) you plan to pick BN layers with.
        example: a batch of inputs (PyTorch), anything `bnkit.data.load` reads.
        input_shape: one sample's shape, for a random example (PyTorch).
        source: the model `model` was made from (the module a `torch.export` graph or a
            PT2E-prepared graph came from): each BN's eps and momentum are compared.

    Examples:
        >>> import keras, bnkit
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
        ...                       keras.layers.BatchNormalization()])
        >>> [f.code for f in bnkit.check(m, batch_size=4).findings]
        ['BN004']
    """
    for value, name in ((batch_size, "batch_size"), (steps, "steps")):
        if value is not None:
            check_int(value, name)
    model = readable(model)
    backend = get_backend(model)
    deploy = backend.deployer()
    records = backend.records(model)
    x = _example(example, input_shape)
    facts = {f.path: f for f in deploy.bn_facts(model, x)}
    bn = [r for r in records if r.is_bn]
    name = getattr(model, "name", type(model).__name__)
    found: list[Finding] = []
    if not bn:
        found.append(_no_bn(deploy.norm_layers(model), name))
    found += _overridden(bn)
    found += _coded(bn)
    found += _train_after_frozen(bn, facts)
    found += _momentum(bn, steps)
    found += _batch(bn, facts, batch_size)
    found += _variance(facts.values())
    found += _unestimated(facts.values())
    found += _shared(facts.values())
    found += _off_path(facts.values())
    found += _ultralytics_freeze(type(model).__module__, bn)
    found += _partial(bn, facts, records, select)
    found += _stale(backend.compile_status(model), name)
    if source is not None:
        found += _against_source(deploy.source_differences(model, readable(source)))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return CheckReport(name, tuple(sorted(found, key=lambda f: (order[f.severity], f.code))))


def _example(example: Any, input_shape: tuple[int, ...] | None) -> np.ndarray | None:
    if example is not None:
        return next(iter(load(example, batch_size=EXAMPLE_BATCH).inputs()))
    if input_shape is None:
        return None
    return np.random.default_rng(0).normal(size=(EXAMPLE_BATCH, *input_shape)).astype("float32")


_CODED = {
    EVAL_UNDONE_BY_TRAIN: (
        "BN010",
        "warning",
        "pin the mode instead: bnkit.freeze(model, bn='frozen'), which survives "
        "model.train(); or call bn.eval() again after every model.train()",
    ),
    STATS_WITHOUT_AFFINE: (
        "BN011",
        "warning",
        "to keep the statistics too, use mode 'frozen' (bnkit.freeze); to train BN, "
        "make gamma/beta trainable as well (mode 'train')",
    ),
    NO_RUNNING_STATS: (
        "BN012",
        "error",
        "give it running statistics: track_running_stats=True and re-estimate them "
        "(bnkit.adapt), or replace it with GroupNorm if batch statistics are intended",
    ),
    BATCH_STATS_AT_TRAINING_ONLY: (
        "BN013",
        "warning",
        "pin a mode instead: bnkit.freeze(model, bn='frozen') normalises with the stored "
        "statistics in training too",
    ),
    CUMULATIVE_AVERAGE: (
        "BN014",
        "warning",
        "set a momentum (0.1 is PyTorch's default), or re-estimate the statistics on the "
        "final weights with bnkit.adapt after training",
    ),
    SYNC_WITHOUT_GROUP: (
        "BN015",
        "warning",
        "train on GPUs inside an initialised process group (torchrun), or use plain "
        "BatchNorm for one process; to keep its statistics, pin it (bnkit.freeze)",
    ),
    QAT_STATS_UPDATE: (
        "BN018",
        "info",
        "for the last epochs of QAT freeze them, as PyTorch's QAT recipe does: "
        "model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats) (model.train() then "
        "leaves them in eval); convert folds the statistics they hold then. A PT2E QAT "
        "graph: bnkit.pt2e.move_exported_model_to_eval(model) before inference (it keeps "
        "each BN's momentum and eps, which torchao's resets)",
    ),
    PEFT_UNSAVED_STATS: (
        "BN020",
        "error",
        "build the adapter with bnkit.peft.get_peft_model(model, config, bn='frozen') "
        "(statistics fixed, nothing to save) or bn='train' (the BN layers saved with the "
        "adapter); or pin them before training: bnkit.freeze(model, bn='frozen')",
    ),
    EXPORTED_BATCH_STATS: (
        "BN019",
        "error",
        "export again after model.eval() (torch.export.export(model.eval(), ...)), or "
        "export bnkit.fold(model).model, which has no BN left to get wrong",
    ),
}


def _coded(bn: list[Any]) -> Iterator[Finding]:
    """The findings that notes of the backend's records carry."""
    for r in bn:
        for note in r.notes:
            if note.code in _CODED:
                code, severity, fix = _CODED[note.code]
                yield Finding(code, severity, r.path, note.text, fix)


def _no_bn(others: dict[str, int], name: str) -> Finding:
    has = ", ".join(f"{n} {k}" for k, n in sorted(others.items())) or "no normalisation layer"
    return Finding(
        "BN009",
        "info",
        name,
        f"the model has no BatchNormalization layer ({has}): there are no BN statistics to "
        "freeze, re-estimate or fold",
        "nothing to do for BN; LayerNorm and GroupNorm behave the same in training and inference",
    )


def _overridden(bn: list[Any]) -> Iterator[Finding]:
    for r in bn:
        for note in r.notes:
            if note.code == TRAINING_OVERRIDDEN:
                yield Finding(
                    "BN001",
                    "error",
                    r.path,
                    note.text,
                    "pin the mode: bnkit.freeze(model, bn='frozen') (or --rule for these "
                    "layers); training=False at call time does not freeze BN in Keras 3",
                )


def _train_after_frozen(bn: list[Any], facts: dict[str, Any]) -> Iterator[Finding]:
    for r in bn:
        fact = facts.get(r.path)
        if r.bn_mode == "train" and fact is not None and fact.producer_trainable is False:
            yield Finding(
                "BN002",
                "info",
                r.path,
                "trains with batch statistics (and gamma/beta) while the layer feeding it is "
                "frozen: cheap adaptation to new data, but its outputs depend on the batch "
                "and its statistics drift from what the frozen layers after it expect",
                "keep it if BN-only adaptation is what you want; use mode 'affine' to train "
                "gamma/beta with fixed statistics, or 'adapt' to re-estimate them once",
            )


def _momentum(bn: list[Any], steps: int | None) -> Iterator[Finding]:
    if steps is None:
        return
    for r in bn:
        if r.bn_state is None or not r.bn_state.stats_update or r.momentum is None:
            continue
        remain = r.momentum**steps
        if remain > STALE_SHARE:
            yield Finding(
                "BN003",
                "warning",
                r.path,
                f"momentum {r.momentum:g}: after {steps} steps {remain:.0%} of the running "
                "statistics are still the old ones, so inference will use statistics that "
                "lag the trained weights",
                f"lower the momentum (for example to {_momentum_for(steps):.3g}), train "
                "longer, or re-estimate the statistics after training with bnkit.adapt",
            )


def _momentum_for(steps: int, keep: float = 0.05) -> float:
    return float(keep ** (1.0 / steps))


def _batch(bn: list[Any], facts: dict[str, Any], batch_size: int | None) -> Iterator[Finding]:
    if batch_size is None:
        return
    for r in bn:
        if r.bn_state is None or not r.bn_state.batch_stats:
            continue
        fact = facts.get(r.path)
        values = None if fact is None or fact.spatial is None else batch_size * fact.spatial
        if values == 1:
            yield Finding(
                "BN004",
                "error",
                r.path,
                "trains on batch statistics of a single value per channel: the batch "
                "variance is 0, so every input gives the output beta (PyTorch raises here)",
                "use a batch size of at least 2 (16 or more for stable statistics), or "
                "freeze this BN (mode 'frozen' or 'affine')",
            )
        elif batch_size < SMALL_BATCH:
            yield Finding(
                "BN004",
                "warning",
                r.path,
                f"trains on batch statistics of only {batch_size} "
                f"{'image' if batch_size == 1 else 'images'}: noisy statistics, "
                "and training and inference see different normalisations",
                f"use a batch of {SMALL_BATCH} or more, or mode 'affine'/'frozen' for this BN",
            )


def _variance(facts: Any) -> Iterator[Finding]:
    for f in facts:
        if f.nonfinite or f.min_var + f.epsilon <= 0:
            yield Finding(
                "BN005",
                "error",
                f.path,
                f"moving statistics hold {f.nonfinite} non-finite values"
                if f.nonfinite
                else f"moving variance {f.min_var:g} plus epsilon is not positive",
                "inference outputs NaN: re-estimate the statistics (bnkit.adapt) or reload "
                "weights saved before training diverged",
            )
        elif f.min_var + f.epsilon < TINY_VARIANCE:
            yield Finding(
                "BN005",
                "warning",
                f.path,
                f"moving variance {f.min_var:.2g} with epsilon {f.epsilon:g}: that channel is "
                f"multiplied by {1 / (f.min_var + f.epsilon) ** 0.5:.3g}, so tiny input "
                "changes explode (and overflow to inf/NaN in float16)",
                "re-estimate the statistics on representative data (bnkit.adapt) or raise epsilon",
            )


def _against_source(differences: list[tuple[str, str]]) -> Iterator[Finding]:
    for path, what in differences:
        yield Finding(
            "BN022",
            "error",
            path,
            f"BN differs from the source model: {what}; the model normalises (and, in "
            "training, averages its statistics) otherwise than the one it was made from",
            "torchao's PT2E (prepare_qat_pt2e, move_exported_model_to_eval/_train, "
            "convert_pt2e) resets eps to 1e-5 and momentum to 0.1 (pytorch/ao#4107): use "
            "the drop-ins of bnkit.pt2e, which keep them; else set them back by hand",
        )


def _unestimated(facts: Any) -> Iterator[Finding]:
    for f in facts:
        if f.unestimated:
            yield Finding(
                "BN021",
                "warning",
                f.path,
                "running statistics at their initial values (mean 0, variance 1, no batch "
                "counted) while gamma/beta differ by channel, as trained ones do: the "
                "statistics never saw data, so the layer normalises as if its inputs had "
                "mean 0 and variance 1 (weights loaded without the BN buffers, or the "
                "buffers reset after loading; or a model built with random gamma/beta, as "
                "timm's RepVGG, that was never run on data)",
                "load the BN buffers with the weights (running_mean, running_var), or "
                "re-estimate them on representative data: bnkit.adapt(model, data)",
            )


def _shared(facts: Any) -> Iterator[Finding]:
    for f in facts:
        if f.calls > 1:
            yield Finding(
                "BN006",
                "warning",
                f.path,
                f"called at {f.calls} places: in training its running statistics average "
                "inputs from every call site, so in inference no call site is normalised "
                "with its own statistics",
                "give each call site its own BatchNormalization layer",
            )


def _ultralytics_freeze(module: str, bn: list[Any]) -> Iterator[Finding]:
    """BN017: an Ultralytics YOLO model whose leading blocks were frozen by
    `requires_grad=False` (the recipe its users share) while their BN layers still update
    their statistics in `train()`."""
    if not module.startswith("ultralytics."):
        return
    blocks: dict[int, int] = {}
    for r in bn:
        found = re.match(r"^model\.(\d+)\.", r.path)
        if found and any(n.code == STATS_WITHOUT_AFFINE for n in r.notes):
            blocks[int(found.group(1))] = blocks.get(int(found.group(1)), 0) + 1
    if not blocks:
        return
    first, last = min(blocks), max(blocks)
    yield Finding(
        "BN017",
        "warning",
        f"model.{first}" if first == last else f"model.{first} ... model.{last}",
        f"YOLO blocks {first}-{last} have fixed weights (requires_grad=False) but their "
        f"{sum(blocks.values())} BN layers update their statistics in every train() step: a "
        "freeze by requires_grad alone moves what the frozen blocks learned",
        f"bnkit.ultralytics.freeze(model, freeze={last + 1}) before model.train(...): the "
        "blocks' weights and BN statistics stay fixed through the trainer, its EMA and the "
        "checkpoints it saves",
    )


def _off_path(facts: Any) -> Iterator[Finding]:
    for f in facts:
        if f.calls == 0:
            yield Finding(
                "BN016",
                "info",
                f.path,
                "not on the inference path: an inference pass never calls it (an auxiliary "
                "classifier that runs in training only)",
                "nothing to do: adapt, shift and tta leave its statistics as they are and say "
                "so; it trains with the model's training loss only",
            )


def _partial(
    bn: list[Any], facts: dict[str, Any], records: list[Any], select: Selector | str | None
) -> Iterator[Finding]:
    if select is not None:
        yield from _selector_coverage(records, select)
    groups: dict[str, list[Any]] = {}
    for r in bn:
        fact = facts.get(r.path)
        if fact is not None and not fact.pinned and fact.producer_trainable is not False:
            groups.setdefault(_parent(r.path), []).append(r)
    for parent, rows in groups.items():
        held = [r for r in rows if r.bn_mode in ("frozen", STATS_ONLY)]
        if held and len(held) < len(rows):
            where = f"in '{parent}'" if parent else "in the model"
            kinds = "/".join(sorted({str(r.bn_mode) for r in held}))
            yield Finding(
                "BN007",
                "warning",
                parent or "(model)",
                f"{len(held)} of {len(rows)} BN layers {where} not after frozen layers are "
                f"{kinds} and the others train ({kinds}: {_names(held)}): if a name pattern "
                "picked them, it caught only some",
                "select BN layers by type, not by name: bnkit.freeze(model, bn=...) or "
                "--rule 'bn=frozen'; check with bnkit inspect --bn-only",
            )


def _container(paths: list[str]) -> str:
    """The innermost container path holding every path ('' when only the model does)."""
    parents = [_parent(p) for p in paths]
    common = parents[0]
    for p in parents[1:]:
        while common and not (p == common or p.startswith((common + "/", common + "."))):
            common = _parent(common)
    return common


def _parent(path: str) -> str:
    """The container path of a layer path (Keras separates with '/', PyTorch with '.')."""
    cut = max(path.rfind("/"), path.rfind("."))
    return path[:cut] if cut > 0 else ""


def _selector_coverage(records: list[Any], select: Selector | str) -> Iterator[Finding]:
    selector = parse_selector(select) if isinstance(select, str) else select
    _, infos = leaf_records(records)
    hits = selector.match(infos)
    if not hits:
        raise SelectorError(no_match_message(selector, infos))
    bn_hits = sum(infos[i].is_bn for i in hits)
    total = sum(i.is_bn for i in infos)
    if 0 < bn_hits < total:
        yield Finding(
            "BN007",
            "warning",
            str(selector),
            f"selects {bn_hits} of the model's {total} BN layers",
            "if you meant every BN layer, select by type (AllBN, 'bn'); otherwise this is "
            "intended and bnkit.inspect --bn-only lists the rest",
        )


def _names(rows: list[Any], n: int = 3) -> str:
    names = [r.name for r in rows[:n]]
    return ", ".join(names) + (f" and {len(rows) - n} more" if len(rows) > n else "")


def _stale(status: Any, name: str) -> Iterator[Finding]:
    if status.stale:
        yield Finding(
            "BN008",
            "error",
            name,
            status.message(),
            "recompile after changing trainable flags: bnkit.recompile(model) keeps loss, "
            "metrics and optimizer settings with a fresh optimizer",
        )
