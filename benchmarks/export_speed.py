"""Claim: the folded export infers faster than the unfolded frozen model.

For MobileNetV2 and ResNet50 (`weights=None`, randomised BN statistics, 128x128 inputs),
times `predict_on_batch` of the model with every BN frozen by `bnkit.freeze` against the
export written by `bnkit.export` (BN folded into the convolutions), at batch 1 and 32,
both in this run, median of REPEATS after a warm-up; prints unfolded / folded time ratios.

    KERAS_BACKEND=torch MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python benchmarks/export_speed.py
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/export_speed.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import bnkit

SIZE = 128
REPEATS = {1: 30, 32: 5}


def randomise_bn(model: keras.Model) -> None:
    rng = np.random.default_rng(0)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


def median_time(model: keras.Model, x: np.ndarray, repeats: int) -> float:
    model.predict_on_batch(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    print(f"backend {keras.backend.backend()}, {SIZE}x{SIZE} inputs, median of repeats")
    print("| model | batch | frozen, unfolded | folded export | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in ("MobileNetV2", "ResNet50"):
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, name)(weights=None, input_shape=(SIZE, SIZE, 3))
        randomise_bn(model)
        bnkit.freeze(model, bn="frozen")
        report = bnkit.export(model, folder / f"{name}.keras")
        folded = keras.models.load_model(folder / f"{name}.keras")
        for batch, repeats in REPEATS.items():
            x = np.random.default_rng(1).normal(size=(batch, SIZE, SIZE, 3)).astype("float32")
            t_model = median_time(model, x, repeats)
            t_folded = median_time(folded, x, repeats)
            print(
                f"| {name} ({report.folded}/{report.bn_layers} BN folded) | {batch} | "
                f"{t_model * 1e3:.1f} ms | {t_folded * 1e3:.1f} ms | {t_model / t_folded:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
