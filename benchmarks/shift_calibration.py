"""Calibrates `bnkit.shift`'s recommendation thresholds by experiment on the embedded digits.

For pretrained digit models (one per seed) and target domains blended between the source
digits (alpha 0) and the MNIST-M-style target (alpha 1), it measures the model shift score
and what each BN treatment gives on the blend's test split:
- frozen: source statistics, no labels;
- adapt: statistics re-estimated on the blend's unlabelled training images;
- fine-tunes on LABELS_PER_CLASS labelled images per class, whole network, same steps:
  `adapt+frozen` (re-estimate, then BN frozen) and `train` (BN in train mode).
The threshold for "adapt" is the smallest measured score whose adapt gain exceeds one
standard deviation over seeds; the one for "train" the smallest where BN training beats
adapt+frozen by more than that spread.

    KERAS_BACKEND=torch .venv/bin/python benchmarks/shift_calibration.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import bnkit
from bnkit.data import digits
from bnkit.demo_keras import accuracy, train_classifier
from bnkit.pretrain import pretrained_digits

SEEDS = (0, 1, 2)
ALPHAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
LABELS_PER_CLASS = 10
EPOCHS, BATCH, LR = 15, 20, 1e-3


def few_labels(x: np.ndarray, y: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False) for c in range(10)])
    return x[idx], y[idx]


def fine_tune(path: Path, x_unl, xl, yl, xt, yt, bn: str, seed: int) -> float:
    model = keras.models.load_model(path)
    if bn == "frozen":
        bnkit.adapt(model, x_unl)
    bnkit.freeze(model, bn=bn)
    train_classifier(model, xl, yl, epochs=EPOCHS, batch_size=BATCH, seed=seed, lr=LR)
    return accuracy(model, xt, yt)


def main() -> None:
    rows = []
    work = Path(tempfile.mkdtemp())
    for seed in SEEDS:
        src, tgt = digits("source", seed=seed), digits("target", seed=seed)
        net = pretrained_digits(seed=seed)
        start = work / f"start{seed}.keras"
        net.model.save(start)
        for alpha in ALPHAS:
            blend = [
                (1 - alpha) * s[0] + alpha * t[0]
                for s, t in zip((src.train, src.test), (tgt.train, tgt.test), strict=True)
            ]
            x_unl, xt, yt = blend[0], blend[1], src.test[1]
            model = keras.models.load_model(start)
            score = bnkit.shift(model, x_unl).score
            frozen = accuracy(model, xt, yt)
            bnkit.adapt(model, x_unl)
            adapted = accuracy(model, xt, yt)
            xl, yl = few_labels(x_unl, src.train[1], LABELS_PER_CLASS, seed)
            ft_frozen = fine_tune(start, x_unl, xl, yl, xt, yt, "frozen", seed)
            ft_train = fine_tune(start, x_unl, xl, yl, xt, yt, "train", seed)
            rows.append((seed, alpha, score, frozen, adapted, ft_frozen, ft_train))
            print(
                f"seed {seed} alpha {alpha:.2f}: shift {score:.3f}  frozen {frozen:.3f}  "
                f"adapt {adapted:.3f}  ft adapt+frozen {ft_frozen:.3f}  ft train {ft_train:.3f}",
                flush=True,
            )
    table = np.array(rows)
    print(f"\nmean over seeds {SEEDS} ({keras.backend.backend()} backend):")
    print(
        "| alpha | shift (nats) | frozen | adapt | adapt gain "
        "| fine-tune adapt+frozen | fine-tune train | train gain |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for alpha in ALPHAS:
        r = table[table[:, 1] == alpha]
        m, s = r.mean(0), r.std(0)
        g1, g2 = r[:, 4] - r[:, 3], r[:, 6] - r[:, 5]
        print(
            f"| {alpha:.2f} | {m[2]:.3f} ± {s[2]:.3f} | {m[3]:.1%} | {m[4]:.1%} | "
            f"{g1.mean():+.1%} ± {g1.std():.1%} | {m[5]:.1%} | {m[6]:.1%} | "
            f"{g2.mean():+.1%} ± {g2.std():.1%} |"
        )


if __name__ == "__main__":
    main()
