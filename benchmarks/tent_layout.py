"""Which memory layout TENT's step should take on a CPU (why `TorchTestTime` tries both).

TENT's step (a forward with batch-statistics BN, the entropy's backward to BN's weights
and the optimizer's step, `bnkit.backends.torch.tta.TorchTestTime.step`) with the batch
as given (channels-first) and channels-last, as ratios to an inference pass of the same
model on the same batches as given, interleaved, medians of `--runs`. Models: the demo's
residual CNN pretrained on the source digits (32x32, batches of 64), and torchvision's
resnet18 (`weights=None`, 10 classes) at 32x32 and 64x64 (batches of 64) and 224x224
(batches of 16); the last column: the largest difference of BN weights after the steps
between the two layouts (float rounding).

    .venv/bin/python benchmarks/tent_layout.py [--runs 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
import torchvision

from bnkit.backends.torch.tta import TorchTestTime
from bnkit.corruptions import corrupted_digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits


def steps(model: torch.nn.Module, batches: list[np.ndarray], last: bool) -> torch.nn.Module:
    adapter = TorchTestTime()
    model = copy.deepcopy(model)
    adapter.prepare(model, 1e-3, "adam")
    adapter._channels_last = last  # the layout forced: no trials
    for x in batches:
        adapter.step(model, x)
    adapter.finish(model)
    return model


def inference(model: torch.nn.Module, batches: list[np.ndarray]) -> None:
    with torch.no_grad():
        for x in batches:
            model(torch.from_numpy(x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    x, _ = corrupted_digits("gaussian_noise", 5, seed=0)
    digits = np.ascontiguousarray(kit("torch").images(x[:384]))
    cases = {"digits CNN 32x32": (pretrained_digits(framework="torch", seed=0).model, digits, 64)}
    for size, batch in ((32, 64), (64, 64), (224, 16)):
        torch.manual_seed(0)
        net = torchvision.models.resnet18(weights=None, num_classes=10)
        images = rng.normal(size=(6 * batch, 3, size, size)).astype("float32")
        cases[f"resnet18 {size}x{size}"] = (net, images, batch)
    print(f"torch {torch.__version__}, 2 threads, 6 batches per run, medians of {args.runs}")
    for name, (model, images, batch) in cases.items():
        model.eval()
        batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        floor, given, last = measure(model, batches, args.runs)
        a, b = steps(model, batches, False), steps(model, batches, True)
        diff = max(
            float((p - q).detach().abs().max())
            for p, q in zip(a.parameters(), b.parameters(), strict=True)
        )
        print(f"{name:<20} batch {batch:>2}  inference {floor / len(batches) * 1e3:6.1f} ms"
              f"  TENT step as given {given:.2f}  channels-last {last:.2f}"
              f"  BN weights differ by {diff:.1e}")  # fmt: skip


def measure(model: torch.nn.Module, batches: list[np.ndarray], runs: int) -> tuple[float, ...]:
    """The inference pass's seconds, and both layouts' steps as ratios to it."""
    pieces = {"inference": lambda: inference(model, batches),
              "as given": lambda: steps(model, batches, False),
              "channels-last": lambda: steps(model, batches, True)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for _ in range(runs + 1):  # the first run warms up
        for k, piece in pieces.items():
            t = time.perf_counter()
            piece()
            times[k].append(time.perf_counter() - t)
    floor = statistics.median(times["inference"][1:])
    return floor, *(statistics.median(times[k][1:]) / floor for k in ("as given", "channels-last"))


if __name__ == "__main__":
    main()
