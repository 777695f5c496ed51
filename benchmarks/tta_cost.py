"""Claim: TENT with its guards costs at most 3.5 inference passes per batch at batch 64
(issue 21's goal), TENT without guards at most 3.5 (issue 12's), `robust` at most 3.5
(issue 22's).

The stream: the demo digits at severity 5 of one corruption (gaussian noise), 719
images shuffled nine times over (the first 6,464 images: 101 batches of 64), i.i.d.,
through `bnkit.tta` as a user runs it, on the demo's residual CNN pretrained on the
source digits (and, on PyTorch, torchvision resnet18 trained from scratch on them, as
benchmarks/bn_after_pruning.py trains it). A batch's cost is the time `bnkit.tta`
spends on it (its `BatchRecord.seconds`: the guards' reference pass, the TENT step, the
checks) over an inference pass of the same model on the same batch (compiled as `tta`
compiles it; the median over the stream), timed in the same run. Reported: the mean
over the full batches after the first two (tracing); with guards also over the first
`window` batches (8: all checked), over batches 8-31 (the gap between checks growing:
checks at 8, 10, 14 and 22 when all are calm) and over every batch after the window
(the gap up to 16), with the number of checks after the window; `robust` over the
batches after the first two and over those after the window; the median of RUNS
interleaved runs (their range in brackets). The re-estimation that `tta` runs once
after the stream (one statistics pass per batch, with its tracing) is reported apart.

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

import bnkit
from bnkit.backends import get_backend
from bnkit.corruptions import corrupted_digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits
from bnkit.stats import OnlineAdapt
from bnkit.tta import WINDOW

BATCH, RUNS, SKIP, SHUFFLES = 64, 5, 2, 9


def inference_seconds(model, batches) -> float:
    adapter = get_backend(model).test_time()
    adapter.prepare(model, 1e-3, "adam")  # compiled inference on TensorFlow and JAX, as tta's
    adapter.predict(model, batches[0])  # warm-up (tracing)
    times = []
    for b in batches:
        t = time.perf_counter()
        adapter.predict(model, b)
        times.append(time.perf_counter() - t)
    adapter.finish(model)
    return statistics.median(times)


def tta_seconds(
    k, start, x, y, guard: bool, method: str = "tent", checks: list[float] | None = None
) -> tuple[list[float], float]:
    """The seconds of each full batch, and the whole call's seconds less the batches'
    (the re-estimation after the stream); `checks` gets the number of checks after the
    window."""
    model = k.clone(start)
    update = OnlineAdapt.update
    counted: list[int] = []

    def counting(self, batch, **kwargs):
        counted.append(1)
        return update(self, batch, **kwargs)

    OnlineAdapt.update = counting  # type: ignore[method-assign]
    try:
        t = time.perf_counter()
        report = bnkit.tta(model, (x, y), method, batch_size=BATCH, guard=guard)
    finally:
        OnlineAdapt.update = update  # type: ignore[method-assign]
    total = time.perf_counter() - t
    full = [b.seconds for b in report.batches if b.size == BATCH]
    if checks is not None:
        checks.append(len(counted) - WINDOW)
    return full, total - sum(b.seconds for b in report.batches)


def measure(name: str, k, start, x, y) -> None:
    batches = [x[i : i + BATCH] for i in range(0, len(x) - BATCH + 1, BATCH)]
    ratios: dict[str, list[float]] = {
        "plain": [], "guards": [], "first 8": [], "8-31": [], "after": [], "settle": [],
        "robust": [], "robust after": [], "checks": [],
    }  # fmt: skip
    infer = []
    for _ in range(RUNS):
        i = inference_seconds(k.clone(start), batches)
        infer.append(i)
        plain, settle = tta_seconds(k, start, x, y, guard=False)
        guarded, _ = tta_seconds(k, start, x, y, guard=True, checks=ratios["checks"])
        ratios["plain"].append(statistics.mean(plain[SKIP:]) / i)
        ratios["guards"].append(statistics.mean(guarded[SKIP:]) / i)
        ratios["first 8"].append(statistics.mean(guarded[SKIP:WINDOW]) / i)
        ratios["8-31"].append(statistics.mean(guarded[WINDOW:32]) / i)
        ratios["after"].append(statistics.mean(guarded[WINDOW:]) / i)
        ratios["settle"].append(settle / i / len(batches))
        robust, _ = tta_seconds(k, start, x, y, guard=True, method="robust")
        ratios["robust"].append(statistics.mean(robust[SKIP:]) / i)
        ratios["robust after"].append(statistics.mean(robust[WINDOW:]) / i)
    checks = ratios.pop("checks")
    cells = "  ".join(
        f"{key} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for key, v in ratios.items()
    )
    cells += f"  checks after the window {min(checks):.0f}-{max(checks):.0f}"
    print(f"{name:22s} inference {statistics.median(infer) * 1e3:5.1f} ms  {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", default="torch", choices=("torch", "keras"))
    args = parser.parse_args()
    k = kit(args.framework)
    x, y = corrupted_digits("gaussian_noise", 5)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(y)) for _ in range(SHUFFLES)])
    order = order[: len(order) // BATCH * BATCH]  # full batches only
    x, y = k.images(x[order]), y[order]
    print(f"{k.version()}, batch {BATCH}, {len(y)} images 32x32, inference passes per "
          f"batch: median of {RUNS} interleaved runs (range); settle: the re-estimation "
          "after the stream")  # fmt: skip
    net = pretrained_digits(framework=args.framework)
    measure("digits residual CNN", k, net.model, x, y)
    if args.framework == "torch":
        from bn_after_pruning import trained_resnet18

        measure("torchvision resnet18", k, trained_resnet18(k, 0), x, y)


if __name__ == "__main__":
    main()
