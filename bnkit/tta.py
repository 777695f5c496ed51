"""Test-time adaptation without labels: BN re-estimation (`adapt`), TENT with guards
against its known collapse, and `robust` (statistics re-estimated on the stream so far,
with the predictions of label-shifted streams corrected), on Keras models and PyTorch
modules alike.

TENT (Wang et al., ICLR 2021) predicts each incoming batch with BN normalising on the
batch's statistics and then trains only BN's gamma/beta to lower the entropy of those
predictions. On some streams it collapses (one class takes over, the predictions lose
their entropy); the guards here watch the predicted-class distribution over a window of
recent batches against the start model's predictions on the same images, and reset to
the start weights when it collapses or when anything turns non-finite.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from bnkit.backends import get_backend
from bnkit.backends.base import CHANNELS_FIRST
from bnkit.data import DataError, load
from bnkit.domains import MIN_IMAGES, Domains
from bnkit.errors import BnkitError, BnkitWarning, check_int, check_rate
from bnkit.stats import Moments, OnlineAdapt, _layer_shift, adapt, off_path_note

METHODS = ("none", "adapt", "tent", "robust")
OPTIMIZERS = ("adam", "sgd")
DEFAULT_BATCH_SIZE = 64
"""the TENT paper's ImageNet batch size."""
DEFAULT_LR = 1e-3
"""the TENT repository's CIFAR setting: Adam, 1e-3, betas (0.9, 0.999), one step."""
MIN_BATCH_SIZE = 16
"""below it a batch's statistics are too noisy to normalise with (and to adapt on)."""
WINDOW = 8
"""batches over which the predicted-class distribution is watched."""
ENTROPY_RATIO = 0.5
"""collapse: the window's predicted-class entropy below this share of the start model's."""
TAKEOVER = 0.5
"""collapse: one class's share of the window's predictions above the reference's share of
that class by more than this."""
AGREEMENT = 0.5
"""collapse: under this share of a batch's predictions agree with the reference's."""
CHECK_EVERY_MAX = 16
"""with guards, the reference (the start weights with the stream's statistics) checks
every batch of the stream's first `window`; after it the gap to the next check starts
at one batch and doubles after each calm check, up to CHECK_EVERY_MAX batches. A check
that is not calm (under CALM of the batch's predictions agree with the reference's)
tightens it back to every batch; after a reset every batch is checked for a window; once
the stream is held out as label-shifted, the reference predicts every batch. The
collapse and label-shift tests use the checked batches, the finiteness test runs on
every batch. A check costs two inference passes (the reference's statistics pass and its
prediction), the TENT step about three (benchmarks/tta_cost.py)."""
CALM = 0.75
"""a check is calm when at least this share of the batch's predictions agree with the
reference's (a collapse is called under AGREEMENT; the predictions of a healthy TENT
agree with the reference's on 80 to 95% of the images of the corruption benchmark)."""
MEASURED_SHARE = 0.25
"""The guards' reference where a new batch size costs no trace (PyTorch, Keras-torch):
after the first `window` batches a checked batch's statistics are taken from this share
of it (evenly spaced, at least MEASURED_MIN images), weighted as the whole batch."""
MEASURED_MIN = 16
"""the fewest images of a checked batch the reference's statistics take in."""
ROBUST_SHARE = 0.125
"""`robust`: after the first `window` batches the stream's statistics take in this share
of each batch (evenly spaced, at least ROBUST_MIN images, each weighted as the share of
its batch it stands for), pooled: the samples are measured together once they fill a
batch of the stream's first batch size (ROBUST_POOLED), so the statistics pass runs
once per 8 batches at a size already traced, and TensorFlow and JAX trace nothing new
(benchmarks/README.md)."""
ROBUST_MIN = 8
"""the fewest images of a batch `robust`'s statistics take in after the window."""
ROBUST_EVERY = 1
"""`robust`: after the window every this-many-th batch gives its sample."""
ROBUST_POOLED = True
"""`robust`: samples wait to fill a batch before they are measured (False: each one
measured with its own batch, at its own size; the variants of benchmarks/README.md)."""
LAME_NEIGHBOURS = 5
"""`robust`: each output's neighbours in the batch for the Laplacian correction (LAME's
k-NN affinity, Boudiaf et al., CVPR 2022)."""
LAME_ITERATIONS = 20
"""`robust`: fixed-point iterations of the correction (it converges in fewer)."""
SHIFT_RUN = 2
"""`robust`: label shift is found at the second batch in a row that fails the test (a
class-sorted or drifting stream fails it batch after batch; an i.i.d. stream of mixed
corruptions, whose outputs are heavier-tailed than the test assumes, fails it now and
then, one batch alone)."""
SOURCE_GATE = (0.005, 0.009)
"""`robust`, the stream's first SOURCE_GATE_BATCHES batches: where the middle BN layers'
statistics on the stream so far lie within the first bound of the source's (mean KL over
their channels, nats), the batch is predicted with the source statistics; beyond the
second, with the stream's; blended between. The middle layers (after the first, before
the last third) barely move with the classes a batch holds (one class of the clean
digits: at most 0.006 nats) and move with the domain (the corruptions the source model
gets wrong: 0.01 to 0.1); the deep layers move with both. A young stream has no history
to tell a batch of few classes from a new domain, and normalising a one-class batch with
its own statistics erases its class (benchmarks/README.md)."""
SOURCE_GATE_RATIO = (4.0, 6.0)
"""`robust`, with SOURCE_GATE: the deep BN layers' shift (the last third) over the middle
ones'. One or two classes of a domain the model handles move the deep layers mostly 10
to 40 times as far as the middle ones; every class of a new domain, 1.5 to 5 times
(the corruption benchmark's first batches). At most the first bound, the batch is taken
to hold every class and is predicted with the stream's statistics whatever SOURCE_GATE
says; at least the second, SOURCE_GATE decides; blended between."""
SOURCE_GATE_BATCHES = 2
"""`robust`: the batches SOURCE_GATE applies to (from the third on, the label-shift test
has the stream's history)."""
SOURCE_GATE_CLASSES = 0.5
"""`robust`, where SOURCE_GATE and SOURCE_GATE_RATIO keep some of the source statistics
for a young batch: if the predictions made so spread over at least this share of the
classes (or of the batch, when smaller; measured as the exponential of the entropy of
their histogram), the batch holds many classes and is predicted with the stream's
statistics instead. A domain that moves the deep layers far more than the middle ones
looks like a batch of few classes to the ratio (glass_blur at severity 1 on the digits:
the source statistics 91% right on an i.i.d. stream's first batches, the whole stream's
98%); a batch of one class in a domain the model handles is predicted as one class. 0.5
was set before measuring, not tuned (benchmarks/README.md). Not applied to a model with
a single output column."""
SOURCE_SPLIT = 1 / 3
"""`robust`, the first SOURCE_GATE_BATCHES batches: the share of the BN layers, the first
ones, that the split candidate normalises with the stream's statistics, the rest with the
source's. A batch of few classes in a domain the model gets wrong is predicted by neither
alone: its own statistics in the deep layers erase its class, the source's in the early
ones leave the domain in. The early layers carry the domain and the deep ones the
classes (benchmarks/first_batch.py: the digits CNN's first batches of the Dirichlet
streams at severity 5, two in three of one class: 24.5% of the images right with the
batch's statistics, 24.3% with the source's, 40.0% split)."""
SOURCE_SPLIT_MARGIN = 0.6
"""`robust`: the split candidate's predictions replace the gate's where their mean entropy
is lower by at least this many nats. On the digits CNN a batch of one class normalised
with its own statistics spreads its predictions over the classes (mostly 1.4 to 1.9
nats), split predicts it at 0.1 to 0.9 where it predicts it well; on batches of every
class the two lie less than 0.6 apart but for contrast (1.1 to 1.2, where both are about
as accurate). benchmarks/README.md says how 0.6 was chosen."""
SPLIT_OWN = 0.5
"""`robust`, the first SOURCE_GATE_BATCHES batches: where the split candidate and the
batch's own predictions agree on less than this share of the batch, the source
statistics' predictions are made too, and"""
SPLIT_SOURCE = 0.8
"""where the split candidate's agree with the source's on at least this share, the
split's are taken: normalising the early layers with the batch's statistics changed
little, so the domain is one the model handles, and the batch's own statistics, which
disagree with both, erased its classes (a young batch of few classes)."""
LABEL_SHIFT_P = 1e-3
"""label shift: a batch whose reference outputs are this unlikely (chi-square test) as a
sample of the stream's so far shows the stream is not i.i.d.; from it on TENT is held."""


@dataclass(frozen=True)
class BatchRecord:
    """One batch of the stream."""

    index: int
    size: int
    accuracy: float | None
    """on this batch's predictions (made before its update), where labels were given."""
    entropy: float
    """mean entropy of the predicted distributions, in nats."""
    reset: str | None
    """why the weights went back to the start after this batch (None: they did not)."""
    adapted: bool
    """False for a batch that was predicted, not adapted on (see `held`, or below the
    minimum size)."""
    seconds: float
    held: str | None = None
    """why TENT held this batch out (the stream is label-shifted, found at this batch or
    before): it was predicted with the stream's statistics and the start weights."""
    corrected: str | None = None
    """`robust`: why this batch's predictions were corrected for label shift (found at
    this batch or before)."""
    domains: int | None = None
    """`robust`: how many domains the stream has shown up to this batch (`bnkit.domains`);
    with more than one, each image is normalised with its own domain's statistics."""


@dataclass(frozen=True)
class TTAReport:
    """What test-time adaptation did on a stream."""

    method: str
    batches: tuple[BatchRecord, ...]
    samples: int
    accuracy: float | None
    """over every prediction, where labels were given."""
    seconds: float
    settings: dict[str, Any]
    off_path: tuple[str, ...] = ()
    """BN layers that no inference pass reaches (their statistics kept as they were)."""

    @property
    def too_small(self) -> list[int]:
        """Indices of the batches TENT could not adapt on: fewer samples than
        `min_batch_size` (predicted as the model stood)."""
        return [b.index for b in self.batches if not b.adapted and b.held is None]

    @property
    def resets(self) -> list[tuple[int, str]]:
        """(batch index, reason) of every reset."""
        return [(b.index, b.reset) for b in self.batches if b.reset is not None]

    @property
    def held(self) -> list[int]:
        """Indices of the batches TENT held out as label-shifted."""
        return [b.index for b in self.batches if b.held is not None]

    @property
    def corrected(self) -> list[int]:
        """Indices of the batches whose predictions `robust` corrected for label shift."""
        return [b.index for b in self.batches if b.corrected is not None]

    @property
    def domains(self) -> int:
        """`robust`: how many domains the stream showed (1 for other methods)."""
        return max((b.domains or 1 for b in self.batches), default=1)

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(
            {
                "method": self.method,
                "samples": self.samples,
                "accuracy": self.accuracy,
                "seconds": self.seconds,
                "settings": self.settings,
                "resets": [{"batch": i, "reason": r} for i, r in self.resets],
                "held": self.held,
                "corrected": self.corrected,
                "domains": self.domains,
                "too_small": self.too_small if self.method == "tent" else [],
                "off_path": list(self.off_path),
                "batches": [asdict(b) for b in self.batches],
            },
            indent=2,
        )

    def __str__(self) -> str:
        acc = "" if self.accuracy is None else f", accuracy {self.accuracy:.1%}"
        text = f"{self.method}: {self.samples} samples in {len(self.batches)} batches{acc}"
        resets = self.resets
        if resets:
            text += f"; {len(resets)} reset(s), first at batch {resets[0][0]}: {resets[0][1]}"
        held = self.held
        if held:
            text += f"; {len(held)} label-shifted batch(es) held out of TENT, first {held[0]}"
        corrected = self.corrected
        if corrected:
            text += (
                f"; label shift from batch {corrected[0]}: predictions of "
                f"{len(corrected)} batch(es) corrected"
            )
        if self.domains > 1:
            first = next(b.index for b in self.batches if (b.domains or 1) > 1)
            text += (
                f"; {self.domains} domains in the stream (the second from batch {first}), "
                "each normalised with its own images' statistics"
            )
        small = self.too_small if self.method == "tent" else []
        if small:
            text += (
                f"; {len(small)} batch(es) smaller than {self.settings['min_batch_size']} "
                "predicted without adapting"
            )
        return text + off_path_note(self.off_path)


