"""Keras training for `compare`: new heads, guarded training runs and frozen-prefix caching."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from bnkit.backends.base import batch_slices, sample_order
from bnkit.backends.keras.core import BN, set_random_seed, walk
from bnkit.backends.keras.deploy import identity_at_inference
from bnkit.errors import BnkitError
from bnkit.records import Diverged, EpochLog, Split

HEAD_DROPOUT = 0.2
SGD_MOMENTUM = 0.9
EVAL_BATCH = 256


def output_units(model: Any) -> int | None:
    """The size of the model's last output axis, or None when it has several outputs."""
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1:
        return None
    return outputs[0].shape[-1]


def with_head(
    model: Any,
    num_classes: int,
    head: Callable[[Any], Any] | None,
    example: np.ndarray | None = None,
) -> Any:
    """`model` with its top replaced when `head` is given or the output does not have
    `num_classes` units: the features are the output of the last top-level layer whose
    output is a feature map (rank 4), else the input of the last layer; the new top is
    `head(features)` or GlobalAveragePooling2D (for a feature map), Dropout(0.2) and a
    Dense layer of `num_classes` logits. `example` is not needed: Keras knows shapes."""
    if head is None and output_units(model) == num_classes:
        return model
    features = _features(model)
    if head is not None:
        outputs = head(features)
    else:
        x = features
        if len(x.shape) == 4:
            x = keras.layers.GlobalAveragePooling2D(name="bnkit_pool")(x)
        x = keras.layers.Dropout(HEAD_DROPOUT, name="bnkit_dropout")(x)
        outputs = keras.layers.Dense(num_classes, name="bnkit_head")(x)
    return keras.Model(model.inputs, outputs, name=f"{model.name}_new_head")


def _features(model: Any) -> Any:
    if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
        raise BnkitError(
            "a new head needs a functional or sequential Keras model with known inputs; "
            "build the model with keras.Input, or pass head="
        )
    layers = [x for x in model.layers if not isinstance(x, keras.layers.InputLayer)]
    for layer in reversed(layers):
        out = _call_tensors(layer).output_tensors
        if len(out) == 1 and len(out[0].shape) == 4:
            return out[0]
    inputs = _call_tensors(layers[-1]).input_tensors
    if len(inputs) != 1:
        raise BnkitError(f"cannot find the features before {layers[-1].name}: pass head=")
    return inputs[0]


def _call_tensors(layer: Any) -> Any:
    """The node of a layer's call in its parent graph (a nested model's own `output` is a
    tensor of its inner graph, not of the parent's)."""
    nodes = layer._inbound_nodes
    if len(nodes) != 1:
        raise BnkitError(
            f"layer {layer.name!r} is called {len(nodes)} times: bnkit cannot cut the model "
            "there; pass head= or train_from= another layer"
        )
    return nodes[0]


def from_logits(model: Any) -> bool:
    """True unless the model ends in a softmax."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return False
    activation = getattr(last, "activation", None)
    return activation is not keras.activations.softmax


def prepare(model: Any, lr: float, logits: bool, optimizer: str = "adam", loss: Any = None) -> None:
    """A fresh optimizer (Adam, or SGD with momentum 0.9), the loss (`loss`, else sparse
    cross-entropy) and accuracy."""
    opt = (
        keras.optimizers.SGD(lr, momentum=SGD_MOMENTUM)
        if optimizer == "sgd"
        else keras.optimizers.Adam(lr)
    )
    model.compile(
        optimizer=opt,
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
        metrics=["accuracy"],
    )


# ---------------------------------------------------------------------- prefix caching


def frozen_prefix(model: Any, train_from: str | None) -> Split | None:
    """The split at top-level layer `train_from` when everything before it is frozen, in
    inference mode and deterministic, and the rest depends on the prefix only through the
    cut; None when the model cannot be cached that way."""
    if train_from is None:
        return None
    names = [x.name for x in model.layers]
    if train_from not in names:
        return None
    cut = model.layers[names.index(train_from)]
    try:
        (cut_tensor,) = _call_tensors(cut).input_tensors
        prefix = keras.Model(model.inputs, cut_tensor)
        suffix = keras.Model(cut_tensor, model.outputs)
    except (BnkitError, ValueError, AttributeError, TypeError):
        return None
    if not all(_inert(layer) for layer in prefix._flatten_layers(include_self=False)):
        return None
    return Split(prefix, suffix)


def _inert(layer: Any) -> bool:
    """A layer that computes the same thing in training as in inference and trains nothing."""
    if identity_at_inference(layer):  # dropout, noise, augmentation: random in training
        return False
    if layer.trainable_variables:
        return False
    if isinstance(layer, BN):
        return getattr(layer, "bn_mode", None) in ("frozen", "adapt") or not layer.trainable
    return True


def fingerprint(model: Any) -> str:
    """A digest of every variable's value: equal digests, equal computations."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def working_copy(model: Any) -> Iterator[Any]:
    """A copy of `model` with its own variables: rebuilt from its config (pinned BN modes,
    trainable flags and nested models are in it) with its weights, in memory; through a
    saved `.keras` file when the model has no usable config (a subclassed model). The
    in-memory copy of a ResNet50V2 takes a third of the file's time."""
    copy = _config_copy(model)
    if copy is not None:
        yield copy
        return
    from bnkit.backends.keras.core import KerasBackend

    backend = KerasBackend()
    with tempfile.TemporaryDirectory(prefix="bnkit-compare-") as tmp:
        backend.save(model, Path(tmp) / "start.keras")
        yield backend.load(Path(tmp) / "start.keras")


