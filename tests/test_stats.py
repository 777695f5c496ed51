"""adapt: population BN statistics, checked against NumPy on the layer inputs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import bn_layers, weights_of

import bnkit
from bnkit.data import DataError
from bnkit.policy import Glob

EPS_TOL = 1e-4  # float32 forward passes against a float64 NumPy reference


def _reference(model, x, batch):
    """Per-layer population mean/var of BN inputs, each BN normalising with batch statistics."""
    sums: dict[str, list] = {}
    for i in range(0, len(x), batch):
        h = keras.ops.convert_to_tensor(x[i : i + batch])
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                a = keras.ops.convert_to_numpy(h).astype(np.float64)
                sums.setdefault(layer.name, []).append(a.reshape(-1, a.shape[-1]))
                mu, var = a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))
                g = keras.ops.convert_to_numpy(layer.gamma)
                b = keras.ops.convert_to_numpy(layer.beta)
                h = keras.ops.convert_to_tensor(
                    ((a - mu) / np.sqrt(var + layer.epsilon) * g + b).astype("float32")
                )
            else:
                h = layer(h)
    return {k: (np.concatenate(v).mean(0), np.concatenate(v).var(0)) for k, v in sums.items()}


@pytest.fixture
def conv_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="c1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(5, 3, name="c2"),
            keras.layers.BatchNormalization(name="bn2"),
        ]
    )


def test_adapt_matches_numpy_population_statistics(conv_model):
    rng = np.random.default_rng(0)
    x = (rng.normal(2.0, 3.0, size=(40, 8, 8, 3))).astype("float32")
    ref = _reference(conv_model, x, batch=16)  # uneven last batch: 16, 16, 8
    before = {layer.name: weights_of(layer) for layer in conv_model.layers}
    report = bnkit.adapt(conv_model, x, batch_size=16)
    assert (report.batches, report.samples) == (3, 40)
    for bn in bn_layers(conv_model):
        w = weights_of(bn)
        mean, var = ref[bn.name]
        np.testing.assert_allclose(w["moving_mean"], mean, rtol=EPS_TOL, atol=EPS_TOL)
        np.testing.assert_allclose(w["moving_variance"], var, rtol=EPS_TOL, atol=EPS_TOL)
        assert not np.allclose(w["moving_mean"], before[bn.name]["moving_mean"])
    for layer in conv_model.layers:
        after = weights_of(layer)
        for name, value in before[layer.name].items():
            if name not in ("moving_mean", "moving_variance"):
                assert np.array_equal(value, after[name]), (layer.name, name)
    # the layer's own call is back: inference uses the new running statistics
    out = keras.ops.convert_to_numpy(conv_model(x[:2], training=False))
    assert np.isfinite(out).all() and "call" not in vars(conv_model.layers[1])


def test_adapt_selected_layers_only_and_through_nested_models(transfer, data):
    model, base = transfer
    x, _ = data
    before = {b.name: weights_of(b) for b in bn_layers(base)}
    report = bnkit.adapt(model, x, select=Glob("block2_*"), max_batches=2, batch_size=8)
    assert [r.path for r in report.layers] == ["base/block2_preact_bn", "base/block2_bn"]
    assert report.samples == 16
    after = {b.name: weights_of(b) for b in bn_layers(base)}
    assert np.array_equal(before["stem_bn"]["moving_mean"], after["stem_bn"]["moving_mean"])
    assert not np.array_equal(before["block2_bn"]["moving_mean"], after["block2_bn"]["moving_mean"])


def test_adapt_rejects_bad_data(conv_model):
    with pytest.raises(DataError, match="NaN or inf"):
        bnkit.adapt(conv_model, np.full((4, 8, 8, 3), np.nan, dtype="float32"))
    with pytest.raises(DataError, match="empty"):
        bnkit.adapt(conv_model, np.zeros((0, 8, 8, 3), dtype="float32"))
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(bnkit.BnkitError, match="no BatchNormalization"):
        bnkit.adapt(plain, np.zeros((4, 4), dtype="float32"))
