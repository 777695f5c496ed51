"""Keras integration: a callback that watches BN across `fit`. Imported only by its users
(it imports Keras)."""

from __future__ import annotations

from typing import Any

import keras

from bnkit.errors import BnkitError
from bnkit.policy import Plan
from bnkit.watch import ACTIONS, BNWatchError, Watch, WatchReport, act_on_problems, epoch_counts

__all__ = ["BNWatch", "BNWatchError"]


class BNWatch(keras.callbacks.Callback):
    """Watches every BN layer during `fit`, epoch by epoch, against the plan.

    At the end of each epoch it adds to the logs (so to `History` and to every logger):
    `bn_stats_kept` and `bn_affine_kept` (BN layers whose statistics and gamma/beta did
    not change during the epoch), `bn_layers` and `bn_problems` (differences from the
    plan). When there is a problem it warns (`BnkitWarning`), stops training after the
    epoch, or raises `BNWatchError`, as `on_problem` says. `reports` keeps every epoch's
    `WatchReport`.

    Args:
        plan: what each layer should do; by default the last `bnkit.freeze` plan of the
            model, else what `bnkit.inspect` says at the start of `fit`.
        on_problem: `warn`, `stop` or `raise`.

    Examples:
        >>> import keras, numpy as np, bnkit
        >>> from bnkit.keras_callbacks import BNWatch
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
        ...                       keras.layers.BatchNormalization(), keras.layers.Dense(1)])
        >>> _ = bnkit.freeze(m, bn="frozen")
        >>> m.compile(optimizer="sgd", loss="mse")
        >>> h = m.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=2, verbose=0,
        ...           callbacks=[BNWatch(on_problem="raise")])
        >>> h.history["bn_stats_kept"], h.history["bn_problems"]
        ([1, 1], [0, 0])
    """

    def __init__(self, plan: Plan | None = None, on_problem: str = "warn") -> None:
        super().__init__()
        if on_problem not in ACTIONS:
            raise BnkitError(f"on_problem must be one of {', '.join(ACTIONS)}, got {on_problem!r}")
        self.plan = plan
        self.on_problem = on_problem
        self.reports: list[WatchReport] = []
        self._watch: Watch | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._watch = Watch(self.model, self.plan)
        self.reports = []

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._watch is not None:
            self._watch.start()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._watch is None:
            return
        report = self._watch.stop()
        self.reports.append(report)
        if logs is not None:
            logs.update(epoch_counts(report))
        if act_on_problems(report, epoch + 1, self.on_problem):
            self.model.stop_training = True
