"""The Hugging Face `Trainer` callback with a real Trainer on CPU (no downloads, no
reporting but where a test asks for TensorBoard): the trap it fixes happening without
it, frozen BN bit-identical and affine moving only gamma/beta with it, the counts in
`state.log_history` and in TensorBoard's event file, TimmWrapper models and a plain
`nn.Module`, and an off-plan epoch that stops or raises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnkit

transformers = pytest.importorskip("transformers")
from bnkit.transformers_callbacks import BNFinetuning, BNWatchError  # noqa: E402


def resnet() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3
    )
    return transformers.ResNetForImageClassification(config)


def timm_wrapper() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.TimmWrapperConfig(architecture="resnet18", num_labels=3)
    return transformers.TimmWrapperForImageClassification(config)


class PlainNet(nn.Module):
    """A plain module as the Trainer takes one: a dict batch in, the loss out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.body(pixel_values))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def data(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=g) * 2 + 1, "labels": i % 3}
            for i in range(n)]  # fmt: skip


def train(model, callbacks=(), epochs: int = 2, tmp_path=None, report_to=()):
    args = transformers.TrainingArguments(
        str(tmp_path or "out"), num_train_epochs=epochs, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=list(report_to), save_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model, args, train_dataset=data(), callbacks=list(callbacks))
    trainer.train()
    return trainer


def bn_state(model: nn.Module) -> dict[str, np.ndarray]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for key, t in (("mean", m.running_mean), ("var", m.running_var),
                           ("gamma", m.weight), ("beta", m.bias)):  # fmt: skip
                out[f"{name}.{key}"] = t.detach().numpy().copy()
    return out


def moved(before: dict, after: dict, key: str) -> list[str]:
    return [k for k in before if k.endswith(key) and not np.array_equal(before[k], after[k])]


def test_without_bnkit_the_trainer_moves_frozen_bn_statistics(tmp_path):
    model = resnet()
    for m in model.modules():  # the usual freeze: requires_grad off and eval()
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.requires_grad_(False)
    before = bn_state(model)
    train(model, tmp_path=tmp_path)
    after = bn_state(model)
    assert moved(before, after, "mean") and not moved(before, after, "gamma")


@pytest.mark.parametrize("build", [resnet, timm_wrapper, PlainNet], ids=["resnet", "timm", "plain"])
def test_frozen_bn_is_bit_identical_and_counts_reach_the_log_history(tmp_path, build):
    model = build()
    before = bn_state(model)
    callback = BNFinetuning(bn="frozen", on_problem="raise")
    trainer = train(model, [callback], tmp_path=tmp_path)
    after = bn_state(model)
    assert not moved(before, after, "")  # every statistic and gamma/beta
    logged = [h for h in trainer.state.log_history if "bn_stats_kept" in h]
    n_bn = len(bnkit.inspect(model).bn_layers)
    assert [h["bn_stats_kept"] for h in logged] == [n_bn, n_bn]
    assert [h["bn_problems"] for h in logged] == [0, 0]


def test_affine_moves_only_gamma_and_beta(tmp_path):
    model = resnet()
    before = bn_state(model)
    train(model, [BNFinetuning(bn="affine", on_problem="raise")], tmp_path=tmp_path)
    after = bn_state(model)
    assert not moved(before, after, "mean") and not moved(before, after, "var")
    assert moved(before, after, "gamma") and moved(before, after, "beta")


def test_a_submodule_and_a_sibling_train_from(tmp_path):
    model = resnet()
    before = {k: v.detach().clone() for k, v in model.resnet.state_dict().items()}
    head = model.classifier[-1].weight.detach().clone()
    callback = BNFinetuning(module="resnet", train_from="classifier", on_problem="raise")
    train(model, [callback], tmp_path=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.resnet.state_dict().items())
    assert not torch.equal(head, model.classifier[-1].weight)


def test_the_counts_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(resnet(), [BNFinetuning(on_problem="raise")], tmp_path=tmp_path,
          report_to=["tensorboard"])  # fmt: skip
    (event_file,) = tmp_path.rglob("events.out.tfevents*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/bn_stats_kept" in scalars, scalars
    assert [e.value for e in events.Scalars("train/bn_stats_kept")] == [8.0, 8.0]


class UnfreezesOnItsOwn(transformers.TrainerCallback):
    """A user's callback that makes a frozen layer trainable at epoch 1 (off plan)."""

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if round(state.epoch or 0) == 1:
            model.resnet.embedder.embedder.convolution.weight.requires_grad_(True)


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_an_off_plan_epoch_stops_or_raises(tmp_path, action):
    model = resnet()
    callback = BNFinetuning(train_from="classifier", on_problem=action)
    if action == "raise":
        with pytest.raises(BNWatchError, match="off plan"):
            train(model, [callback, UnfreezesOnItsOwn()], epochs=3, tmp_path=tmp_path)
        return
    with pytest.warns(bnkit.BnkitWarning, match="off plan"):
        trainer = train(model, [callback, UnfreezesOnItsOwn()], epochs=3, tmp_path=tmp_path)
    assert len(callback.reports) == 2  # stopped after the off-plan epoch, not at epoch 3
    assert [h["bn_problems"] > 0 for h in trainer.state.log_history if "bn_problems" in h] == [
        False,
        True,
    ]


def test_unfreeze_at_an_epoch_honours_the_new_bn_mode(tmp_path):
    model = resnet()
    callback = BNFinetuning(train_from="classifier", bn="frozen", unfreeze_at_epoch=1,
                            unfreeze_bn="affine", on_problem="raise")  # fmt: skip
    train(model, [callback], tmp_path=tmp_path)
    first, second = (r.counts() for r in callback.reports)
    n_bn = first["bn_layers"]
    assert first["bn_affine_kept"] == n_bn and second["bn_affine_kept"] < n_bn
    assert first["bn_stats_kept"] == second["bn_stats_kept"] == n_bn


def test_unfreeze_from_none_unfreezes_the_whole_model_through_the_trainer(tmp_path):
    """unfreeze_at_epoch with unfreeze_from=None trains everything from that epoch (it
    unfroze nothing before): requires_grad and moved weights."""
    model = resnet()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    callback = BNFinetuning(train_from="classifier", bn="frozen", unfreeze_at_epoch=1,
                            unfreeze_bn="affine", on_problem="raise")  # fmt: skip
    train(model, [callback], epochs=2, tmp_path=tmp_path)
    assert all(p.requires_grad for p in model.parameters())
    end = model.state_dict()
    conv = "resnet.embedder.embedder.convolution.weight"
    assert not torch.equal(start[conv], end[conv])
    bn = "resnet.embedder.embedder.normalization"
    assert not torch.equal(start[f"{bn}.weight"], end[f"{bn}.weight"])
    assert torch.equal(start[f"{bn}.running_mean"], end[f"{bn}.running_mean"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_from": ["head"]}, "train_from must be a string"),
        ({"unfreeze_at_epoch": "2"}, "unfreeze_at_epoch must be a whole number"),
        ({"unfreeze_at_epoch": 1.5}, "unfreeze_at_epoch must be a whole number"),
        ({"unfreeze_lr": float("nan")}, "unfreeze_lr must be a positive number"),
        ({"unfreeze_lr": "fast"}, "unfreeze_lr must be a number"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_made(kwargs, message):
    with pytest.raises(bnkit.BnkitError, match=message):
        BNFinetuning(**kwargs)
