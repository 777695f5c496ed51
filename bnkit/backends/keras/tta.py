"""Keras test-time adaptation: TENT's entropy step on BN gamma/beta, on any backend.

Only BN layers stay trainable, so a training-mode call normalises them with the batch's
statistics and leaves every other layer in inference mode. The gradient is taken the
way each backend takes one (torch autograd, a TensorFlow tape, `jax.value_and_grad` over
`stateless_call`) and applied with a Keras optimizer. On TensorFlow and JAX the step and
the inference pass are compiled (XLA `tf.function`s, `jax.jit`), as Keras compiles `fit`
and `predict` by default.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from bnkit.backends.keras.core import BN, clone, jit_reductions, variable_values, walk
from bnkit.backends.keras.train import from_logits

SGD_MOMENTUM = 0.9
PROBABILITY_FLOOR = 1e-7


class KerasTestTime:
    """The TestTimeAdapter capability for Keras models (see `backends.base`)."""

    def __init__(self) -> None:
        self.traced = keras.backend.backend() in ("tensorflow", "jax")
        self._optimizer: Any = None
        self._logits = True
        self._flags: list[tuple[Any, bool]] = []
        self._compiled: dict[int, Any] = {}  # TensorFlow, JAX: id(model) -> TENT step
        self._inference: dict[int, Any] = {}  # TensorFlow, JAX: id(model) -> inference

    def prepare(self, model: Any, lr: float, optimizer: str) -> None:
        """Only BN layers trainable (the flags before are remembered); a fresh optimizer."""
        self._flags = [(n.layer, n.layer.trainable) for n in walk(model)]
        self._flags.append((model, model.trainable))
        model.trainable = True
        for node in walk(model):
            if not node.children:
                node.layer.trainable = isinstance(node.layer, BN)
        self._logits = from_logits(model)
        self._optimizer = (
            keras.optimizers.SGD(lr, momentum=SGD_MOMENTUM)
            if optimizer == "sgd"
            else keras.optimizers.Adam(lr)
        )
        self._optimizer.build(model.trainable_variables)
        self._compiled, self._inference = {}, {}

    def step(self, model: Any, x: np.ndarray) -> np.ndarray:
        """One entropy-minimisation step on `x`; returns that forward's outputs."""
        compiled = self._step(model)
        if compiled is not None:
            out = compiled(x)
        else:  # torch: eager, as torch users run
            variables = model.trainable_variables
            out, grads = _torch_gradient(model, x, variables, self._logits)
            if variables:
                self._optimizer.apply(grads, variables)
        return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)

    def _step(self, model: Any) -> Any:
        """The compiled TENT step of `model` on TensorFlow (`tf.function` with XLA, as
        Keras compiles `fit` by default) and on JAX (`jax.jit` over `stateless_call`);
        None on torch. Traced once per shape."""
        backend = keras.backend.backend()
        if backend not in _STEPS:
            return None
        if id(model) not in self._compiled:
            step = _STEPS[backend](model, self._logits, self._optimizer)
            self._compiled[id(model)] = (step, model)  # model kept: its id stays its own
        return self._compiled[id(model)][0]

    def finish(self, model: Any) -> None:
        """Puts back the trainable flags `prepare` changed."""
        self._compiled, self._inference = {}, {}
        for layer, flag in reversed(self._flags):
            layer.trainable = flag

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs, compiled on TensorFlow and JAX as Keras compiles
        `predict` (the variables read at each call, so new statistics count)."""
        backend = keras.backend.backend()
        if backend not in _INFERENCE or not model.built:  # a first call builds it
            out = model(x, training=False)
        else:
            if id(model) not in self._inference:  # the model kept: its id stays its own
                self._inference[id(model)] = (_INFERENCE[backend](model), model)
            out = self._inference[id(model)][0](x)
        return np.asarray(keras.ops.convert_to_numpy(out), np.float32)

    def reference(self, model: Any) -> Any:
        """A copy of the start model with its own variables."""
        return clone(model)

    def save_state(self, model: Any) -> list[np.ndarray]:
        """Every variable, copied."""
        return [np.array(w, copy=True) for w in model.get_weights()]

    def restore_state(self, model: Any, state: list[np.ndarray]) -> None:
        """Puts back `save_state`'s copy and starts the optimizer afresh."""
        model.set_weights(state)
        for v in self._optimizer.variables:
            v.assign(keras.ops.zeros(v.shape, dtype=v.dtype))

    def finite(self, model: Any) -> bool:
        """True when every trained (BN) variable is finite."""
        return all(
            np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in model.trainable_variables
        )


