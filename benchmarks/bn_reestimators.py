"""Claim: the compression toolkits' own BN re-estimators and bnkit's, side by side in one
run, interleaved, on the same models and batches: bnkit.adapt gives the exact population
statistics with shuffled and with class-sorted batches, at least every peer's accuracy,
in at most every peer's time.

The four estimators, each its project's own code:
- NNCF 3.x `nncf.batch_norm_adaptation(model, dataset, num_iterations=...)`: BN in
  training mode, forwards: a moving average at each layer's momentum, from the old
  statistics, with the batch's unbiased variance;
- AIMET `aimet_torch.bn_reestimation.reestimate_bn_stats(model, loader, num_batches,
  forward_fn)`: the mean of the per-batch means and of the per-batch unbiased variances
  (the spread between batch means left out);
- `torch.optim.swa_utils.update_bn(loader, model)`: a cumulative average of the same
  per-batch values, the whole model in `train()`;
- `bnkit.adapt(model, loader)`: every input of each layer pooled, in float64.

Each estimator sees the same batches of 64, shuffled or sorted by class, and each BN
normalises with its batch's statistics during the pass (all four do): the exact
statistics are the population mean and variance of all the inputs each BN layer receives
in that pass, computed here in float64 from forward pre-hooks on a copy whose BN layers
use batch statistics (`exact`). Per method: the largest relative error of any
`running_mean` (against the channel's standard deviation) and `running_var`, the
accuracy after re-estimation, the time as a ratio to one inference pass over the same
batches (medians of interleaved runs), and whether the quantizer's state (fake-quantize
scales and observers) was left as it was.

Models: (a) torchvision resnet18 trained from scratch on the digits and 50% structured
pruned with torch-pruning (as `bn_after_pruning.py --model resnet18`), re-estimated on
512 training images, scored on the source test split; (b) the demo's digits CNN on each
of the 15 ImageNet-C corruptions at severity 5 (half of each stream re-estimates, the
other half is scored; means over corruptions); (c) the digits CNN prepared for int8
quantization-aware training (torch.ao FX, x86), one QAT epoch on the source digits, then
re-estimated on the shifted target digits (before `convert`).

AIMET is not installed with the project (it brings cvxpy, bokeh, pandas and more): the
script makes `.venv-aimet` beside `.venv` on first use, which sees `.venv`'s packages
through a `.pth` file and adds `aimet-torch==2.42.0` and what it needs, then re-executes
itself there. `--no-aimet` runs the other three in `.venv`.

    .venv/bin/python benchmarks/bn_reestimators.py [--runs 3] [--corruptions ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
ROOT = Path(__file__).resolve().parents[1]
AIMET_VENV = ROOT / ".venv-aimet"
AIMET = "aimet-torch==2.42.0"


def _aimet_python() -> Path:
    """`.venv-aimet`'s python, made when missing: `.venv`'s packages plus AIMET."""
    python = AIMET_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AIMET_VENV)], check=True)
        ours = subprocess.run(
            [sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        theirs = subprocess.run(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        # an `import` line of a .pth file runs: .venv's own .pth files (bnkit's
        # editable install) are processed too
        (Path(theirs) / "bnkit-main-venv.pth").write_text(
            f"import site; site.addsitedir({ours!r})\n"
        )
        subprocess.run([str(python), "-m", "pip", "install", "-q", AIMET], check=True)
    return python


if "--no-aimet" not in sys.argv and Path(sys.prefix) != AIMET_VENV:
    os.execve(str(_aimet_python()), [str(AIMET_VENV / "bin" / "python"), *sys.argv],
              {**os.environ, **MALLOC})  # fmt: skip
if any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

import warnings

import numpy as np
import torch
from torch import nn

import bnkit
from bnkit.corruptions import CORRUPTIONS, corrupted_digits
from bnkit.data import digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits

BATCH = 64
BN = nn.modules.batchnorm._BatchNorm


# ---------------------------------------------------------------------- the estimators


def forward_pass(model: nn.Module, loader: list) -> None:
    """The floor: one inference pass over the batches."""
    model.eval()
    with torch.no_grad():
        for x, _ in loader:
            model(x)


def bnkit_adapt(model: nn.Module, loader: list) -> None:
    bnkit.adapt(model, loader)


def nncf_adaptation(model: nn.Module, loader: list) -> None:
    import contextlib
    import io

    import nncf

    dataset = nncf.Dataset(loader, lambda batch: batch[0])
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bar, on stdout
        nncf.batch_norm_adaptation(model, dataset, num_iterations=len(loader))


def aimet_reestimation(model: nn.Module, loader: list) -> None:
    from aimet_torch.bn_reestimation import reestimate_bn_stats

    reestimate_bn_stats(model, loader, len(loader), lambda m, batch: m(batch[0]))


def swa_update_bn(model: nn.Module, loader: list) -> None:
    torch.optim.swa_utils.update_bn(loader, model)
    model.eval()


METHODS = {
    "bnkit.adapt": bnkit_adapt,
    "nncf.batch_norm_adaptation": nncf_adaptation,
    "aimet reestimate_bn_stats": aimet_reestimation,
    "swa_utils.update_bn": swa_update_bn,
}


# ---------------------------------------------------------------------- measuring


def bns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BN)]


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    keep = ("scale", "zero_point", "min_val", "max_val")
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(keep)}


def exact(model: nn.Module, loader: list) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Population mean and variance of every BN's inputs in a pass over `loader` where
    each BN normalises with its batch's statistics (observers off, fake quantization on)."""
    ref = copy.deepcopy(model).eval()
    ref.apply(torch.ao.quantization.disable_observer)
    inputs: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, bn in bns(ref):
        bn.train()
        bn.track_running_stats = False  # batch statistics, no update

        def keep(module: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach().double().numpy()
            inputs.setdefault(name, []).append(np.moveaxis(x, 1, 0).reshape(x.shape[1], -1))

        hooks.append(bn.register_forward_pre_hook(keep))
    with torch.no_grad():
        for x, _ in loader:
            ref(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, parts in inputs.items():
        a = np.concatenate(parts, axis=1)
        out[name] = (a.mean(axis=1), a.var(axis=1))
    return out


def errors(model: nn.Module, reference: dict) -> tuple[float, float]:
    """Largest relative error of any running mean (in standard deviations) and any
    running variance, against `reference`."""
    worst_mean = worst_var = 0.0
    for name, bn in bns(model):
        mean, var = reference[name]
        got_mean = bn.running_mean.double().numpy()
        got_var = bn.running_var.double().numpy()
        worst_mean = max(worst_mean, float(np.max(np.abs(got_mean - mean) / np.sqrt(var + 1e-12))))
        worst_var = max(worst_var, float(np.max(np.abs(got_var - var) / (var + 1e-12))))
    return worst_mean, worst_var


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(torch.as_tensor(x[i : i + 256])) for i in range(0, len(x), 256)])
    return float((out.argmax(1).numpy() == y).mean())


