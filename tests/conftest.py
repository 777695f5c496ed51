"""Shared fixtures: small real Keras models and data. The Keras backend comes from
KERAS_BACKEND (torch when unset); `make test` runs the suite under torch and tensorflow."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

import bnkit  # noqa: F401  (registers the pinned BN layer)

INPUT = (8, 8, 3)
CLASSES = 3


def build_transfer(seed: int = 0) -> tuple[keras.Model, keras.Model]:
    """A small residual 'pretrained' base called with training=False under a new head."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(INPUT)
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem_conv")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", name="block1_conv")(x)
    y = keras.layers.BatchNormalization(name="block1_bn")(y)
    x = keras.layers.Add(name="block1_add")([x, y])
    x = keras.layers.BatchNormalization(name="block2_preact_bn")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", name="block2_conv")(x)
    x = keras.layers.BatchNormalization(name="block2_bn")(x)
    x = keras.layers.ReLU(name="block2_relu")(x)
    base = keras.Model(inp, x, name="base")
    outer_in = keras.Input(INPUT)
    h = base(outer_in, training=False)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="head")(h)
    return keras.Model(outer_in, out, name="transfer"), base


@pytest.fixture(scope="session", autouse=True)
def bnkit_cache(tmp_path_factory):
    """bnkit's cache (the pretrained digits model) in one temporary folder per session."""
    folder = tmp_path_factory.mktemp("bnkit-cache")
    os.environ["BNKIT_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture
def transfer() -> tuple[keras.Model, keras.Model]:
    return build_transfer()


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 2.0, size=(32, *INPUT)).astype("float32")
    y = rng.integers(0, CLASSES, size=32)
    return x, y


def compile_fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int = 1) -> None:
    """Compiles (if needed) and fits with settings that move every trainable weight."""
    if not model.compiled:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)


def weights_of(layer: keras.layers.Layer) -> dict[str, np.ndarray]:
    """Copies of a layer's variables by name (np.array on torch tensors may alias)."""
    return {v.name: np.array(keras.ops.convert_to_numpy(v), copy=True) for v in layer.weights}


def bn_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def randomise_bn(model: keras.Model, seed: int = 0) -> None:
    """Non-trivial BN statistics and gamma/beta, so folding and shift measure something."""
    rng = np.random.default_rng(seed)
    for layer in bn_layers(model):
        c = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
        if layer.scale:
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        if layer.center:
            layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))


def changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray], name: str) -> bool:
    return not np.array_equal(before[name], after[name])