def tta(
    model: Any,
    data: Any,
    method: str = "robust",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    steps: int = 1,
    episodic: bool = False,
    lr: float = DEFAULT_LR,
    optimizer: str = "adam",
    guard: bool = True,
    min_batch_size: int = MIN_BATCH_SIZE,
    window: int = WINDOW,
    max_batches: int | None = None,
    on_batch: Callable[[BatchRecord], None] | None = None,
) -> TTAReport:
    """Adapts `model` in place to an unlabelled stream, predicting each batch as it comes.

    `none` predicts with the model as it is. `adapt` re-estimates every BN layer's
    statistics on the whole stream first (`bnkit.adapt`), then predicts. `tent`
    predicts each batch with BN normalising on that batch's statistics and then takes
    `steps` Adam (or SGD, momentum 0.9) steps on BN gamma/beta to lower the entropy of
    the predictions; every other weight stays fixed and every other layer in
    inference mode. `episodic` resets to the start weights before each batch. With
    `guard`, the weights go back to the start when they or the outputs turn
    non-finite, or when the predicted-class distribution over the last `window`
    batches collapses against the start model's predictions on the same images (its
    entropy falls below half of theirs, or one class gains more than half of the
    predictions); each reset is reported with its batch. Also with `guard`, once a
    batch's outputs show the stream is not i.i.d. (a chi-square test of their mean
    against the stream's so far, p < 0.001: label shift, as in a class-sorted stream),
    TENT is held for the rest of the stream: one-class batches would both normalise
    with their own statistics and teach TENT that class. Held batches are predicted by
    the start weights with statistics re-estimated on the stream so far. The guards'
    reference (those start weights and statistics) runs on each of the first `window`
    batches; after them the gap between checks doubles after each calm check (at least
    3/4 of the predictions agree with the reference's), up to 16 batches, and falls back
    to one batch after a check that is not calm. After a reset the reference runs on
    every batch again for a window. The finiteness test runs on every batch. After `tent`
    the statistics are re-estimated on the stream, so the model runs in inference mode
    as usual.

    `robust`, the default, suits every stream measured, and most those that are not
    i.i.d. (sorted by class, or drifting through the classes), where TENT and every
    normalisation on the batch's own statistics lose: each batch is predicted in
    inference mode with the statistics re-estimated on the stream so far, this batch
    included (what `adapt` would compute on them, with no gradient step; after the
    first `window` batches on a sample of them, below), and once the
    outputs show label shift (two batches in a row fail the chi-square test above)
    each batch's predictions are corrected by LAME (Boudiaf et al., CVPR 2022): a
    Laplacian over the batch's k-nearest outputs draws neighbouring predictions to
    agree, which a batch of few classes rewards. The first two batches of a stream have
    no history to tell a batch of few classes from a new domain, and normalising a
    one-class batch with its own statistics erases its class: where the middle BN
    layers' statistics on them stay close to the model's own while the deep layers'
    move far more (what few classes do), they are predicted with the model's
    statistics, blended with the stream's as the evidence weakens (`SOURCE_GATE`,
    `SOURCE_GATE_RATIO`), unless those predictions spread over half the classes
    (`SOURCE_GATE_CLASSES`: a domain can move the deep layers too); each is also
    predicted with the stream's statistics in the first third of the BN layers and the
    model's in the rest (the domain taken out, the classes kept), and those predictions
    are kept where their mean entropy is lower by
    `SOURCE_SPLIT_MARGIN` nats (a batch of few classes normalised with its own statistics
    spreads its predictions over the classes). Where the stream mixes domains (images
    from several cameras, weathers or corruptions, told apart by their own pixel
    statistics: `bnkit.domains`), each image is normalised instead with the statistics
    of its own domain's images so far, once that domain holds 64 images (before, the
    whole stream's). The statistics take in every image of the first `window` batches,
    then an eighth of each batch (at least 8 images, each weighted as the share of its
    batch it stands for), the samples measured together once they fill a batch: on a
    stream of one domain `robust` costs 1.2 to 1.5 inference passes per batch after the
    window on PyTorch and every Keras backend (measured; telling the domains apart is
    about 0.1 of them), and on a mixed stream one more pass per domain in the batch. At
    the end the model holds the stream's statistics over the images measured (on a
    stream of at most `window` batches exactly what `adapt` gives; on the longer streams
    measured the sampling moved the means by at most 0.1 point down).
    On the corruption benchmark (severity 5) its mean is above whole-stream `adapt`'s
    on every stream (47.0% against 32.2% where the 15 corruptions are mixed) and above
    TENT with guards, at a lower cost: hence the default. Where the model is already
    right and the labels arrive in runs it can still fall below the model as it was,
    on a single corruption: by up to 2.3 points on a class-sorted stream, 7 on a short
    one (Keras; on PyTorch not at all on the full streams, 1 point on the short ones;
    benchmarks/README.md).

    Labels in `data`, if any, only score the predictions.

    Args:
        model: a Keras classifier or a PyTorch module (changed in place).
        data: the stream: anything `bnkit.data.load` reads (arrays, `(x, y)`, a
            DataLoader, a folder); arrays are cut into batches of `batch_size`.
        method: `robust` (the default), `tent`, `adapt` or `none`.
        batch_size: the batch size for arrays and folders.
        steps: TENT steps per batch.
        episodic: reset before every batch.
        lr: TENT's learning rate.
        optimizer: `adam` or `sgd`.
        guard: reset on collapse or non-finite values.
        min_batch_size: smaller batches are refused (all of them) or, at the end of
            the stream, predicted without adapting.
        window: batches the collapse guard looks at.
        max_batches: use at most this many batches of the stream.
        on_batch: called with each batch's record.

    Examples:
        >>> import torch, numpy as np, bnkit
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
        ...                         torch.nn.Linear(8, 3))
        >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
        >>> r = bnkit.tta(m, (x, np.zeros(64, int)), "tent", batch_size=32)
        >>> len(r.batches), r.resets
        (2, [])
    """
    if method not in METHODS:
        raise BnkitError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    lr = check_rate(lr)
    if optimizer not in OPTIMIZERS:
        raise BnkitError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    batch_size = check_int(batch_size, "batch_size")
    steps, window = check_int(steps, "steps"), check_int(window, "window")
    min_batch_size = check_int(min_batch_size, "min_batch_size")
    if max_batches is not None:
        max_batches = check_int(max_batches, "max_batches")
    if method == "tent" and batch_size < min_batch_size:
        raise BnkitError(
            f"TENT needs batches of at least {min_batch_size} (got {batch_size}): smaller "
            "batches give BN statistics too noisy to normalise with; use --method adapt, "
            "which re-estimates the statistics over the whole stream, or larger batches"
        )
    backend = get_backend(model)
    loaded = load(data, batch_size=batch_size, channels_first=backend.layout == CHANNELS_FIRST)
    stream = _Limited(loaded, max_batches)
    settings = {
        "batch_size": batch_size, "steps": steps, "episodic": episodic, "lr": lr,
        "optimizer": optimizer, "guard": guard, "min_batch_size": min_batch_size,
        "window": window,
    }  # fmt: skip
    t0 = time.perf_counter()
    adapter = backend.test_time()
    off_path: tuple[str, ...] = ()
    if method == "adapt":
        off_path = adapt(model, stream).off_path
    if method == "tent":
        backend.unfreeze(model)  # pinned BN would ignore batch statistics
        adapter.prepare(model, lr, optimizer)
        start = adapter.save_state(model)
        records = _tent(adapter, model, start, stream, steps, episodic, guard,
                        min_batch_size, window, on_batch)  # fmt: skip
        _refuse_unadapted(adapter, model, start, records, min_batch_size)
        off_path = _settle(adapter, model, start, stream, records, guard)
    elif method == "robust":
        records, off_path = _robust(adapter, model, stream, window, on_batch)
    else:
        records = _predict_only(adapter, model, stream, on_batch)
    report = _report(method, records, time.perf_counter() - t0, settings)
    return replace(report, off_path=off_path)