def loaders(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, list]:
    """The same images in batches of 64, shuffled and sorted by class."""
    orders = {
        "shuffled": np.random.default_rng(seed).permutation(len(y)),
        "sorted": np.argsort(y, kind="stable"),
    }
    out = {}
    for name, order in orders.items():
        out[name] = [
            (torch.as_tensor(x[order[i : i + BATCH]]), torch.as_tensor(y[order[i : i + BATCH]]))
            for i in range(0, len(y), BATCH)
        ]
        if len(out[name][-1][1]) == 1:  # no batch of one for BN
            out[name][-2:] = [tuple(torch.cat(p) for p in zip(*out[name][-2:], strict=True))]
    return out


def measure(start: nn.Module, loader: list, test: tuple, runs: int, methods: dict) -> dict:
    """Per method: errors, accuracy, time ratio to a forward pass (medians of `runs`
    interleaved), quantizer kept."""
    reference = exact(start, loader)
    times: dict[str, list[float]] = {m: [] for m in ["forward pass", *methods]}
    result: dict[str, dict] = {}
    for _ in range(runs):
        for name, run in {"forward pass": forward_pass, **methods}.items():
            model = copy.deepcopy(start)
            before = quantizer_state(model)
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run(model, loader)
            except Exception as err:  # a peer that cannot run on this model: its error
                result[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
                continue
            times[name].append(time.perf_counter() - t0)
            if name == "forward pass":
                continue
            after = quantizer_state(model)
            kept = all(torch.equal(before[k], after[k]) for k in before)
            result[name] = {
                "errors": errors(model, reference),
                "accuracy": accuracy(model, *test),
                "quantizer kept": kept if before else None,
            }
    floor = statistics.median(times["forward pass"])
    for name in methods:
        if times[name]:
            result[name]["time"] = statistics.median(times[name]) / floor
    return result


# ---------------------------------------------------------------------- the models


def pruned_resnet18(k: object, seed: int) -> tuple[nn.Module, tuple, tuple]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bn_after_pruning import prune_torch, trained_resnet18

    model = trained_resnet18(k, seed)
    prune_torch(model, "structured", 0.5)
    src = digits("source", 32, seed)
    x, y = src.train
    order = np.random.default_rng(seed).permutation(len(y))[:512]
    return model, (k.images(x[order]), y[order]), (k.images(src.test[0]), src.test[1])


def qat_digits(k: object, seed: int) -> tuple[nn.Module, tuple, tuple]:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model = copy.deepcopy(pretrained_digits(framework="torch", seed=seed).model)
    x, y = digits("source", 32, seed).train
    xs, ys = torch.as_tensor(k.images(x)), torch.as_tensor(y).long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (xs[:2],))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    torch.manual_seed(seed)
    order = torch.randperm(len(ys))
    for i in range(0, len(ys) - 1, 64):
        batch = order[i : i + 64]
        loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    target = digits("target", 32, seed)
    return model, (k.images(target.train[0]), target.train[1]), (
        k.images(target.test[0]), target.test[1],
    )  # fmt: skip


