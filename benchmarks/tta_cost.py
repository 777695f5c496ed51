"""Claim: one TENT step costs at most 3.5 inference passes at batch 64 (issue 12's goal);
the guards add two inference passes (the reference's statistics pass and its prediction).

For the demo's residual CNN (9 BN) and torchvision resnet18 (20 BN), 32x32 inputs, batch
64, PyTorch: the median over RUNS interleaved timings of an inference pass (eval,
no_grad), of bnkit's TENT step (forward with BN on batch statistics, entropy, backward,
Adam on gamma/beta), and of the guard's extra inference pass. With `--framework keras`
the digits CNN as a Keras model on the current KERAS_BACKEND.

    .venv/bin/python benchmarks/tta_cost.py [--framework torch|keras]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

import numpy as np

from bnkit.backends import get_backend
from bnkit.demo import kit

BATCH, RUNS, REPEATS = 64, 7, 5


def timed(fn, x) -> float:
    t = time.perf_counter()
    for _ in range(REPEATS):
        fn(x)
    return (time.perf_counter() - t) / REPEATS


def measure(name: str, model, x: np.ndarray) -> None:
    adapter = get_backend(model).test_time()
    adapter.prepare(model, 1e-3, "adam")
    for _ in range(2):  # warm-up
        adapter.step(model, x)
        adapter.predict(model, x)
    infer, step = [], []
    for _ in range(RUNS):
        infer.append(timed(lambda b: adapter.predict(model, b), x))
        step.append(timed(lambda b: adapter.step(model, b), x))
    adapter.finish(model)
    ratios = [s / i for s, i in zip(step, infer, strict=True)]
    ri = statistics.median(infer)
    rs = statistics.median(step)
    print(f"{name:28s} inference {ri * 1e3:7.1f} ms  TENT step {rs * 1e3:7.1f} ms  "
          f"ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}); "
          f"with guards {statistics.median(ratios) + 2:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", default="torch", choices=("torch", "keras"))
    args = parser.parse_args()
    k = kit(args.framework)
    x = np.random.default_rng(0).random((BATCH, 32, 32, 3)).astype("float32")
    print(f"{k.version()}, batch {BATCH}, 32x32, median of {RUNS} interleaved runs (range)")
    k.seed_everything(0)
    measure("digits residual CNN", k.digits_resnet(32, 10), k.images(x))
    if args.framework == "torch":
        import torchvision

        measure("torchvision resnet18", torchvision.models.resnet18(weights=None), k.images(x))


if __name__ == "__main__":
    main()
