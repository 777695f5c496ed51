"""Keras 3 backend (TensorFlow, JAX and torch backends of Keras alike).

Keras' switches mapped onto bnkit's BN state:
- `layer.trainable` (own flag): gamma/beta variables trainable, and, in
  BatchNormalization.call, `training and self.trainable` decides batch
  statistics and their update;
- a parent's `trainable=False` hides every child's variables from `fit`;
- `fit` passes `training=True` through every Functional/Sequential call,
  overriding a `training=False` recorded when a nested model was called;
- a pinned BN (`PinnedBatchNormalization`) ignores `training` outside mode
  `train` and ignores `trainable` assignments propagated from a parent.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from bnkit.backends.base import (
    CHANNELS_LAST,
    Deployer,
    MomentPass,
    Snapshot,
    TestTimeAdapter,
    Trainer,
    missing,
)
from bnkit.errors import BackendError, BnkitError, ModelFileError
from bnkit.policy import MODE_STATES, BNState, LayerDecision, Mode, mode_of
from bnkit.records import (
    CHANGED_SINCE_COMPILE,
    STATS_WITHOUT_AFFINE,
    TRAINED_UNDER_FROZEN_PARENT,
    TRAINING_OVERRIDDEN,
    CompileStatus,
    LayerRecord,
    Note,
    leaf_records,
)

BN = keras.layers.BatchNormalization
_LAYER_TRAINABLE = keras.layers.Layer.trainable

# model -> id of its compiled state when bnkit changed it after compile (a new compile clears it)
_PENDING: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
# layer -> its own trainable flag before bnkit first touched it
_ORIGINAL: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def clone(model: Any) -> Any:
    """A copy of `model` with its own variables (weights and BN statistics copied),
    without importing TensorFlow."""
    with without_tensorflow():
        copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def is_model(obj: Any) -> bool:
    """True for any Keras layer or model."""
    return isinstance(obj, keras.layers.Layer)


class _PinMixin:
    """Makes a BN layer keep a bnkit mode through `fit` and parent `trainable` changes."""

    _bnkit_base: type
    _bnkit_mode: str
    _bnkit_pinned: bool

    def __init__(self, *args: Any, bn_mode: str = "frozen", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _pin(self, Mode(bn_mode))

    @property
    def trainable(self) -> bool:
        return bool(self._trainable)  # type: ignore[attr-defined]

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if getattr(self, "_bnkit_pinned", False):
            return
        _LAYER_TRAINABLE.fset(self, value)

    @property
    def bn_mode(self) -> str:
        """The pinned mode."""
        return self._bnkit_mode

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if self._bnkit_mode != Mode.TRAIN.value:
            training = False
        return super().call(inputs, training=training, mask=mask)  # type: ignore[misc]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()  # type: ignore[misc]
        config["bn_mode"] = self._bnkit_mode
        return dict(config)


@keras.saving.register_keras_serializable(package="bnkit")
class PinnedBatchNormalization(_PinMixin, keras.layers.BatchNormalization):  # type: ignore[misc]
    """BatchNormalization pinned to a bnkit mode (frozen, affine, train or adapt).

    Serialisable: a model saved after `bnkit.freeze` reloads with
    `keras.models.load_model` once bnkit is imported, every mode intact.
    """

    _bnkit_base = BN


_PINNED_CLASSES: dict[type, type] = {BN: PinnedBatchNormalization}


def _pinned_class(cls: type) -> type:
    """The pinned variant of a BN class; subclasses get one made on first use."""
    if issubclass(cls, _PinMixin):
        return cls
    if cls not in _PINNED_CLASSES:
        _PINNED_CLASSES[cls] = type(f"Pinned{cls.__name__}", (_PinMixin, cls), {"_bnkit_base": cls})
    return _PINNED_CLASSES[cls]


def _pin(layer: Any, mode: Mode) -> None:
    object.__setattr__(layer, "_bnkit_pinned", False)
    _LAYER_TRAINABLE.fset(layer, MODE_STATES[mode].affine_trained)
    object.__setattr__(layer, "_bnkit_mode", mode.value)
    object.__setattr__(layer, "_bnkit_pinned", True)


# --------------------------------------------------------------------------- walking


@dataclass
class _Node:
    layer: Any
    path: str
    parents: tuple[Any, ...]
    children: list[Any]


def _sublayers(layer: Any) -> list[Any]:
    subs = layer.layers if isinstance(layer, keras.Model) else getattr(layer, "_layers", [])
    return [s for s in subs if not isinstance(s, keras.layers.InputLayer)]


def walk(model: Any) -> list[_Node]:
    """Every layer under `model` once, depth first in each model's topological order."""
    out: list[_Node] = []
    seen: set[int] = set()

    def visit(layer: Any, prefix: str, parents: tuple[Any, ...]) -> None:
        for child in _sublayers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            subs = _sublayers(child)
            path = prefix + child.name
            out.append(_Node(child, path, parents, subs))
            if subs:
                visit(child, path + "/", (*parents, child))

    visit(model, "", (model,))
    return out


