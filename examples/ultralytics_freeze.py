"""Freeze the backbone of an Ultralytics YOLO model, BN statistics included. The script
generates a tiny detection dataset, builds YOLO11n from its yaml (no weights), and
measures each way of freezing the first 10 blocks (33 BN layers): what the blocks' BN
statistics and gamma/beta did in the trained model, and in the EMA copy the trainer
saves. Offline: YOLO_OFFLINE=1, plots=False, amp=False, a local dataset.

    python examples/ultralytics_freeze.py
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported

import numpy as np
import torch
from PIL import Image
from ultralytics import YOLO

import bnkit
import bnkit.ultralytics

root = Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
for split in ("train", "val"):  # 8 images per split, one red or green box each
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i in range(8):
        img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        x0, y0 = rng.integers(4, 30, 2)
        w, h = rng.integers(16, 30, 2)
        img[y0 : y0 + h, x0 : x0 + w] = (200, 40, 40) if i % 2 == 0 else (40, 200, 40)
        Image.fromarray(img).save(root / "images" / split / f"{i}.png")
        box = (
            f"{(x0 + w / 2) / 64:.4f} {(y0 + h / 2) / 64:.4f} {w / 64:.4f} {h / 64:.4f}"
        )
        (root / "labels" / split / f"{i}.txt").write_text(f"{i % 2} {box}\n")
names = "names:\n  0: red\n  1: green\n"
(root / "data.yaml").write_text(
    f"path: {root}\ntrain: images/train\nval: images/val\n{names}"
)
settings = dict(
    data=str(root / "data.yaml"),
    epochs=2,
    imgsz=64,
    batch=4,
    nbs=4,
    warmup_epochs=0,
    workers=0,
    plots=False,
    amp=False,
    val=False,
    device="cpu",
    verbose=False,
    project=str(root / "runs"),
    exist_ok=True,
)  # nbs=batch and no warmup: every batch takes an optimizer step


def frozen_bn(model):
    return {
        n: (m.running_mean.clone(), m.weight.detach().clone())
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d) and int(n.split(".")[1]) < 10
    }


def requires_grad_recipe(trainer):  # the recipe users share: on_train_start
    for k, v in trainer.model.named_parameters():
        v.requires_grad = not any(f"model.{x}." in k for x in range(10))


def run(name, setup=None, **extra):
    yolo = YOLO("yolo11n.yaml")
    start = {}
    if setup is not None:
        setup(yolo)
    yolo.add_callback("on_train_start", lambda t: start.update(frozen_bn(t.model)))
    yolo.train(name=f"run{len(list((root / 'runs').glob('*')))}", **settings, **extra)
    trained, ema = frozen_bn(yolo.trainer.model), frozen_bn(yolo.trainer.ema.ema)
    n = len(start)
    kept = sum(torch.equal(start[k][0], trained[k][0]) for k in start)
    gamma = sum(torch.equal(start[k][1], trained[k][1]) for k in start)
    in_ema = sum(torch.equal(start[k][0], ema[k][0]) for k in start)
    print(f"| {name} | {n} | {kept}/{n} | {gamma}/{n} | {in_ema}/{n} |", flush=True)
    return yolo, kept


recipe = lambda y: y.add_callback("on_train_start", requires_grad_recipe)  # noqa: E731
rows = [
    ("requires_grad=False in on_train_start", recipe, {}),
    ("Ultralytics freeze=10", None, {"freeze": 10}),
    ("bnkit.ultralytics.freeze(bn='frozen')",
     lambda y: bnkit.ultralytics.freeze(y, freeze=10, bn="frozen"), {}),
    ("bnkit.ultralytics.freeze(bn='affine')",
     lambda y: bnkit.ultralytics.freeze(y, freeze=10, bn="affine"), {}),
]  # fmt: skip
print("| approach | BN in blocks 0-9 | kept statistics | kept gamma/beta | in EMA |")
print("|---|---|---|---|---|")
for name, setup, extra in rows:
    yolo, kept = run(name, setup, **extra)
    if "bn='frozen'" in name:
        assert kept == 33
        print(bnkit.check(yolo.trainer.model))  # nothing to report
