"""Claim: `bnkit.adapt` costs little more than `model.predict` over the same data.

Prints time(adapt) / time(predict), both measured in this run on the same model
and data: the median of RUNS interleaved timings, with the range of the ratio. The
forward pass is the floor.

    KERAS_BACKEND=torch MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python benchmarks/adapt_vs_predict.py
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/adapt_vs_predict.py
    KERAS_BACKEND=jax .venv/bin/python benchmarks/adapt_vs_predict.py   # and a profile
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import bnkit

N, SIZE, BATCH, RUNS = 1024, 32, 64, 7


def residual_cnn() -> keras.Model:
    inp = keras.Input((SIZE, SIZE, 3))
    x = inp
    for width in (32, 64, 128):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        y = keras.layers.BatchNormalization()(y)
        x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10)(x))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    keras.utils.set_random_seed(0)
    model = residual_cnn()
    x = np.random.default_rng(0).normal(size=(N, SIZE, SIZE, 3)).astype("float32")
    model.predict(x[:BATCH], batch_size=BATCH, verbose=0)  # warm up both paths
    bnkit.adapt(model, x[:BATCH], batch_size=BATCH)
    predict, adapt = [], []
    for _ in range(RUNS):
        predict.append(timed(lambda: model.predict(x, batch_size=BATCH, verbose=0)))
        adapt.append(timed(lambda: bnkit.adapt(model, x, batch_size=BATCH)))
    ratios = [a / p for a, p in zip(adapt, predict, strict=True)]
    t_predict, t_adapt = statistics.median(predict), statistics.median(adapt)
    print(f"backend {keras.backend.backend()}: {N} images {SIZE}x{SIZE}, batch {BATCH}, "
          f"median of {RUNS} interleaved runs")  # fmt: skip
    print(f"predict {N / t_predict:,.0f} img/s, adapt {N / t_adapt:,.0f} img/s")
    print(f"ratio adapt/predict = {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    if keras.backend.backend() == "jax":
        profile_jax(model, x)


def profile_jax(model: keras.Model, x: np.ndarray) -> None:
    """Where adapt's time goes on JAX: bnkit's jitted moments pass alone against a jitted
    inference pass over the same batches (no Python around either but the call); the
    same pass compiled without bnkit's XLA option, and that with each layer's moments
    replaced by a slice of its input (no reduction left, the BN inputs still read); and
    how many YNNPACK fusions XLA compiled each into (the inference pass is one: the
    whole network as one YNNPACK graph)."""
    import jax

    import bnkit.backends.keras.core as core
    from bnkit.stats import _bn_paths

    backend, paths = _bn_paths(model, None)

    def values():
        return ([v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables])  # fmt: skip

    infer = jax.jit(lambda t, f, b: model.stateless_call(t, f, b, training=False)[0])
    batches = [x[i : i + BATCH] for i in range(0, N, BATCH)]

    def fusions(compiled) -> int:
        text = compiled.lower(*values(), batches[0]).compile().as_text()
        return text[text.index("ENTRY") :].count("__ynn_fusion")

    plain_fusions = fusions(infer)  # traced here, before any pass patches the BN layers

    def pass_ratio() -> tuple[float, int]:
        core._PASSES.pop(model, None)
        t_infer, t_pass = [], []
        for _ in range(RUNS):
            t_infer.append(timed(lambda: [jax.block_until_ready(infer(*values(), b))
                                          for b in batches]))  # fmt: skip
            with backend.moments_pass(model, paths, normalize="batch") as run:
                run(batches[0])  # traced (once: the pass is cached per model)
                t_pass.append(timed(lambda: [run(b) for b in batches]))
        with backend.moments_pass(model, paths, normalize="batch"):
            captured = next(iter(core._PASSES[model].values()))[1]

            def pure(t, f, b):
                captured["captured"].clear()
                model.stateless_call(t, f, b, training=False)
                return dict(captured["captured"])

            count = fusions(jax.jit(pure, compiler_options=core._JAX_CPU_PASS))
        return statistics.median(t_pass) / statistics.median(t_infer), count

    ratio, count = pass_ratio()
    on_cpu, moments = core._on_cpu, keras.ops.moments
    core._on_cpu = lambda: False  # the pass compiled without the option, as predict is
    try:
        untuned, _ = pass_ratio()
        keras.ops.moments = lambda v, axes: (v[0, 0, 0], v[0, 0, 0] * 0 + 1)
        sliced, _ = pass_ratio()
    finally:
        core._on_cpu, keras.ops.moments = on_cpu, moments
        core._PASSES.pop(model, None)
    print(f"profile: the jitted moments pass alone = {ratio:.2f} jitted inference passes "
          f"({untuned:.2f} compiled without XLA's option, {sliced:.2f} without it and with "
          f"a slice for the moments, no reduction); YNNPACK fusions: inference "
          f"{plain_fusions}, moments pass {count}")  # fmt: skip


if __name__ == "__main__":
    main()
