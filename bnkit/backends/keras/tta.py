"""Keras test-time adaptation: TENT's entropy step on BN gamma/beta, on any backend.

Only BN layers stay trainable, so a training-mode call normalises them with the batch's
statistics and leaves every other layer in inference mode. The gradient is taken the
way each backend takes one (torch autograd, a TensorFlow tape, `jax.value_and_grad` over
`stateless_call`) and applied with a Keras optimizer. On TensorFlow the step and the
inference pass run as compiled `tf.function`s, as `fit` and `predict` do.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from bnkit.backends.keras.core import BN, clone, walk
from bnkit.backends.keras.train import from_logits

SGD_MOMENTUM = 0.9
PROBABILITY_FLOOR = 1e-7


class KerasTestTime:
    """The TestTimeAdapter capability for Keras models (see `backends.base`)."""

    def __init__(self) -> None:
        self._optimizer: Any = None
        self._logits = True
        self._flags: list[tuple[Any, bool]] = []
        self._compiled: dict[int, Any] = {}  # TensorFlow: id(model) -> compiled functions

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
        self._compiled = {}

    def step(self, model: Any, x: np.ndarray) -> np.ndarray:
        """One entropy-minimisation step on `x`; returns that forward's outputs."""
        if keras.backend.backend() == "tensorflow":
            out = self._tf(model)[0](x)
            return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)
        variables = model.trainable_variables
        out, grads = _GRADIENT[keras.backend.backend()](model, x, variables, self._logits)
        if variables:
            self._optimizer.apply(grads, variables)
        return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)

    def _tf(self, model: Any) -> tuple[Any, Any]:
        """The compiled TENT step and inference pass of `model` (traced once per input
        shape, like `fit`'s train function)."""
        if id(model) not in self._compiled:
            import tensorflow as tf

            variables = model.trainable_variables
            logits, optimizer = self._logits, self._optimizer

            def step(x: Any) -> Any:
                out, grads = _tensorflow_gradient(model, x, variables, logits)
                if variables:
                    optimizer.apply(grads, variables)
                return out

            def infer(x: Any) -> Any:
                return model(x, training=False)

            self._compiled[id(model)] = (
                tf.function(step, reduce_retracing=True),
                tf.function(infer, reduce_retracing=True),
                model,  # kept alive, so its id is not reused
            )
        fns = self._compiled[id(model)]
        return fns[0], fns[1]

    def finish(self, model: Any) -> None:
        """Puts back the trainable flags `prepare` changed."""
        self._compiled = {}
        for layer, flag in reversed(self._flags):
            layer.trainable = flag

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs."""
        if keras.backend.backend() == "tensorflow" and self._optimizer is not None:
            out = self._tf(model)[1](x)
        else:
            out = model(x, training=False)
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


def _tensorflow_gradient(model: Any, x: np.ndarray, variables: list[Any], logits: bool) -> Any:
    import tensorflow as tf

    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = _entropy(out, logits)
    return out, tape.gradient(loss, variables) if variables else []


def _jax_gradient(model: Any, x: np.ndarray, variables: list[Any], logits: bool) -> Any:
    import jax

    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(values: list[Any]) -> Any:
        out, _ = model.stateless_call(values, fixed, x, training=True)
        return _entropy(out, logits), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    return out, grads


_GRADIENT = {
    "torch": _torch_gradient,
    "tensorflow": _tensorflow_gradient,
    "jax": _jax_gradient,
}
