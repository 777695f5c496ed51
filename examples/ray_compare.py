"""Run a `compare` sweep on Ray: every (strategy, seed) run is a Ray task started from
the same packed weights, with the numbers the sequential executor gives. Without
`address`, bnkit starts a local Ray instance (and stops it);
`address="ray://head:10001"` uses a cluster whose workers have bnkit and your code.

    python examples/ray_compare.py
"""

import numpy as np
import torch
from torch import nn

import bnkit
from bnkit.data import digits
from bnkit.demo import few_labels

torch.manual_seed(0)
target = digits("target", size=16)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
)  # fmt: skip
x, y = few_labels(*target.train, per_class=10)
train = (x.transpose(0, 3, 1, 2), y)  # PyTorch modules take NCHW
val = (target.val[0].transpose(0, 3, 1, 2), target.val[1])

on_ray = bnkit.compare(
    model, train, val, ["frozen", "train"], epochs=2, seeds=2, executor="ray"
)
print(on_ray)
torch.set_num_threads(1)  # each Ray task runs one thread: the same arithmetic here
here = bnkit.compare(model, train, val, ["frozen", "train"], epochs=2, seeds=2)
pairs = zip(on_ray.runs, here.runs, strict=True)
same = [np.isclose(a.final_val_loss, b.final_val_loss) for a, b in pairs]
print(f"{sum(same)} of {len(same)} runs gave the sequential executor's numbers")
assert all(r.status == "ok" for r in on_ray.runs) and all(same)
