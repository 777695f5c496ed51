"""BNWatch in a real `fit`: per-epoch counts in the logs and History, and a warning, a
stop or an error when BN does something its plan says it must not."""

from __future__ import annotations

import warnings

import keras
import pytest
from conftest import compile_fit

import bnkit
from bnkit.keras_callbacks import BNWatch, BNWatchError


def _fit(model, data, callback, epochs=3):
    x, y = data
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=[callback])


def test_counts_reach_history_when_as_planned(transfer, data):
    model, _ = transfer
    bnkit.freeze(model, bn="affine")
    history = _fit(model, data, BNWatch(on_problem="raise"))
    assert history.history["bn_layers"] == [4, 4, 4]
    assert history.history["bn_stats_kept"] == [4, 4, 4]
    assert history.history["bn_affine_kept"] == [0, 0, 0]
    assert history.history["bn_problems"] == [0, 0, 0]


@pytest.mark.parametrize("action", ["warn", "stop", "raise"])
def test_a_plan_broken_during_fit_warns_stops_or_raises(transfer, data, action):
    model, _ = transfer
    plan = bnkit.freeze(model, bn="frozen")
    bnkit.unfreeze(model)  # the BN layers train again, against the plan
    callback = BNWatch(plan, on_problem=action)
    if action == "raise":
        with pytest.raises(BNWatchError, match="statistics moved, planned frozen"):
            _fit(model, data, callback)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _fit(model, data, callback)
    assert any(issubclass(w.category, bnkit.BnkitWarning) for w in caught)
    epochs = len(history.history["loss"])
    assert epochs == (1 if action == "stop" else 3)
    assert history.history["bn_stats_kept"] == [0] * epochs
    assert callback.reports[0].problems()


def test_expectations_default_to_inspect_at_the_start_of_fit(transfer, data):
    model, _ = transfer
    compile_fit(model, *data)  # no freeze: every BN trains, as inspect says
    history = _fit(model, data, BNWatch(on_problem="raise"), epochs=1)
    assert history.history["bn_problems"] == [0]
