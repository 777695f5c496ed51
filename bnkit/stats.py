"""BN statistics: re-estimation on new data (`adapt`) and domain shift per layer (`shift`)."""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bnkit.backends import get_backend
from bnkit.backends.base import CHANNELS_FIRST
from bnkit.data import DEFAULT_BATCH_SIZE, Data, DataError, check_input_shape, load
from bnkit.errors import BnkitError, SelectorError, check_int
from bnkit.policy import Selector, as_selector, no_match_message
from bnkit.records import leaf_records


class Moments:
    """Per-channel mean and population variance over many batches, combined exactly in
    float64: the batches given are kept and pooled at once when the result is read
    (each batch's deviation from the pooled mean added back, as Chan et al.'s update)."""

    def __init__(self) -> None:
        self._n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray, int]] = []

    def add(self, mean: np.ndarray, var: np.ndarray, n: int) -> None:
        self._pending.append((mean, var, n))

    @property
    def n(self) -> int:
        """How many values per channel were pooled."""
        return self._n + sum(p[2] for p in self._pending)

    def _pool(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        means = np.array([p[0] for p in pending], dtype=np.float64)
        m2s = np.array([p[1] for p in pending], dtype=np.float64)
        counts = np.array([float(p[2]) for p in pending])
        if self._mean is not None and self._m2 is not None:
            means = np.concatenate([self._mean[None], means])
            m2s = np.concatenate([self._m2[None] / self._n, m2s])
            counts = np.concatenate([[float(self._n)], counts])
        total = counts.sum()
        mean = np.tensordot(counts, means, axes=1) / total
        means -= mean
        means *= means
        m2s += means
        self._m2 = np.tensordot(counts, m2s, axes=1)
        self._mean, self._n = mean, int(total)

    @property
    def mean(self) -> np.ndarray | None:
        """The pooled mean, per channel."""
        self._pool()
        return self._mean

    @property
    def m2(self) -> np.ndarray | None:
        """The sum of squared deviations from the mean, per channel."""
        self._pool()
        return self._m2

    def result(self) -> dict[str, np.ndarray]:
        """The running statistics to store: `mean` and population `var`."""
        self._pool()
        if self._mean is None or self._m2 is None:
            raise BnkitError("a selected BN layer saw no data: is it on the model's path?")
        return {"mean": self._mean, "var": self._m2 / self._n}


def pool_together(group: Sequence[Moments]) -> None:
    """Pools the batches given to each of `group` (a model's BN layers) in one set of
    NumPy calls for all of them: the same sums as each pooling its own, without a
    dozen small calls per layer. Where their numbers of batches differ, or some have
    pooled before and others not, each pools its own."""
    todo = [m for m in group if m._pending]
    prior = {m._mean is not None for m in todo}
    if len(todo) < 2 or len({len(m._pending) for m in todo}) > 1 or len(prior) > 1:
        for m in todo:
            m._pool()
        return
    shapes = [np.shape(m._pending[0][0]) for m in todo]
    widths = [math.prod(shape) for shape in shapes]
    rows = list(zip(*(m._pending for m in todo), strict=True))  # per batch, every layer's
    flat = np.ravel if any(len(shape) != 1 for shape in shapes) else _as_is
    means = [np.concatenate([flat(p[0]) for p in row]) for row in rows]
    variances = [np.concatenate([flat(p[1]) for p in row]) for row in rows]
    counts = [[float(p[2]) for p in row] for row in rows]
    if prior == {True}:  # what each pooled before weighs as one batch more
        n = [float(m._n) for m in todo]
        means.append(np.concatenate([np.ravel(v) for m in todo if (v := m._mean) is not None]))
        m2s = np.concatenate([np.ravel(v) for m in todo if (v := m._m2) is not None])
        variances.append(m2s / np.repeat(n, widths))
        counts.append(n)
    if any(v.size != sum(widths) for v in (*means, *variances)):  # a layer changed width
        for m in todo:
            m._pool()
        return
    mean_rows, var_rows = np.array(means, np.float64), np.array(variances, np.float64)
    weights = np.repeat(np.array(counts), widths, axis=1)
    totals = np.array(counts).sum(axis=0)
    mean = (weights * mean_rows).sum(axis=0) / np.repeat(totals, widths)
    mean_rows -= mean
    mean_rows *= mean_rows
    var_rows += mean_rows
    m2 = (weights * var_rows).sum(axis=0)
    ends = list(itertools.accumulate(widths))
    cuts = [slice(a, b) for a, b in zip([0, *ends], ends, strict=False)]
    for m, shape, cut, total in zip(todo, shapes, cuts, totals, strict=True):
        m._mean, m._m2 = mean[cut].reshape(shape), m2[cut].reshape(shape)
        m._n, m._pending = int(total), []


def _as_is(values: np.ndarray) -> np.ndarray:
    """One layer's per-channel values, already flat."""
    return values


def _on_path(moments: dict[str, Moments]) -> tuple[list[str], tuple[str, ...]]:
    """The BN layers that saw data, and those that did not: not on the inference path
    (the auxiliary classifiers of GoogLeNet and Inception v3 run in training only)."""
    seen = [p for p, m in moments.items() if m.n > 0]
    if not seen:
        raise BnkitError(
            "no selected BN layer saw data in an inference pass: they are not on the "
            "model's inference path"
        )
    return seen, tuple(p for p, m in moments.items() if m.n == 0)


@dataclass(frozen=True)
class LayerAdapt:
    """One BN layer before and after re-estimation."""

    path: str
    mean_change: float
    """largest absolute change of any channel's running mean."""
    var_ratio_min: float
    var_ratio_max: float
    """range over channels of new / old running variance."""


@dataclass(frozen=True)
class AdaptReport:
    """What `adapt` changed."""

    layers: tuple[LayerAdapt, ...]
    batches: int
    samples: int
    off_path: tuple[str, ...] = ()
    """BN layers that no inference pass reaches (kept unchanged): auxiliary classifiers
    that run in training only."""

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(
            {
                "batches": self.batches,
                "samples": self.samples,
                "layers": [asdict(x) for x in self.layers],
                "off_path": list(self.off_path),
            },
            indent=2,
        )

    def __str__(self) -> str:
        worst = max(self.layers, key=lambda x: x.mean_change)
        return (
            f"re-estimated {len(self.layers)} BN layers on {self.samples} samples "
            f"({self.batches} batches); largest mean change {worst.mean_change:.3g} in {worst.path}"
            + off_path_note(self.off_path)
        )


def off_path_note(paths: tuple[str, ...]) -> str:
    """A sentence naming the BN layers no inference pass reached, or ''."""
    if not paths:
        return ""
    names = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return (
        f"; {len(paths)} BN layers are not on the inference path and were left as they "
        f"are ({names})"
    )


def adapt(
    model: Any,
    data: Any,
    *,
    select: Selector | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> AdaptReport:
    """Re-estimates BN running statistics as the population statistics of each layer's
    inputs over `data`, in one pass, leaving every other weight untouched.

    As in PreciseBN, each BN layer normalises with the statistics of the current
    batch during the pass, so each layer's statistics are those of the inputs it
    sees when every layer before it is adapted to the data; means and variances
    are averaged over all batches exactly (not an exponential moving average).
    The variance stored is the population (biased) variance, as Keras uses.

    Inside a `torch.distributed` job (an initialised process group of more than one
    rank) each rank passes its own shard; the moments are all-gathered and combined,
    and every rank ends with the statistics of the union of the shards.

    Args:
        model: a Keras model or a PyTorch module (DDP-wrapped or not).
        data: anything `bnkit.data.load` reads (array, `(x, y)`, folder, `.npz`,
            `tf.data.Dataset`, `PyDataset`, iterable of batches); labels are unused.
        select: which BN layers to re-estimate (every BN layer by default): a
            Selector or its command-line form (`re:^layer4`).
        batch_size: batch size when `data` is an array or folder.
        max_batches: stop after this many batches.
        on_batch: called with the number of batches done, for progress display.

    Examples:
        >>> import keras, numpy as np, bnkit
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
        ...                       keras.layers.BatchNormalization()])
        >>> report = bnkit.adapt(m, np.random.rand(64, 4).astype("float32"))
        >>> report.samples
        64
    """
    backend, paths = _bn_paths(model, select)
    moments, n_batches, n_samples = _collect(
        backend, model, paths, data, "batch", batch_size, max_batches, on_batch
    )
    seen, off_path = _on_path(moments)
    before = backend.bn_stats(model, seen)
    pool_together([moments[p] for p in seen])
    new = {p: moments[p].result() for p in seen}
    _check_finite_stats(new)
    backend.set_bn_stats(model, new)
    return AdaptReport(_summaries(seen, before, new), n_batches, n_samples, off_path)


class OnlineAdapt:
    """`adapt` over a growing stream: after each `update(x)` the model's BN statistics are
    exactly what `adapt` computes over every batch given so far."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._backend, self._paths = _bn_paths(model, None)
        self._moments = {p: Moments() for p in self._paths}

    def update(self, x: np.ndarray, *, write: bool = True, represents: int | None = None) -> None:
        """Adds one batch and (with `write`) writes the statistics of the stream so far.
        `represents`: the number of images `x` stands for (a sample of a larger batch),
        its moments weighted as that many."""
        scale = 1.0 if represents is None else represents / len(x)
        with self._backend.moments_pass(self._model, self._paths, normalize="batch") as run:
            for path, (mean, var, n) in run(x).items():
                self._moments[path].add(mean, var, round(n * scale))
        if write:
            self.write()

    def write(self) -> None:
        """Writes the statistics of every batch given so far into the model."""
        new = self.statistics()
        _check_finite_stats(new)
        self._backend.set_bn_stats(self._model, new)

    @property
    def paths(self) -> list[str]:
        """The BN layers it measures."""
        return list(self._paths)

    def statistics(self) -> dict[str, dict[str, np.ndarray]]:
        """The statistics of every batch given so far, per BN layer a batch reached, in
        the model's order."""
        seen, _ = _on_path(self._moments)
        pool_together([self._moments[p] for p in seen])
        return {p: self._moments[p].result() for p in seen}

    def fork(self) -> OnlineAdapt:
        """Another OnlineAdapt of the same model that starts from this one's batches."""
        twin = copy.copy(self)
        twin._moments = copy.deepcopy(self._moments)
        return twin

    @property
    def empty(self) -> bool:
        """No batch has reached a BN layer yet."""
        return all(m.n == 0 for m in self._moments.values())

    def off_path(self) -> tuple[str, ...]:
        """The BN layers no batch so far reached."""
        return _on_path(self._moments)[1]


def _check_finite_stats(stats: dict[str, dict[str, np.ndarray]]) -> None:
    """Raises DataError (the model unchanged) when a re-estimated statistic is not finite
    or too large for float32, which happens when the data's values are huge."""
    limit = float(np.finfo(np.float32).max)
    every = [np.ravel(v) for values in stats.values() for v in values.values()]
    flat = np.concatenate(every) if every else np.zeros(0)
    if np.isfinite(flat).all() and (flat.size == 0 or np.abs(flat).max() <= limit):
        return  # one check for all layers; the loop below names the layer that fails
    for path, values in stats.items():
        for name, value in values.items():
            if not np.isfinite(value).all() or np.abs(value).max() > limit:
                raise DataError(
                    f"{path}: the {name} of this layer's inputs on the data is not finite in "
                    "float32 (the inputs are too large); check the data's scale (--scale); "
                    "the model was not changed"
                )


def _bn_paths(model: Any, select: Selector | str | None) -> tuple[Any, list[str]]:
    backend = get_backend(model)
    if select is None:
        paths = backend.bn_paths(model)
    else:
        _, infos = leaf_records(backend.records(model))
        selector = as_selector(select)
        hits = selector.match(infos)
        if not hits:
            raise SelectorError(no_match_message(selector, infos))
        paths = [infos[i].path for i in hits if infos[i].is_bn]
    if not paths:
        raise BnkitError(
            "no BatchNormalization layer selected: this model has nothing to re-estimate "
            "or measure (LayerNorm and GroupNorm keep no running statistics)"
        )
    return backend, paths


def _collect(
    backend: Any,
    model: Any,
    paths: list[str],
    data: Any,
    normalize: str,
    batch_size: int,
    max_batches: int | None,
    on_batch: Callable[[int], None] | None,
) -> tuple[dict[str, Moments], int, int]:
    """One pass over the data; each layer's input moments combined over all batches."""
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise DataError(f"max_batches (--max-batches) must be at least 1, got {max_batches!r}")
    batch_size = check_int(batch_size, "batch_size")
    source = data if isinstance(data, Data) else load(data, batch_size=batch_size)
    expected = backend.input_shape(model)
    moments = {p: Moments() for p in paths}
    n_batches = n_samples = 0
    first: float | None = None
    varied = False
    with backend.moments_pass(model, paths, normalize=normalize) as run:
        for x in source.inputs(max_batches):
            if expected is not None and n_batches == 0:
                check_input_shape(x, expected, source.description, backend.layout == CHANNELS_FIRST)
            first = float(x.flat[0]) if first is None else first
            varied = varied or bool(np.any(x != first))
            for path, (mean, var, n) in run(x).items():
                moments[path].add(mean, var, n)
            n_batches += 1
            n_samples += len(x)
            if on_batch is not None:
                on_batch(n_batches)
    if not varied and n_samples > 1:
        raise DataError(
            f"every input value in {source.description} is {first:g}: such data has no "
            "statistics to estimate or compare (blank images, or a scale that underflows); "
            "check the data and --scale"
        )
    collective = backend.collective()
    if collective is not None:
        return _combine(collective, backend, model, paths, moments, n_batches, n_samples)
    return moments, n_batches, n_samples


def _combine(
    collective: Any,
    backend: Any,
    model: Any,
    paths: list[str],
    moments: dict[str, Moments],
    n_batches: int,
    n_samples: int,
) -> tuple[dict[str, Moments], int, int]:
    """Every rank's moments combined, in rank order, with Chan's update in float64: each
    rank then holds the moments of the union of the shards (a rank may have none)."""
    stored = backend.bn_stats(model, paths)
    widths = [stored[p]["mean"].size for p in paths]
    parts = [np.array([n_batches, n_samples], np.float64)]
    for path, width in zip(paths, widths, strict=True):
        m = moments[path]
        if m.mean is None or m.m2 is None:
            parts.append(np.zeros(1 + 2 * width))
        else:
            parts.append(np.concatenate([[m.n], m.mean.ravel(), m.m2.ravel()]))
    gathered = collective.all_gather(np.concatenate(parts))
    total = {p: Moments() for p in paths}
    for values in gathered:
        at = 2
        for path, width in zip(paths, widths, strict=True):
            n = int(values[at])
            mean, m2 = values[at + 1 : at + 1 + width], values[at + 1 + width : at + 1 + 2 * width]
            at += 1 + 2 * width
            if n > 0:
                total[path].add(mean, m2 / n, n)
    return total, sum(int(v[0]) for v in gathered), sum(int(v[1]) for v in gathered)


def _summaries(
    paths: list[str],
    old: dict[str, dict[str, np.ndarray]],
    new: dict[str, dict[str, np.ndarray]],
) -> tuple[LayerAdapt, ...]:
    """Each layer's largest change of a channel's mean and range of the channels' new
    over old variances, reduced for all layers at once."""

    def flat(stats: dict[str, dict[str, np.ndarray]], name: str) -> np.ndarray:
        return np.concatenate([np.ravel(stats[p][name]) for p in paths])

    starts = [0, *itertools.accumulate(np.size(new[p]["mean"]) for p in paths)][:-1]
    change = np.maximum.reduceat(np.abs(flat(new, "mean") - flat(old, "mean")), starts)
    ratio = flat(new, "var") / np.maximum(flat(old, "var"), 1e-12)
    low, high = np.minimum.reduceat(ratio, starts), np.maximum.reduceat(ratio, starts)
    rows = zip(paths, change.tolist(), low.tolist(), high.tolist(), strict=True)
    return tuple(LayerAdapt(p, float(c), float(lo), float(hi)) for p, c, lo, hi in rows)


# ---------------------------------------------------------------------- shift

CHANNEL_THRESHOLD = 0.1
"""A channel counts as shifted beyond this divergence (nats)."""
ADAPT_THRESHOLD = 0.015
"""Model shift (mean over layers, nats) from which re-estimating statistics pays:
calibrated in benchmarks/shift_calibration.py and benchmarks/shift_corruptions.py."""
LABELS_THRESHOLD = 0.03
"""Model shift from which labels pay: on the 15 corruptions at severities 1, 3 and 5
(benchmarks/shift_corruptions.py), fine-tuning on 10 labelled images per class beat
re-estimation alone by more than 5 points in 25 of the 30 settings from this shift on,
and in 1 of the 15 below it."""
UNSCALED_RATIO = 20.0
"""At the first BN layer, data whose spread is this many times wider (or narrower) than
the stored statistics say is not a domain shift: the inputs are scaled otherwise than in
training (0-255 pixels for a model trained on 0-1 gives 255 there; the strongest
corruptions of the calibration benchmark gave at most 4)."""
VARIANCE_EPSILON = 1e-3
"""Added to both variances, as Keras BatchNormalization's default epsilon is."""


@dataclass(frozen=True)
class LayerShift:
    """How far the inputs of one BN layer on the data are from its running statistics.

    `kl_*` are per-channel divergences KL(data || stored) between Gaussians, in nats.
    """

    path: str
    depth: int
    """index of the layer among the model's BN layers, input side first."""
    channels: int
    kl_mean: float
    kl_max: float
    share_shifted: float
    """share of channels whose divergence exceeds CHANNEL_THRESHOLD."""
    mean_offset: float
    """mean over channels of |data mean - stored mean| in stored standard deviations."""
    std_ratio: float
    """median over channels of data std / stored std."""


@dataclass(frozen=True)
class ShiftReport:
    """Per-layer shift of the data from a model's BN statistics, and what to do about it."""

    layers: tuple[LayerShift, ...]
    samples: int
    batches: int
    score: float
    """mean over layers of the mean channel divergence (nats)."""
    recommendation: str
    """`frozen` (keep BN frozen), `adapt` (re-estimate statistics, no labels needed),
    `labels` (re-estimate now; collect labels and run `compare` to pick the BN mode), or
    `scale` (the inputs are scaled otherwise than in training: fix that first)."""
    off_path: tuple[str, ...] = ()
    """BN layers that no inference pass reaches (not measured)."""

    @property
    def advice(self) -> str:
        """The recommendation as a sentence with its reason."""
        first = self.layers[0]
        return _ADVICE[self.recommendation].format(
            score=self.score,
            adapt=ADAPT_THRESHOLD,
            labels=LABELS_THRESHOLD,
            path=first.path,
            ratio=first.std_ratio if first.std_ratio >= 1 else 1 / first.std_ratio,
            wider="wider" if first.std_ratio >= 1 else "narrower",
        )

    @property
    def worst(self) -> LayerShift:
        """The layer with the largest mean divergence."""
        return max(self.layers, key=lambda x: x.kl_mean)

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(
            {
                "samples": self.samples,
                "batches": self.batches,
                "divergence": "KL(data || stored), per channel, Gaussian, nats",
                "score": self.score,
                "recommendation": self.recommendation,
                "advice": self.advice,
                "thresholds": {
                    "channel": CHANNEL_THRESHOLD,
                    "adapt": ADAPT_THRESHOLD,
                    "labels": LABELS_THRESHOLD,
                },
                "layers": [asdict(x) for x in self.layers],
                "off_path": list(self.off_path),
            },
            indent=2,
        )

    def table(self) -> Any:
        """A rich table, one row per BN layer."""
        from rich.table import Table

        t = Table(
            title=f"BN input shift on {self.samples} samples (KL data || stored, nats)",
            caption=f"KL mean, KL max: the divergence of each channel of this data from the "
            f"stored statistics, mean and largest; > {CHANNEL_THRESHOLD:g}: the share of "
            "channels beyond it; offset: |data mean - stored mean| in stored standard "
            "deviations (mean over channels); std x: data / stored standard deviation "
            "(median over channels)",
        )
        t.add_column("#", justify="right")
        t.add_column("BN layer", no_wrap=True)
        for col in ("channels", "KL mean", "KL max", f"> {CHANNEL_THRESHOLD:g}", "offset", "std x"):
            t.add_column(col, justify="right")
        for r in self.layers:
            t.add_row(
                str(r.depth),
                r.path,
                str(r.channels),
                f"{r.kl_mean:.3f}",
                f"{r.kl_max:.2f}",
                f"{r.share_shifted:.0%}",
                f"{r.mean_offset:.2f}",
                f"{r.std_ratio:.2f}",
            )
        return t

    def __str__(self) -> str:
        w = self.worst
        return (
            f"model shift {self.score:.3f} nats over {len(self.layers)} BN layers "
            f"(worst {w.path}: {w.kl_mean:.3f}); {self.advice}"
            + off_path_note(self.off_path).replace("were left as they are", "were not measured")
        )


_ADVICE = {
    "scale": "check the inputs' scale before anything else: at the first BN layer ({path}) "
    "the data spreads {ratio:.0f}x {wider} than the model's statistics expect, beyond any "
    "domain shift measured in calibration; images given as 0-255 to a model trained on "
    "0-1 do this: add --scale 1/255 or the model's --preprocess (in Python, "
    "bnkit.data.load(..., scale=1/255)) and measure again",
    "frozen": "keep BN frozen: shift {score:.3f} is below {adapt:g}, where re-estimating "
    "statistics stops paying",
    "adapt": "re-estimate BN statistics on this data, no labels needed (bnkit adapt, batches "
    "of 16 or more): shift {score:.3f} is at least {adapt:g}; TENT (bnkit tta --method tent, "
    "i.i.d. batches of 16 or more, 64 as in its paper) matched it within 2 points on the "
    "corruption benchmark, not more; if the data comes as a stream sorted by class or "
    "drifting through the classes, use bnkit tta --method robust, which beat "
    "re-estimation on the whole stream by 2 points there",
    "labels": "re-estimate BN statistics now (bnkit adapt, no labels needed), and collect "
    "labels: shift {score:.3f} is at least {labels:g}, where fine-tuning on 10 labelled "
    "images per class beat re-estimation alone by a median 19 points on the corruption "
    "benchmark; run bnkit compare on them to pick the BN mode",
}


def shift(
    model: Any,
    data: Any,
    *,
    select: Selector | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ShiftReport:
    """Measures, for each BN layer, how far the statistics of its inputs on `data` are
    from its stored running statistics, with the model in inference mode.

    Per channel, the divergence is KL(N(m_d, v_d) || N(m_s, v_s)) with `d` the data's
    and `s` the stored moments (both variances plus Keras' epsilon). It is the KL
    divergence from the standard normal of the layer's normalised activations on
    this data: 0 when the layer's statistics fit, growing with both a mean offset and
    a change of scale, and invariant to rescaling a channel. Nothing in the model
    changes. Inside a `torch.distributed` job each rank measures its own shard and
    every rank gets the measure of their union, as `adapt` does.

    Args:
        model: a Keras model or a PyTorch module (DDP-wrapped or not).
        data: anything `bnkit.data.load` reads; labels are unused.
        select: which BN layers to measure (all by default): a Selector or its
            command-line form.
        batch_size: batch size when `data` is an array or folder.
        max_batches: stop after this many batches.
        on_batch: called with the number of batches done.

    Examples:
        >>> import keras, numpy as np, bnkit
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
        >>> x = np.random.default_rng(0).normal(size=(512, 4)).astype("float32")
        >>> bnkit.shift(m, x).layers[0].kl_mean < 0.01
        True
    """
    backend, paths = _bn_paths(model, select)
    moments, n_batches, n_samples = _collect(
        backend, model, paths, data, "running", batch_size, max_batches, on_batch
    )
    seen, off_path = _on_path(moments)
    stored = backend.bn_stats(model, seen)
    pool_together([moments[p] for p in seen])
    measured = {p: moments[p].result() for p in seen}
    _check_finite_stats(measured)
    layers = tuple(_layer_shift(p, k, measured[p], stored[p]) for k, p in enumerate(seen))
    score = float(np.mean([x.kl_mean for x in layers]))
    ratio = layers[0].std_ratio
    unscaled = ratio > UNSCALED_RATIO or ratio < 1 / UNSCALED_RATIO
    advice = "scale" if unscaled else recommend(score)
    return ShiftReport(layers, n_samples, n_batches, score, advice, off_path)


def recommend(score: float) -> str:
    """`frozen`, `adapt` or `labels` for a model shift score (see ADAPT_THRESHOLD and
    LABELS_THRESHOLD)."""
    if score >= LABELS_THRESHOLD:
        return "labels"
    return "adapt" if score >= ADAPT_THRESHOLD else "frozen"


def gaussian_kl(
    mean_p: np.ndarray, var_p: np.ndarray, mean_q: np.ndarray, var_q: np.ndarray
) -> np.ndarray:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) per element, in nats.

    Examples:
        >>> float(gaussian_kl(np.array(1.0), np.array(1.0), np.array(0.0), np.array(1.0)))
        0.5
    """
    ratio = var_p / var_q
    return 0.5 * (ratio + (mean_p - mean_q) ** 2 / var_q - 1.0 - np.log(ratio))


def _layer_shift(
    path: str, depth: int, data: dict[str, np.ndarray], stored: dict[str, np.ndarray]
) -> LayerShift:
    var_d = data["var"] + VARIANCE_EPSILON
    var_s = stored["var"].astype(np.float64) + VARIANCE_EPSILON
    mean_s = stored["mean"].astype(np.float64)
    kl = gaussian_kl(data["mean"], var_d, mean_s, var_s)
    return LayerShift(
        path=path,
        depth=depth,
        channels=int(kl.size),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        share_shifted=float((kl > CHANNEL_THRESHOLD).mean()),
        mean_offset=float(np.mean(np.abs(data["mean"] - mean_s) / np.sqrt(var_s))),
        std_ratio=float(np.median(np.sqrt(var_d / var_s))),
    )
