"""inspect: what Keras 3 will really do, checked against real fits."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import bn_layers, changed, compile_fit, weights_of

import bnkit


@pytest.fixture(scope="module")
def resnet50v2() -> keras.Model:
    return keras.applications.ResNet50V2(weights=None, include_top=False, input_shape=(32, 32, 3))


def test_resnet50v2_counts(resnet50v2):
    report = bnkit.inspect(resnet50v2)
    bn = report.bn_layers
    assert len(bn) == 49
    assert sum(r.name.endswith("preact_bn") for r in bn) == 16
    assert report.totals()["bn_modes"] == {"train": 49}
    total_trainable = sum(int(np.prod(v.shape)) for v in resnet50v2.trainable_weights)
    assert report.totals()["trainable_params"] == total_trainable
    doc = json.loads(report.to_json())
    assert doc["totals"]["bn_layers"] == 49
    assert doc["layers"][1]["path"] == resnet50v2.layers[2].name


def test_nested_paths_and_training_false_trap(transfer, data):
    model, base = transfer
    base.trainable = False
    base.trainable = True  # the usual "unfreeze the base" step
    report = bnkit.inspect(model)
    paths = [r.path for r in report.layers]
    assert "base" in paths and "base/block2_preact_bn" in paths
    bn = report.bn_layers
    assert len(bn) == 4 and all(r.bn_mode == "train" for r in bn)
    assert all(any("training=False" in n.text for n in r.notes) for r in bn)
    # and it is true: fit updates the statistics despite training=False
    before = [weights_of(b) for b in bn_layers(base)]
    compile_fit(model, *data)
    after = [weights_of(b) for b in bn_layers(base)]
    assert all(
        changed(b, a, "moving_mean") and changed(b, a, "moving_variance")
        for b, a in zip(before, after, strict=True)
    )


def test_bn_trainable_false_is_frozen(transfer, data):
    model, base = transfer
    for layer in bn_layers(base):
        layer.trainable = False
    assert bnkit.inspect(model).bn_counts() == {"frozen": 4}
    before = [weights_of(b) for b in bn_layers(base)]
    compile_fit(model, *data)
    after = [weights_of(b) for b in bn_layers(base)]
    assert all(np.array_equal(b[k], a[k]) for b, a in zip(before, after, strict=True) for k in b)


def test_trainable_bn_inside_frozen_base_still_trains(transfer, data):
    model, base = transfer
    base.trainable = False
    bn = base.get_layer("block1_bn")
    bn.trainable = True
    record = {r.path: r for r in bnkit.inspect(model).layers}["base/block1_bn"]
    assert record.bn_mode == "train" and record.effective_trainable
    assert any("parent 'base' is not" in n.text for n in record.notes)
    before = weights_of(bn)
    compile_fit(model, *data)
    after = weights_of(bn)
    assert changed(before, after, "moving_mean") and changed(before, after, "gamma")


def test_bn_in_untrainable_model_is_stats_only(transfer, data):
    model, base = transfer
    model.trainable = False
    bn = base.get_layer("block1_bn")
    bn.trainable = True
    record = {r.path: r for r in bnkit.inspect(model).layers}["base/block1_bn"]
    assert record.bn_mode == "stats-only"
    before = weights_of(bn)
    compile_fit(model, *data)
    after = weights_of(bn)
    assert changed(before, after, "moving_mean") and not changed(before, after, "gamma")


class MyBN(keras.layers.BatchNormalization):
    pass


def test_subclasses_and_synchronized_bn_count_as_bn():
    sync = keras.backend.backend() == "tensorflow"  # Keras allows synchronized BN only there
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            keras.layers.Conv2D(2, 1),
            MyBN(),
            keras.layers.BatchNormalization(synchronized=sync),
            keras.layers.LayerNormalization(),
        ]
    )
    report = bnkit.inspect(model)
    assert [r.class_name for r in report.bn_layers] == ["MyBN", "BatchNormalization"]


def test_model_without_bn_reports_zero():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(2), keras.layers.LayerNormalization()]
    )
    report = bnkit.inspect(model)
    assert report.totals()["bn_layers"] == 0 and report.bn_counts() == {}


def test_stale_compile_is_reported(transfer, data):
    model, base = transfer
    base.trainable = False
    compile_fit(model, *data)
    assert not bnkit.inspect(model).compile.stale
    base.trainable = True
    status = bnkit.inspect(model).compile
    assert status.stale and "base" in status.stale_layers
    assert status.unknown_to_optimizer > 0
    assert "recompile" in bnkit.inspect(model).notes()[0]
    bnkit.recompile(model)
    assert not bnkit.inspect(model).compile.stale
