"""Claim: a head-only fine-tune through `bnkit.compare` on a PyTorch module is at least 10x
faster than the plain PyTorch training loop with the same frozen backbone, because the
frozen prefix runs once and training uses its cached outputs.

torchvision `resnet18` (weights=None), 64x64 inputs, 2,048 training and 512 validation
images, 20 epochs, batch 32, Adam at 1e-3, a new 4-class head. The plain loop is what a
PyTorch user writes: `requires_grad=False` on the backbone, the BN layers put in eval
mode after `model.train()`, the whole model called on every batch, the validation set
evaluated after every epoch (as compare does). Both runs are timed in this process, one
after the other; the final validation accuracies are printed to show they train alike.

    .venv/bin/python benchmarks/compare_torch.py [--epochs 20] [--images 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

import numpy as np
import torch
import torchvision
from torch import nn

import bnkit

SIZE, CLASSES, BATCH, LR, VAL = 64, 4, 32, 1e-3, 512


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class sets the mean of one colour channel: learnable from features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0, 1, (n, 3, SIZE, SIZE)).astype("float32")
    x[np.arange(n), y % 3] += 0.5 + 0.5 * (y // 3)[:, None, None]
    return x, y


def plain_loop(model: nn.Module, train, val, epochs: int) -> float:
    """The usual head-only loop; returns the final validation accuracy."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc = nn.Linear(model.fc.in_features, CLASSES)
    opt = torch.optim.Adam(model.fc.parameters(), lr=LR)
    x, y = torch.as_tensor(train[0]), torch.as_tensor(train[1])
    xv, yv = torch.as_tensor(val[0]), torch.as_tensor(val[1])
    g = torch.Generator().manual_seed(0)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            b = order[i : i + BATCH]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(xv[i : i + 256]).argmax(1) == yv[i : i + 256]).sum())
                       for i in range(0, len(xv), 256))  # fmt: skip
        acc = hits / len(xv)
    return acc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--images", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train, val = data(args.images, 0), data(VAL, 1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    t = time.perf_counter()
    result = bnkit.compare(model, train, val, ["frozen"], epochs=args.epochs, seeds=1,
                           batch_size=BATCH, lr=LR, train_from="fc")  # fmt: skip
    bnkit_s = time.perf_counter() - t
    run = result.runs[0]
    t = time.perf_counter()
    plain_acc = plain_loop(model, train, val, args.epochs)
    plain_s = time.perf_counter() - t
    print(f"torch {torch.__version__}, resnet18 {SIZE}x{SIZE}, {args.images} images, "
          f"{args.epochs} epochs, batch {BATCH}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"bnkit.compare (prefix cached: {run.cached_prefix}): {bnkit_s:7.1f} s, "
          f"val accuracy {run.final_val_accuracy:.1%}")  # fmt: skip
    print(f"plain PyTorch loop:                  {plain_s:7.1f} s, val accuracy {plain_acc:.1%}")
    print(f"speed-up: {plain_s / bnkit_s:.1f}x (claim: at least 10x)")


if __name__ == "__main__":
    main()