def _refuse_unadapted(
    adapter: Any, model: Any, start: Any, records: list[_Scored], min_batch: int
) -> None:
    """TENT that could adapt on no batch (all smaller than the minimum) is an error, the
    model put back as it was; on some of them, a warning with their count."""
    small = [s.record for s in records if not s.record.adapted and s.record.held is None]
    if not small:
        return
    if len(small) == len(records):
        adapter.restore_state(model, start)
        raise BnkitError(
            f"TENT adapted on no batch: all {len(records)} batches of the stream hold fewer "
            f"than {min_batch} samples (the largest {max(r.size for r in small)}), too few "
            "for BN statistics; give larger batches (--batch-size), or use method 'adapt'; "
            "the model was not changed"
        )
    warnings.warn(
        f"{len(small)} of {len(records)} batches hold fewer than {min_batch} samples and were "
        "predicted without adapting",
        BnkitWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class _Limited:
    """The first `limit` batches of a stream, re-iterable (all of them when None)."""

    data: Any
    limit: int | None

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.data), self.limit)


@dataclass
class _Scored:
    record: BatchRecord
    hits: int | None


def _predict_only(
    adapter: Any, model: Any, stream: Any, on_batch: Callable[[BatchRecord], None] | None
) -> list[_Scored]:
    out = []
    for k, (x, y) in enumerate(stream):
        t = time.perf_counter()
        scored = _score(k, adapter.predict(model, x), y, None, True, time.perf_counter() - t)
        out.append(scored)
        if on_batch is not None:
            on_batch(scored.record)
    return out


