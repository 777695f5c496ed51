"""Keras deployment: BN folded into the layer that feeds it, an inference-only clone that
loads with plain Keras, and the facts `check` reads from a model's graph."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from bnkit.backends.keras.core import BN, in_layer_code, save, walk, without_tensorflow
from bnkit.records import BNFacts, Folded, unestimated

FOLDABLE = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
IDENTITY_AT_INFERENCE = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)


# ---------------------------------------------------------------------- graph facts


def graphs(model: Any) -> Iterator[Any]:
    """The model and every functional or sequential model nested in it."""
    yield model
    for node in walk(model):
        if isinstance(node.layer, keras.Model):
            yield node.layer


def producer(layer: Any) -> Any | None:
    """The layer whose output is this layer's only input, when it has one call."""
    if len(layer._inbound_nodes) != 1:
        return None
    tensors = layer._inbound_nodes[0].input_tensors
    if len(tensors) != 1:
        return None
    return tensors[0]._keras_history.operation


def consumers(graph: Any) -> dict[int, int]:
    """For each layer of `graph`, how many layer calls (and graph outputs) use its output."""
    counts: dict[int, int] = {}
    for layer in graph.layers:
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                op = t._keras_history.operation
                counts[id(op)] = counts.get(id(op), 0) + 1
    for t in getattr(graph, "outputs", None) or []:
        op = t._keras_history.operation
        counts[id(op)] = counts.get(id(op), 0) + 1
    return counts


def fold_pairs(model: Any) -> dict[int, Any]:
    """BN layer id -> the Conv2D, DepthwiseConv2D or Dense it can be folded into: that layer
    directly feeds the BN, feeds nothing else, has a linear activation, and the BN
    normalises its last axis."""
    pairs: dict[int, Any] = {}
    for graph in graphs(model):
        if not hasattr(graph, "_inbound_nodes") or not hasattr(graph, "layers"):
            continue
        uses = consumers(graph)
        for layer in graph.layers:
            if not isinstance(layer, BN) or not _last_axis(layer):
                continue
            src = producer(layer)
            if (
                isinstance(src, FOLDABLE)
                and uses.get(id(src), 0) == 1
                and len(src._inbound_nodes) == 1
                and src.activation is keras.activations.linear
                and getattr(src, "data_format", "channels_last") == "channels_last"
            ):
                pairs[id(layer)] = src
    return pairs


def _last_axis(bn: Any) -> bool:
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    if axis is None or bn.input is None:
        return False
    rank = len(bn.input.shape)
    return axis % rank == rank - 1


# ---------------------------------------------------------------------- folding


def folded_weights(conv: Any, bn: Any) -> tuple[np.ndarray, np.ndarray]:
    """The kernel and bias of `conv` followed by `bn` in inference, as one layer (float64
    arithmetic, cast back to the kernel's dtype)."""
    kernel = keras.ops.convert_to_numpy(_kernel(conv)).astype(np.float64)
    out = kernel.shape[-1] if not isinstance(conv, keras.layers.DepthwiseConv2D) else None
    channels = kernel.shape[-2] * kernel.shape[-1] if out is None else out
    bias = (
        keras.ops.convert_to_numpy(conv.bias).astype(np.float64)
        if conv.use_bias
        else np.zeros(channels)
    )
    mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
    var = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
    gamma = keras.ops.convert_to_numpy(bn.gamma).astype(np.float64) if bn.scale else 1.0
    beta = keras.ops.convert_to_numpy(bn.beta).astype(np.float64) if bn.center else 0.0
    scale = gamma / np.sqrt(var + bn.epsilon)
    if out is None:  # depthwise: channel c = input channel i * multiplier + m
        new_kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    else:
        new_kernel = kernel * scale
    new_bias = (bias - mean) * scale + beta
    dtype = keras.ops.convert_to_numpy(_kernel(conv)).dtype
    return new_kernel.astype(dtype), new_bias.astype(dtype)


def _kernel(layer: Any) -> Any:
    return layer.kernel


