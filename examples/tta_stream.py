"""Adapt at test time, without labels: TENT on a stream of corrupted digits, with the
guards that hold it when the stream is not i.i.d. (here, sorted by class, where plain
TENT collapses), and `robust` (the statistics of the stream so far, predictions
corrected for label shift), against re-estimating the statistics on the whole stream
first.

    python examples/tta_stream.py
"""

import numpy as np
import torch
from torch import nn

import bnkit
from bnkit.data import digits
from bnkit.plots import tta_plot

torch.manual_seed(0)
source = digits("source", size=16)


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def network() -> nn.Module:
    convs = [block(3, 16), block(16, 32), block(32, 32)]
    return nn.Sequential(
        *convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)
    )


# A model trained on the source digits; every run below starts from its weights.
model = network()
x, y = (
    torch.as_tensor(source.train[0].transpose(0, 3, 1, 2)),
    torch.as_tensor(source.train[1]),
)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
model.train()
for _ in range(4):
    for i in range(0, len(x), 32):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
        opt.step()
bnkit.adapt(model, x.numpy())
start = model.state_dict()

# The test stream: held-out source digits, darkened and noisy: a shift BN sees.
x, y = source.test
rng = np.random.default_rng(0)
shifted = np.clip(0.4 * x + rng.normal(0.3, 0.15, x.shape), 0, 1).astype("float32")
shifted = shifted.transpose(0, 3, 1, 2)
order = {
    "i.i.d.": rng.permutation(len(y)),
    "sorted by class": np.argsort(y, kind="stable"),
}


def run(method: str, stream: str, guard: bool = True) -> bnkit.TTAReport:
    fresh = network()
    fresh.load_state_dict(start)
    idx = order[stream]
    return bnkit.tta(fresh, (shifted[idx], y[idx]), method, batch_size=30, guard=guard)


for stream in order:
    none, adapt = run("none", stream), run("adapt", stream)
    tent, guarded = run("tent", stream, guard=False), run("tent", stream)
    robust = run("robust", stream)
    print(
        f"{stream}: source {none.accuracy:.1%}, adapt {adapt.accuracy:.1%}, "
        f"TENT {tent.accuracy:.1%}, TENT with guards {guarded.accuracy:.1%}, "
        f"robust {robust.accuracy:.1%}"
    )
    print(f"  {guarded}\n  {robust}")
tta_plot(guarded, "tta.png")  # accuracy and entropy per batch, held batches shaded
assert guarded.accuracy is not None and guarded.accuracy > tent.accuracy - 0.05
assert robust.accuracy is not None and robust.accuracy > tent.accuracy