def _leaves(model: Any) -> list[_Node]:
    return [n for n in walk(model) if not n.children]


def in_layer_code(node: _Node) -> bool:
    """True for a layer its parent calls from its own `call` (a subclassed layer or model,
    as KerasHub's blocks are) rather than from a functional or sequential graph: Keras
    records no graph node for such a call."""
    parent = node.parents[-1]
    return not (isinstance(parent, keras.Sequential) or hasattr(parent, "_nodes_by_depth"))


def _called_with_training_false(layer: Any) -> bool:
    for node in getattr(layer, "_inbound_nodes", []):
        if node.arguments.kwargs.get("training") is False:
            return True
    return False


def _own_variables(layer: Any) -> list[Any]:
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def _size(v: Any) -> int:
    return int(np.prod(v.shape)) if len(v.shape) else 1


# --------------------------------------------------------------------------- BN state


def _bn_state(layer: Any, trainable_ids: set[int]) -> BNState:
    affine = [
        v for v in (getattr(layer, "gamma", None), getattr(layer, "beta", None)) if v is not None
    ]
    if affine:
        affine_trained = any(id(v) in trainable_ids for v in affine)
    else:
        affine_trained = bool(layer.trainable)
    if isinstance(layer, _PinMixin):
        batch = layer.bn_mode == Mode.TRAIN.value and bool(layer.trainable)
    else:
        batch = bool(layer.trainable)
    return BNState(affine_trained=affine_trained, stats_update=batch, batch_stats=batch)


def _bn_mode_name(layer: Any, state: BNState) -> str:
    name = mode_of(state)
    if isinstance(layer, _PinMixin) and layer.bn_mode == Mode.ADAPT.value and name == "frozen":
        return Mode.ADAPT.value
    return name


def _bn_notes(node: _Node, state: BNState) -> list[Note]:
    notes = []
    if state.batch_stats:
        for parent in node.parents:
            if _called_with_training_false(parent):
                notes.append(
                    Note(
                        TRAINING_OVERRIDDEN,
                        f"'{parent.name}' was called with training=False, but fit passes "
                        "training=True and overrides it: these statistics update",
                    )
                )
    if state.stats_update and not state.affine_trained:
        notes.append(
            Note(
                STATS_WITHOUT_AFFINE,
                "fit updates its statistics but not gamma/beta (the model is not trainable)",
            )
        )
    return notes


def _effective_trainable(node: _Node, trainable_ids: set[int]) -> bool:
    """Whether fit trains the layer: its variables are in the model's trainable set."""
    own = list(node.layer._trainable_variables)
    if own:
        return any(id(v) in trainable_ids for v in own)
    return bool(node.layer.trainable) and bool(node.parents[0].trainable)


