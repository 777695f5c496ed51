"""BN after pruning a Keras model (its weights set to zero by magnitude): `adapt`
re-estimates it exactly (the first BN layer's statistics against NumPy on the pruned
convolution's outputs) and says how far each layer moved. Folding before Keras' int8
quantization. The PyTorch side, with
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


def test_a_folded_keras_model_quantizes_to_int8():
    """Keras 3's `model.quantize("int8")` quantizes Dense (not the convolutions): after
    `bnkit.fold` the Dense that fed a BN carries it in its int8 weights, the BN is gone,
    and the outputs stay those of the float model within int8's error."""
    import warnings

    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(8, 3),
                              layers.BatchNormalization(), layers.ReLU(),
                              layers.GlobalAveragePooling2D(), layers.Dense(16),
                              layers.BatchNormalization(), layers.Dense(3)])  # fmt: skip
    x = np.random.default_rng(0).normal(1.0, 2.0, (32, 8, 8, 3)).astype("float32")
    bnkit.adapt(model, x)  # statistics of the data, not the initial 0 and 1
    ref = np.asarray(model.predict(x, verbose=0))
    folded = bnkit.fold(model, x)
    assert len(folded.folded) == 2 and not folded.kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "layer X does not have a quantize method"
        folded.model.quantize("int8")
    modes = [getattr(layer, "quantization_mode", None) for layer in folded.model.layers]
    assert modes.count("int8") == 2  # both Dense layers, the first with its BN in it
    assert not any(isinstance(layer, keras.layers.BatchNormalization)
                   for layer in folded.model.layers)  # fmt: skip
    got = np.asarray(folded.model.predict(x, verbose=0))
    scale = float(np.abs(ref).max())
    assert float(np.abs(got - ref).max()) < 0.05 * scale
    assert float((got.argmax(1) == ref.argmax(1)).mean()) > 0.9
