"""Small Keras models bnkit builds itself: the residual CNN of the embedded demo."""

from __future__ import annotations

from typing import Any

import keras

WIDTHS = (16, 32, 64)


def digits_resnet(input_size: int = 32, num_classes: int = 10) -> keras.Model:
    """A small residual CNN with 9 BN layers: a nested `backbone` (stem and three
    residual blocks, the last two downsampling with a projected shortcut), then global
    average pooling and a `classifier` Dense layer, as `keras.applications` models are
    used in transfer learning."""
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = _conv_bn(inputs, WIDTHS[0], 1, "stem")
    x = keras.layers.ReLU(name="stem_relu")(x)
    for k, width in enumerate(WIDTHS, start=1):
        x = _block(x, width, 1 if k == 1 else 2, f"block{k}")
    backbone = keras.Model(inputs, x, name="backbone")
    outer = keras.Input((input_size, input_size, 3), name="input")
    y = backbone(outer)
    y = keras.layers.GlobalAveragePooling2D(name="pool")(y)
    y = keras.layers.Dense(num_classes, name="classifier")(y)
    return keras.Model(outer, y, name="digits_resnet")


def _conv_bn(x: Any, width: int, stride: int, name: str) -> Any:
    x = keras.layers.Conv2D(
        width, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn")(x)


def _block(x: Any, width: int, stride: int, name: str) -> Any:
    y = _conv_bn(x, width, stride, f"{name}_1")
    y = keras.layers.ReLU(name=f"{name}_1_relu")(y)
    y = _conv_bn(y, width, 1, f"{name}_2")
    if stride != 1 or x.shape[-1] != width:
        x = keras.layers.Conv2D(width, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(x)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([x, y]))


def train_classifier(
    model: keras.Model, x: Any, y: Any, *, epochs: int, batch_size: int, seed: int, lr: float
) -> None:
    """Fits `model` with Adam and sparse cross-entropy from logits, deterministically."""
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)


def accuracy(model: keras.Model, x: Any, y: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on `(x, y)` in inference mode."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float((logits.argmax(-1) == y).mean())


def clone(model: keras.Model) -> keras.Model:
    """A copy of `model` with its own variables (weights and BN statistics copied)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy
