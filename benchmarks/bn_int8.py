"""Claim: BN handled before int8 post-training quantization. Folding with `bnkit.fold`
before PyTorch's PTQ gives the int8 accuracy of PTQ's own Conv+BN fusion, and
re-estimating BN on the deployment domain (`bnkit.adapt`, no labels) before quantizing
keeps the accuracy it brings in int8; both with torch.ao's FX graph mode and with
torchao's PT2E (the export-based flow torch.ao's FX mode gives way to).

The demo's residual CNN pretrained on the source digits (PyTorch; seeds 0-2 are three
models, each pretrained from its seed) is quantized to int8 with torch.ao's FX graph mode
(`prepare_fx` with the x86 default qconfig mapping, which fuses Conv+BN+ReLU itself;
calibration on the images given; `convert_fx`), on the source domain and on each of the
15 corruptions at severity 5 (`bnkit.corruptions`). The images of a domain (the source
validation and test split, 719) are cut in two halves by the seed: the first half
(unlabelled) calibrates the quantization and is what `adapt` re-estimates on, the second
is scored. Per domain: the float model; int8 (PTQ's fusion); int8 after `bnkit.fold`
(BN folded by bnkit, then PTQ); on the corruptions also `adapt` in float and `adapt`
then int8. PT2E: the model exported with `torch.export` (batch dimension free),
`prepare_pt2e` with the X86InductorQuantizer's default config (which folds Conv+BN
itself), calibration, `convert_pt2e` (bnkit.pt2e's drop-ins; the same numbers as
torchao's here, where every BN has PyTorch's default eps). Means over the seeds (and over
the 15 corruptions); "kept" is the share of re-estimation's float gain left in int8:
(int8 adapt - int8) / (float adapt - float).

    .venv/bin/python benchmarks/bn_int8.py [--seeds 3] [--corruptions gaussian_noise,fog]
        [--quantizers fx,pt2e]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

import numpy as np
import torch

import bnkit
from bnkit.corruptions import CORRUPTIONS, corrupted_digits
from bnkit.data import digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits

COLUMNS = ("float", "int8", "fold+int8", "adapt", "adapt+int8")


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.as_tensor(x)).argmax(1).numpy() == y).mean())


def int8(model, calibration: np.ndarray):
    """FX graph-mode post-training quantization (x86), calibrated on `calibration`."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantization's deprecation notices
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"),
                              (torch.as_tensor(calibration[:1]),))  # fmt: skip
        with torch.no_grad():
            for i in range(0, len(calibration), 64):
                prepared(torch.as_tensor(calibration[i : i + 64]))
        return convert_fx(prepared)


def int8_pt2e(model, calibration: np.ndarray):
    """torchao PT2E post-training quantization (X86InductorQuantizer), calibrated on
    `calibration`: the model exported with a free batch dimension."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    import bnkit.pt2e

    model = copy.deepcopy(model).eval()
    example = torch.as_tensor(calibration[:64])
    batch = torch.export.Dim("batch", min=2)
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = bnkit.pt2e.prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(0, len(calibration), 64):
            prepared(torch.as_tensor(calibration[i : i + 64]))
    return bnkit.pt2e.convert_pt2e(prepared)


QUANTIZERS = {"fx": int8, "pt2e": int8_pt2e}


def domain(k, start, x, y, seed: int, shifted: bool, quantize) -> dict[str, float]:
    order = np.random.default_rng(seed).permutation(len(y))
    half = len(y) // 2
    calibration, xs, ys = x[order[:half]], x[order[half:]], y[order[half:]]
    folded = bnkit.fold(start, calibration).model
    out = {
        "float": accuracy(start, xs, ys),
        "int8": accuracy(quantize(start, calibration), xs, ys),
        "fold+int8": accuracy(quantize(folded, calibration), xs, ys),
    }
    if shifted:
        adapted = k.clone(start)
        bnkit.adapt(adapted, calibration)
        out["adapt"] = accuracy(adapted, xs, ys)
        out["adapt+int8"] = accuracy(quantize(adapted, calibration), xs, ys)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    parser.add_argument("--quantizers", default="fx,pt2e")
    args = parser.parse_args()
    k = kit("torch")
    names = args.corruptions.split(",")
    quantizers = args.quantizers.split(",")
    rows: dict[str, list[dict[str, float]]] = {
        f"{label} {q}": [] for label in ("source", "corruptions") for q in quantizers
    }
    for seed in range(args.seeds):
        start = pretrained_digits(framework="torch", seed=seed).model.eval()
        src = digits("source", seed=seed)
        x = np.concatenate([src.val[0], src.test[0]])
        y = np.concatenate([src.val[1], src.test[1]])
        for q in quantizers:
            run = domain(k, start, k.images(x), y, seed, False, QUANTIZERS[q])
            rows[f"source {q}"].append(run)
        for name in names:
            cx, cy = corrupted_digits(name, 5, seed=seed)
            for q in quantizers:
                run = domain(k, start, k.images(cx), cy, seed, True, QUANTIZERS[q])
                rows[f"corruptions {q}"].append(run)
                cells = "  ".join(f"{c} {v:.1%}" for c, v in run.items())
                print(f"seed {seed} {name:22s} {q:5s} {cells}", flush=True)
    print(f"{torch.__version__}, {args.seeds} seeds, {len(names)} corruptions at severity 5")
    print("domain, PTQ     " + "".join(f"{c:>12s}" for c in COLUMNS) + "        kept")
    for label, runs in rows.items():
        means = {c: float(np.mean([r[c] for r in runs])) for c in COLUMNS if c in runs[0]}
        cells = "".join(f"{means[c]:12.1%}" if c in means else f"{'':>12s}" for c in COLUMNS)
        kept = ""
        if "adapt" in means and means["adapt"] != means["float"]:
            share = (means["adapt+int8"] - means["int8"]) / (means["adapt"] - means["float"])
            kept = f"{share:12.0%}"
        print(f"{label:16s}{cells}{kept}", flush=True)


if __name__ == "__main__":
    main()
