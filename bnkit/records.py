"""What every backend produces: layer records, compile status, coded notes, training
logs, BN facts and folded copies. Plain data, below both the backends and the features,
importing neither."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bnkit.policy import BNState, LayerInfo

# ---------------------------------------------------------------------- notes

TRAINING_OVERRIDDEN = "training-false-overridden"
"""Keras: a nested model called with training=False, whose BN layers fit still updates."""
STATS_WITHOUT_AFFINE = "stats-without-affine"
"""The statistics update in training while gamma/beta do not."""
TRAINED_UNDER_FROZEN_PARENT = "trained-under-frozen-parent"
"""Keras: a trainable layer inside a non-trainable parent, which fit still trains."""
CHANGED_SINCE_COMPILE = "changed-since-compile"
"""Keras: a trainable flag changed after compile; the next fit ignores or fails on it."""
EVAL_UNDONE_BY_TRAIN = "eval-undone-by-train"
"""PyTorch: a BN in eval() now, which model.train() puts back in training mode."""
NO_RUNNING_STATS = "no-running-stats"
"""PyTorch: track_running_stats=False, batch statistics in eval() too."""
BATCH_STATS_AT_TRAINING_ONLY = "batch-stats-in-training-only"
"""PyTorch: track_running_stats=False with running buffers kept (Lightning's freeze):
batch statistics in train(), the stored ones in eval()."""
CUMULATIVE_AVERAGE = "cumulative-average"
"""PyTorch: momentum=None, the running statistics are a cumulative average."""
FIXED_BN = "fixed-batchnorm"
"""PyTorch: torchvision's FrozenBatchNorm2d, whose gamma/beta and statistics are buffers:
always frozen, nothing to freeze, no other mode possible."""
SYNC_WITHOUT_GROUP = "sync-batchnorm-unsynchronised"
"""PyTorch: SyncBatchNorm that cannot synchronise: no process group (it trains as a
plain BN), or a group on CPU (its training forward raises)."""
QAT_STATS_UPDATE = "qat-fused-bn-statistics-update"
"""PyTorch: the BN inside an eager-mode QAT fused Conv+BN module (`prepare_qat`) whose
statistics still update (no `freeze_bn_stats` yet)."""
EXPORTED_BATCH_STATS = "exported-graph-batch-stats"
"""PyTorch: a BN in a `torch.export` graph that was exported in training mode: the graph
normalises with the batch's statistics, in inference too, and cannot be switched."""
PEFT_UNSAVED_STATS = "peft-unsaved-statistics"
"""PyTorch: a BN of a PEFT model whose statistics update in training while the adapter
(its `modules_to_save`) does not hold them: the reloaded model is not the trained one."""


@dataclass(frozen=True)
class Note:
    """A pitfall found on one layer: a stable `code` (one of the constants above) that
    programs match on, and `text` for people."""

    code: str
    text: str

    def __str__(self) -> str:
        return self.text


# ---------------------------------------------------------------------- layers


@dataclass(frozen=True)
class LayerRecord:
    """One layer as `inspect` reports it."""

    path: str
    name: str
    class_name: str
    is_container: bool
    trainable: bool
    """the layer's own flag."""
    effective_trainable: bool
    """whether training updates its weights (its flag and every parent's)."""
    trainable_params: int
    non_trainable_params: int
    is_bn: bool = False
    bn_mode: str | None = None
    """effective mode in training: frozen, affine, train, adapt, stats-only or custom."""
    bn_state: BNState | None = None
    momentum: float | None = None
    """the share of the old running statistics kept at each update (Keras' convention;
    PyTorch's `momentum` m is reported as 1 - m); None for a cumulative average."""
    notes: tuple[Note, ...] = ()

    def info(self, index: int) -> LayerInfo:
        """The selector view of this layer at position `index`."""
        return LayerInfo(self.path, self.name, self.class_name, index, self.is_bn)


def leaf_records(records: list[LayerRecord]) -> tuple[list[LayerRecord], list[LayerInfo]]:
    """The non-container records and their selector view, in topological order."""
    leaves = [r for r in records if not r.is_container]
    return leaves, [r.info(i) for i, r in enumerate(leaves)]


@dataclass(frozen=True)
class CompileStatus:
    """Whether a model's compiled training state still matches its layers."""

    compiled: bool
    stale_layers: tuple[str, ...] = ()
    """layers whose trainable flag changed since `compile`."""
    pending: bool = False
    """bnkit changed BN modes or trainable flags since the last compile."""
    unknown_to_optimizer: int = 0
    """trainable variables the (already built) optimizer does not know."""

    @property
    def stale(self) -> bool:
        """True when the next `fit` would not do what the layers say."""
        return bool(self.stale_layers) or self.pending or self.unknown_to_optimizer > 0

    def message(self) -> str:
        """One sentence for the user, or '' when not stale."""
        if not self.stale:
            return ""
        parts = []
        if self.stale_layers:
            parts.append(f"{len(self.stale_layers)} layers changed trainable since compile")
        if self.pending:
            parts.append("bnkit changed BN modes or trainable flags since compile")
        if self.unknown_to_optimizer:
            parts.append(
                f"{self.unknown_to_optimizer} trainable variables are unknown to the optimizer "
                "(fit raises 'Unknown variable' or trains nothing new)"
            )
        return (
            "; ".join(parts) + ": Keras ignores this on TensorFlow and may fail on torch; "
            "call bnkit.recompile(model)"
        )


# ---------------------------------------------------------------------- check and export


@dataclass(frozen=True)
class BNFacts:
    """What `check` needs to know about one BN layer beyond its record."""

    path: str
    calls: int
    """how many times the layer is called in the model (in its graphs, or in one pass)."""
    spatial: int | None
    """values per channel and sample (1 for a BN after Dense); None when unknown."""
    epsilon: float
    min_var: float
    nonfinite: int
    """non-finite values among its running mean and variance."""
    pinned: bool
    producer_trainable: bool | None
    """whether the layer feeding it trains (None: no single layer with weights feeds it)."""
    unestimated: bool = False
    """its running statistics are still at their initial values (mean 0, variance 1, no
    batch counted) while its gamma or beta were clearly trained: see `unestimated`."""


def unestimated(
    mean: np.ndarray, var: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None
) -> bool:
    """True when a BN layer's running statistics never saw data (every mean exactly 0,
    every variance exactly 1) while its gamma or beta were trained: they differ from
    channel to channel, which no initialiser does (ones, zeros, timm's zero-initialised
    last gamma are all constant). Such a layer was loaded without its buffers, or had
    them reset after loading."""
    if mean.size == 0 or np.any(mean != 0) or np.any(var != 1):
        return False
    return any(v is not None and v.size > 1 and np.ptp(v) > 0 for v in (gamma, beta))


@dataclass(frozen=True)
class Folded:
    """An inference-only copy of a model."""

    model: Any
    folded: tuple[str, ...]
    """BN layers folded into the layer before them."""
    kept: tuple[str, ...]
    """BN layers kept, fixed in inference mode."""
    dropped: tuple[str, ...]
    """layers that are the identity in inference (dropout, noise), removed."""
    reasons: tuple[tuple[str, str], ...] = ()
    """(BN layer, why it was kept rather than folded) for each kept BN layer."""


# ---------------------------------------------------------------------- training


@dataclass(frozen=True)
class EpochLog:
    """One epoch of a guarded training run."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass(frozen=True)
class Diverged:
    """Where a guarded training run stopped."""

    epoch: int
    step: int
    loss: float
    layer: str | None
    """the first layer whose output was non-finite on the offending batch, if any."""


@dataclass(frozen=True)
class Split:
    """A model cut into a frozen prefix and the trainable rest, sharing its layers."""

    prefix: Any
    suffix: Any
