"""Claim: `bnkit.fold` on a PyTorch module speeds up inference as much as
`torch.fx.experimental.optimization.fuse` does, folds at least as many BN layers, and
says why it kept the others (fx's fuse skips them silently).

For torchvision `mobilenet_v3_small`, `resnet18` and `densenet121` (weights=None, randomised BN
statistics, 64x64 inputs, eval mode), at batch 1 and 32: inference time of the original,
of `bnkit.fold(...).model` and of fx's `fuse(...)`, each the median of RUNS interleaved
timings (range printed), and each copy's largest output difference from the original.

    .venv/bin/python benchmarks/fold_torch.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

import bnkit

SIZE, RUNS, REPEATS = 64, 7, {1: 40, 32: 4}


def randomise(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def timed(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(repeats):
            model(x)
        return (time.perf_counter() - t) / repeats


def main() -> None:
    print(f"torch {torch.__version__}, {SIZE}x{SIZE} inputs, eval mode, median of {RUNS} "
          "interleaved runs (range, relative to the original)")  # fmt: skip
    for name in ("mobilenet_v3_small", "resnet18", "densenet121"):
        model = getattr(torchvision.models, name)(weights=None).eval()
        randomise(model)
        ours = bnkit.fold(model, input_shape=(3, SIZE, SIZE))
        theirs = fuse(model)
        total = bn_count(model)
        print(f"\n{name}: {total} BN layers; bnkit folds {len(ours.folded)} and keeps "
              f"{len(ours.kept)}; fx fuse folds {total - bn_count(theirs)} and leaves "
              f"{bn_count(theirs)} without a word")  # fmt: skip
        for batch in (1, 32):
            x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                want = model(x)
                diff = {
                    "bnkit.fold": float((ours.model(x) - want).abs().max()),
                    "fx fuse": float((theirs(x) - want).abs().max()),
                }
            models = {"original": model, "bnkit.fold": ours.model, "fx fuse": theirs}
            for m in models.values():
                timed(m, x, 2)
            times: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(RUNS):
                for k, m in models.items():
                    times[k].append(timed(m, x, REPEATS[batch]))
            base = statistics.median(times["original"])
            for k in models:
                med = statistics.median(times[k])
                lo, hi = min(times[k]) / base, max(times[k]) / base
                d = f", max |diff| {diff[k]:.1e}" if k in diff else ""
                print(f"  batch {batch:>2} {k:<10} {med * 1e3:7.2f} ms  speed-up "
                      f"{base / med:4.2f}x ({1 / hi:.2f}-{1 / lo:.2f}){d}")  # fmt: skip


if __name__ == "__main__":
    main()