# ---------------------------------------------------------------------- the table


def row(label: str, loader: str, results: list[dict], method: str) -> str:
    values = [r[method] for r in results]
    errors_seen = [v["error"] for v in values if "error" in v]
    if errors_seen:
        return f"| {label} | {loader} | {method} | could not run: {errors_seen[0]} ||||| |"
    mean_err = max(v["errors"][0] for v in values)
    var_err = max(v["errors"][1] for v in values)
    acc = np.mean([v["accuracy"] for v in values])
    t = np.median([v["time"] for v in values])
    kept = {v["quantizer kept"] for v in values}
    q = "" if kept == {None} else ("kept" if kept == {True} else "CHANGED")
    return (
        f"| {label} | {loader} | {method} | {mean_err:.1e} | {var_err:.1e} | {acc:.1%} "
        f"| {t:.2f} | {q} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    parser.add_argument("--models", default="resnet18,corruptions,qat")
    parser.add_argument("--no-aimet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    methods = dict(METHODS)
    if args.no_aimet:
        methods.pop("aimet reestimate_bn_stats")
    k = kit("torch")
    wanted = args.models.split(",")
    cases: list[tuple[str, nn.Module, tuple, tuple]] = []
    if "resnet18" in wanted:
        cases.append(("resnet18, 50% pruned", *pruned_resnet18(k, args.seed)))
    if "corruptions" in wanted:
        start = pretrained_digits(framework="torch", seed=args.seed).model.eval()
        for name in args.corruptions.split(","):
            cx, cy = corrupted_digits(name, 5, seed=args.seed)
            order = np.random.default_rng(args.seed).permutation(len(cy))
            half = len(cy) // 2
            calib = (k.images(cx[order[:half]]), cy[order[:half]])
            test = (k.images(cx[order[half:]]), cy[order[half:]])
            cases.append((f"digits CNN, {name}", start, calib, test))
    if "qat" in wanted:
        cases.append(("digits CNN, int8 QAT", *qat_digits(k, args.seed)))
    results: dict[tuple[str, str], list[dict]] = {}
    for label, start, calib, test in cases:
        group = "digits CNN, 15 corruptions" if label.startswith("digits CNN, ") and (
            "QAT" not in label
        ) else label  # fmt: skip
        for loader_name, loader in loaders(*calib, args.seed).items():
            r = measure(start, loader, test, args.runs, methods)
            results.setdefault((group, loader_name), []).append(r)
            cells = "  ".join(
                f"{m} {v['accuracy']:.1%} {v['time']:.2f}x" if "error" not in v else f"{m} error"
                for m, v in r.items()
            )
            print(f"{label:32s} {loader_name:8s} {cells}", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}; seed {args.seed}; {args.runs} interleaved runs")
    print("| model | batches | method | mean error | var error | accuracy | time (passes) "
          "| quantizer |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for (group, loader_name), runs in results.items():
        for method in methods:
            print(row(group, loader_name, runs, method))


if __name__ == "__main__":
    main()
