"""freeze: every mode proven by a real fit, pins, save/reload, recompile, two-stage fine-tune."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import bn_layers, build_transfer, changed, compile_fit, moved_keys, weights_of

import bnkit
from bnkit.backends.keras.core import PinnedBatchNormalization

STATS = ("moving_mean", "moving_variance")
AFFINE = ("gamma", "beta")


def fit_and_diff(model, base, data):
    before = {b.name: weights_of(b) for b in bn_layers(base)}
    compile_fit(model, *data)
    after = {b.name: weights_of(b) for b in bn_layers(base)}
    return {
        name: {k: changed(before[name], after[name], k) for k in STATS + AFFINE} for name in before
    }


def test_frozen_keeps_gamma_beta_and_stats_bit_identical(transfer, data):
    model, base = transfer
    plan = bnkit.freeze(model, bn="frozen")
    assert plan.bn_counts() == {"frozen": 4}
    conv_before = weights_of(base.get_layer("block2_conv"))
    moved = fit_and_diff(model, base, data)
    assert not any(any(m.values()) for m in moved.values())
    assert changed(conv_before, weights_of(base.get_layer("block2_conv")), "kernel")


def test_affine_keeps_stats_and_trains_gamma_beta(transfer, data):
    model, base = transfer
    bnkit.freeze(model, bn="affine")
    moved = fit_and_diff(model, base, data)
    for m in moved.values():
        assert not m["moving_mean"] and not m["moving_variance"]
        assert m["gamma"] and m["beta"]


def test_train_changes_all_four(transfer, data):
    model, base = transfer
    bnkit.freeze(model, bn="train")
    moved = fit_and_diff(model, base, data)
    assert all(all(m.values()) for m in moved.values())


def test_adapt_is_frozen_until_reestimated(transfer, data):
    model, base = transfer
    bnkit.freeze(model, bn="adapt")
    assert bnkit.inspect(model).bn_counts() == {"adapt": 4}
    moved = fit_and_diff(model, base, data)
    assert not any(any(m.values()) for m in moved.values())


def test_layers_frozen_by_policy_keep_every_weight(transfer, data):
    model, base = transfer
    plan = bnkit.freeze(model, train_from="block2_conv", bn="train")
    frozen = [
        base.get_layer(n)
        for n in ("stem_conv", "stem_bn", "block1_conv", "block1_bn", "block2_preact_bn")
    ]
    trained = [base.get_layer("block2_conv"), base.get_layer("block2_bn"), model.get_layer("head")]
    assert {d.path for d in plan.layers if d.trainable} >= {
        "base/block2_conv",
        "base/block2_bn",
        "head",
    }
    before = [weights_of(layer) for layer in frozen + trained]
    compile_fit(model, *data)
    after = [weights_of(layer) for layer in frozen + trained]
    for b, a in zip(before[: len(frozen)], after[: len(frozen)], strict=True):
        assert all(np.array_equal(b[k], a[k]) for k in b)
    for b, a in zip(before[len(frozen) :], after[len(frozen) :], strict=True):
        assert any(changed(b, a, k) for k in b)


def test_saved_plan_reloads_with_modes_and_behaves_the_same(transfer, data, tmp_path):
    model, _ = transfer
    plan = bnkit.freeze(model, rules=["bn=frozen", "glob:block1_bn=affine", "glob:block2_bn=train"])
    modes = {r.path: r.bn_mode for r in bnkit.inspect(model).bn_layers}
    assert modes == {
        "base/stem_bn": "frozen",
        "base/block1_bn": "affine",
        "base/block2_preact_bn": "frozen",
        "base/block2_bn": "train",
    }
    path = tmp_path / "frozen.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    loaded_base = loaded.get_layer("base")
    assert all(isinstance(b, PinnedBatchNormalization) for b in bn_layers(loaded_base))
    assert {r.path: r.bn_mode for r in bnkit.inspect(loaded).bn_layers} == modes
    x, _ = data
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    with bnkit.watch(loaded, plan=plan) as w:
        compile_fit(loaded, *data)
    assert w.report.ok, w.report.problems()
    assert w.report.counts()["bn_stats_kept"] == 3


def test_modes_are_pinned_through_parent_trainable(transfer, data):
    model, base = transfer
    bnkit.freeze(model, bn="frozen")
    base.trainable = False
    base.trainable = True  # the usual "unfreeze the base" step
    assert bnkit.inspect(model).bn_counts() == {"frozen": 4}
    moved = fit_and_diff(model, base, data)
    assert not any(any(m.values()) for m in moved.values())


def test_without_bnkit_unfreezing_the_base_unfreezes_bn(data):
    model, base = build_transfer()
    for b in bn_layers(base):
        b.trainable = False
    base.trainable = False
    base.trainable = True
    assert bnkit.inspect(model).bn_counts() == {"train": 4}
    moved = fit_and_diff(model, base, data)
    assert all(m["moving_mean"] for m in moved.values())


def test_unfreeze_is_the_inverse(transfer, data):
    model, base = transfer
    base.get_layer("stem_conv").trainable = False
    flags = {layer.name: layer.trainable for layer in model._flatten_layers()}
    classes = {layer.name: type(layer) for layer in model._flatten_layers()}
    bnkit.freeze(model, train_from="block2_conv", bn="affine")
    assert bnkit.unfreeze(model) == 4
    assert {layer.name: layer.trainable for layer in model._flatten_layers()} == flags
    assert {layer.name: type(layer) for layer in model._flatten_layers()} == classes
    moved = fit_and_diff(model, base, data)
    assert all(all(m.values()) for m in moved.values())


def test_freeze_on_compiled_model_warns_and_recompile_fixes(transfer, data):
    model, base = transfer
    bnkit.freeze(model, train_from="head", bn="frozen")  # stage 1: head only
    head0 = weights_of(model.get_layer("head"))
    base0 = {layer.name: weights_of(layer) for layer in base.layers if layer.weights}
    compile_fit(model, *data)
    assert changed(head0, weights_of(model.get_layer("head")), "kernel")
    assert all(
        np.array_equal(base0[n][k], v)
        for n in base0
        for k, v in weights_of(base.get_layer(n)).items()
    )

    with pytest.warns(bnkit.BnkitWarning, match="recompile"):
        plan = bnkit.freeze(model, train_from="block2_preact_bn", bn="frozen")  # stage 2
    assert plan.needs_recompile and bnkit.inspect(model).compile.stale
    bnkit.recompile(model)
    assert not bnkit.inspect(model).compile.stale
    with bnkit.watch(model) as w:
        compile_fit(model, *data)
    assert w.report.ok, w.report.problems()
    assert changed(base0["block2_conv"], weights_of(base.get_layer("block2_conv")), "kernel")
    assert not changed(base0["block1_conv"], weights_of(base.get_layer("block1_conv")), "kernel")
    assert w.report.counts()["bn_stats_kept"] == 4


def test_freeze_recompile_flag_recompiles(transfer, data):
    model, _ = transfer
    compile_fit(model, *data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bnkit.BnkitWarning)
        plan = bnkit.freeze(model, bn="affine", recompile=True)
    assert not plan.needs_recompile and not bnkit.inspect(model).compile.stale


def test_unfreezing_after_fit_without_recompile_is_the_keras_trap(transfer, data):
    """Keras 3 itself: a stale optimizer raises 'Unknown variable' (torch), a variable
    count mismatch (JAX), or trains nothing new (TensorFlow)."""
    model, base = transfer
    base.trainable = False
    compile_fit(model, *data)
    base.trainable = True
    assert bnkit.inspect(model).compile.unknown_to_optimizer > 0
    conv0 = weights_of(base.get_layer("block2_conv"))
    try:
        compile_fit(model, *data)
    except ValueError as err:
        assert "Unknown variable" in str(err) or "optimizer was built with" in str(err)
    else:
        assert not changed(conv0, weights_of(base.get_layer("block2_conv")), "kernel")


def test_bad_selectors_name_the_closest_layer(transfer):
    model, _ = transfer
    with pytest.raises(bnkit.SelectorError, match="block2_conv"):
        bnkit.freeze(model, train_from="block2_cnv")
    with pytest.raises(bnkit.SelectorError, match="matches no layer"):
        bnkit.freeze(model, rules=["glob:conv9_*=frozen"])
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(bnkit.SelectorError, match="no BatchNormalization"):
        bnkit.freeze(plain, bn="frozen")
    with pytest.raises(bnkit.BnkitError, match="needs a policy"):
        bnkit.freeze(model)


# ---------------------------------------------------------------------- both frameworks

EXPECTED_MOVES = {
    "frozen": set(),
    "affine": {"gamma", "beta"},
    "train": {"mean", "var", "gamma", "beta"},
    "adapt": set(),
}


@pytest.mark.parametrize("mode", list(EXPECTED_MOVES))
def test_each_mode_survives_the_framework_undoing_a_freeze(fw, mode):
    """Pinned modes hold through a real training step after parent.trainable = True
    (Keras) or model.train() (PyTorch), and watch agrees with the plan."""
    model = fw.build()
    bnkit.freeze(model, bn=mode)
    fw.reenable(model)
    before = fw.bn_values(model)
    with bnkit.watch(model) as w:
        fw.train(model)
    moves = moved_keys(before, fw.bn_values(model))
    assert all(m == EXPECTED_MOVES[mode] for m in moves.values()), moves
    assert w.report is not None and w.report.ok, w.report.problems()


def test_unfreeze_gives_plain_bn_that_trains_again(fw):
    model = fw.build()
    bnkit.freeze(model, bn="frozen")
    assert bnkit.unfreeze(model) == len(fw.bn_values(model))
    before = fw.bn_values(model)
    fw.train(model)
    moves = moved_keys(before, fw.bn_values(model))
    assert all(m == EXPECTED_MOVES["train"] for m in moves.values()), moves
