"""Claim: with a frozen backbone, `bnkit.compare` trains a head at least 5x faster than
plain `model.fit` with the same frozen layers, because the frozen prefix runs once and
training uses its cached outputs.

Both train the same ResNet50V2 (weights=None, 32x32 inputs) with a new head for EPOCHS
epochs, with validation after each epoch, in one run; the compare time includes saving and
reloading the start model. The ratio grows with the number of epochs: plain `fit` runs the
backbone forward every epoch, the cached path once.

    KERAS_BACKEND=torch MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python benchmarks/prefix_cache.py
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/prefix_cache.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import bnkit

N, N_VAL, SIZE, CLASSES, BATCH, EPOCHS = 2048, 256, 32, 10, 32, 20


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50V2(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
    )
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(base(inputs))
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(x))


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(N + N_VAL, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, CLASSES, size=N + N_VAL)
    train, val = (x[:N], y[:N]), (x[N:], y[N:])

    plain = model()
    bnkit.freeze(plain, train_from="pool", bn="frozen")
    plain.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    plain.fit(x[:256], y[:256], batch_size=BATCH, epochs=1, verbose=0)  # warm up (tracing)
    t = time.perf_counter()
    plain.fit(*train, batch_size=BATCH, epochs=EPOCHS, validation_data=val, verbose=0)
    t_plain = time.perf_counter() - t

    net = model()
    t = time.perf_counter()
    result = bnkit.compare(
        net, train, val, ["frozen"], epochs=EPOCHS, seeds=1, train_from="pool", batch_size=BATCH
    )
    t_cached = time.perf_counter() - t
    assert result.runs[0].cached_prefix, "the prefix was not cached"
    print(
        f"backend {keras.backend.backend()}: ResNet50V2 {SIZE}x{SIZE}, {N} training images, "
        f"{EPOCHS} epochs, head only"
    )
    print(f"plain fit {t_plain:.1f} s, compare (cached prefix) {t_cached:.1f} s")
    print(f"speed-up = {t_plain / t_cached:.1f}x")


if __name__ == "__main__":
    main()
