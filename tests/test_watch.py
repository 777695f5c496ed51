"""watch: reports what training really changed and every difference from the plan."""

from __future__ import annotations

import json

from conftest import compile_fit

import bnkit


def test_watch_flags_statistics_that_moved_in_a_frozen_plan(transfer, data):
    model, _ = transfer
    plan = bnkit.freeze(model, bn="frozen")
    bnkit.unfreeze(model)  # someone undoes the freeze behind the plan's back
    with bnkit.watch(model, plan=plan) as w:
        compile_fit(model, *data)
    problems = w.report.problems()
    assert not w.report.ok
    assert any(p.startswith("base/stem_bn: statistics moved, planned frozen") for p in problems)
    assert any("gamma/beta moved, planned frozen" in p for p in problems)
    assert w.report.counts()["bn_stats_kept"] == 0
    doc = json.loads(w.report.to_json())
    assert doc["counts"]["problems"] == len(problems)


def test_watch_uses_the_last_freeze_plan(transfer, data):
    model, _ = transfer
    bnkit.freeze(model, train_from="block2_conv", bn="affine")
    with bnkit.watch(model) as w:
        compile_fit(model, *data)
    assert w.report.source == "last freeze plan"
    assert w.report.ok, w.report.problems()
    by_path = {c.path: c for c in w.report.layers}
    assert by_path["base/block2_bn"].weights_changed and not by_path["base/block2_bn"].stats_changed
    assert not by_path["base/stem_conv"].weights_changed
    assert by_path["head"].weights_changed and by_path["head"].weight_delta > 0


def test_watch_without_plan_expects_what_inspect_says(transfer, data):
    model, _ = transfer
    with bnkit.watch(model) as w:
        compile_fit(model, *data)
    assert w.report.source == "inspect at start"
    assert w.report.ok, w.report.problems()
    assert w.report.counts() == {
        "bn_layers": 4,
        "bn_stats_kept": 0,
        "bn_affine_kept": 0,
        "layers_changed": 8,
        "problems": 0,
    }


def test_watch_flags_trainable_layers_that_did_not_move(transfer):
    model, _ = transfer
    bnkit.freeze(model, bn="train")
    with bnkit.watch(model) as w:
        pass  # no training at all
    assert any("did not move, planned trainable" in p for p in w.report.problems())
    assert any("statistics did not move, planned train" in p for p in w.report.problems())