def inference_copy(model: Any, fold: bool = True, example: np.ndarray | None = None) -> Folded:
    """A copy of `model` for deployment, built from plain Keras layers only: each BN that
    can be folded is folded into the Conv2D/DepthwiseConv2D/Dense feeding it (that layer
    gains a bias), every other BN becomes a non-trainable BatchNormalization (inference
    mode even when called with `training=True`); folded BN layers and dropout, noise and
    random augmentation layers become `Identity` layers (no computation; works for
    Sequential and Functional models alike, nested ones included).
    """
    pairs = fold_pairs(model) if fold else {}
    into = {id(conv): bn for bn_id, conv in pairs.items() for bn in [_by_id(model, bn_id)]}
    folded: list[str] = []
    kept: list[str] = []
    dropped: list[str] = []
    made: list[tuple[Any, Any]] = []

    def clone_layer(layer: Any) -> Any:
        clone = _cloned(layer)
        made.append((layer, clone))
        return clone

    def _cloned(layer: Any) -> Any:
        config = layer.get_config()
        if id(layer) in pairs:
            folded.append(layer.name)
            return keras.layers.Identity(name=layer.name)
        if identity_at_inference(layer):
            dropped.append(layer.name)
            return keras.layers.Identity(name=layer.name)
        if isinstance(layer, BN):
            config.pop("bn_mode", None)
            config["trainable"] = False
            kept.append(layer.name)
            return keras.layers.BatchNormalization.from_config(config)
        if id(layer) in into:
            config["use_bias"] = True
        clone = layer.__class__.from_config(config)
        clone.trainable = False
        return clone

    skip = {layer.name for layer in _leaves(model) if id(layer) in pairs}
    skip |= {layer.name for layer in _leaves(model) if identity_at_inference(layer)}

    def call_layer(layer: Any, *args: Any, **kwargs: Any) -> Any:
        # functional graphs: a skipped layer is not called at all (its stored call
        # arguments, such as mask, would not fit Identity); Sequential graphs, which
        # Keras clones without call_function, call the Identity clones instead
        if layer.name in skip:
            return args[0]
        return layer(*args, **kwargs)

    calls = {} if isinstance(model, keras.Sequential) else {"call_function": call_layer}
    with without_tensorflow():
        copy = keras.models.clone_model(model, clone_function=clone_layer, recursive=True, **calls)
    _copy_weights(made, into)
    copy.trainable = False
    reasons = [(name, _why_kept(model, name, fold)) for name in kept]
    for node in walk(model):
        if isinstance(node.layer, BN) and node.layer.name not in (*folded, *kept):
            kept.append(node.layer.name)
            owner = type(node.parents[-1]).__name__
            reasons.append((node.layer.name, f"{owner} calls it from its own code"))
    return Folded(copy, tuple(folded), tuple(kept), tuple(dropped), tuple(reasons))


def _why_kept(model: Any, name: str, fold: bool) -> str:
    """Why the BN layer `name` was not folded."""
    if not fold:
        return "folding was turned off"
    bn = next(layer for layer in _leaves(model) if layer.name == name)
    src = producer(bn)
    if src is None:
        return "it has several inputs or calls"
    if not isinstance(src, FOLDABLE):
        return f"it follows {type(src).__name__}, not a Conv2D, DepthwiseConv2D or Dense"
    if src.activation is not keras.activations.linear:
        return f"{src.name} applies an activation before it"
    if not _last_axis(bn):
        return "it does not normalise the channel axis of its input"
    return f"{src.name}'s output feeds other layers too"


def identity_at_inference(layer: Any) -> bool:
    """Dropout, noise and random augmentation layers: the identity in inference."""
    if isinstance(layer, IDENTITY_AT_INFERENCE):
        return True
    module = type(layer).__module__
    return type(layer).__name__.startswith("Random") and module.startswith("keras.")


def _by_id(model: Any, layer_id: int) -> Any:
    for layer in _leaves(model):
        if id(layer) == layer_id:
            return layer
    raise KeyError(layer_id)


def _leaves(model: Any) -> list[Any]:
    return [n.layer for n in walk(model) if not n.children]


def _copy_weights(made: list[tuple[Any, Any]], into: dict[int, Any]) -> None:
    """Every weight of each cloned layer into its clone (`made`: what `clone_model` gave
    for each layer); a layer of the user's own code (a subclassed layer with sublayers,
    as KerasHub's blocks) pairs its sublayers with the clone's by position, since its
    config need not give them their names back. The layers BN was folded into get their
    folded kernel and bias; folded BN and dropout became weightless Identity layers."""
    for layer, clone in made:
        if isinstance(clone, keras.layers.Identity) or not hasattr(layer, "weights"):
            continue  # a folded BN or a dropout; an operation of keras.ops (no weights)
        inner = [n.layer for n in walk(layer) if not n.children]
        theirs = [n.layer for n in walk(clone) if not n.children]
        pairs = list(zip(inner, theirs, strict=True)) if inner else [(layer, clone)]
        for src, dst in pairs:
            if id(src) in into:
                kernel, bias = folded_weights(src, into[id(src)])
                _kernel(dst).assign(kernel)
                dst.bias.assign(bias)
                continue
            for target, value in zip(dst.weights, src.weights, strict=True):
                target.assign(keras.ops.convert_to_numpy(value))


def outputs(model: Any, x: np.ndarray, training: bool = False) -> np.ndarray:
    """The model's output on `x` as a float64 array."""
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=training)), dtype=np.float64)


def export_savedmodel(model: Any, path: Any) -> None:
    """A TensorFlow SavedModel through `model.export` (TensorFlow backend)."""
    model.export(str(path), format="tf_saved_model", verbose=False)


def export_onnx(model: Any, path: Any) -> None:
    """An ONNX file through `model.export` (needs the backend's exporter installed)."""
    model.export(str(path), format="onnx", verbose=False)


def load_plain(path: Any) -> Any:
    """Loads a `.keras` export the way a user without bnkit would."""
    return keras.models.load_model(path)