def _measured(
    x: np.ndarray, settled: bool, share: float = MEASURED_SHARE, least: int = MEASURED_MIN
) -> np.ndarray:
    """The images of a batch the statistics take in: all of them during the first
    window, then `share` of them (at least `least`), evenly spaced."""
    take = max(least, int(np.ceil(len(x) * share)))
    if not settled or take >= len(x):
        return x
    return x[np.linspace(0, len(x) - 1, take).round().astype(int)]


class _Pool:
    """`robust`'s samples after the window, measured together once they fill `size`
    images (the stream's first batch size), each image weighted as the images of its
    batch it stands for; `flush` measures what is left at the end of the stream."""

    def __init__(self, online: OnlineAdapt, size: int) -> None:
        self._online, self._size = online, size
        self._samples: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []

    def add(self, x: np.ndarray) -> None:
        sample = _measured(x, True, ROBUST_SHARE, ROBUST_MIN)
        if not ROBUST_POOLED:
            self._online.update(sample, represents=len(x))
            return
        self._samples.append(sample)
        self._weights.append(np.full(len(sample), len(x) / len(sample)))
        if sum(len(s) for s in self._samples) >= self._size:
            self._measure(self._size)

    def flush(self) -> None:
        held = sum(len(s) for s in self._samples)
        if held:
            self._measure(held)

    def _measure(self, size: int) -> None:
        x, weights = np.concatenate(self._samples), np.concatenate(self._weights)
        self._samples, self._weights = [x[size:]], [weights[size:]]  # none, or a few
        if size > 1:  # one image has no batch statistics past a dense layer
            self._online.update(x[:size], represents=round(float(weights[:size].sum())))


def _robust(
    adapter: Any,
    model: Any,
    stream: Any,
    window: int,
    on_batch: Callable[[BatchRecord], None] | None,
) -> tuple[list[_Scored], tuple[str, ...]]:
    """Each batch predicted with the statistics of the stream so far (every image of
    the first `window` batches, this one included; then samples of every batch, measured
    once they fill a batch: `_Pool`), the first SOURCE_GATE_BATCHES blended with the
    source's by `_gated`; where the stream mixes domains, each image with those of its
    own domain's images so far; from the batch that shows label shift on, the
    predictions corrected by LAME."""
    online = OnlineAdapt(model)
    source = get_backend(model).bn_stats(model, online.paths)  # before the stream
    pool: _Pool | None = None
    domains = Domains(get_backend(model).layout == CHANNELS_FIRST)
    own: dict[int, OnlineAdapt] = {}  # per domain, once the stream holds more than one
    seen = Moments()  # of the per-image outputs on the stream so far
    shifted: str | None = None
    run = 0  # batches in a row that failed the label-shift test
    out: list[_Scored] = []
    for k, (x, y) in enumerate(stream):
        t = time.perf_counter()
        ids = domains.assign(x)
        if ids is not None and len(domains.counts) > 1 and not own:
            own[0] = online.fork()  # every image before this batch was of the first
        if pool is None:  # pooled samples are measured at the first batch's size
            pool = _Pool(online, max(len(x), 2))  # one image: no statistics past a dense BN
        if k < window:
            online.update(x)
        elif (k - window) % ROBUST_EVERY == 0:
            pool.add(x)
        if ids is not None and len(domains.counts) > 1:
            outputs = _by_domain(adapter, model, x, ids, domains, online, own)
        elif k < SOURCE_GATE_BATCHES:
            outputs = _gated(adapter, model, x, online, source)
        else:
            outputs = adapter.predict(model, x)
        if shifted is None:
            why = _label_shift(outputs, seen)
            run = 0 if why is None else run + 1
            if run >= SHIFT_RUN:
                shifted = f"{why}, at batch {k} and the {SHIFT_RUN - 1} before"
        seen.add(outputs.mean(0), outputs.var(0), len(outputs))
        if shifted is not None:
            outputs = lame(outputs)
        scored = _score(k, outputs, y, None, True, time.perf_counter() - t)
        scored.record = replace(scored.record, corrected=shifted, domains=len(domains.counts))
        out.append(scored)
        if on_batch is not None:
            on_batch(scored.record)
    if pool is not None:
        pool.flush()
    return out, (online.off_path() if out else ())