def _config_copy(model: Any) -> Any:
    """`model` rebuilt from its config with its weights, or None when it cannot be (the
    copy must have the same layers, in the same order, with the same weights)."""
    kind = type(model)
    if kind.__name__ not in ("Functional", "Sequential") or not kind.__module__.startswith("keras"):
        return None  # a subclassed model: its config may not rebuild it
    from bnkit.backends.keras.core import without_tensorflow

    try:
        with without_tensorflow():  # as the file round trip: no TensorFlow on torch or JAX
            copy = type(model).from_config(model.get_config())
        copy.set_weights(_weights(model))
    except Exception:  # any failure: the file round trip instead
        return None
    if _layout(copy) != _layout(model):
        return None
    return copy


def _layout(model: Any) -> list[tuple[str, str, bool, str | None]]:
    """Each layer's path, class, flag and pinned BN mode."""
    return [
        (n.path, type(n.layer).__name__, bool(n.layer.trainable), getattr(n.layer, "bn_mode", None))
        for n in walk(model)
    ]


def packed(model: Any) -> bytes:
    """`model` as the bytes of a saved `.keras` file, for another process (`unpacked`)."""
    from bnkit.backends.keras.core import KerasBackend

    with tempfile.TemporaryDirectory(prefix="bnkit-pack-") as tmp:
        KerasBackend().save(model, Path(tmp) / "start.keras")
        return (Path(tmp) / "start.keras").read_bytes()


def unpacked(value: bytes) -> Any:
    """The model `packed` saved, loaded."""
    from bnkit.backends.keras.core import KerasBackend

    with tempfile.TemporaryDirectory(prefix="bnkit-pack-") as tmp:
        (Path(tmp) / "start.keras").write_bytes(value)
        return KerasBackend().load(Path(tmp) / "start.keras")


def worker_env() -> dict[str, str]:
    """The Keras backend in use: another process must pick it before importing Keras."""
    return {"KERAS_BACKEND": str(keras.backend.backend())}


def save_state(model: Any) -> list[np.ndarray]:
    """Copies of every variable of `model` (weights and BN statistics, not the
    optimizer's: each run compiles a fresh one)."""
    return _weights(model)


def restore_state(model: Any, state: list[np.ndarray]) -> None:
    """Puts back what `save_state` copied."""
    model.set_weights(state)


