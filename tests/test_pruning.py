"""BN after pruning a Keras model (its weights set to zero by magnitude): `adapt`
re-estimates it exactly (the first BN layer's statistics against NumPy on the pruned
convolution's outputs) and says how far each layer moved. The PyTorch side, with
`torch.nn.utils.prune` and torch-pruning, is test_pruning_torch.py."""

from __future__ import annotations

import numpy as np

import bnkit

EPS_TOL = 1e-4  # float32 forward passes against a float64 NumPy reference


def _moments(outputs: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(i for i in range(outputs.ndim) if i != channel % outputs.ndim)
    return outputs.mean(axis=axes), outputs.var(axis=axes)


def _zero_smallest(w: np.ndarray, amount: float) -> np.ndarray:
    cut = np.quantile(np.abs(w), amount)
    return np.where(np.abs(w) <= cut, 0.0, w).astype(w.dtype)


def test_adapt_after_zeroing_half_of_a_keras_models_weights():
    import keras
    from conftest import KerasFramework

    fw = KerasFramework()
    model = fw.build()
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Conv2D):
            w = np.asarray(keras.ops.convert_to_numpy(layer.kernel))
            layer.kernel.assign(_zero_smallest(w, 0.5))
    x = fw.inputs(40, seed=2)
    before = fw.bn_values(model)[fw.first_bn]["mean"]
    report = bnkit.adapt(model, x, batch_size=16)
    mean, var = _moments(fw.first_bn_input(model, x), -1)
    after = fw.bn_values(model)[fw.first_bn]
    np.testing.assert_allclose(after["mean"], mean, atol=EPS_TOL)
    np.testing.assert_allclose(after["var"], var, rtol=EPS_TOL)
    assert not np.array_equal(before, after["mean"])
    assert {layer.path for layer in report.layers} == set(fw.bn_values(model))
