"""KerasHub image classifiers (one per backbone family with BN, random weights, built by
benchmarks/zoo.py's configs) through every capability, on the Keras backend of the run:
inspect counts every BN (KerasHub's blocks call theirs from their own code, where Keras
records no graph), freeze survives KerasHub's own compile, watch sees the plan kept,
adapt, shift and check, and export folds, verifies and reloads with plain Keras."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest

import bnkit

keras_hub = pytest.importorskip("keras_hub")
ZOO = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
_spec = importlib.util.spec_from_file_location("bnkit_zoo", ZOO)
assert _spec is not None and _spec.loader is not None
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)
FAMILIES = ("ResNet", "ResNetV2", "CSPNet", "MobileNetV3", "EfficientNet", "DenseNet", "HGNetV2")
SIZE = zoo.KERAS_HUB_SIZE


def bn_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def values(layers: list) -> list[dict[str, np.ndarray]]:
    return [{v.name: np.array(keras.ops.convert_to_numpy(v)) for v in b.weights} for b in layers]


def moved(before: list[dict], after: list[dict], names: tuple[str, ...]) -> int:
    return sum(
        any(not np.array_equal(a[n], b[n]) for n in names)
        for a, b in zip(before, after, strict=True)
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_capability_on_a_kerashub_classifier(family, tmp_path):
    model = zoo.keras_hub_models()[family]()
    bns = bn_layers(model)
    n = len(bns)
    assert n > 0 and len(bnkit.inspect(model).bn_layers) == n
    rng = np.random.default_rng(0)
    x = rng.random((16, SIZE, SIZE, 3), dtype=np.float32)
    y = np.arange(16) % 3
    assert model.compiled  # KerasHub compiles its tasks when built: freeze must recompile
    plan = bnkit.freeze(model, bn="affine", recompile=True)
    assert plan.bn_counts() == {"affine": n} and not plan.needs_recompile
    before = values(bns)
    with bnkit.watch(model) as w:
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    after = values(bns)
    assert moved(before, after, ("moving_mean", "moving_variance")) == 0
    assert moved(before, after, ("gamma", "beta")) > 0
    assert not [p for p in w.report.problems() if "gamma/beta" in p or "statistics" in p]
    report = bnkit.adapt(model, x)
    assert len(report.layers) == n
    assert moved(after, values(bns), ("moving_mean",)) == n
    assert np.isfinite(bnkit.shift(model, x).score)
    assert not bnkit.check(model, batch_size=8).errors
    exported = bnkit.export(model, tmp_path / "m.keras", check_data=x)
    assert exported.folded + exported.kept == n
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(x)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-4,
        atol=1e-5,
    )
