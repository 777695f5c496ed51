"""How `robust` tells the domains of a mixed stream apart (issue 34): the variants
measured before choosing, on the corruption benchmark's stream that mixes all 15
corruptions at severity 5 (PyTorch, the demo's CNN, batch 64).

Each variant splits every batch into groups, adds each group's input moments (BN
normalising with the group's own statistics, as `adapt` does) to its group's
statistics over the stream so far, and predicts the group's images with them (with the
whole stream's while the group holds fewer than 64 images); no LAME here, so the
variants differ only in how the images are grouped:

- `bn-1`: no grouping, each batch normalised with its own statistics (the simplest
  baseline of the TTA literature);
- `stream`: one group, the statistics of the whole stream so far (`robust` before);
- `oracle`: grouped by the true corruption: the ceiling of per-domain statistics;
- `first-bn-0.5`: grouped by each image's statistics at the input of the first BN
  layer (per channel: mean and log variance against the source statistics, UnMix-TNS's
  instance statistics), a new group beyond a mean squared difference of 0.5;
- `pixels-1.0`, `pixels-0.5`, `pixels-0.3`: grouped by `bnkit.domains`' pixel
  statistics (no model needed, the same on every backend) at those thresholds.

`--single` runs the grouping variants on each corruption alone (class-sorted and
Dirichlet streams) too: one domain must not lose against `stream`.

    .venv/bin/python benchmarks/tta_domains.py [--variants ...] [--single] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from tta_corruptions import BATCH, stream

import bnkit
import bnkit.domains as domains_module
from bnkit.corruptions import CORRUPTIONS, corrupted_digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits
from bnkit.stats import OnlineAdapt

VARIANTS = ("bn-1", "stream", "oracle", "first-bn-0.5", "pixels-1.0", "pixels-0.5",
            "pixels-0.3")  # fmt: skip
MIN = 64


def first_bn_features(source: Any, x: np.ndarray) -> np.ndarray:
    """Per image and channel of the first BN layer's input: the mean in units of the
    source's standard deviation and the log variance against the source's."""
    bn = next(m for m in source.modules() if isinstance(m, torch.nn.BatchNorm2d))
    got = []
    hook = bn.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().double()))
    with torch.no_grad():
        source.eval()
        source(torch.as_tensor(x))
    hook.remove()
    a, mean, var = got[0], bn.running_mean.double(), bn.running_var.double()
    mu = (a.mean((2, 3)) - mean) / var.sqrt()
    spread = (a.var((2, 3)) + 1e-5).log() - var.log()
    return torch.cat([mu, spread], 1).numpy()


class Leader:
    """Each image joins the nearest group's centre within `threshold` (mean squared
    difference), else starts a group: `bnkit.domains.Domains` on other features."""

    def __init__(self, threshold: float) -> None:
        self.threshold, self.centres, self.counts = threshold, [], []

    def assign(self, features: np.ndarray) -> np.ndarray:
        ids = np.empty(len(features), int)
        for i, f in enumerate(features):
            d = ((np.array(self.centres) - f) ** 2).mean(1) if self.centres else None
            if d is None or d.min() > self.threshold:
                self.centres.append(f.copy())
                self.counts.append(0)
                ids[i] = len(self.centres) - 1
            else:
                ids[i] = int(d.argmin())
            self.counts[ids[i]] += 1
            self.centres[ids[i]] += (f - self.centres[ids[i]]) / self.counts[ids[i]]
        return ids


def run(variant: str, net: Any, x: np.ndarray, y: np.ndarray, truth: np.ndarray) -> tuple:
    k = kit("torch")
    model, source = k.clone(net), k.clone(net)
    backend = bnkit.backends.get_backend(model)
    adapter = backend.test_time()
    if variant == "bn-1":
        hits = 0
        for i in range(0, len(y), BATCH):
            model.train()
            with torch.no_grad():
                out = model(torch.as_tensor(x[i : i + BATCH])).numpy()
            hits += int((out.argmax(1) == y[i : i + BATCH]).sum())
        return hits / len(y), 1
    whole = OnlineAdapt(model)
    own: dict[int, OnlineAdapt] = {}
    counts: dict[int, int] = {}
    if variant.startswith("pixels-"):
        domains_module.NEW_DOMAIN = float(variant.split("-")[1])
        pixels = domains_module.Domains(channels_first=True)
    elif variant.startswith("first-bn-"):
        leader = Leader(float(variant.split("-")[2]))
    hits = 0
    for i in range(0, len(y), BATCH):
        xb, yb = x[i : i + BATCH], y[i : i + BATCH]
        if variant == "stream":
            ids = np.zeros(len(xb), int)
        elif variant == "oracle":
            ids = truth[i : i + BATCH]
        elif variant.startswith("pixels-"):
            ids = pixels.assign(xb)
        else:
            ids = leader.assign(first_bn_features(source, xb))
        whole.update(xb, write=False)
        for d in np.unique(ids):
            idx = np.flatnonzero(ids == d)
            counts[d] = counts.get(d, 0) + len(idx)
            stats = own.setdefault(int(d), OnlineAdapt(model))
            if len(idx) > 1:
                stats.update(xb[idx], write=False)
            (stats if counts[d] >= MIN and not stats.empty else whole).write()
            hits += int((adapter.predict(model, xb[idx]).argmax(1) == yb[idx]).sum())
    return hits / len(y), len(own)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    k = kit("torch")
    net = pretrained_digits(framework="torch").model
    sets = {c: corrupted_digits(c, 5) for c in CORRUPTIONS}
    xs = np.concatenate([sets[c][0] for c in CORRUPTIONS])
    ys = np.concatenate([sets[c][1] for c in CORRUPTIONS])
    kinds = np.concatenate([np.full(len(sets[c][1]), i) for i, c in enumerate(CORRUPTIONS)])
    order = np.random.default_rng(args.seed).permutation(len(ys))
    x, y, truth = k.images(xs[order]), ys[order], kinds[order]
    variants = args.variants.split(",")
    print(f"{k.version()}; the 15 corruptions at severity 5 mixed ({len(y)} images), "
          f"batch {BATCH}, seed {args.seed}")  # fmt: skip
    for variant in variants:
        t = time.perf_counter()
        acc, groups = run(variant, net, x, y, truth)
        print(f"{variant:>14}: {acc:.1%} ({groups} groups, {time.perf_counter() - t:.0f} s)",
              flush=True)  # fmt: skip
    if not args.single:
        return
    grouping = [v for v in variants if v.startswith(("pixels-", "first-bn-", "stream"))]
    print("\none corruption alone: accuracy (groups)")
    print("corruption".ljust(32) + "".join(f"{v:>16}" for v in grouping))
    for name in CORRUPTIONS:
        for kind in ("sorted", "dirichlet"):
            xs1, ys1 = stream(*sets[name], args.seed, kind)
            cells = [run(v, net, k.images(xs1), ys1, np.zeros(len(ys1), int)) for v in grouping]
            print(f"{name} {kind}".ljust(32)
                  + "".join(f"{f'{a:.1%} ({g})':>16}" for a, g in cells), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
