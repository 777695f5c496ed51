"""`bnkit.adapt`'s moments pass channels-last on a CPU, against the pass as given.

Two parts:

- `--part speed`: on torchvision resnet18 (224x224, batches of 16), mobilenet_v3_small
  (224x224, 16), timm efficientnet_b0 (224x224, 8) and densenet121 (128x128, 8), random
  weights, 3 batches: `bnkit.adapt` (channels-last, as it runs), the same pass as given
  (the layout before 2026-12-08: bnkit's `_channels_last` answering None) and
  `torch.optim.swa_utils.update_bn`, each on a fresh `deepcopy` whose time is taken
  off, as ratios to an inference pass as given; medians of `--runs` interleaved runs.
- `--part agreement`: every torchvision classification model with BN (RegNetY-128GF
  left out for its size) and 19 timm models, random weights, 2 batches of 4 at 64x64
  (299 for Inception v3): the largest relative difference of any running variance, and
  of any running mean in standard deviations, between the two layouts; and, on
  resnet152 and resnet50, the same between one thread and two as given and between a
  float64 copy of the model (its BN moments still taken in float32, as bnkit takes
  them) and either layout: the networks' own float32 conditioning.

    .venv/bin/python benchmarks/adapt_layout.py [--part speed|agreement] [--runs 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import timm
import torch
import torchvision

import bnkit
import bnkit.backends.torch.core as core

LAYOUT = core._channels_last
TIMM = ["efficientnet_b0", "mobilenetv3_large_100", "resnet50d", "regnety_008",
        "densenet121", "dla34", "hrnet_w18_small", "ghostnet_100", "rexnet_100",
        "cspresnet50", "dpn68", "res2net50_14w_8s", "tresnet_m", "mixnet_s", "fbnetc_100",
        "repvgg_a0", "vovnet39a", "xception41", "inception_v3"]  # fmt: skip


def as_given(given: bool) -> None:
    """The moments pass as given (True) or as it runs (False)."""
    core._channels_last = (lambda model, x: None) if given else LAYOUT
    core._GIVEN_LAYOUT.clear()


def adapted(model: torch.nn.Module, batches: list, given: bool) -> dict[str, torch.Tensor]:
    """A copy of `model` re-estimated on `batches`: its running statistics, in float64."""
    as_given(given)
    copied = copy.deepcopy(model)
    try:
        bnkit.adapt(copied, batches)
    finally:
        as_given(False)
    keep = ("running_mean", "running_var")
    return {k: v.double() for k, v in copied.state_dict().items() if k.endswith(keep)}


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for key, value in a.items():
        if key.endswith("running_var"):
            scale = value.abs() + 1e-6
        else:
            scale = a[key.replace("running_mean", "running_var")].sqrt() + 1e-6
        worst = max(worst, float(((value - b[key]).abs() / scale).max()))
    return worst


def ratios(model: torch.nn.Module, batches: list, runs: int) -> tuple[float, dict[str, float]]:
    """The inference pass's seconds per batch, and each method's time over it."""
    tensors = [torch.from_numpy(b) for b in batches]

    def inference() -> None:
        with torch.no_grad():
            for t in tensors:
                model(t)

    pieces: dict[str, Callable[[], object]] = {
        "inference": inference,
        "given": lambda: adapted(model, batches, True),
        "last": lambda: adapted(model, batches, False),
        "swa": lambda: torch.optim.swa_utils.update_bn(tensors, copy.deepcopy(model)),
        "deepcopy": lambda: copy.deepcopy(model),
    }
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for piece in pieces.values():
        piece()  # warm-up
    for _ in range(runs):
        for key, piece in pieces.items():
            t0 = time.perf_counter()
            piece()
            times[key].append(time.perf_counter() - t0)
    floor, copying = (statistics.median(times[k]) for k in ("inference", "deepcopy"))
    out = {k: (statistics.median(times[k]) - copying) / floor for k in ("given", "last", "swa")}
    return floor / len(batches), out


def speed(runs: int) -> None:
    cases = [
        ("resnet18, 224x224, batch 16", torchvision.models.resnet18(weights=None), (16, 224)),
        ("mobilenet_v3_small, 224x224, batch 16",
         torchvision.models.mobilenet_v3_small(weights=None), (16, 224)),
        ("timm efficientnet_b0, 224x224, batch 8",
         timm.create_model("efficientnet_b0", pretrained=False), (8, 224)),
        ("densenet121, 128x128, batch 8", torchvision.models.densenet121(weights=None), (8, 128)),
    ]  # fmt: skip
    print("| model | inference (ms per batch) | adapt as given | **adapt channels-last** "
          "| swa_utils.update_bn |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for name, model, (n, size) in cases:
        rng = np.random.default_rng(0)
        batches = [rng.standard_normal((n, 3, size, size)).astype(np.float32) for _ in range(3)]
        per_batch, r = ratios(model.eval(), batches, runs)
        print(f"| {name} | {per_batch * 1e3:.1f} | {r['given']:.2f} | **{r['last']:.2f}** "
              f"| {r['swa']:.2f} |", flush=True)  # fmt: skip


def agreement() -> None:
    builders = [(n, lambda n=n: torchvision.models.get_model(n, weights=None))
                for n in torchvision.models.list_models(module=torchvision.models)
                if n != "regnet_y_128gf"]  # fmt: skip
    builders += [(n, lambda n=n: timm.create_model(n, pretrained=False)) for n in TIMM]
    results: list[tuple[str, float]] = []
    for name, build in builders:
        torch.manual_seed(0)
        model = build().eval()
        if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            continue
        size = 299 if "inception" in name else 64
        x = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
        batches = [x[:4], x[4:]]
        try:
            given = adapted(model, batches, True)
        except bnkit.BnkitError as err:  # as given too: the model's, not the layout's
            print(f"{name:28s} cannot run at {size}x{size}: {str(err)[:80]}", flush=True)
            continue
        results.append((name, difference(given, adapted(model, batches, False))))
        print(f"{name:28s} {results[-1][1]:.1e}", flush=True)
    values = sorted(v for _, v in results)
    worst = max(results, key=lambda r: r[1])
    print(f"\n{len(results)} models with BN; channels-last against as given: largest "
          f"{worst[1]:.1e} ({worst[0]}), median {statistics.median(values):.1e}")  # fmt: skip
    for name in ("resnet152", "resnet50"):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
        batches = [x[:4], x[4:]]
        given, last = adapted(model, batches, True), adapted(model, batches, False)
        torch.set_num_threads(1)
        one_thread = adapted(model, batches, True)
        torch.set_num_threads(2)
        wide = adapted(model.double(), [b.astype(np.float64) for b in batches], True)
        print(f"{name}: channels-last against as given {difference(given, last):.1e}; "
              f"one thread against two {difference(given, one_thread):.1e}; float64 "
              f"against as given {difference(wide, given):.1e}, against channels-last "
              f"{difference(wide, last):.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="speed", choices=("speed", "agreement"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    if args.part == "speed":
        speed(args.runs)
    else:
        agreement()


if __name__ == "__main__":
    main()
