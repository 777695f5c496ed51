"""Fine-tune a Hugging Face vision model with the `Trainer`, BN frozen for real: the
Trainer calls `model.train()` before every step, so BN put in `eval()` or frozen by
`requires_grad=False` updates its statistics anyway. The script measures each way of
freezing on a small `ResNetForImageClassification` (random weights, nothing
downloaded) and prints the table of the guide.

    python examples/transformers_finetune.py
"""

import tempfile

import numpy as np
import torch
import transformers
from torch import nn

import bnkit
from bnkit.data import digits
from bnkit.transformers_callbacks import BNFinetuning

images, labels = digits("target", size=32).train
data = [
    {"pixel_values": torch.as_tensor(x.transpose(2, 0, 1)), "labels": int(y)}
    for x, y in zip(images[:64], labels[:64], strict=True)
]


def model() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10
    )
    return transformers.ResNetForImageClassification(config)


def bn_values(m: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (b.running_mean.clone(), b.weight.detach().clone())
        for name, b in m.named_modules()
        if isinstance(b, nn.BatchNorm2d)
    }


def train(m: nn.Module, callbacks=()) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=16,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, log_level="error",
    )  # fmt: skip
    trainer = transformers.Trainer(
        m, args, train_dataset=data, callbacks=list(callbacks)
    )
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    return trainer


def bn_eval(m):
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.eval()


def bn_no_grad(m):
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.requires_grad_(False)


approaches = {
    "requires_grad=False on every BN": (bn_no_grad, None),
    "bn.eval() on every BN": (bn_eval, None),
    "requires_grad=False on model.resnet": (
        lambda m: m.resnet.requires_grad_(False),
        None,
    ),
    "bnkit BNFinetuning(bn='frozen')": (None, "frozen"),
    "bnkit BNFinetuning(bn='affine')": (None, "affine"),
    "bnkit BNFinetuning(bn='train')": (None, "train"),
}
print("| approach | BN | kept statistics | kept gamma/beta | watch |")
print("|---|---|---|---|---|")
for name, (setup, mode) in approaches.items():
    m = model()
    if setup is not None:
        setup(m)
    callbacks = [BNFinetuning(bn=mode, on_problem="raise")] if mode else []
    before = bn_values(m)
    trainer = train(m, callbacks)
    after = bn_values(m)
    stats = sum(torch.equal(before[k][0], after[k][0]) for k in before)
    gamma = sum(torch.equal(before[k][1], after[k][1]) for k in before)
    logged = [h for h in trainer.state.log_history if "bn_problems" in h]
    watch = "as planned" if logged and logged[-1]["bn_problems"] == 0 else ""
    n = len(before)
    print(f"| {name} | {n} | {stats}/{n} | {gamma}/{n} | {watch} |")
    if mode == "frozen":
        assert stats == gamma == len(before)
        kept = logged[-1]["bn_stats_kept"]  # in state.log_history, and any report_to
print(f"\nstate.log_history holds the watch counts: bn_stats_kept={kept}")
print(bnkit.inspect(model()).summary().splitlines()[0])
assert np.isfinite(kept)