def _gated(
    adapter: Any,
    model: Any,
    x: np.ndarray,
    online: OnlineAdapt,
    source: dict[str, dict[str, np.ndarray]],
) -> np.ndarray:
    """The batch's outputs with the statistics of the stream so far blended with the
    source's (the two Gaussians' mixture) by SOURCE_GATE and SOURCE_GATE_RATIO, the
    stream's share the larger of the two ramps' verdicts (the stream's alone where those
    predictions spread over SOURCE_GATE_CLASSES of the classes), or split (the stream's
    in the first SOURCE_SPLIT of the BN layers, the source's after them) where those
    predictions' mean entropy is lower by SOURCE_SPLIT_MARGIN; the model keeps the
    stream's."""
    streamed = online.statistics()
    paths = list(streamed)
    third = (2 * len(paths)) // 3
    middle, deep = paths[1 : max(2, third)], paths[max(2, third) :]
    if not middle or not deep:  # too few BN layers to tell classes from domains
        return adapter.predict(model, x)
    shift = {p: _layer_shift(p, 0, streamed[p], source[p]).kl_mean for p in paths}
    mid = float(np.mean([shift[p] for p in middle]))
    ratio = float(np.mean([shift[p] for p in deep])) / max(mid, 1e-12)
    a = max(_ramp(mid, SOURCE_GATE), 1.0 - _ramp(ratio, SOURCE_GATE_RATIO))  # the stream's
    backend = get_backend(model)
    early = max(1, round(len(paths) * SOURCE_SPLIT))
    try:
        if a < 1.0:  # else the model holds the stream's statistics already
            backend.set_bn_stats(model, _mixture(source, streamed, a))
        outputs = adapter.predict(model, x)
        if a < 1.0 and _spread(outputs):
            backend.set_bn_stats(model, streamed)
            outputs = adapter.predict(model, x)
        backend.set_bn_stats(
            model, _mixture(source, streamed, {p: float(i < early) for i, p in enumerate(paths)})
        )
        split = adapter.predict(model, x)
        if _mean_entropy(outputs) - _mean_entropy(split) >= SOURCE_SPLIT_MARGIN:
            return split
        if outputs.ndim == 2 and outputs.shape[1] > 1 and _agree(outputs, split) < SPLIT_OWN:
            backend.set_bn_stats(model, {p: source[p] for p in paths})
            if _agree(split, adapter.predict(model, x)) >= SPLIT_SOURCE:
                return split
        return outputs
    finally:
        online.write()


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    """The share of the batch whose predicted class is the same in `a` and `b`."""
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())


def _spread(outputs: np.ndarray) -> bool:
    """True where a batch's predictions fall in at least SOURCE_GATE_CLASSES of the
    classes (of the batch's size, where smaller); False for a single output column,
    whose classes cannot be counted."""
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return False
    return _classes_seen(outputs) >= SOURCE_GATE_CLASSES * min(outputs.shape)


def _classes_seen(outputs: np.ndarray) -> float:
    """How many classes the batch's predictions spread over: the exponential of the
    entropy of their histogram (1 where all fall in one class, k where they fall evenly
    in k)."""
    counts = np.bincount(outputs.argmax(axis=1), minlength=outputs.shape[1])
    p = counts[counts > 0] / len(outputs)
    return float(np.exp(-(p * np.log(p)).sum()))


def _mean_entropy(outputs: np.ndarray) -> float:
    """The mean entropy of the predicted distributions (softmax outputs or logits), nats."""
    log_p = _log_probs(outputs)
    return float(-(np.exp(log_p) * log_p).sum(axis=1).mean())


def _mixture(
    source: dict[str, dict[str, np.ndarray]],
    streamed: dict[str, dict[str, np.ndarray]],
    share: float | dict[str, float],
) -> dict[str, dict[str, np.ndarray]]:
    """Per BN layer of `streamed`, the mean and variance of the mixture of the source's
    and the stream's Gaussians, the stream weighing `share` (one for every layer, or
    per layer), in float64."""
    out = {}
    for p, stream in streamed.items():
        a = share[p] if isinstance(share, dict) else share
        ms, vs = (source[p][n].astype(np.float64) for n in ("mean", "var"))
        mt, vt = (stream[n].astype(np.float64) for n in ("mean", "var"))
        m = (1 - a) * ms + a * mt
        out[p] = {"mean": m, "var": (1 - a) * (vs + (ms - m) ** 2) + a * (vt + (mt - m) ** 2)}
    return out


def _ramp(value: float, bounds: tuple[float, float]) -> float:
    """0 at or below the first bound, 1 at or above the second, linear between."""
    return float(np.clip((value - bounds[0]) / (bounds[1] - bounds[0]), 0.0, 1.0))