# --------------------------------------------------------------------------- backend


class KerasBackend:
    """The Backend protocol for Keras 3 models."""

    name = "keras"
    layout = CHANNELS_LAST
    model_suffix = ".keras"

    def __init__(self) -> None:
        self.name = f"keras {keras.__version__} ({keras.backend.backend()})"

    def trainer(self) -> Trainer:
        raise missing("trainer", "compare", self.name)

    def deployer(self) -> Deployer:
        raise missing("deployer", "check and export", self.name)

    def test_time(self) -> TestTimeAdapter:
        raise missing("test_time", "tta", self.name)

    def collective(self) -> None:
        """Keras runs alone here: a Keras model's statistics are combined over one process."""
        return None

    def launched_job(
        self, world: int, on_wait: Callable[[str], None] | None = None
    ) -> AbstractContextManager[tuple[int, int]]:
        raise BackendError(
            f"this is one of {world} processes (WORLD_SIZE), but a Keras model's statistics "
            "are combined in one process: run the command without torchrun"
        )

    def records(self, model: Any) -> list[LayerRecord]:
        trainable_ids = {id(v) for v in model.trainable_variables}
        compiled = (
            getattr(model, "_compiled_trainable_state", None)
            if getattr(model, "compiled", False)
            else None
        )
        return [self._record(n, trainable_ids, compiled) for n in walk(model)]

    def bn_paths(self, model: Any) -> list[str]:
        _, infos = leaf_records(self.records(model))
        return [info.path for info in infos if info.is_bn]

    def _record(self, node: _Node, trainable_ids: set[int], compiled: dict | None) -> LayerRecord:
        layer = node.layer
        own = _own_variables(layer)
        n_train = sum(_size(v) for v in own if id(v) in trainable_ids)
        n_fixed = sum(_size(v) for v in own if id(v) not in trainable_ids)
        effective = _effective_trainable(node, trainable_ids)
        notes: list[Note] = []
        frozen_parents = [p.name for p in node.parents[1:] if not p.trainable]
        if effective and frozen_parents and not node.children:
            notes.append(
                Note(
                    TRAINED_UNDER_FROZEN_PARENT,
                    f"trainable although parent '{frozen_parents[0]}' is not: fit still trains "
                    "it (Keras collects variables by their own flag)",
                )
            )
        if compiled is not None and layer in compiled and compiled[layer] != layer.trainable:
            notes.append(
                Note(
                    CHANGED_SINCE_COMPILE,
                    f"trainable changed to {layer.trainable} after compile: call "
                    "bnkit.recompile(model)",
                )
            )
        bn_fields: dict[str, Any] = {}
        if isinstance(layer, BN):
            state = _bn_state(layer, trainable_ids)
            notes += _bn_notes(node, state)
            bn_fields = dict(
                is_bn=True,
                bn_mode=_bn_mode_name(layer, state),
                bn_state=state,
                momentum=float(layer.momentum),
            )
        return LayerRecord(
            path=node.path,
            name=layer.name,
            class_name=type(layer).__name__,
            is_container=bool(node.children),
            trainable=bool(layer.trainable),
            effective_trainable=effective,
            trainable_params=n_train,
            non_trainable_params=n_fixed,
            notes=tuple(notes),
            **bn_fields,
        )

    def compile_status(self, model: Any) -> CompileStatus:
        if not getattr(model, "compiled", False):
            return CompileStatus(compiled=False)
        state = getattr(model, "_compiled_trainable_state", {})
        stale = tuple(
            n.path for n in walk(model) if n.layer in state and state[n.layer] != n.layer.trainable
        )
        pending = _PENDING.get(model) == id(state)
        unknown = 0
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and optimizer.built:
            known = {id(v) for v in optimizer._trainable_variables}
            unknown = sum(id(v) not in known for v in model.trainable_variables)
        return CompileStatus(True, stale, pending, unknown)

    # ------------------------------------------------------------------ changing

    def apply(self, model: Any, decisions: Sequence[LayerDecision]) -> None:
        nodes = walk(model)
        leaves = [n for n in nodes if not n.children]
        if len(leaves) != len(decisions):
            raise BnkitError("the plan does not match this model's layers: run freeze again")
        for n in nodes:
            _ORIGINAL.setdefault(n.layer, bool(n.layer.trainable))
        _ORIGINAL.setdefault(model, bool(model.trainable))
        own = {id(n.layer): bool(n.layer.trainable) for n in leaves}
        needed = _containers_needed(model, nodes, leaves, decisions)
        for container, value in needed:
            container.trainable = value
        for node, d in zip(leaves, decisions, strict=True):
            if d.rule is None:
                _set_trainable(node.layer, own[id(node.layer)])
            elif d.is_bn and d.bn_mode is not None:
                self.set_bn_mode(node.layer, Mode(d.bn_mode))
            else:
                node.layer.trainable = d.trainable
        if getattr(model, "compiled", False):
            _PENDING[model] = id(model._compiled_trainable_state)

    def set_bn_mode(self, layer: Any, mode: Mode) -> None:
        if not isinstance(layer, BN):
            raise BnkitError(
                f"layer '{layer.name}' is {type(layer).__name__}, not BatchNormalization"
            )
        layer.__class__ = _pinned_class(type(layer))
        _pin(layer, mode)

    def unfreeze(self, model: Any) -> int:
        nodes = walk(model)
        released = 0
        for layer in [model, *(n.layer for n in nodes)]:
            if isinstance(layer, _PinMixin):
                layer.__class__ = layer._bnkit_base
                object.__setattr__(layer, "_bnkit_pinned", False)
                released += 1
        for layer in [model] + [n.layer for n in nodes]:
            if layer in _ORIGINAL:
                _set_trainable(layer, _ORIGINAL.pop(layer))
        if getattr(model, "compiled", False):
            _PENDING[model] = id(model._compiled_trainable_state)
        return released

    def recompile(self, model: Any) -> None:
        if not getattr(model, "compiled", False) or not hasattr(model, "_compile_config"):
            raise BnkitError(
                f"model '{model.name}' is not compiled: call model.compile(...) yourself"
            )
        config = dict(model._compile_config.config)
        optimizer = config.get("optimizer")
        if isinstance(optimizer, keras.optimizers.Optimizer):
            config["optimizer"] = optimizer.__class__.from_config(optimizer.get_config())
        model.compile(**config)
        _PENDING.pop(model, None)

    # ------------------------------------------------------------------ reading weights

    def snapshot(self, model: Any, weights_too: bool = True) -> Snapshot:
        weights: dict[str, dict[str, np.ndarray]] = {}
        stats: dict[str, dict[str, np.ndarray]] = {}
        for node in walk(model):
            layer = node.layer
            stat_vars = _stat_variables(layer)
            own = {v.name: _copy(v) for v in layer._trainable_variables} if weights_too else {}
            if own:
                weights[node.path] = own
            if stat_vars:
                stats[node.path] = {k: _copy(v) for k, v in stat_vars.items()}
        return Snapshot(weights, stats)

    # ------------------------------------------------------------------ statistics

    def bn_stats(self, model: Any, paths: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
        stats = self.snapshot(model, weights_too=False).stats
        return {p: stats[p] for p in paths}

    def set_bn_stats(self, model: Any, stats: dict[str, dict[str, np.ndarray]]) -> None:
        layers = {n.path: n.layer for n in walk(model)}
        for path, values in stats.items():
            layer = layers[path]
            layer.moving_mean.assign(values["mean"].astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(values["var"].astype(layer.moving_variance.dtype))

    @contextlib.contextmanager
    def moments_pass(
        self, model: Any, paths: Sequence[str], *, normalize: str
    ) -> Iterator[MomentPass]:
        nodes = {n.path: n.layer for n in walk(model)}
        layers = [nodes[p] for p in paths]
        captured: dict[str, tuple[Any, Any, Any]] = {}
        try:
            for path, layer in zip(paths, layers, strict=True):
                call = _moment_call(layer, path, captured, batch_stats=normalize == "batch")
                object.__setattr__(layer, "call", call)
            yield _compiled_pass(model, layers, captured, normalize)
        finally:
            for layer in layers:
                if "call" in vars(layer):
                    object.__delattr__(layer, "call")

    def input_shape(self, model: Any) -> tuple[int | None, ...] | None:
        inputs = getattr(model, "inputs", None)
        if not inputs or len(inputs) != 1:
            return None
        return tuple(inputs[0].shape[1:])

    def forward(self, model: Any, x: np.ndarray) -> None:
        model(x, training=False)

    # ------------------------------------------------------------------ files

    def load(self, path: Path) -> Any:
        try:
            with without_tensorflow(), warnings.catch_warnings():
                # another backend's optimizer has other variables: its state is not kept
                warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
                return keras.models.load_model(path, custom_objects=_foreign_classes(path))
        except Exception as err:  # Keras raises many types for a bad archive
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelFileError(
                f"{path}: Keras could not load this model ({first[:200]}); "
                "check that it was saved with model.save('*.keras') and that any custom "
                "layers are imported"
            ) from None

    def save(self, model: Any, path: Path) -> None:
        save(model, path)


def save(model: Any, path: Path) -> None:
    """`model.save(path)`, loadable on every Keras backend: an optimizer of the torch
    backend is written under its public name (`keras.optimizers.Adam`), as TensorFlow and
    JAX write theirs, not as `keras.src.backend.torch.optimizers...`, which another
    backend cannot use and imports torch to look at."""
    with without_tensorflow():
        portable = _portable_compile_config(model)
        try:
            if portable is not None:
                object.__setattr__(model, "get_compile_config", lambda: portable)
            model.save(path)
        finally:
            if "get_compile_config" in vars(model):
                object.__delattr__(model, "get_compile_config")


_BACKEND_PACKAGE = "keras.src.backend."
_PUBLIC_MODULES = ("optimizers", "losses", "metrics")
"""Where the public class of a backend-specific one is found, by its class name."""


def _portable_compile_config(model: Any) -> dict[str, Any] | None:
    """The model's serialised compile config with a backend-specific optimizer under its
    public module, or None when there is nothing to change."""
    if not getattr(model, "compiled", False):
        return None
    config = model.get_compile_config()
    optimizer = config.get("optimizer") if isinstance(config, dict) else None
    if not isinstance(optimizer, dict):
        return None
    module = str(optimizer.get("module") or "")
    if not module.startswith(_BACKEND_PACKAGE) or _public(optimizer.get("class_name", "")) is None:
        return None
    return {**config, "optimizer": {**optimizer, "module": "keras.optimizers"}}


def _public(class_name: str) -> Any:
    for module in _PUBLIC_MODULES:
        found = getattr(getattr(keras, module), class_name, None)
        if isinstance(found, type):
            return found
    return None


def _foreign_classes(path: Path) -> dict[str, Any]:
    """Classes a saved config names in another Keras backend's package (the torch backend
    saves its optimizers as `keras.src.backend.torch.optimizers.*`), mapped to this
    backend's public class of the same name. Loading them as saved would import that
    backend (on TensorFlow, torch's import after TensorFlow crashes the process) or fail
    where it is not installed."""
    from bnkit.backends.keras.files import read_config

    here = f"{_BACKEND_PACKAGE}{keras.backend.backend()}."
    found: dict[str, Any] = {}

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for value in node:
                visit(value)
            return
        if not isinstance(node, dict):
            return
        module, name = node.get("module"), node.get("class_name")
        if (
            isinstance(module, str)
            and isinstance(name, str)
            and module.startswith(_BACKEND_PACKAGE)
            and not module.startswith(here)
        ):
            public = _public(name)
            if public is not None:
                found[str(node.get("registered_name") or name)] = public
        for value in node.values():
            visit(value)

    visit(read_config(path))
    return found


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed` without importing TensorFlow on another backend (Keras
    imports it only to seed it, and nothing of TensorFlow runs unless it is imported)."""
    with without_tensorflow():
        keras.utils.set_random_seed(seed)


@contextlib.contextmanager
def without_tensorflow() -> Iterator[None]:
    """Keeps Keras from importing TensorFlow on another backend: (de)serialisation asks
    `tf.available` only to test objects for TensorFlow types, and seeding only to seed
    it; neither matters while TensorFlow is not imported (importing it costs seconds and
    log lines)."""
    from keras.src.utils import module_utils

    lazy = module_utils.tensorflow
    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        yield
        return
    saved = lazy._available
    lazy._available = False
    try:
        yield
    finally:
        lazy._available = saved


def _containers_needed(
    model: Any, nodes: list[_Node], leaves: list[_Node], decisions: Sequence[LayerDecision]
) -> Iterator[tuple[Any, bool]]:
    """Each container (the model first, then top-down) with the trainable value it needs."""
    trainable_leaf = {id(n.layer) for n, d in zip(leaves, decisions, strict=True) if d.trainable}
    below: dict[int, bool] = {}
    for n in leaves:
        if id(n.layer) in trainable_leaf:
            for p in n.parents:
                below[id(p)] = True
    yield model, below.get(id(model), False)
    for n in nodes:
        if n.children:
            yield n.layer, below.get(id(n.layer), False)


def _set_trainable(layer: Any, value: bool) -> None:
    """Sets a layer's own flag without touching its children or a pin."""
    if isinstance(layer, _PinMixin):
        return
    layer._trainable = value
    for v in layer._trainable_variables:
        v.trainable = value


def _moment_call(
    layer: Any, path: str, captured: dict[str, tuple[Any, Any, Any]], *, batch_stats: bool
) -> Any:
    """A BN call that records its input's per-channel moments, then normalises with them
    (`batch_stats`) or exactly as the layer would in inference."""
    ops = keras.ops
    inference_call = type(layer).call

    def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
        x = ops.cast(inputs, "float32")
        axis = layer.axis % len(x.shape)
        reduce = [i for i in range(len(x.shape)) if i != axis]
        mean, var = ops.moments(x, axes=reduce)
        count = ops.cast(ops.size(x), "float32") / float(x.shape[axis])
        captured[path] = (mean, var, count)
        if not batch_stats:
            return inference_call(layer, inputs, training=False, mask=mask)
        return ops.batch_normalization(
            x,
            mean,
            var,
            axis=axis,
            offset=layer.beta if layer.center else None,
            scale=layer.gamma if layer.scale else None,
            epsilon=layer.epsilon,
        )

    return call


# model -> {fingerprint of the pass: compiled function}; traced once, reused across calls
_PASSES: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _compiled_pass(
    model: Any, layers: list[Any], captured: dict[str, tuple[Any, Any, Any]], normalize: str
) -> MomentPass:
    """One inference-mode forward pass returning each patched layer's input moments.

    On TensorFlow the pass is a traced `tf.function` (as `predict` is), on JAX a
    `jax.jit` over `stateless_call` with the variables as arguments (as Keras compiles
    `predict`), each cached per model and layer set and traced again for a new batch
    shape; on torch it runs eagerly without autograd. The cached function reads the
    moments of this pass's patched layers from `box`, which each pass points at its own.
    """
    name = keras.backend.backend()
    if name == "torch":
        import torch

        @torch.no_grad()
        def eager(x: Any) -> dict[str, tuple[Any, Any, Any]]:
            captured.clear()
            model(x, training=False)
            return dict(captured)

        return _to_numpy(eager)
    key = (normalize, tuple(id(layer) for layer in layers), _structure(model))
    cache = _PASSES.setdefault(model, {})
    if key not in cache:
        cache.clear()
        cache[key] = _compile(name, model)
    fn, box = cache[key]
    box["captured"] = captured
    return _to_numpy(fn)


def _to_numpy(fn: Any) -> MomentPass:
    jax_arrays = keras.backend.backend() == "jax"

    def run(x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        out = fn(x)
        if jax_arrays:  # one transfer for all the moments, not one per array
            import jax

            out = jax.device_get(out)
        return {p: (_numpy(m), _numpy(v), round(float(_numpy(n)))) for p, (m, v, n) in out.items()}

    return run


def _compile(name: str, model: Any) -> tuple[Any, dict[str, Any]]:
    """The pass compiled as the backend compiles `predict`, and the box through which
    each use hands it the dict its patched layers write their moments into."""
    box: dict[str, Any] = {}

    def step(x: Any) -> dict[str, tuple[Any, Any, Any]]:
        box["captured"].clear()
        model(x, training=False)
        return dict(box["captured"])

    if name == "tensorflow":
        import tensorflow as tf

        return tf.function(step, reduce_retracing=True), box
    if name != "jax":
        return step, box

    def pure(trainable: list[Any], fixed: list[Any], x: Any) -> Any:
        box["captured"].clear()
        model.stateless_call(trainable, fixed, x, training=False)
        return dict(box["captured"])

    compiled = jit_reductions(pure)

    return lambda x: compiled(*variable_values(model), x), box


def variable_values(model: Any) -> tuple[list[Any], list[Any]]:
    """The values of `model`'s trainable and non-trainable variables, as `stateless_call`
    takes them."""
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])  # fmt: skip


def jit_reductions(fn: Any) -> Any:
    """`jax.jit(fn)`, on CPU with XLA's reductions let into its YNNPACK graphs (see
    _JAX_CPU_PASS); where this XLA does not know the option, compiled as `predict` is."""
    import jax

    tuned = jax.jit(fn, compiler_options=_JAX_CPU_PASS) if _on_cpu() else None
    plain = jax.jit(fn)
    chosen: list[Any] = []  # the function that compiled

    def call(*args: Any) -> Any:
        if chosen:
            return chosen[0](*args)
        if tuned is not None:
            try:
                out = tuned(*args)
                chosen.append(tuned)
                return out
            except jax.errors.JaxRuntimeError as err:  # an XLA without the option
                if _OPTION not in str(err):
                    raise
        chosen.append(plain)
        return plain(*args)

    return call


_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_JAX_CPU_PASS = {_OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}
"""XLA's CPU compiler runs an inference pass as one YNNPACK graph, and a pass that also
returns each BN input's moments, or normalises with the batch's, as one graph per layer
with XLA's own loops for the reductions between them; with reductions let into
YNNPACK, bnkit's moments pass went from 1.3 inference passes to 1.06-1.16 and TENT's
gradient from 3.2 to 2.8 (benchmarks/adapt_vs_predict.py, tta_cost.py). The option is
XLA's, set per compilation."""


def _on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


def _structure(model: Any) -> tuple[tuple[int, type, bool, str], ...]:
    """What a traced pass depends on besides weights: each layer, its class, flag and pin."""
    return tuple(
        (id(n.layer), type(n.layer), bool(n.layer.trainable), getattr(n.layer, "bn_mode", ""))
        for n in walk(model)
    )


def _numpy(v: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(v))


def _stat_variables(layer: Any) -> dict[str, Any]:
    if not isinstance(layer, BN) or not layer.built:
        return {}
    return {"mean": layer.moving_mean, "var": layer.moving_variance}


def _copy(v: Any) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(v), copy=True)
