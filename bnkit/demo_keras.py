"""The demo's Keras set-ups: the residual CNN of the embedded digits story and the
ResNet50V2 set-ups of the traps table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from bnkit.backends.keras.core import clone as core_clone
from bnkit.backends.keras.core import set_random_seed, without_tensorflow
from bnkit.policy import Mode

WIDTHS = (16, 32, 64)
MODEL_SUFFIX = ".keras"
TRAPS_TITLE = "ResNet50V2"


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


def images(x: Any) -> Any:
    """The demo's (N, H, W, C) images, as Keras takes them."""
    return x


def train_classifier(
    model: keras.Model, x: Any, y: Any, *, epochs: int, batch_size: int, seed: int, lr: float
) -> None:
    """Fits `model` with Adam and sparse cross-entropy from logits, deterministically."""
    set_random_seed(seed)
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
    return core_clone(model)


# ---------------------------------------------------------------------- the traps table


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and the Keras backend."""
    set_random_seed(seed)


def version() -> str:
    """Keras' version and backend, as reports name them."""
    return f"keras {keras.__version__} ({keras.backend.backend()})"


def traps_model(input_size: int, num_classes: int) -> tuple[keras.Model, keras.Model]:
    """ResNet50V2 (`weights=None`) called with `training=False` under a new head, as guides
    do; returns the model and its base."""
    base = keras.applications.ResNet50V2(
        weights=None, include_top=False, input_shape=(input_size, input_size, 3)
    )
    inputs = keras.Input((input_size, input_size, 3))
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="transfer"), base


def get_state(model: keras.Model) -> list[Any]:
    """Copies of every weight and statistic."""
    return [w.copy() for w in model.get_weights()]


def set_state(model: keras.Model, state: list[Any]) -> None:
    """Puts back what `get_state` copied."""
    model.set_weights(state)


def bnkit_label(mode: Mode) -> str:
    """The traps table's label of a bnkit row."""
    return f"bnkit.freeze(bn='{mode.value}'), then base.trainable = True"


def reenable(base: keras.Model) -> None:
    """What the framework's own code does next: `base.trainable = True`."""
    base.trainable = False
    base.trainable = True


def fit_once(model: keras.Model, x: Any, y: Any, batch_size: int) -> None:
    """One epoch of plain SGD, in order, as the traps table trains each approach."""
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)


def _bn_layers(base: keras.Model) -> list[Any]:
    return [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]


def _set_bn_untrainable(base: keras.Model, pick: Callable[[Any], bool]) -> int:
    chosen = [layer for layer in _bn_layers(base) if pick(layer)]
    for layer in chosen:
        layer.trainable = False
    return len(chosen)


def _bn_flag_then_unfreeze(base: keras.Model) -> int:
    n = _set_bn_untrainable(base, lambda layer: True)
    base.trainable = False
    base.trainable = True
    return n


def _training_false_then_unfreeze(base: keras.Model) -> int:
    base.trainable = False
    base.trainable = True
    return 0


def trap_approaches() -> list[tuple[str, Callable[[keras.Model], int]]]:
    """The ways guides and forum answers freeze BN in Keras, each returning how many BN
    layers its code touched."""
    return [
        ("bn.trainable = False (every BN)", lambda b: _set_bn_untrainable(b, lambda layer: True)),
        ("bn.trainable = False, then base.trainable = True", _bn_flag_then_unfreeze),
        ("base(x, training=False), then base.trainable = True", _training_false_then_unfreeze),
        (
            "BN picked by name.startswith('bn')",
            lambda b: _set_bn_untrainable(b, lambda layer: layer.name.startswith("bn")),
        ),
        (
            "BN picked by 'preact_bn' in name",
            lambda b: _set_bn_untrainable(b, lambda layer: "preact_bn" in layer.name),
        ),
    ]


# ---------------------------------------------------------------------- the digits model


def backend_name() -> str:
    """The Keras backend in use (`tensorflow`, `torch`, `jax`)."""
    return keras.backend.backend()


def load(path: Any) -> keras.Model:
    """Loads a `.keras` file."""
    with without_tensorflow():
        return keras.models.load_model(path)