def _by_domain(
    adapter: Any,
    model: Any,
    x: np.ndarray,
    ids: np.ndarray,
    domains: Domains,
    online: OnlineAdapt,
    own: dict[int, OnlineAdapt],
) -> np.ndarray:
    """The batch's outputs, each domain's images normalised with the statistics of that
    domain's images so far (the stream's while it holds fewer than MIN_IMAGES); the
    model keeps the whole stream's statistics."""
    parts = []
    for d in np.unique(ids):
        idx = np.flatnonzero(ids == d)
        stats = own.setdefault(int(d), OnlineAdapt(model))
        if len(idx) > 1:  # one image has no batch statistics past a dense layer
            stats.update(x[idx], write=False)
        mature = domains.counts[d] >= MIN_IMAGES and not stats.empty
        (stats if mature else online).write()
        parts.append((idx, adapter.predict(model, x[idx])))
    online.write()
    outputs = np.empty((len(x), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
    for idx, part in parts:
        outputs[idx] = part
    return outputs


def lame(
    outputs: np.ndarray, neighbours: int = LAME_NEIGHBOURS, iterations: int = LAME_ITERATIONS
) -> np.ndarray:
    """LAME's Laplacian correction of one batch of outputs (logits or probabilities):
    the assignments z maximise sum_i z_i.log p_i + sum_ij w_ij z_i.z_j - sum_i z_i.log z_i,
    with w the batch's k-nearest-neighbour affinity on the centred log-probabilities
    (the outputs stand in for the paper's features, so it needs no access inside the
    model). Returns log-probabilities; a batch of `neighbours` or fewer is returned
    as its log-probabilities unchanged."""
    logp = _log_probs(outputs)
    n = len(logp)
    if n <= neighbours:
        return logp
    f = logp - logp.mean(1, keepdims=True)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    distance = -f @ f.T
    np.fill_diagonal(distance, np.inf)
    nearest = np.argpartition(distance, neighbours, axis=1)[:, :neighbours]
    affinity = np.zeros((n, n), dtype=np.float64)
    affinity[np.arange(n)[:, None], nearest] = 1.0
    z = np.exp(logp)
    for _ in range(iterations):
        e = logp + affinity @ z
        e -= e.max(1, keepdims=True)
        new = np.exp(e)
        new /= new.sum(1, keepdims=True)
        if np.abs(new - z).max() < 1e-6:
            z = new
            break
        z = new
    return np.log(np.clip(z, 1e-12, None)).astype(outputs.dtype)


def _probabilities(outputs: np.ndarray) -> bool:
    """True for a softmax output (rows of non-negative values summing to 1), False for
    logits."""
    return bool(np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3) and (outputs >= 0).all())


def _log_probs(outputs: np.ndarray) -> np.ndarray:
    o = outputs.astype(np.float64)
    if _probabilities(o):
        return np.log(np.clip(o, 1e-12, None))
    o = o - o.max(1, keepdims=True)
    return o - np.log(np.exp(o).sum(1, keepdims=True))


def _settle(
    adapter: Any, model: Any, start: Any, stream: Any, records: list[_Scored], guard: bool
) -> tuple[str, ...]:
    """Re-estimates the statistics on the stream for inference; with `guard`, weights whose
    statistics overflow go back to the start first (the last batch records it). Returns
    the BN layers off the inference path."""
    try:
        return adapt(model, stream).off_path
    except DataError:
        if not guard:
            raise
        adapter.restore_state(model, start)
        off_path = adapt(model, stream).off_path
        last = records[-1]
        reason = "non-finite statistics: the adapted weights overflow float32"
        last.record = replace(last.record, reset=last.record.reset or reason)
        return off_path


def _tent(
    adapter: Any,
    model: Any,
    start: Any,
    stream: Any,
    steps: int,
    episodic: bool,
    guard: bool,
    min_batch: int,
    window: int,
    on_batch: Callable[[BatchRecord], None] | None,
) -> list[_Scored]:
    reference = adapter.reference(model) if guard else None
    online = OnlineAdapt(reference) if reference is not None else None
    recent: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=window)
    seen = Moments()  # of the reference's per-image outputs on the stream so far
    shifted: str | None = None
    tight = 0  # batches still to check one by one after a reset
    gap, due = 1, window  # batches from one check to the next, the next one due
    out: list[_Scored] = []
    try:
        for k, (x, y) in enumerate(stream):
            t = time.perf_counter()
            forced = bool(shifted or tight or k < window)  # checked whatever the gap
            if len(x) < min_batch:  # the stream's last, short batch
                scored = _score(k, adapter.predict(model, x), y, None, False, 0.0)
            elif online is None:
                scored = _step(adapter, model, start, x, y, k, steps, episodic, None, t)
            elif forced or k >= due:
                # a sample of the batch, where a new batch size costs no trace: the
                # 8 to 11 checks after the window do not repay one
                sample = x if adapter.traced else _measured(x, k >= window)
                online.update(sample, represents=len(x))
                fallback = adapter.predict(reference, x)
                held = shifted or _label_shift(fallback, seen)
                if held is not None and shifted is None:  # the stream is not i.i.d.
                    shifted = f"{held}, at batch {k}"
                seen.add(fallback.mean(0), fallback.var(0), len(fallback))
                if held is not None:
                    scored = _score(k, fallback, y, None, False, time.perf_counter() - t, held)
                else:
                    scored = _step(adapter, model, start, x, y, k, steps, episodic,
                                   (fallback, recent), t, reference)  # fmt: skip
                    calm = not scored.record.reset and _agreement(recent) >= CALM
                    gap = min(2 * gap, CHECK_EVERY_MAX) if calm and not forced else 1
                    due = k + gap
            else:  # between checks: only the finiteness guard
                scored = _step(adapter, model, start, x, y, k, steps, episodic,
                               (None, recent), t, reference)  # fmt: skip
            tight = window if scored.record.reset else max(tight - 1, 0)
            out.append(scored)
            if on_batch is not None:
                on_batch(scored.record)
    finally:
        adapter.finish(model)
    return out


def _step(
    adapter: Any,
    model: Any,
    start: Any,
    x: np.ndarray,
    y: Any,
    k: int,
    steps: int,
    episodic: bool,
    guarded: tuple[np.ndarray | None, deque[tuple[np.ndarray, np.ndarray]]] | None,
    t: float,
    reference: Any = None,
) -> _Scored:
    """TENT on one batch; with `guarded` (the reference's outputs, or None on a batch
    between checks, and the window), a reset on non-finite values or collapse, and the
    reference's predictions then."""
    if episodic:
        adapter.restore_state(model, start)
    outputs = adapter.step(model, x)
    for _ in range(steps - 1):
        adapter.step(model, x)
    reset = None
    if guarded is not None:
        fallback, recent = guarded
        if not (np.isfinite(outputs).all() and adapter.finite(model)):
            reset = "non-finite outputs or BN weights"
        elif fallback is not None:
            recent.append((outputs.argmax(1), fallback.argmax(1)))
            reset = _collapse(recent, outputs.shape[1])
        if reset is not None:
            adapter.restore_state(model, start)
            recent.clear()
            # the re-estimated model's predictions
            outputs = fallback if fallback is not None else adapter.predict(reference, x)
    return _score(k, outputs, y, reset, True, time.perf_counter() - t)


def _label_shift(outputs: np.ndarray, seen: Moments) -> str | None:
    """Why a batch is not a sample of the stream so far, or None: the mean of the
    reference's per-image outputs lies further from the stream's mean than sampling
    allows (a chi-square test over the outputs, each scaled by its per-image variance
    on the stream). One-class batches would otherwise both normalise TENT with their
    own statistics and teach it that class (its collapse on sorted streams)."""
    from scipy.special import chdtrc  # chi2.sf less scipy.stats' generic checks

    n = len(outputs)
    if seen.mean is None or seen.m2 is None or seen.n < n:
        return None
    var = seen.m2 / seen.n
    scale = var * (1 / n + 1 / seen.n)
    statistic = float(((outputs.mean(0) - seen.mean) ** 2 / np.maximum(scale, 1e-12)).sum())
    p = float(chdtrc(outputs.shape[1], statistic))
    if p >= LABEL_SHIFT_P:
        return None
    return (
        f"label shift: the mean output of this batch is off the stream's by a chi-square "
        f"of {statistic:.0f} over {outputs.shape[1]} classes (p={p:.1g})"
    )


def _agreement(recent: deque[tuple[np.ndarray, np.ndarray]]) -> float:
    """The share of the last checked batch's predictions that agree with the
    reference's (0 when the window was just emptied by a reset)."""
    if not recent:
        return 0.0
    last, last_ref = recent[-1]
    return float((last == last_ref).mean())


def _collapse(recent: deque[tuple[np.ndarray, np.ndarray]], classes: int) -> str | None:
    """Why the window's predictions collapsed against the reference's (the start weights
    with statistics re-estimated on the stream so far), or None."""
    agree = _agreement(recent)
    if agree < AGREEMENT:
        return (
            f"collapse: {agree:.0%} of this batch's predictions agree with those of the "
            "statistics re-estimated on the stream"
        )
    adapted = np.concatenate([a for a, _ in recent])
    start = np.concatenate([r for _, r in recent])
    share_a = np.bincount(adapted, minlength=classes) / len(adapted)
    share_s = np.bincount(start, minlength=classes) / len(start)
    h_a, h_s = _entropy(share_a), _entropy(share_s)
    if h_a < ENTROPY_RATIO * h_s:
        return (
            f"collapse: predicted-class entropy {h_a:.2f} nats over {len(recent)} batches, "
            f"under half the re-estimated model's {h_s:.2f}"
        )
    top = int(share_a.argmax())
    if share_a[top] - share_s[top] > TAKEOVER:
        return (
            f"collapse: class {top} takes {share_a[top]:.0%} of the predictions over "
            f"{len(recent)} batches (re-estimated model: {share_s[top]:.0%})"
        )
    return None


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _score(
    k: int,
    outputs: np.ndarray,
    y: Any,
    reset: str | None,
    adapted: bool,
    seconds: float,
    held: str | None = None,
) -> _Scored:
    ent = _mean_entropy(outputs)
    hits = None
    acc = None
    if y is not None:
        labels = np.asarray(y).reshape(len(outputs), -1)
        labels = labels.argmax(1) if labels.shape[1] > 1 else labels[:, 0]
        hits = int((outputs.argmax(1) == labels).sum())
        acc = hits / len(outputs)
    record = BatchRecord(k, len(outputs), acc, ent, reset, adapted, seconds, held)
    return _Scored(record, hits)


def _report(
    method: str, scored: list[_Scored], seconds: float, settings: dict[str, Any]
) -> TTAReport:
    if not scored:
        raise DataError("the stream is empty: give at least one batch")
    samples = sum(s.record.size for s in scored)
    labelled = all(s.hits is not None for s in scored)
    accuracy = sum(s.hits or 0 for s in scored) / samples if labelled else None
    return TTAReport(method, tuple(s.record for s in scored), samples, accuracy, seconds, settings)
