"""Where `robust` loses to whole-stream `adapt` on label-shifted streams, batch by batch
(issue 34's do-no-harm misses): the accuracy at each position of the stream, averaged over
the 15 corruptions and the seeds, for `adapt` (the statistics of the whole stream) and
`robust` (online, each batch predicted before the ones after it are seen).

    .venv/bin/python benchmarks/tta_batches.py [--framework torch|keras] [--images 384]
        [--severity 5] [--seeds 3] [--streams sorted,dirichlet,iid]
"""

from __future__ import annotations

import argparse

import numpy as np
from tta_corruptions import BATCH, stream

import bnkit
from bnkit.corruptions import CORRUPTIONS, corrupted_digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits

METHODS = ("adapt", "robust")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", default="torch", choices=("torch", "keras"))
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--streams", default="sorted,dirichlet,iid")
    args = parser.parse_args()
    k = kit(args.framework)
    net = pretrained_digits(framework=args.framework)
    sets = {c: corrupted_digits(c, args.severity) for c in CORRUPTIONS}
    print(f"{k.version()}; severity {args.severity}, {args.seeds} seeds, batch {BATCH}"
          + (f", the first {args.images} images" if args.images else "")
          + "; accuracy at each batch of the stream, mean over corruptions and seeds")  # fmt: skip
    for kind in args.streams.split(","):
        found: dict[str, list[list[float]]] = {m: [] for m in METHODS}
        for c in CORRUPTIONS:
            for s in range(args.seeds):
                xs, ys = stream(*sets[c], s, kind)
                xs, ys = k.images(xs[: args.images]), ys[: args.images]
                for m in METHODS:
                    report = bnkit.tta(k.clone(net.model), (xs, ys), m, batch_size=BATCH)
                    found[m].append([float(b.accuracy) for b in report.batches])
        width = min(len(r) for r in found["adapt"])  # 719 images: 11 x 64 + 15
        means = {m: np.array([r[:width] for r in v]).mean(0) for m, v in found.items()}
        print(f"\n{kind}".ljust(12) + "".join(f"{i + 1:>7}" for i in range(width)))
        for m in METHODS:
            print(m.ljust(11) + "".join(f"{a:7.1%}" for a in means[m]))
        gap = (means["robust"] - means["adapt"]) * 100
        print("difference".ljust(11) + "".join(f"{d:+7.1f}" for d in gap), flush=True)


if __name__ == "__main__":
    main()
