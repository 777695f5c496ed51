"""Test-time adaptation on the 15 ImageNet-C corruptions of the embedded digits.

The demo's residual CNN, pretrained on the source digits (cached), meets the source
validation and test images (719) corrupted at severity 5. For each corruption: accuracy
of the source model, `adapt` (statistics re-estimated on the stream), TENT without
guards and TENT with guards (`bnkit.tta`, batch 64, Adam 1e-3, one step), RoTTA as
published (benchmarks/rotta_reference.py, PyTorch only) and `robust`, on an i.i.d.
stream, a class-sorted stream and a Dirichlet-ordered stream (delta 0.1, 10 slots,
RoTTA's LabelDirichletDomainSequence), over 3 seeds (the seed orders the stream); then
one mixed stream of all 15 corruptions shuffled together.

    .venv/bin/python benchmarks/tta_corruptions.py [--framework torch|keras] [--seeds 3]
        [--corruptions gaussian_noise,fog] [--methods source,adapt,robust]
        [--streams iid,sorted,dirichlet,mixed] [--severity 5] [--images 384]
        [--pretrain-seed 0]

`--severity` picks another severity (1-5); `--images N` keeps the first N images of each
ordered stream (a short stream: `adapt` re-estimates on those N). With `source`, `adapt`
and `robust` among the methods, a last column gives `robust` less the better of
`source` and `adapt` (what "do no harm" asks to stay above -1 point), and the mean row
says in how many corruptions it is below -1. With `source` among the methods, a "worst -
source" row gives each method's worst corruption against the source model.
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

METHODS = (("source", "none", True), ("adapt", "adapt", True), ("tent", "tent", False),
           ("tent+guards", "tent", True), ("rotta-ref", "rotta", True),
           ("robust", "robust", True))  # fmt: skip
STREAMS = ("iid", "sorted", "dirichlet", "mixed")
BATCH = 64
DELTA, SLOTS = 0.1, 10


def run(k, start, x, y, method: str, guard: bool, seed: int) -> float:
    model = k.clone(start)
    if method == "rotta":
        from rotta_reference import run as rotta

        return float((rotta(model, k.images(x), 10, BATCH, seed) == y).mean())
    report = bnkit.tta(model, (k.images(x), y), method, batch_size=BATCH, guard=guard)
    return float(report.accuracy)


def stream(x, y, seed: int, kind: str):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    if kind == "sorted":
        order = order[np.argsort(y[order], kind="stable")]
    if kind == "dirichlet":  # RoTTA's ttasampler: each class split over slots by Dirichlet
        slots: list[list[np.ndarray]] = [[] for _ in range(SLOTS)]
        for c in range(int(y.max()) + 1):
            ids = order[y[order] == c]
            cuts = (np.cumsum(rng.dirichlet([DELTA] * SLOTS))[:-1] * len(ids)).astype(int)
            for slot, part in zip(slots, np.split(ids, cuts), strict=True):
                slot.append(part)
        order = np.concatenate([slot[i] for slot in slots for i in rng.permutation(len(slot))])
    return x[order], y[order]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", default="torch", choices=("torch", "keras"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    parser.add_argument("--methods", default=",".join(m for m, _, _ in METHODS))
    parser.add_argument("--streams", default=",".join(STREAMS))
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument(
        "--pretrain-seed", type=int, default=0, help="the seed the digits model is trained with"
    )
    args = parser.parse_args()
    names = [c for c in args.corruptions.split(",") if c]
    wanted = args.methods.split(",")
    torch_only = {"rotta"} if args.framework != "torch" else set()
    methods = [m for m in METHODS if m[0] in wanted and m[1] not in torch_only]
    streams = args.streams.split(",")
    k = kit(args.framework)
    net = pretrained_digits(framework=args.framework, seed=args.pretrain_seed)
    t0 = time.perf_counter()
    sets = {c: corrupted_digits(c, args.severity) for c in names}
    cut = slice(None, args.images)
    harm = {"source", "adapt", "robust"} <= {m for m, _, _ in methods}
    print(f"{k.version()}; corrupted sets ready in {time.perf_counter() - t0:.0f} s; "
          f"{len(sets[names[0]][1])} images per corruption, batch {BATCH}, "
          f"{args.seeds} seeds (mean ± std)"
          + (f"; the first {args.images} images of each stream" if args.images else "")
          )  # fmt: skip
    header = "corruption".ljust(18) + "".join(f"{m:>17}" for m, _, _ in methods)
    if harm:
        header += f"{'robust - best':>17}"
    titles = {"iid": "i.i.d.", "sorted": "class-sorted", "dirichlet": "Dirichlet (0.1)"}
    for kind in [s for s in streams if s != "mixed"]:
        print(f"\n{titles[kind]} stream, severity {args.severity}\n{header}")
        table: dict[str, list[float]] = {m: [] for m, _, _ in methods}
        gaps: list[float] = []
        for c in names:
            x, y = sets[c]
            cells = []
            for label, method, guard in methods:
                accs = []
                for s in range(args.seeds):
                    xs, ys = stream(x, y, s, kind)
                    accs.append(run(k, net.model, xs[cut], ys[cut], method, guard, s))
                table[label].append(float(np.mean(accs)))
                cells.append(f"{np.mean(accs):8.1%} ± {np.std(accs):4.1%}")
            if harm:
                gaps.append(table["robust"][-1] - max(table["source"][-1], table["adapt"][-1]))
                cells.append(f"{gaps[-1] * 100:+8.1f}")
            print(c.ljust(18) + "".join(f"{cell:>17}" for cell in cells), flush=True)
        means = "".join(f"{np.mean(table[m]):17.1%}" for m, _, _ in methods)
        if harm:
            means += f"{sum(g < -0.01 for g in gaps):>9} below -1"
        print("mean".ljust(18) + means)
        if "source" in table:  # each method's worst corruption against the source model
            worst = []
            for m, _, _ in methods:
                gap = np.array(table[m]) - np.array(table["source"])
                at = int(np.argmin(gap))
                worst.append(f"{gap[at] * 100:+.1f} {names[at][:10]}")
            print("worst - source".ljust(18) + "".join(f"{cell:>17}" for cell in worst))
    if "mixed" in streams:
        xs = np.concatenate([sets[c][0] for c in names])
        ys = np.concatenate([sets[c][1] for c in names])
        cells = []
        for _, method, guard in methods:
            accs = [run(k, net.model, *stream(xs, ys, s, "iid"), method, guard, s)
                    for s in range(args.seeds)]  # fmt: skip
            cells.append(f"{np.mean(accs):8.1%} ± {np.std(accs):4.1%}")
        print(f"\nmixed stream of {len(names)} corruptions ({len(ys)} images)\n{header}")
        print("mixed".ljust(18) + "".join(f"{cell:>17}" for cell in cells))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
