"""Recalibrates `bnkit.shift`'s recommendation on the 15 ImageNet-C corruptions of the
embedded digits, at severities 1, 3 and 5.

The demo's residual CNN, pretrained on the source digits (cached), meets each corrupted
set (the source validation and test images, 719). Per corruption and severity: the model
shift score `bnkit.shift` gives on the unlabelled set, and the accuracy on the images
left after taking 10 labelled images per class (619) of
- the source model (frozen);
- label-free: `adapt` (statistics re-estimated on all 719 unlabelled images) and TENT
  with guards (`bnkit.tta`, batch 64, an i.i.d. stream, seed 0);
- with the 100 labels: `adapt`, then `bnkit.compare` of BN `frozen` against BN `train`
  (whole network, 15 epochs, Adam 1e-3, batch 20, seeds 0 and 1).

    .venv/bin/python benchmarks/shift_corruptions.py [--framework torch|keras]
        [--severities 1,3,5] [--corruptions gaussian_noise,fog]
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

import bnkit
from bnkit.corruptions import CORRUPTIONS, corrupted_digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits

LABELS_PER_CLASS = 10
EPOCHS, BATCH, LR, SEEDS = 15, 20, 1e-3, 2


def labelled(y: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), LABELS_PER_CLASS, replace=False)
             for c in range(10)]  # fmt: skip
    mask = np.zeros(len(y), bool)
    mask[np.concatenate(picks)] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", default="torch", choices=("torch", "keras"))
    parser.add_argument("--severities", default="1,3,5")
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    args = parser.parse_args()
    k = kit(args.framework)
    net = pretrained_digits(framework=args.framework)
    t0 = time.perf_counter()
    cols = ("shift", "source", "adapt", "tent", "ft frozen", "ft train")
    print(f"{k.version()}; accuracy on the 619 unlabelled-for-scoring images; fine-tunes "
          f"on {LABELS_PER_CLASS} labels per class, mean over {SEEDS} seeds")  # fmt: skip
    print("corruption".ljust(18) + "sev" + "".join(f"{c:>11}" for c in cols), flush=True)
    for severity in [int(s) for s in args.severities.split(",")]:
        for c in [c for c in args.corruptions.split(",") if c]:
            raw, y = corrupted_digits(c, severity)
            x = k.images(raw)  # the framework's layout, for bnkit
            mask = labelled(y)
            rest = (x[~mask], y[~mask])
            scored = (raw[~mask], y[~mask])  # k.accuracy takes NHWC images
            score = bnkit.shift(net.model, x).score
            source = k.accuracy(net.model, *scored)
            adapted = k.clone(net.model)
            bnkit.adapt(adapted, x)
            adapt = k.accuracy(adapted, *scored)
            order = np.random.default_rng(0).permutation(len(y))
            tented = k.clone(net.model)
            bnkit.tta(tented, x[order], "tent", batch_size=64)
            tent = k.accuracy(tented, *scored)
            result = bnkit.compare(adapted, (x[mask], y[mask]), rest, ["frozen", "train"],
                                   epochs=EPOCHS, seeds=SEEDS, batch_size=BATCH, lr=LR)  # fmt: skip
            ft = {s.strategy: s.val_accuracy_mean for s in result.summaries}
            row = (score, source, adapt, tent, ft["frozen"], ft["train"])
            print(c.ljust(18) + f"{severity:3d}" + f"{row[0]:11.3f}"
                  + "".join(f"{v:11.1%}" for v in row[1:]), flush=True)  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