def predict(model: Any, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Inference-mode outputs as a NumPy array."""
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


# ---------------------------------------------------------------------- guarded runs


def guarded_fit(
    model: Any,
    paths_from: Any,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    on_step: Callable[[], None] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> Diverged | None:
    """Trains `model` (compiled) step by step in the seed's data order, evaluating after
    each epoch. A non-finite loss or weight stops the run: the weights that the last fully
    finite step (finite loss, finite update) started from are restored, and the step and
    the first layer (named as in `paths_from`) whose output was non-finite on that batch
    are returned."""
    set_random_seed(seed)
    entered = _weights(model)  # the weights the next step starts from
    last_ok = entered  # the weights the last fully finite step (loss and update) started from
    for epoch in range(epochs):
        start = time.perf_counter()
        loss_sum = acc_sum = 0.0
        for step, b in enumerate(batch_slices(sample_order(len(x), seed, epoch), batch_size)):
            logs = model.train_on_batch(x[b], y[b], return_dict=True)
            loss = float(logs["loss"])
            new = _weights(model) if np.isfinite(loss) else None
            if new is None or not all(np.isfinite(w).all() for w in new):
                layer = first_nonfinite_layer(paths_from, model, x[b])
                model.set_weights(last_ok)
                return Diverged(epoch, step, loss, layer)
            last_ok, entered = entered, new
            loss_sum += loss * len(b)
            acc_sum += float(logs.get("accuracy", np.nan)) * len(b)
            if on_step is not None:
                on_step()
        val_loss, val_acc = evaluate(model, *val)
        log = EpochLog(
            epoch, loss_sum / len(x), acc_sum / len(x), val_loss, val_acc,
            time.perf_counter() - start,
        )  # fmt: skip
        if on_epoch is not None:
            on_epoch(log)
    return None


def _weights(model: Any) -> list[np.ndarray]:
    """Copies of every weight (on torch, `get_weights` arrays share the tensors' memory)."""
    return [np.array(w, copy=True) for w in model.get_weights()]


def evaluate(model: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Loss and accuracy in inference mode, as `model.evaluate` computes them (the mean
    over batches of EVAL_BATCH, weighted by their sizes), through `test_on_batch`:
    `evaluate` builds a new input pipeline on each call (about 60 ms on TensorFlow,
    which after every epoch of a head trained on cached features was a third of the
    run)."""
    total_loss = total_acc = 0.0
    for i in range(0, len(x), EVAL_BATCH):
        xb, yb = x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH]
        out = model.test_on_batch(xb, yb, return_dict=True)
        total_loss += float(out["loss"]) * len(xb)
        total_acc += float(out.get("accuracy", np.nan)) * len(xb)
    return total_loss / len(x), total_acc / len(x)


def first_nonfinite_layer(paths_from: Any, model: Any, x: np.ndarray) -> str | None:
    """Runs `x` through `model` in training mode, eagerly, and names the first leaf layer
    whose output holds NaN or inf (None when every output is finite)."""
    paths = {id(n.layer): n.path for n in walk(paths_from)}
    leaves = [n.layer for n in walk(model) if not n.children and id(n.layer) in paths]
    found: list[str] = []
    with _checking(leaves, paths, found), contextlib.suppress(Exception):
        model(x, training=True)
    return found[0] if found else None


@contextlib.contextmanager
def _checking(leaves: list[Any], paths: dict[int, str], found: list[str]) -> Iterator[None]:
    try:
        for layer in leaves:
            object.__setattr__(layer, "call", _checked(layer, paths[id(layer)], found))
        yield
    finally:
        for layer in leaves:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")


def _checked(layer: Any, path: str, found: list[str]) -> Any:
    original = type(layer).call.__get__(layer)

    def call(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if not found:
            tensors = out if isinstance(out, list | tuple) else [out]
            for t in tensors:
                if not np.isfinite(keras.ops.convert_to_numpy(t)).all():
                    found.append(path)
                    break
        return out

    return call


class KerasTrainer:
    """The Trainer capability for Keras models (see `bnkit.backends.base.Trainer`)."""

    with_head = staticmethod(with_head)
    from_logits = staticmethod(from_logits)
    working_copy = staticmethod(working_copy)
    packed = staticmethod(packed)
    unpacked = staticmethod(unpacked)
    worker_env = staticmethod(worker_env)
    save_state = staticmethod(save_state)
    restore_state = staticmethod(restore_state)
    prepare = staticmethod(prepare)
    frozen_prefix = staticmethod(frozen_prefix)
    fingerprint = staticmethod(fingerprint)
    predict = staticmethod(predict)
    guarded_fit = staticmethod(guarded_fit)
    evaluate = staticmethod(evaluate)
