"""`watch`: see what training really changed, layer by layer, against the plan."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from rich.table import Table

from bnkit.backends import get_backend
from bnkit.backends.base import Snapshot
from bnkit.errors import BnkitError, BnkitWarning
from bnkit.freeze import last_plan
from bnkit.policy import MODE_STATES, STATS_ONLY, Mode, Plan
from bnkit.report import inspect

ACTIONS = ("warn", "stop", "raise")
"""What the training callbacks do when BN is off plan."""


class BNWatchError(BnkitError):
    """A BN layer did something its plan says it must not (a callback's
    `on_problem="raise"`)."""


def epoch_counts(report: WatchReport) -> dict[str, int]:
    """What the training callbacks log each epoch: `bn_layers`, `bn_stats_kept`,
    `bn_affine_kept` and `bn_problems`."""
    counts = report.counts()
    keys = ("bn_layers", "bn_stats_kept", "bn_affine_kept")
    return {**{k: counts[k] for k in keys}, "bn_problems": counts["problems"]}


def act_on_problems(report: WatchReport, epoch: int, action: str) -> bool:
    """What a training callback does at the end of `epoch` (as its framework numbers
    epochs): nothing when BN kept to the plan; else raises BNWatchError (`raise`) or
    warns; True when the fit should stop (`stop`)."""
    if report.ok:
        return False
    message = f"epoch {epoch}: BN off plan: " + "; ".join(report.problems()[:3])
    if action == "raise":
        raise BNWatchError(message)
    warnings.warn(message, BnkitWarning, stacklevel=3)
    return action == "stop"


@dataclass(frozen=True)
class Expectation:
    """What one layer should do in training."""

    label: str
    """the BN mode, or `trainable` / `fixed`."""
    weights_train: bool
    stats_update: bool | None
    """None for layers without running statistics."""


@dataclass(frozen=True)
class LayerChange:
    """What changed in one layer between the start and the end of `watch`."""

    path: str
    is_bn: bool
    expected: str
    weights_changed: bool
    weight_delta: float
    """largest absolute change of any trainable weight (gamma/beta for BN)."""
    stats_changed: bool | None
    stats_delta: float | None
    problems: tuple[str, ...]


@dataclass(frozen=True)
class WatchReport:
    """Per-layer changes and every difference from the plan."""

    layers: tuple[LayerChange, ...]
    source: str
    """where the expectations came from: the last `freeze` plan, a plan given, or `inspect`."""

    @property
    def ok(self) -> bool:
        """True when every layer did what was planned."""
        return not self.problems()

    def problems(self) -> list[str]:
        """Each difference from the plan, prefixed with its layer path."""
        return [f"{c.path}: {p}" for c in self.layers for p in c.problems]

    def counts(self) -> dict[str, int]:
        """BN layers that kept their statistics and their gamma/beta, and layers changed."""
        bn = [c for c in self.layers if c.is_bn]
        return {
            "bn_layers": len(bn),
            "bn_stats_kept": sum(not c.stats_changed for c in bn),
            "bn_affine_kept": sum(not c.weights_changed for c in bn),
            "layers_changed": sum(c.weights_changed or bool(c.stats_changed) for c in self.layers),
            "problems": len(self.problems()),
        }

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(
            {
                "source": self.source,
                "counts": self.counts(),
                "problems": self.problems(),
                "layers": [asdict(c) for c in self.layers],
            },
            indent=2,
        )

    def table(self) -> Table:
        """A rich table of every layer that changed or has a problem."""
        t = Table(title=f"watch ({self.source})")
        for col in ("path", "expected", "weights", "stats", "problems"):
            t.add_column(col, overflow="fold")
        for c in self.layers:
            if not (c.weights_changed or c.stats_changed or c.problems):
                continue
            stats = "" if c.stats_changed is None else _delta(c.stats_changed, c.stats_delta)
            t.add_row(
                c.path,
                c.expected,
                _delta(c.weights_changed, c.weight_delta),
                stats,
                "; ".join(c.problems),
            )
        return t

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        k = self.counts()
        lines = [
            f"watch ({self.source}): {k['layers_changed']} layers changed; "
            f"BN: {k['bn_stats_kept']}/{k['bn_layers']} kept statistics, "
            f"{k['bn_affine_kept']}/{k['bn_layers']} kept gamma/beta",
        ]
        lines += [f"problem: {p}" for p in self.problems()]
        return "\n".join(lines)


class Watch:
    """Watches one model against its plan: `start` copies every weight, `stop` reports
    what changed since. `watch` uses it as a context manager; callbacks call `start`
    and `stop` once per epoch. Expectations are fixed when it is made."""

    def __init__(self, model: Any, plan: Plan | None = None) -> None:
        self._model = model
        self._backend = get_backend(model)
        self._expected, self.source = _expectations(model, plan)
        self._before: Snapshot | None = None
        self.report: WatchReport | None = None
        """the last report; filled by `stop` (when the `watch` block exits)."""

    def start(self) -> None:
        """Copies every weight and statistic as the reference for the next `stop`."""
        self._before = self._backend.snapshot(self._model)

    def stop(self) -> WatchReport:
        """What changed since `start`, against the plan."""
        if self._before is None:
            raise BnkitError("Watch.stop() before start()")
        after = self._backend.snapshot(self._model)
        self.report = WatchReport(_compare(self._before, after, self._expected), self.source)
        return self.report


@contextlib.contextmanager
def watch(model: Any, plan: Plan | None = None) -> Iterator[Watch]:
    """Snapshots every weight before the block and reports what changed after it.

    Expectations come from `plan`, else from the last `bnkit.freeze` on this
    model, else from `bnkit.inspect` at the start. Every difference is a
    problem: statistics that moved in a layer planned `frozen`, weights that
    moved in a layer planned fixed, or nothing that moved where training was
    planned.

    Args:
        model: a Keras model or a PyTorch module.
        plan: the plan to check against (default: the last `freeze` on `model`).

    Yields:
        A `Watch`, whose `report` (a `WatchReport`) is filled when the block exits:
        `report.ok`, `report.problems()`, and `str(report)` saying what moved.

    Examples:
        >>> import keras, numpy as np, bnkit
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
        ...                       keras.layers.BatchNormalization(), keras.layers.Dense(1)])
        >>> _ = bnkit.freeze(m, bn="frozen")
        >>> m.compile(optimizer="sgd", loss="mse")
        >>> with bnkit.watch(m) as w:
        ...     _ = m.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
        >>> w.report.ok
        True
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet18(weights=None)
        >>> _ = bnkit.freeze(net, bn="frozen")
        >>> with bnkit.watch(net) as w:
        ...     _ = net.train()(torch.randn(2, 3, 32, 32))  # model.train(): still frozen
        >>> w.report.counts()["bn_stats_kept"]
        20
    """
    handle = Watch(model, plan)
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def _expectations(model: Any, plan: Plan | None) -> tuple[dict[str, Expectation], str]:
    source = "plan given"
    if plan is None:
        plan = last_plan(model)
        source = "last freeze plan"
    if plan is not None:
        return {
            d.path: _from_decision(d.trainable, d.bn_mode, d.is_bn) for d in plan.layers
        }, source
    out = {}
    for r in inspect(model).leaves():
        if r.is_bn and r.bn_state is not None:
            out[r.path] = Expectation(
                r.bn_mode or "custom", r.bn_state.affine_trained, r.bn_state.stats_update
            )
        else:
            out[r.path] = _from_decision(r.effective_trainable, None, False)
    return out, "inspect at start"


def _from_decision(trainable: bool, bn_mode: str | None, is_bn: bool) -> Expectation:
    if not is_bn:
        return Expectation("trainable" if trainable else "fixed", trainable, None)
    if bn_mode == STATS_ONLY:
        return Expectation(bn_mode, False, True)
    try:
        state = MODE_STATES[Mode(bn_mode)]
    except ValueError:
        return Expectation(str(bn_mode), trainable, None)
    return Expectation(str(bn_mode), state.affine_trained, state.stats_update)


def _compare(
    before: Snapshot, after: Snapshot, expected: dict[str, Expectation]
) -> tuple[LayerChange, ...]:
    changes = []
    for path, exp in expected.items():
        w_changed, w_delta = _diff(before.weights.get(path, {}), after.weights.get(path, {}))
        has_stats = path in before.stats and path in after.stats
        s_changed, s_delta = (
            _diff(before.stats[path], after.stats[path]) if has_stats else (None, None)
        )
        if path not in before.weights and not has_stats:
            continue
        changes.append(
            LayerChange(
                path=path,
                is_bn=has_stats,
                expected=exp.label,
                weights_changed=w_changed,
                weight_delta=w_delta,
                stats_changed=s_changed,
                stats_delta=s_delta,
                problems=_problems(exp, path in before.weights, w_changed, s_changed),
            )
        )
    return tuple(changes)


def _problems(
    exp: Expectation, has_weights: bool, w_changed: bool, s_changed: bool | None
) -> tuple[str, ...]:
    out = []
    what = "gamma/beta" if s_changed is not None else "weights"
    if has_weights and w_changed and not exp.weights_train:
        out.append(f"{what} moved, planned {exp.label}")
    if has_weights and not w_changed and exp.weights_train:
        out.append(f"{what} did not move, planned {exp.label}")
    if s_changed is not None and exp.stats_update is not None and s_changed != exp.stats_update:
        verb = "moved" if s_changed else "did not move"
        out.append(f"statistics {verb}, planned {exp.label}")
    return tuple(out)


def _diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[bool, float]:
    changed = False
    delta = 0.0
    for name, old in a.items():
        new = b.get(name)
        if new is None or new.shape != old.shape:
            return True, float("inf")
        if not np.array_equal(old, new):
            changed = True
            delta = max(delta, float(np.max(np.abs(new.astype(np.float64) - old))))
    return changed, delta


def _delta(changed: bool, delta: float | None) -> str:
    return f"moved {delta:.2g}" if changed else "kept"
