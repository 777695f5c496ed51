"""Claim (issue 23): re-estimating BN statistics after pruning (`bnkit.adapt`) recovers
at least half of the accuracy that 50% structured pruning loses, with no labels and no
training.

The demo's residual CNN pretrained on the source digits (PyTorch, and Keras on the
current KERAS_BACKEND) meets the source test images (20%). For each pruning: accuracy
before pruning, after it, and after re-estimating every BN layer's statistics on 512
unlabelled training images with `bnkit.adapt` (on PyTorch also with
`torch.optim.swa_utils.update_bn` on the same images). Pruning, by magnitude, of every
convolution:
- unstructured at 30, 50 and 70% (PyTorch: `torch.nn.utils.prune.l1_unstructured`, its
  masks and reparametrisation hooks kept in place; Keras: the smallest weights of each
  kernel set to zero);
- structured at 25 and 50% (PyTorch: torch-pruning's MetaPruner with L2 group
  magnitude, channels removed, BN layers shrunk with them, the classifier kept; Keras:
  the filters with the smallest L2 norms of each kernel set to zero, in place).
Seeds 0-2 are three models pretrained from those seeds (each on its seed's split).
"recovered" is (after - pruned) / (before - pruned) of the means over seeds.

`--model resnet18` (PyTorch) does the same with torchvision's resnet18 (`weights=None`,
10 classes) trained from scratch on each seed's source training split (Adam 1e-3, 15
epochs, batch 64, then its statistics re-estimated on the training images, as the demo
CNN's are). `--widths 64,128,256` trains the same CNN with 4 times the channels per layer
(16, 32, 64 by default), cached apart, to see how the recovery depends on width.

    .venv/bin/python benchmarks/bn_after_pruning.py [--framework torch|keras] [--seeds 3]
        [--widths 64,128,256] [--model resnet18]
"""

from __future__ import annotations

import argparse
import os
import sys

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

import numpy as np

import bnkit
from bnkit.data import digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits

CALIBRATION = 512
SETTINGS = (("unstructured", 0.3), ("unstructured", 0.5), ("unstructured", 0.7),
            ("structured", 0.25), ("structured", 0.5))  # fmt: skip


def accuracy(k, model, x, y) -> float:
    from bnkit.backends import get_backend

    out = get_backend(model).test_time().predict(model, k.images(x))
    return float((out.argmax(1) == y).mean())


def prune_torch(model, kind: str, amount: float) -> None:
    import torch

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if kind == "unstructured":
        from torch.nn.utils import prune

        for conv in convs:
            prune.l1_unstructured(conv, "weight", amount=amount)
        return
    import torch_pruning as tp

    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, torch.randn(1, 3, 32, 32), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=amount, ignored_layers=[last],
    )  # fmt: skip
    pruner.step()


def prune_keras(model, kind: str, amount: float) -> None:
    """Unstructured: the smallest weights of each kernel set to zero. Structured: the
    filters (output channels) of each kernel with the smallest L2 norms set to zero, the
    channels kept in place (Keras has no channel removal of its own)."""
    import keras

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Conv2D):
            w = np.asarray(keras.ops.convert_to_numpy(layer.kernel))
            if kind == "unstructured":
                cut = np.quantile(np.abs(w), amount)
                layer.kernel.assign(np.where(np.abs(w) <= cut, 0.0, w).astype(w.dtype))
                continue
            norms = np.sqrt((w**2).reshape(-1, w.shape[-1]).sum(0))
            dropped = np.argsort(norms)[: round(amount * w.shape[-1])]
            w[..., dropped] = 0.0
            layer.kernel.assign(w)


def trained_resnet18(k, seed: int):
    """torchvision's resnet18 trained from scratch on the seed's source training digits."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    x, y = digits("source", 32, seed).train
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    xs, ys = torch.as_tensor(k.images(x)), torch.as_tensor(y).long()
    for _ in range(15):
        model.train()
        order = torch.randperm(len(ys))
        for i in range(0, len(ys) - 1, 64):  # no batch of one for BN
            batch = order[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    bnkit.adapt(model, k.images(x))
    return model


def update_bn(k, model, x) -> None:
    import torch

    batches = [torch.as_tensor(k.images(x[i : i + 64])) for i in range(0, len(x), 64)]
    torch.optim.swa_utils.update_bn(batches, model)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", default="torch", choices=("torch", "keras"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--widths", default="")
    parser.add_argument("--model", default="digits", choices=("digits", "resnet18"))
    args = parser.parse_args()
    k = kit(args.framework)
    cache = None
    if args.widths:  # the demo CNN with other widths, pretrained and cached apart
        from bnkit import demo_keras, demo_torch
        from bnkit.pretrain import cache_dir

        demo_torch.WIDTHS = demo_keras.WIDTHS = tuple(int(w) for w in args.widths.split(","))
        cache = cache_dir() / f"widths-{args.widths.replace(',', '-')}"
    settings = list(SETTINGS)
    methods = ["before", "pruned", "adapt"] + (["update_bn"] if args.framework == "torch" else [])
    table = {s: {m: [] for m in methods} for s in settings}
    for seed in range(args.seeds):
        if args.model == "resnet18":
            start = trained_resnet18(k, seed)
        else:
            start = pretrained_digits(framework=args.framework, seed=seed, cache=cache).model
        d = digits("source", 32, seed)
        (xt, yt), xc = d.test, d.train[0][:CALIBRATION]
        before = accuracy(k, start, xt, yt)
        for kind, amount in settings:
            cells = table[kind, amount]
            cells["before"].append(before)
            model = k.clone(start)
            if args.framework == "torch":
                prune_torch(model, kind, amount)
            else:
                prune_keras(model, kind, amount)
            cells["pruned"].append(accuracy(k, model, xt, yt))
            pruned = model
            if "update_bn" in methods:
                other = k.clone(pruned)
                update_bn(k, other, xc)
                cells["update_bn"].append(accuracy(k, other, xt, yt))
            bnkit.adapt(pruned, k.images(xc))
            cells["adapt"].append(accuracy(k, pruned, xt, yt))
        print(f"seed {seed} done", flush=True)
    widths = args.widths or "as built"
    print(f"\n{k.version()}; {args.model}, widths {widths}; {args.seeds} seeds (mean ± std "
          "over seeds); source test images; "
          f"re-estimation on {CALIBRATION} unlabelled training images")  # fmt: skip
    print("pruning".ljust(20) + "".join(f"{m:>16}" for m in methods) + "  recovered (adapt)"
          + ("  recovered (update_bn)" if "update_bn" in methods else ""))  # fmt: skip
    for (kind, amount), cells in table.items():
        row = f"{kind} {amount:.0%}".ljust(20)
        row += "".join(f"{np.mean(v):9.1%} ± {np.std(v):4.1%}" for v in cells.values())
        for m in ("adapt", "update_bn"):
            if m in cells:
                lost = np.mean(cells["before"]) - np.mean(cells["pruned"])
                gained = np.mean(cells[m]) - np.mean(cells["pruned"])
                row += f"  {gained / lost:17.0%}" if lost > 0.005 else f"{'(no loss)':>19}"
        print(row)


if __name__ == "__main__":
    main()
