"""BN statistics: re-estimation on new data (`adapt`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bnkit.backends import get_backend
from bnkit.data import DEFAULT_BATCH_SIZE, batches
from bnkit.errors import BnkitError
from bnkit.policy import AllBN, Selector
from bnkit.report import leaf_records


class _Moments:
    """Per-channel mean and population variance over many batches, combined exactly
    (Chan et al.'s parallel update, in float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, mean: np.ndarray, var: np.ndarray, n: int) -> None:
        mean = mean.astype(np.float64)
        var = var.astype(np.float64)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n, mean, var * n
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta**2 * (self.n * n / total)
        self.n = total

    def result(self) -> dict[str, np.ndarray]:
        """The running statistics to store: `mean` and population `var`."""
        if self.mean is None or self.m2 is None:
            raise BnkitError("a selected BN layer saw no data: is it on the model's path?")
        return {"mean": self.mean, "var": self.m2 / self.n}


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

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(
            {
                "batches": self.batches,
                "samples": self.samples,
                "layers": [asdict(x) for x in self.layers],
            },
            indent=2,
        )

    def __str__(self) -> str:
        worst = max(self.layers, key=lambda x: x.mean_change)
        return (
            f"re-estimated {len(self.layers)} BN layers on {self.samples} samples "
            f"({self.batches} batches); largest mean change {worst.mean_change:.3g} in {worst.path}"
        )


def adapt(
    model: Any,
    data: Any,
    *,
    select: Selector | None = None,
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

    Args:
        model: a Keras model.
        data: an array of inputs, an `(x, y)` tuple, or an iterable of batches.
        select: which BN layers to re-estimate (every BN layer by default).
        batch_size: batch size when `data` is an array.
        max_batches: stop after this many batches.
        on_batch: called with the number of batches done, for progress display.

    Example:
        >>> import keras, numpy as np, bnkit
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
        ...                       keras.layers.BatchNormalization()])
        >>> report = bnkit.adapt(m, np.random.rand(64, 4).astype("float32"))
        >>> report.samples
        64
    """
    backend = get_backend(model)
    _, infos = leaf_records(backend.records(model))
    picked = [infos[i] for i in (select or AllBN()).match(infos) if infos[i].is_bn]
    if not picked:
        raise BnkitError("no BatchNormalization layer selected: nothing to re-estimate")
    paths = [p.path for p in picked]
    moments = {p: _Moments() for p in paths}
    before = backend.snapshot(model).stats
    n_batches = n_samples = 0
    with backend.bn_batch_moments(model, paths, lambda p, m, v, n: moments[p].add(m, v, n)):
        for x in batches(data, batch_size, max_batches):
            backend.forward(model, x)
            n_batches += 1
            n_samples += len(x)
            if on_batch is not None:
                on_batch(n_batches)
    new = {p: moments[p].result() for p in paths}
    backend.set_bn_stats(model, new)
    return AdaptReport(tuple(_summary(p, before[p], new[p]) for p in paths), n_batches, n_samples)


def _summary(path: str, old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> LayerAdapt:
    ratio = new["var"] / np.maximum(old["var"], 1e-12)
    return LayerAdapt(
        path=path,
        mean_change=float(np.max(np.abs(new["mean"] - old["mean"]))),
        var_ratio_min=float(ratio.min()),
        var_ratio_max=float(ratio.max()),
    )