def _entropy(out: Any, logits: bool) -> Any:
    ops = keras.ops
    if logits:
        logp = ops.log_softmax(out, axis=-1)
        return -ops.mean(ops.sum(ops.exp(logp) * logp, axis=-1))
    p = ops.maximum(out, PROBABILITY_FLOOR)
    return -ops.mean(ops.sum(p * ops.log(p), axis=-1))


def _torch_gradient(model: Any, x: np.ndarray, variables: list[Any], logits: bool) -> Any:
    import torch

    out = model(x, training=True)
    if not variables:
        return out.detach(), []
    loss = _entropy(out, logits)
    grads = torch.autograd.grad(loss, [v.value for v in variables])
    return out.detach(), list(grads)


def _tensorflow(model: Any, logits: bool, optimizer: Any) -> Any:
    import tensorflow as tf

    variables = model.trainable_variables

    def step(x: Any) -> Any:
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = _entropy(out, logits)
        if variables:
            optimizer.apply(tape.gradient(loss, variables), variables)
        return out

    return _xla_or_graph(step)


def _tensorflow_inference(model: Any) -> Any:
    return _xla_or_graph(lambda x: model(x, training=False))


def _xla_or_graph(fn: Any) -> Any:
    """`fn` as an XLA-compiled `tf.function`, or as a plain one for a model with an
    operation XLA cannot compile (found on the first call, before anything ran)."""
    import tensorflow as tf

    xla = tf.function(fn, reduce_retracing=True, jit_compile=True)
    chosen: list[Any] = []  # the function that ran once

    def call(x: Any) -> Any:
        if chosen:
            return chosen[0](x)
        try:
            out = xla(x)
            chosen.append(xla)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            chosen.append(tf.function(fn, reduce_retracing=True))
            out = chosen[0](x)
        return out

    return call


def _jax(model: Any, logits: bool, optimizer: Any) -> Any:
    import jax

    def gradient(trainable: list[Any], fixed: list[Any], x: Any) -> Any:
        def loss(values: list[Any]) -> Any:
            out, _ = model.stateless_call(values, fixed, x, training=True)
            return _entropy(out, logits), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        return out, grads

    def update(trainable: list[Any], fixed: list[Any], slots: list[Any], x: Any) -> Any:
        out, grads = gradient(trainable, fixed, x)
        trainable, slots = optimizer.stateless_apply(slots, grads, trainable)
        return out, trainable, slots

    update_jit = jit_reductions(update)

    def step(x: Any) -> Any:
        variables = model.trainable_variables
        if not variables:  # nothing to train: BN still on the batch's statistics
            return model.stateless_call(*variable_values(model), x, training=True)[0]
        slots = [v.value for v in optimizer.variables]
        out, trainable, slots = update_jit(*variable_values(model), slots, x)
        for v, value in zip(variables, trainable, strict=True):
            v.assign(value)
        for v, value in zip(optimizer.variables, slots, strict=True):
            v.assign(value)
        return out

    return step


def _jax_inference(model: Any) -> Any:
    import jax

    infer_jit = jax.jit(lambda t, f, x: model.stateless_call(t, f, x, training=False)[0])
    return lambda x: infer_jit(*variable_values(model), x)


_STEPS = {"tensorflow": _tensorflow, "jax": _jax}
_INFERENCE = {"tensorflow": _tensorflow_inference, "jax": _jax_inference}
