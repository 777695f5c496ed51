"""Claim: bnkit's TENT matches a straight implementation of the published algorithm in
accuracy within 0.5 points on the same stream (issue 12).

The reference below is the TENT repository's (github.com/DequanWang/tent, tent.py)
`configure_model` (train mode, gradients only on BN's affine parameters, BN without
running statistics so it normalises with the batch's), `collect_params` and
`forward_and_adapt` (predict, entropy, backward, step), with its CIFAR optimiser
(Adam, 1e-3, betas (0.9, 0.999), one step per batch). For each of the 15 corruptions at
severity 5, both adapt the demo's pretrained PyTorch residual CNN on the same i.i.d.
stream (batch 64, seed 0); the accuracies are those of each batch's predictions made
before its update, as TENT scores them.

    .venv/bin/python benchmarks/tta_parity.py
"""

from __future__ import annotations

import os
import sys
import time

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

import numpy as np
import torch
from torch import nn

import bnkit
from bnkit.corruptions import CORRUPTIONS, corrupted_digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits

BATCH = 64


def configure_model(model: nn.Module) -> nn.Module:
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def collect_params(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for name, p in m.named_parameters():
                if name in ("weight", "bias"):
                    params.append(p)
    return params


def softmax_entropy(x: torch.Tensor) -> torch.Tensor:
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


@torch.enable_grad()
def forward_and_adapt(x: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer):
    outputs = model(x)
    loss = softmax_entropy(outputs).mean(0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return outputs


def reference(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model = configure_model(model)
    optimizer = torch.optim.Adam(collect_params(model), lr=1e-3, betas=(0.9, 0.999))
    hits = 0
    for i in range(0, len(x), BATCH):
        out = forward_and_adapt(torch.as_tensor(x[i : i + BATCH]), model, optimizer)
        hits += int((out.argmax(1).numpy() == y[i : i + BATCH]).sum())
    return hits / len(y)


def main() -> None:
    k = kit("torch")
    net = pretrained_digits(framework="torch")
    t0 = time.perf_counter()
    print(f"{k.version()}; severity 5, i.i.d. stream (seed 0), batch {BATCH}")
    print(f"{'corruption':18s}{'reference':>11}{'bnkit':>9}{'diff':>8}{'guards':>9}")
    diffs = []
    for c in CORRUPTIONS:
        x, y = corrupted_digits(c, 5)
        order = np.random.default_rng(0).permutation(len(y))
        x, y = k.images(x)[order], y[order]
        ref = reference(k.clone(net.model), x, y)
        # the stream's last, short batch (15 images) is adapted on by the reference and
        # only predicted by bnkit (min_batch_size 16): lower the minimum to match it
        mine = bnkit.tta(k.clone(net.model), (x, y), "tent", batch_size=BATCH, guard=False,
                         min_batch_size=1).accuracy  # fmt: skip
        guarded = bnkit.tta(k.clone(net.model), (x, y), "tent", batch_size=BATCH).accuracy
        diffs.append(abs(mine - ref))
        print(f"{c:18s}{ref:11.1%}{mine:9.1%}{mine - ref:+8.1%}{guarded:9.1%}", flush=True)
    print(f"largest difference {max(diffs):.2%} (claim: at most 0.5 points); "
          f"total {time.perf_counter() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
