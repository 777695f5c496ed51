"""Fine-tune a torchvision (or timm) model with a plain PyTorch loop, BN frozen for
real: `requires_grad=False` does not stop the running statistics, and `model.train()`
undoes an earlier `bn.eval()`; a mode pinned by bnkit survives both.

    python examples/torch_finetune.py
"""

import numpy as np
import torch
import torchvision
from torch import nn

import bnkit
from bnkit.data import digits

torch.manual_seed(0)
source, target = digits("source", size=32), digits("target", size=32)


def tensors(split):
    """(images NCHW, labels) as tensors; PyTorch modules take channels first."""
    x, y = split
    return torch.as_tensor(x.transpose(0, 3, 1, 2)), torch.as_tensor(y)


def train(model, split, epochs, lr):
    """The usual loop: model.train(), then SGD over what requires grad."""
    x, y = tensors(split)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()


@torch.no_grad()
def accuracy(model, split):
    x, y = tensors(split)
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


# or timm.create_model("resnet18", pretrained=False, num_classes=10)
model = torchvision.models.resnet18(weights=None, num_classes=10)
train(model, source.train, epochs=2, lr=0.05)  # "pretraining" on the source digits
bnkit.adapt(model, tensors(source.train)[0])  # exact statistics for the final weights
print(f"source test accuracy: {accuracy(model, source.test):.1%}")

# The trap: requires_grad=False on the backbone, then the usual loop.
trap = torchvision.models.resnet18(weights=None, num_classes=10)
trap.load_state_dict(model.state_dict())
for name, p in trap.named_parameters():
    p.requires_grad = name.startswith("fc.")
print(bnkit.check(trap))  # BN011: gamma/beta fixed while the statistics still update
with bnkit.watch(trap) as w:
    train(trap, target.train, epochs=1, lr=0.01)
print(
    "requires_grad=False, statistics kept:", w.report.counts()["bn_stats_kept"], "of 20"
)

# bnkit: everything before layer4 frozen; layer4 and fc trained, every BN frozen.
plan = bnkit.freeze(model, train_from="layer4", bn="frozen")
print(plan)
with bnkit.watch(model) as w:
    train(model, target.train, epochs=2, lr=0.01)
print(w.report)
print(f"target test accuracy: {accuracy(model, target.test):.1%}")
assert w.report.ok and w.report.counts()["bn_stats_kept"] == 20
assert np.isfinite(accuracy(model, target.test))
