"""Claim: on a PyTorch module, `bnkit.adapt` costs at most 1.1x a plain no-grad forward
pass over the same data, and no peer is both faster and as exact.

Side by side in one run, on the same model and data: the forward pass (the floor),
`bnkit.adapt`, `torch.optim.swa_utils.update_bn`, and fvcore's `update_bn_stats`
(written out below: it is not installed). Each is timed RUNS times, interleaved; the
median and the range are printed, with each method's largest distance from the exact
population statistics (every BN normalising with its batch's statistics, as in
training, the moments of all its inputs computed in float64 on a float64 copy).

    .venv/bin/python benchmarks/adapt_torch.py

(the script re-executes itself with glibc's allocator told to keep memory: see README)
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

import numpy as np
import torch
from torch import nn

import bnkit

N, SIZE, BATCH, RUNS = 2048, 32, 64, 5


def residual_cnn() -> nn.Module:
    """A plain residual CNN with 7 BN layers."""

    class Block(nn.Module):
        def __init__(self, c_in: int, c: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.conv1(x)))
            return nn.functional.max_pool2d(torch.relu(x + self.bn2(self.conv2(x))), 2)

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 32), Block(32, 64), Block(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


def bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def forward_pass(model: nn.Module, loader: list[torch.Tensor]) -> None:
    model.eval()
    with torch.no_grad():
        for x in loader:
            model(x)


def swa_update_bn(model: nn.Module, loader: list[torch.Tensor]) -> None:
    torch.optim.swa_utils.update_bn(loader, model)


def fvcore_update_bn_stats(model: nn.Module, loader: list[torch.Tensor]) -> None:
    """fvcore.nn.precise_bn.update_bn_stats, written out: momentum 1, then each
    batch's statistics averaged into the result, weighted by batch size."""
    layers = bns(model)
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.momentum = 1.0
    mean = [torch.zeros_like(bn.running_mean) for bn in layers]
    var = [torch.zeros_like(bn.running_var) for bn in layers]
    seen = 0
    model.train()
    with torch.no_grad():
        for x in loader:
            model(x)
            seen += len(x)
            for i, bn in enumerate(layers):
                mean[i] += (bn.running_mean - mean[i]) * len(x) / seen
                var[i] += (bn.running_var - var[i]) * len(x) / seen
    for i, bn in enumerate(layers):
        bn.running_mean, bn.running_var, bn.momentum = mean[i], var[i], momenta[i]


def bnkit_adapt(model: nn.Module, loader: list[torch.Tensor]) -> None:
    bnkit.adapt(model, loader)


def exact(model: nn.Module, loader: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Population mean and variance of every BN's inputs, float64 throughout."""
    ref = copy.deepcopy(model).double().train()
    inputs: dict[int, list[np.ndarray]] = {}
    hooks = []
    for i, bn in enumerate(bns(ref)):
        bn.track_running_stats = False  # batch statistics, no update

        def keep(module: nn.Module, args: tuple, i: int = i) -> None:
            x = args[0].detach().numpy()
            inputs.setdefault(i, []).append(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1))

        hooks.append(bn.register_forward_pre_hook(keep))
    with torch.no_grad():
        for x in loader:
            ref(x.double())
    for h in hooks:
        h.remove()
    out = []
    for i in sorted(inputs):
        a = np.concatenate(inputs[i], axis=1)
        out.append((a.mean(axis=1), a.var(axis=1)))
    return out


def distance(model: nn.Module, reference: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Largest relative difference of any running mean or variance from the reference."""
    worst = 0.0
    for bn, (mean, var) in zip(bns(model), reference, strict=True):
        scale = np.sqrt(var) + 1e-12
        worst = max(worst, float(np.max(np.abs(bn.running_mean.double().numpy() - mean) / scale)))
        worst = max(worst, float(np.max(np.abs(bn.running_var.double().numpy() - var) / var)))
    return worst


def main() -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = residual_cnn()
    rng = np.random.default_rng(0)
    data = torch.as_tensor(rng.normal(size=(N, 3, SIZE, SIZE)).astype("float32"))
    loader = list(data.split(BATCH))
    methods = {
        "forward pass": forward_pass,
        "bnkit.adapt": bnkit_adapt,
        "swa_utils.update_bn": swa_update_bn,
        "fvcore update_bn_stats": fvcore_update_bn_stats,
    }
    copies = {name: copy.deepcopy(model) for name in methods}
    for name, fn in methods.items():  # warm up every path once
        fn(copies[name], loader[:2])
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(RUNS):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn(copies[name], loader)
            times[name].append(time.perf_counter() - t)
    reference = exact(model, loader)
    floor = statistics.median(times["forward pass"])
    print(f"torch {torch.__version__}, {N} images {SIZE}x{SIZE}, batch {BATCH}, 7 BN layers, "
          f"median of {RUNS} interleaved runs (range)")  # fmt: skip
    print(f"{'method':<24} {'img/s':>8} {'x forward':>10} {'range':>13} {'max rel. error':>15}")
    for name in methods:
        med = statistics.median(times[name])
        lo, hi = min(times[name]) / floor, max(times[name]) / floor
        err = "" if name == "forward pass" else f"{distance(copies[name], reference):.1e}"
        print(f"{name:<24} {N / med:>8,.0f} {med / floor:>10.2f} {lo:>6.2f}-{hi:<6.2f} {err:>15}")


if __name__ == "__main__":
    main()