def run_savedmodel(path: Any, x: np.ndarray) -> np.ndarray:
    """Runs an exported SavedModel's `serve` endpoint on `x`."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return np.asarray(loaded.serve(tf.constant(x)), dtype=np.float64)


def run_onnx(path: Any, x: np.ndarray) -> np.ndarray:
    """Runs an exported ONNX file with onnxruntime on `x`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[0], dtype=np.float64)


def bn_facts(model: Any, example: np.ndarray | None = None) -> list[BNFacts]:
    """Facts about every BN layer of `model`, nested ones included, read from its graph
    (`example` is not needed)."""
    facts = []
    for node in walk(model):
        bn = node.layer
        if not isinstance(bn, BN) or not bn.built:
            continue
        mean = keras.ops.convert_to_numpy(bn.moving_mean)
        var = keras.ops.convert_to_numpy(bn.moving_variance)
        shape = bn.input.shape if bn._inbound_nodes else None
        spatial = None
        if shape is not None and all(d is not None for d in shape[1:]):
            spatial = int(np.prod(shape[1:])) // int(shape[bn.axis])
        src = producer(bn)
        facts.append(
            BNFacts(
                path=node.path,
                calls=len(bn._inbound_nodes) or int(in_layer_code(node)),
                spatial=spatial,
                epsilon=float(bn.epsilon),
                min_var=float(np.nanmin(var)) if np.isfinite(var).any() else float("nan"),
                nonfinite=int((~np.isfinite(mean)).sum() + (~np.isfinite(var)).sum()),
                pinned=hasattr(bn, "bn_mode"),
                producer_trainable=None
                if src is None or not src.weights
                else bool(src.trainable_variables),
                unestimated=unestimated(mean, var, _values(bn.gamma), _values(bn.beta)),
            )
        )
    return facts


def _values(weight: Any) -> np.ndarray | None:
    return None if weight is None else keras.ops.convert_to_numpy(weight)


def norm_layers(model: Any) -> dict[str, int]:
    """How many layers of each other normalisation class the model has (LayerNorm...)."""
    counts: dict[str, int] = {}
    for node in walk(model):
        name = type(node.layer).__name__
        if "Normalization" in name and not isinstance(node.layer, BN):
            counts[name] = counts.get(name, 0) + 1
    return counts


def format_problem(format: str) -> str | None:
    """Why `format` cannot be exported on this Keras backend, or None when it can."""
    backend = keras.backend.backend()
    if format == "savedmodel" and backend != "tensorflow":
        return (
            f"a SavedModel export needs the TensorFlow backend (this is {backend}); "
            "run with KERAS_BACKEND=tensorflow"
        )
    if format != "onnx":
        return None
    import importlib.util

    needed = ["tf2onnx", "onnxruntime"] if backend == "tensorflow" else ["onnx", "onnxscript"]
    needed.append("onnxruntime")
    missing = sorted({m for m in needed if importlib.util.find_spec(m) is None})
    if missing:
        return (
            f"ONNX export on the {backend} backend needs {', '.join(missing)}: pip install "
            f"{' '.join(missing)}"
        )
    return None


FORMATS: tuple[str, ...] = ("keras", "savedmodel", "onnx")


def write(model: Any, path: Path, format: str, example: np.ndarray) -> None:
    """Writes the inference copy: a `.keras` file, a SavedModel folder or an ONNX file."""
    if format == "keras":
        save(model, path)
    elif format == "savedmodel":
        export_savedmodel(model, path)
    else:
        export_onnx(model, path)


def run_written(path: Path, format: str, x: np.ndarray) -> np.ndarray:
    """Loads what `write` wrote, without bnkit's classes, and runs it on `x`."""
    if format == "keras":
        return outputs(load_plain(path), x)
    if format == "savedmodel":
        return run_savedmodel(path, x)
    return run_onnx(path, x)


def source_differences(model: Any, source: Any) -> list[tuple[str, str]]:
    """See `Deployer.source_differences`: (path, what differs) for each BN layer whose
    epsilon or momentum is not that of the layer of the same path in `source`."""
    want = {n.path: n.layer for n in walk(source) if isinstance(n.layer, BN)}
    out = []
    for node in walk(model):
        bn = node.layer
        if not isinstance(bn, BN):
            continue
        src = want.get(node.path)
        if src is None:
            out.append((node.path, "no BatchNormalization layer of this path in the source"))
            continue
        parts = [
            f"{name} {getattr(bn, name):g}, the source's {getattr(src, name):g}"
            for name in ("epsilon", "momentum")
            if not np.isclose(getattr(bn, name), getattr(src, name), rtol=1e-6, atol=0.0)
        ]
        if parts:
            out.append((node.path, "; ".join(parts)))
    return out


class KerasDeployer:
    """The Deployer capability for Keras models (see `bnkit.backends.base.Deployer`)."""

    formats: tuple[str, ...] = FORMATS
    bn_facts = staticmethod(bn_facts)
    norm_layers = staticmethod(norm_layers)
    inference_copy = staticmethod(inference_copy)
    outputs = staticmethod(outputs)
    format_problem = staticmethod(format_problem)
    write = staticmethod(write)
    run_written = staticmethod(run_written)
    source_differences = staticmethod(source_differences)
