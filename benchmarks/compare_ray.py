"""Claim (issue 13): a `compare` sweep on 2 Ray workers against the sequential executor on
this 2-core machine, as a ratio, with the same numbers.

The demo's PyTorch residual CNN pretrained on the source digits, fine-tuned on the
target digits' training split (the whole network, 3 epochs, batch 32, Adam 1e-3) for
the strategies frozen, affine, train and adapt over 2 seeds: 8 runs. Sequential: one
process with torch's default threads (2 here), as `bnkit compare` runs, and again with
one thread. Ray: a local `ray.init(num_cpus=2)`, one run per task, one thread per task.
Ray's start-up is timed apart from the sweep. The largest differences between the
executors' final validation accuracies are printed: none against one thread; against two
threads, reductions add in another order and the last bits differ.

    .venv/bin/python benchmarks/compare_ray.py [--epochs 3] [--seeds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})

import ray
import torch

import bnkit
from bnkit.data import digits
from bnkit.demo import kit
from bnkit.pretrain import pretrained_digits

STRATEGIES = ("frozen", "affine", "train", "adapt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    k = kit("torch")
    net = pretrained_digits(framework="torch")
    target = digits("target", seed=0)
    train = (k.images(target.train[0]), target.train[1])
    val = (k.images(target.val[0]), target.val[1])
    kwargs = {"epochs": args.epochs, "seeds": args.seeds, "batch_size": 32}
    runs = len(STRATEGIES) * args.seeds
    threads = torch.get_num_threads()
    print(f"{k.version()}; {len(train[1])} training, {len(val[1])} validation images; "
          f"{runs} runs of {args.epochs} epochs; torch threads {threads}")  # fmt: skip
    t = time.perf_counter()
    sequential = bnkit.compare(net.model, train, val, STRATEGIES, **kwargs)
    seq = time.perf_counter() - t
    torch.set_num_threads(1)  # the thread count each Ray task gets
    t = time.perf_counter()
    one_thread = bnkit.compare(net.model, train, val, STRATEGIES, **kwargs)
    seq1 = time.perf_counter() - t
    torch.set_num_threads(threads)
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    start = time.perf_counter() - t
    t = time.perf_counter()
    on_ray = bnkit.compare(net.model, train, val, STRATEGIES, executor="ray", **kwargs)
    par = time.perf_counter() - t
    ray.shutdown()
    diff = max(abs(a.final_val_accuracy - b.final_val_accuracy)
               for a, b in zip(sequential.runs, on_ray.runs, strict=True))  # fmt: skip
    print(
        f"sequential {seq:6.1f} s; Ray (2 workers) {par:6.1f} s (+ {start:.1f} s to start "
        f"Ray); speed-up {seq / par:.2f}x ({seq / (par + start):.2f}x with the start)"
    )
    same = max(abs(a.final_val_accuracy - b.final_val_accuracy)
               for a, b in zip(one_thread.runs, on_ray.runs, strict=True))  # fmt: skip
    print(f"sequential with one thread {seq1:6.1f} s: Ray speed-up {seq1 / par:.2f}x")
    print(f"largest difference in final validation accuracy: {diff:.2%} against the "
          f"sequential run on {threads} threads, {same:.2%} against the one on one thread; "
          f"statuses {sorted({r.status for r in on_ray.runs})}")  # fmt: skip
    for s in sequential.summaries:
        r = next(x for x in on_ray.summaries if x.strategy == s.strategy)
        print(f"  {s.strategy:7s} sequential {s.val_accuracy_mean:6.1%}  "
              f"ray {r.val_accuracy_mean:6.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
