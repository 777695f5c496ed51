"""Why `robust` is what it is (issue 22): the normalisations and corrections measured
before choosing, on the corruption benchmark's streams (PyTorch, the demo's CNN, batch
64, seed 0 by default).

- `online`: each batch predicted with the statistics of the stream so far, this batch
  included (OnlineAdapt, what `robust` normalises with), no correction;
- `rbn-memory`: RoTTA's robust BN on bnkit's moments: a category-balanced memory of 64
  samples (RoTTA's CSTU, pseudo-labels from the model), and after each batch every BN
  layer's statistics moved towards the memory's by alpha 0.05 from the source
  statistics; then the batch predicted;
- `rbn-memory-warm`: the same with alpha max(0.05, 1/k) at the k-th update (a running
  mean at first), for streams far shorter than RoTTA's;
- `tent-online`: TENT's entropy step on BN gamma/beta, normalising with the stream's
  statistics so far instead of the batch's, with `robust`'s correction;
- `robust`: `bnkit.tta(..., "robust")`.

    .venv/bin/python benchmarks/tta_variants.py [--seeds 1] [--corruptions fog,snow]
        [--streams iid,sorted,dirichlet]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rotta_reference import CSTU
from tta_corruptions import BATCH, stream

import bnkit
from bnkit.backends import get_backend
from bnkit.corruptions import CORRUPTIONS, corrupted_digits
from bnkit.demo import kit
from bnkit.stats import Moments, OnlineAdapt
from bnkit.tta import _label_shift, lame

ALPHA, MEMORY = 0.05, 64
VARIANTS = ("adapt", "online", "rbn-memory", "rbn-memory-warm", "tent-online", "robust")


def softmax(o: np.ndarray) -> np.ndarray:
    e = np.exp(o - o.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def bn_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


def run(variant: str, model, x: np.ndarray, y: np.ndarray) -> float:
    backend = get_backend(model)
    adapter = backend.test_time()
    if variant == "robust":
        return float(bnkit.tta(model, (x, y), "robust", batch_size=BATCH).accuracy)
    if variant == "adapt":
        return float(bnkit.tta(model, (x, y), "adapt", batch_size=BATCH).accuracy)
    hits = 0
    if variant == "online":
        online = OnlineAdapt(model)
        for i in range(0, len(y), BATCH):
            online.update(x[i : i + BATCH])
            hits += int(
                (adapter.predict(model, x[i : i + BATCH]).argmax(1) == y[i : i + BATCH]).sum()
            )
        return hits / len(y)
    if variant.startswith("rbn-memory"):
        paths = bn_paths(model)
        modules = dict(model.named_modules())
        memory = CSTU(MEMORY, 10)  # RoTTA's own, from the reference
        for k, i in enumerate(range(0, len(y), BATCH), start=1):
            xb = x[i : i + BATCH]
            p = softmax(adapter.predict(model, xb))
            entropy = -(p * np.log(p + 1e-6)).sum(1)
            for j in range(len(xb)):
                memory.add(xb[j], int(p[j].argmax()), float(entropy[j]))
            a = max(ALPHA, 1 / k) if variant.endswith("warm") else ALPHA
            with backend.moments_pass(model, paths, normalize="running") as moments:
                got = moments(np.stack(memory.memory()[0]))
            new = {}
            for path in paths:
                bn = modules[path]
                mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
                new[path] = {"mean": (1 - a) * mean + a * got[path][0],
                             "var": (1 - a) * var + a * got[path][1]}  # fmt: skip
            backend.set_bn_stats(model, new)
            hits += int((adapter.predict(model, xb).argmax(1) == y[i : i + BATCH]).sum())
        return hits / len(y)
    if variant == "tent-online":
        online = OnlineAdapt(model)
        params = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                  for p in m.parameters()]  # fmt: skip
        trained = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
        seen, shifted, run_ = Moments(), False, 0
        for i in range(0, len(y), BATCH):
            xb = x[i : i + BATCH]
            online.update(xb)
            model.eval()  # BN normalises with the stream's statistics; gamma/beta learn
            out = model(torch.as_tensor(xb))
            loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            o = out.detach().numpy()
            run_ = run_ + 1 if _label_shift(o, seen) else 0
            shifted = shifted or run_ >= 2
            seen.add(o.mean(0), o.var(0), len(o))
            hits += int(((lame(o) if shifted else o).argmax(1) == y[i : i + BATCH]).sum())
        return hits / len(y)
    raise ValueError(variant)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    parser.add_argument("--streams", default="iid,sorted,dirichlet")
    args = parser.parse_args()
    names = [c for c in args.corruptions.split(",") if c]
    k = kit("torch")
    from bnkit.pretrain import pretrained_digits

    net = pretrained_digits(framework="torch")
    print(f"{k.version()}; {len(names)} corruptions at severity 5, batch {BATCH}, "
          f"{args.seeds} seed(s); mean accuracy over the corruptions")  # fmt: skip
    print("stream".ljust(12) + "".join(f"{v:>17}" for v in VARIANTS))
    sets = {c: corrupted_digits(c, 5) for c in names}
    for kind in args.streams.split(","):
        cells = []
        for variant in VARIANTS:
            accs = [run(variant, k.clone(net.model), k.images(xs), ys)
                    for c in names for s in range(args.seeds)
                    for xs, ys in [stream(*sets[c], s, kind)]]  # fmt: skip
            cells.append(f"{np.mean(accs):17.1%}")
        print(kind.ljust(12) + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
