"""LoRA on a BN network with PEFT, and what the saved adapter gives back. PEFT freezes
the base with `requires_grad=False`, which does not stop BN statistics from moving in
`train()`, and its adapter does not save them: the model `PeftModel.from_pretrained`
reloads is not the one you trained. `bnkit.peft.get_peft_model` gives each BN mode its
meaning and saves what the mode changes with the adapter. The script trains a
torchvision resnet18 (random weights, 3 SGD steps on 64 digits) each way, saves the
adapter, reloads it with plain PEFT, and prints the gap between the two models' logits.

    python examples/peft_lora.py
"""

import tempfile

import numpy as np
import peft
import torch
import torchvision
from torch import nn

import bnkit.peft
from bnkit.data import digits

images, labels = digits("target", size=32).train
x = torch.as_tensor(images[:64].transpose(0, 3, 1, 2))
y = torch.as_tensor(labels[:64])


def resnet18() -> nn.Module:
    torch.manual_seed(0)  # the same "pretrained" base every time
    return torchvision.models.resnet18(weights=None, num_classes=10)


def lora() -> peft.LoraConfig:
    return peft.LoraConfig(
        target_modules=["conv1", "conv2"], r=4, modules_to_save=["fc"]
    )


def train_save_reload(model: nn.Module) -> float:
    """3 SGD steps, save_pretrained, plain from_pretrained: the logits' gap."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for step in range(3):
        opt.zero_grad()
        batch = slice(step * 16, step * 16 + 16)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    reloaded = peft.PeftModel.from_pretrained(resnet18(), folder)
    with torch.no_grad():
        return float((model.eval()(x) - reloaded.eval()(x)).abs().max())


print("| how the adapter was made | BN saved with it | max logit gap after reload |")
print("|---|---|---|")
gap = train_save_reload(peft.get_peft_model(resnet18(), lora()))
print(f"| peft.get_peft_model | 0 | {gap:.3g} |")
for mode in ("frozen", "affine", "train", "adapt"):
    data = images[64:192].transpose(0, 3, 1, 2) if mode == "adapt" else None
    model = bnkit.peft.get_peft_model(resnet18(), lora(), bn=mode, data=data)
    report = bnkit.peft.adapter_report(model)
    gap = train_save_reload(model)
    print(f"| bnkit.peft.get_peft_model(bn='{mode}') | {report.bn_saved} | {gap:.3g} |")
    assert gap <= 1e-5
print()
print(report)
assert np.isfinite(gap)
