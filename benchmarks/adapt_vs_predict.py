"""Claim: `bnkit.adapt` costs little more than `model.predict` over the same data.

Prints time(adapt) / time(predict), both measured in this run on the same model
and data, each the best of REPEATS. The forward pass is the floor.

    KERAS_BACKEND=torch MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python benchmarks/adapt_vs_predict.py
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/adapt_vs_predict.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import bnkit

N, SIZE, BATCH, REPEATS = 1024, 32, 64, 3


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


def best(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    keras.utils.set_random_seed(0)
    model = residual_cnn()
    x = np.random.default_rng(0).normal(size=(N, SIZE, SIZE, 3)).astype("float32")
    model.predict(x[:BATCH], batch_size=BATCH, verbose=0)  # warm up both paths
    bnkit.adapt(model, x[:BATCH], batch_size=BATCH)
    t_predict = best(lambda: model.predict(x, batch_size=BATCH, verbose=0))
    t_adapt = best(lambda: bnkit.adapt(model, x, batch_size=BATCH))
    print(f"backend {keras.backend.backend()}: {N} images {SIZE}x{SIZE}, batch {BATCH}")
    print(f"predict {N / t_predict:,.0f} img/s, adapt {N / t_adapt:,.0f} img/s")
    print(f"ratio adapt/predict = {t_adapt / t_predict:.2f}")


if __name__ == "__main__":
    main()
