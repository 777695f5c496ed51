"""compare: runs from one saved start, identical data order per seed, divergence guard,
new heads, frozen-prefix caching equal to the uncached path, and an honest verdict."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import CLASSES, INPUT, build_transfer

import bnkit
from bnkit.backends.keras import train as keras_train
from bnkit.compare import Summary, _verdict, sampling_error
from bnkit.data import DataError


@pytest.fixture
def splits():
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, size=(48, *INPUT)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > 0.5).astype(int) + (x[..., 1].mean(axis=(1, 2)) > 0.5)
    return (x[:32], y[:32]), (x[32:], y[32:])


def _numbers(result):
    doc = json.loads(result.to_json())
    for run in doc["runs"]:
        run.pop("seconds")
        for e in run["epochs"]:
            e.pop("seconds")
    return doc


def test_same_inputs_and_seeds_give_identical_numbers_and_model_is_untouched(splits):
    model, _ = build_transfer()
    before = [np.array(w, copy=True) for w in model.get_weights()]
    kwargs = {"epochs": 2, "seeds": 2, "batch_size": 8}
    a = bnkit.compare(model, *splits, ["frozen", "train", "adapt"], **kwargs)
    b = bnkit.compare(model, *splits, ["frozen", "train", "adapt"], **kwargs)
    assert _numbers(a) == _numbers(b)
    assert len(a.runs) == 6 and {r.status for r in a.runs} == {"ok"}
    assert all(len(r.epochs) == 2 for r in a.runs)
    assert all(np.array_equal(w0, w1) for w0, w1 in zip(before, model.get_weights(), strict=True))
    by = {(r.strategy, r.seed): r for r in a.runs}
    # watch saw each strategy do what it says: frozen/adapt keep statistics, train moves them
    assert by["frozen", 0].bn_stats_kept == 4 and by["adapt", 0].bn_stats_kept == 4
    assert by["train", 0].bn_stats_kept == 0 and by["train", 0].epochs[0].bn_stats_moved == 4
    assert all(not r.plan_problems for r in a.runs)
    # different seeds give different data orders
    assert by["train", 0].final_val_loss != by["train", 1].final_val_loss


def test_every_run_starts_from_the_same_weights(splits):
    model, _ = build_transfer()
    model.compile(loss="sparse_categorical_crossentropy")
    expected = model.evaluate(*splits[1], verbose=0)
    nothing = ("nothing", ["all=frozen"])  # a policy that trains nothing at all
    result = bnkit.compare(model, *splits, [nothing], epochs=1, seeds=3, batch_size=8)
    losses = [r.final_val_loss for r in result.runs]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_evaluation_equals_keras_evaluate_over_several_batches():
    """compare's per-epoch evaluation (test_on_batch per chunk, weighted by size) gives
    what `model.evaluate` gives at the same batch size, over a last, shorter batch too."""
    model, _ = build_transfer()
    keras_train.prepare(model, 1e-3, logits=False)
    rng = np.random.default_rng(3)
    n = 2 * keras_train.EVAL_BATCH + 37
    x = rng.normal(0.5, 1.0, size=(n, *INPUT)).astype("float32")
    y = rng.integers(0, CLASSES, n)
    expected = model.evaluate(x, y, batch_size=keras_train.EVAL_BATCH, verbose=0, return_dict=True)
    loss, accuracy = keras_train.evaluate(model, x, y)
    np.testing.assert_allclose(loss, expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(accuracy, expected["accuracy"], rtol=1e-6)


def test_divergence_stops_the_run_restores_finite_weights_and_the_sweep_goes_on(splits):
    model, _ = build_transfer()
    result = bnkit.compare(
        model, *splits, ["train", "frozen"], epochs=3, seeds=2, batch_size=8, lr=1e12
    )
    assert len(result.runs) == 4
    diverged = [r for r in result.runs if r.status == "diverged"]
    assert diverged, [r.final_val_loss for r in result.runs]
    for r in diverged:
        assert r.diverged_epoch is not None and r.diverged_step is not None
        assert np.isfinite(r.final_val_loss)  # the last finite weights came back
        assert r.diverged_layer is None or r.diverged_layer.startswith(("base/", "pool", "head"))
    assert {s.strategy: s.diverged for s in result.summaries}["train"] >= 1


def test_first_nonfinite_layer_names_the_culprit():
    model, base = build_transfer()
    conv = base.get_layer("block1_conv")
    kernel = keras.ops.convert_to_numpy(conv.kernel).copy()
    kernel[0, 0, 0, 0] = np.nan
    conv.kernel.assign(kernel)
    x = np.ones((2, *INPUT), "float32")
    assert keras_train.first_nonfinite_layer(model, model, x) == "base/block1_conv"
    assert "call" not in vars(conv)


def test_new_head_when_the_classes_do_not_match(splits):
    model, _ = build_transfer()  # 3 outputs
    (x, y), (xv, yv) = splits
    y5, yv5 = (y + 2) % 5, (yv + 2) % 5
    result = bnkit.compare(model, (x, y5), (xv, yv5), ["frozen"], epochs=1, seeds=1)
    assert result.head_replaced and "new head with 5 outputs" in " ".join(result.notes)
    seen = []

    def head(features):
        seen.append(tuple(features.shape[1:]))
        pooled = keras.layers.GlobalMaxPooling2D()(features)
        return keras.layers.Dense(5, activation="softmax")(pooled)

    result = bnkit.compare(model, (x, y5), (xv, yv5), ["frozen"], epochs=1, seeds=1, head=head)
    assert seen == [(8, 8, 6)] and np.isfinite(result.runs[0].final_val_loss)
    assert keras_train.output_units(model) == CLASSES  # the input model keeps its head


def test_frozen_prefix_cache_gives_the_uncached_weights(splits):
    (x, y), val = splits
    finals = []
    for cached in (True, False):
        model, _ = build_transfer()
        bnkit.freeze(model, train_from="pool", bn="frozen")
        split = keras_train.frozen_prefix(model, "pool")
        assert split is not None
        target, xs, vs = model, x, val
        if cached:
            target, xs = split.suffix, keras_train.predict(split.prefix, x)
            vs = (keras_train.predict(split.prefix, val[0]), val[1])
        keras_train.prepare(target, 1e-2, logits=False)
        keras_train.guarded_fit(target, model, xs, y, vs, epochs=3, batch_size=8, seed=0)
        finals.append(model.get_layer("head").get_weights())
    for a, b in zip(*finals, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(finals[0][0], build_transfer()[0].get_layer("head").get_weights()[0])


def test_prefix_is_cached_only_when_it_is_frozen_and_deterministic(splits):
    model, _ = build_transfer()
    on = bnkit.compare(model, *splits, ["frozen"], epochs=1, seeds=1, train_from="pool")
    off = bnkit.compare(model, *splits, ["frozen"], epochs=1, seeds=1, train_from="pool",
                        cache_prefix=False)  # fmt: skip
    assert on.runs[0].cached_prefix and not off.runs[0].cached_prefix
    np.testing.assert_allclose(on.runs[0].final_val_loss, off.runs[0].final_val_loss, rtol=1e-4)
    nested = bnkit.compare(model, *splits, ["frozen"], epochs=1, seeds=1,
                           train_from="block2_conv")  # fmt: skip
    assert not nested.runs[0].cached_prefix and "caching was not possible" in nested.notes[0]
    _, base = build_transfer()
    inputs = keras.Input(INPUT)
    h = keras.layers.Dropout(0.5, name="drop")(base(inputs))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    noisy = keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(h))
    bnkit.freeze(noisy, train_from="pool", bn="frozen")
    assert keras_train.frozen_prefix(noisy, "pool") is None  # dropout is active in training
    bnkit.freeze(noisy, train_from="drop", bn="frozen")
    assert keras_train.frozen_prefix(noisy, "drop") is not None


def test_labels_are_checked(splits):
    model, _ = build_transfer()
    (x, y), val = splits
    with pytest.raises(DataError, match="no labels"):
        bnkit.compare(model, x, val)
    with pytest.raises(DataError, match=r"outside 0\.\.2"):
        bnkit.compare(model, (x, y + 1), val, num_classes=3)


def test_verdict_is_honest_about_the_spread():
    def s(name, mean, std):
        return Summary(name, mean, std, 1.0, 0.1, 3, 0)

    best, decisive, text = _verdict([s("a", 0.80, 0.03), s("b", 0.78, 0.02)], 3, 100_000)
    assert best == "a" and not decisive and "within the spread" in text
    best, decisive, text = _verdict([s("a", 0.70, 0.01), s("b", 0.80, 0.02)], 3, 1000)
    assert best == "b" and decisive and "ahead of a by 10.0%" in text
    assert "sampling error of 1000 validation samples (± 3.8%)" in text
    _, decisive, text = _verdict([s("a", 0.9, 0.0), s("b", 0.5, 0.0)], 1, 1000)
    assert not decisive and "one seed" in text


def test_verdict_accounts_for_the_validation_set_size():
    def s(name, mean):
        return Summary(name, mean, 0.0, 1.0, 0.1, 3, 0)

    # ten images: a 10-point lead is one image, whatever the (zero) spread over seeds says
    best, decisive, text = _verdict([s("a", 0.6), s("b", 0.5)], 3, 10)
    assert best == "a" and not decisive
    assert "within the sampling error of 10 validation samples" in text
    # the same lead on 2,000 images is beyond the sampling error
    _, decisive, _ = _verdict([s("a", 0.6), s("b", 0.5)], 3, 2000)
    assert decisive
    # the sampling error is the binomial one: simulated pairs of accuracies on n images
    rng = np.random.default_rng(0)
    diffs = rng.binomial(400, 0.7, 20_000) / 400 - rng.binomial(400, 0.6, 20_000) / 400
    assert sampling_error(0.7, 0.6, 400) == pytest.approx(diffs.std(), rel=0.05)


def test_a_strategy_with_diverged_runs_is_never_best():
    def s(name, mean, diverged):
        return Summary(name, mean, 0.01, 1.0, 0.1, 3, diverged)

    best, _, text = _verdict([s("a", 0.95, 1), s("b", 0.60, 0)], 3, 100)
    assert best == "b" and "a left out: runs diverged" in text
    best, decisive, text = _verdict([s("a", float("nan"), 3), s("b", 0.5, 3)], 3, 100)
    assert best == "" and not decisive and "lower the learning rate" in text
    table = bnkit.CompareResult((), (s("a", 0.9, 3),), best, decisive, text, False, None).table()
    assert "*" not in str(table.columns[0]._cells)


def test_train_from_a_layer_of_the_replaced_top_trains_the_new_head(splits):
    model, _ = build_transfer()  # 3 outputs: pool, then the Dense 'head'
    (x, y), (xv, yv) = splits
    y5, yv5 = (y + 2) % 5, (yv + 2) % 5
    result = bnkit.compare(model, (x, y5), (xv, yv5), ["frozen", "adapt"], epochs=1, seeds=1,
                           train_from="head")  # fmt: skip
    assert result.head_replaced
    assert any("was in the replaced top: training from the new head's first layer" in n
               for n in result.notes)  # fmt: skip
    assert all(r.status == "ok" for r in result.runs)


def test_modes_that_are_the_same_run_by_construction_are_refused(splits):
    model, _ = build_transfer()
    train, val = splits
    with pytest.raises(bnkit.BnkitError, match="same run by construction"):
        bnkit.compare(model, train, val, ["frozen", "affine", "train"], train_from="head")
    # frozen against adapt differ (adapt re-estimates the frozen statistics): allowed
    result = bnkit.compare(model, train, val, ["frozen", "adapt"], train_from="head",
                           epochs=1, seeds=1)  # fmt: skip
    assert {r.strategy for r in result.runs} == {"frozen", "adapt"}


def test_a_stray_huge_label_is_refused_before_a_huge_head_is_built(splits):
    model, _ = build_transfer()
    (x, y), val = splits
    y = y.copy()
    y[0] = 10**9
    with pytest.raises(DataError, match=r"labels reach 1000000000 but hold only 4 classes"):
        bnkit.compare(model, (x, y), val, ["frozen"], epochs=1, seeds=1)


def test_validation_folders_match_training_classes_by_name(tmp_path):
    from PIL import Image

    def folder(root, classes):
        for cls in classes:
            (root / cls).mkdir(parents=True)
            for i in range(4):
                shade = {"a": 30, "b": 220, "c": 120}[cls] + i
                Image.new("RGB", (8, 8), color=(shade,) * 3).save(root / cls / f"{i}.png")
        return root

    train = bnkit.data.load(folder(tmp_path / "train", ["a", "b"]))
    only_b = bnkit.data.load(folder(tmp_path / "val_b", ["b"])).with_classes(train.class_names)
    assert only_b.class_names == ("a", "b")
    assert np.array_equal(only_b.arrays()[1], [1, 1, 1, 1])  # b is class 1, not folder 0
    with pytest.raises(DataError, match="class folders 'c' are not among the training classes"):
        bnkit.data.load(folder(tmp_path / "val_bc", ["b", "c"])).with_classes(train.class_names)
    model, _ = build_transfer()
    result = bnkit.compare(model, train, tmp_path / "val_b", ["frozen", "adapt"], epochs=1,
                           seeds=1, num_classes=3)  # fmt: skip
    assert all(r.status == "ok" for r in result.runs)
