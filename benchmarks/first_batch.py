"""A young stream's first batch, with the statistics taken per BN layer from the source
model or from the batch (issue 34): the digits CNN on each corruption's first 64 images of
the Dirichlet (0.1), class-sorted and i.i.d. streams of `tta_corruptions.py`, 3 seeds.

- `source`: the model's own statistics everywhere; `own`: the batch's everywhere;
- `split`: the batch's in the first third of the BN layers, the source's after them
  (`bnkit.tta.SOURCE_SPLIT`);
- `by entropy`: `split` where its predictions' mean entropy is SOURCE_SPLIT_MARGIN nats
  below `own`'s, else `own`;
- `robust`: `bnkit.tta(..., "robust")` on the batch (its gate, then the split test).

Accuracy over the 15 corruptions x 3 seeds, and the mean entropies (nats) of `own` and
`split`, split by the batch's number of classes.

    .venv/bin/python benchmarks/first_batch.py [--severity 5] [--pretrain-seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
from tta_corruptions import BATCH, stream

import bnkit
from bnkit.backends import get_backend
from bnkit.corruptions import CORRUPTIONS, corrupted_digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits
from bnkit.stats import OnlineAdapt
from bnkit.tta import SOURCE_SPLIT, SOURCE_SPLIT_MARGIN, _mean_entropy, _mixture

CANDIDATES = ("source", "own", "split", "by entropy", "robust")


def first_batch(k, start, x: np.ndarray, y: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per candidate: (accuracy, mean entropy) on the batch."""
    model = k.clone(start)
    backend = get_backend(model)
    adapter = backend.test_time()
    online = OnlineAdapt(model)
    source = backend.bn_stats(model, online.paths)
    online.update(x)
    streamed = online.statistics()
    early = max(1, round(len(online.paths) * SOURCE_SPLIT))
    shares = {
        "source": 0.0,
        "own": 1.0,
        "split": {p: float(i < early) for i, p in enumerate(online.paths)},
    }
    outputs = {}
    for name, share in shares.items():
        backend.set_bn_stats(model, _mixture(source, streamed, share))
        outputs[name] = adapter.predict(model, x)
    gap = _mean_entropy(outputs["own"]) - _mean_entropy(outputs["split"])
    outputs["by entropy"] = outputs["split"] if gap >= SOURCE_SPLIT_MARGIN else outputs["own"]
    out = {n: (float((o.argmax(1) == y).mean()), _mean_entropy(o)) for n, o in outputs.items()}
    report = bnkit.tta(k.clone(start), (x, y), "robust", batch_size=len(y))
    out["robust"] = (float(report.accuracy), report.batches[0].entropy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    k = kit("torch")
    net = pretrained_digits(framework="torch", seed=args.pretrain_seed)
    sets = {c: corrupted_digits(c, args.severity) for c in CORRUPTIONS}
    print(f"{k.version()}; the first {BATCH} images of each stream, severity {args.severity}, "
          f"{args.seeds} seeds, model pretrained with seed {args.pretrain_seed}; accuracy "
          "(mean entropy, nats)")  # fmt: skip
    print("stream".ljust(28) + "".join(f"{c:>16}" for c in CANDIDATES))
    for kind in ("dirichlet", "sorted", "iid"):
        rows: dict[str, list[dict[str, tuple[float, float]]]] = {}
        for c in CORRUPTIONS:
            for s in range(args.seeds):
                xs, ys = stream(*sets[c], s, kind)
                x, y = k.images(xs[:BATCH]), ys[:BATCH]
                group = "1 class" if len(set(y)) == 1 else "2+ classes"
                rows.setdefault(group, []).append(first_batch(k, net.model, x, y))
        for group, found in sorted(rows.items()):
            cells = []
            for n in CANDIDATES:
                accuracy, entropy = np.mean([r[n] for r in found], axis=0)
                cells.append(f"{accuracy:6.1%} ({entropy:.2f})")
            label = f"{kind}, {group} ({len(found)})"
            print(label.ljust(28) + "".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
