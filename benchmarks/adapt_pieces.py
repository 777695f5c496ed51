"""Where `bnkit.adapt`'s time goes beside `swa_utils.update_bn` (issue 31): the pieces
of its pass timed as ratios to one inference pass, interleaved, medians of `--runs`.

- `kernels`: each BN normalising with its batch's statistics through `F.batch_norm`
  from a bare Python closure that keeps the moment tensors: the floor of any exact
  estimator built on PyTorch modules;
- `pass`: bnkit's moments pass (`backend.moments_pass`) fed the batches as NumPy;
- `pass+data`: the same reading the batches through `bnkit.data` with its checks, and
  pooling the moments (`stats._collect`);
- `adapt`: `bnkit.adapt` whole (with its report and the statistics written);
- `swa_utils`: `torch.optim.swa_utils.update_bn`;
- `swa_utils CL`: the same fed the batches channels-last (as a user could), the layout
  `bnkit.adapt` now runs its pass in on a CPU.

Models as `bn_reestimators.py`: the 50% pruned resnet18 on 512 digits, or the digits
CNN on the first half of the gaussian-noise stream.

    .venv/bin/python benchmarks/adapt_pieces.py [--model resnet18|digits] [--runs 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

if "--no-aimet" not in sys.argv:  # bn_reestimators would re-run this in its AIMET venv
    sys.argv.append("--no-aimet")
from bn_reestimators import BN, forward_pass, loaders, pruned_resnet18, swa_update_bn

import bnkit
from bnkit import stats
from bnkit.corruptions import corrupted_digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits


def kernels(model: torch.nn.Module, loader: list) -> None:
    layers = [m for m in model.modules() if isinstance(m, BN)]
    kept: list = []
    for bn in layers:

        def forward(x, bn=bn, w=bn.weight, b=bn.bias, eps=bn.eps):
            mean, var = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
            out = F.batch_norm(x, mean, var, w, b, True, 1.0, eps)
            kept.append((mean, var))
            return out

        bn.forward = forward
    model.eval()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    for bn in layers:
        del bn.forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "digits"))
    parser.add_argument("--runs", type=int, default=30)
    args, _ = parser.parse_known_args()
    torch.set_num_threads(2)
    k = kit("torch")
    if args.model == "resnet18":
        start, calib, _ = pruned_resnet18(k, 0)
    else:
        start = pretrained_digits(framework="torch", seed=0).model.eval()
        x, y = corrupted_digits("gaussian_noise", 5, seed=0)
        order = np.random.default_rng(0).permutation(len(y))[: len(y) // 2]
        calib = (k.images(x[order]), y[order])
    loader = loaders(*calib, 0)["shuffled"]
    backend = bnkit.backends.get_backend(start)
    paths = backend.bn_paths(start)

    def moments(model: torch.nn.Module, loader: list) -> None:
        with backend.moments_pass(model, paths, normalize="batch") as run:
            for x, _ in loader:
                run(x.numpy())

    def collect(model: torch.nn.Module, loader: list) -> None:
        stats._collect(backend, model, paths, loader, "batch", 64, None, None)

    last = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in loader]
    pieces = {"inference": forward_pass, "kernels": kernels, "pass": moments,
              "pass+data": collect, "adapt": lambda m, d: bnkit.adapt(m, d),
              "swa_utils": swa_update_bn,
              "swa_utils CL": lambda m, d: swa_update_bn(m, last)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(args.runs):
        for name, piece in pieces.items():
            model = copy.deepcopy(start)
            t0 = time.perf_counter()
            piece(model, loader)
            times[name].append(time.perf_counter() - t0)
    floor = statistics.median(times["inference"])
    print(f"{args.model}: inference pass {floor * 1e3:.1f} ms over {len(loader)} batches")
    for name in pieces:
        print(f"{name:>10}: {statistics.median(times[name]) / floor:.3f} passes")


if __name__ == "__main__":
    main()
