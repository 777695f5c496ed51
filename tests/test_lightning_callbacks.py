"""The Lightning callback, with a real `lightning.Trainer` on CPU: the plan is applied
before the optimizer is made, modes survive Lightning's `model.train()` calls, the
unfreeze adds a parameter group and honours BN modes, counts reach the logger, and an
off-plan epoch warns, stops or raises. Also: Lightning's own `BaseFinetuning.freeze`
leaves BN on batch statistics, and `bnkit.inspect` says so."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch_nets import net, state

import bnkit
from bnkit.lightning_callbacks import BNFinetuning, BNWatchError

pl = pytest.importorskip("lightning.pytorch")


class Classifier(pl.LightningModule):
    """The small residual CNN as a LightningModule; Adam over every parameter (parameters
    without a gradient are left alone), or over those that require grad (the
    BackboneFinetuning recipe)."""

    def __init__(self, unfreeze_stem_at: int | None = None, only_trainable: bool = False):
        super().__init__()
        self.backbone = net()
        self.unfreeze_stem_at = unfreeze_stem_at
        self.only_trainable = only_trainable

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_train_epoch_start(self):
        if self.current_epoch == self.unfreeze_stem_at:  # a hook that unfreezes on its own
            self.backbone.stem[0].weight.requires_grad_(True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad or not self.only_trainable]
        return torch.optim.Adam(params, lr=1e-2)


def loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 6, 6, generator=g) * 2 + 1
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=8)


def fit(model, callback, tmp_path, epochs: int = 3):
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", callbacks=[callback],
        logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, loader())
    return trainer


def logged(trainer, key: str) -> list[float]:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_plan_holds_through_lightning_and_counts_reach_the_logger(tmp_path):
    model = Classifier()
    before = state(model.backbone)
    callback = BNFinetuning(train_from="head", bn="frozen", module="backbone", on_problem="raise")
    trainer = fit(model, callback, tmp_path)
    after = state(model.backbone)
    assert not any(np.array_equal(before[k], after[k]) is False for k in before if "head" not in k)
    assert not np.array_equal(before["head.weight"], after["head.weight"])
    assert [r.counts()["bn_stats_kept"] for r in callback.reports] == [2, 2, 2]
    assert logged(trainer, "bn_stats_kept") == [2.0, 2.0, 2.0]
    assert float(trainer.callback_metrics["bn_problems"]) == 0.0
    modes = {r.path: r.bn_mode for r in bnkit.inspect(model.backbone).bn_layers}
    assert modes == {"stem.1": "frozen", "block.1": "frozen"}


def test_unfreeze_at_an_epoch_adds_a_parameter_group_and_honours_bn_modes(tmp_path):
    model = Classifier(only_trainable=True)
    start = state(model.backbone)
    seen = {}

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen[trainer.current_epoch] = state(pl_module.backbone)

    callback = BNFinetuning(train_from="head", bn="frozen", module="backbone",
                            unfreeze_at_epoch=1, unfreeze_from="block", unfreeze_bn="affine",
                            on_problem="raise")  # fmt: skip
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", callbacks=[callback, Spy()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(model, loader())
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1e-3)
    e0, e1 = seen[0], seen[1]
    assert np.array_equal(e0["block.0.weight"], start["block.0.weight"])  # frozen phase
    assert not np.array_equal(e1["block.0.weight"], e0["block.0.weight"])  # then trained
    assert not np.array_equal(e1["block.1.weight"], e0["block.1.weight"])  # affine: gamma
    assert np.array_equal(e1["block.1.running_mean"], start["block.1.running_mean"])  # no stats
    assert np.array_equal(e1["stem.0.weight"], start["stem.0.weight"])
    assert [r.counts()["bn_affine_kept"] for r in callback.reports] == [2, 1]


@pytest.mark.parametrize("action", ["warn", "stop", "raise"])
def test_an_off_plan_epoch_warns_stops_or_raises(tmp_path, action):
    model = Classifier(unfreeze_stem_at=1)
    callback = BNFinetuning(train_from="head", module="backbone", on_problem=action)
    if action == "raise":
        with pytest.raises(BNWatchError, match=r"epoch 1: BN off plan: stem\.0"):
            fit(model, callback, tmp_path)
        return
    with pytest.warns(bnkit.BnkitWarning, match=r"stem\.0"):
        trainer = fit(model, callback, tmp_path, epochs=3)
    epochs_run = len(callback.reports)
    assert epochs_run == (2 if action == "stop" else 3) and trainer.current_epoch == epochs_run
    assert [r.ok for r in callback.reports][:2] == [True, False]


def test_base_finetuning_freeze_leaves_batch_statistics_and_bnkit_pins_them(tmp_path):
    from lightning.pytorch.callbacks import BaseFinetuning

    model = Classifier()
    BaseFinetuning.freeze(model.backbone, train_bn=False)
    layers = {r.path: r for r in bnkit.inspect(model.backbone).bn_layers}
    assert layers["stem.1"].bn_state.batch_stats  # normalises with batch statistics in train()
    assert any("batch statistics" in str(n) for n in layers["stem.1"].notes)
    x = next(iter(loader()))[0][:2]
    model.train()
    lightning_train = model(x).detach()
    model.eval()
    eval_out = model(x).detach()
    assert not torch.allclose(lightning_train, eval_out, atol=1e-4)  # train() != eval()
    callback = BNFinetuning(train_from="head", module="backbone", on_problem="raise")
    fit(model, callback, tmp_path, epochs=1)
    layers = {r.path: r for r in bnkit.inspect(model.backbone).bn_layers}
    assert layers["stem.1"].bn_mode == "frozen" and not layers["stem.1"].bn_state.batch_stats
    model.train()
    pinned_train = model(x).detach()
    model.eval()
    assert torch.allclose(pinned_train, model(x).detach(), atol=1e-6)


def test_unfreeze_from_none_unfreezes_the_whole_module(tmp_path):
    """unfreeze_from=None means the whole module (it unfroze nothing before)."""
    model = Classifier(only_trainable=True)
    start = state(model.backbone)
    callback = BNFinetuning(train_from="head", bn="frozen", module="backbone",
                            unfreeze_at_epoch=1, unfreeze_bn="affine",
                            on_problem="raise")  # fmt: skip
    trainer = fit(model, callback, tmp_path, epochs=2)
    assert all(p.requires_grad for p in model.backbone.parameters())
    end = state(model.backbone)
    assert not np.array_equal(end["stem.0.weight"], start["stem.0.weight"])
    assert not np.array_equal(end["block.1.weight"], start["block.1.weight"])  # affine
    assert np.array_equal(end["block.1.running_mean"], start["block.1.running_mean"])
    assert len(trainer.optimizers[0].param_groups) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_problem": "panic"}, "on_problem must be one of"),
        ({"train_from": ["head"]}, "train_from must be a string"),
        ({"unfreeze_at_epoch": "2"}, "unfreeze_at_epoch must be a whole number"),
        ({"unfreeze_at_epoch": 1.5}, "unfreeze_at_epoch must be a whole number"),
        ({"unfreeze_at_epoch": -1}, "unfreeze_at_epoch must be at least 0"),
        ({"unfreeze_lr": float("nan")}, "unfreeze_lr must be a positive number"),
        ({"unfreeze_lr": -0.1}, "unfreeze_lr must be a positive number"),
        ({"unfreeze_lr": "0.1"}, "unfreeze_lr must be a number"),
        ({"bn": "frozn"}, "frozn"),
        ({"rules": 42}, "rule"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_made(kwargs, message):
    with pytest.raises(bnkit.BnkitError, match=message):
        BNFinetuning(**kwargs)


def test_one_rule_may_be_given_as_a_string():
    callback = BNFinetuning(rules="bn=affine")
    assert len(callback.schedule.rules) == 1 and callback.schedule.rules[0].bn.value == "affine"


def test_bad_arguments_get_one_clear_error():
    with pytest.raises(bnkit.BnkitError, match="on_problem must be one of"):
        BNFinetuning(on_problem="panic")
    callback = BNFinetuning(module="trunk")
    with pytest.raises(bnkit.BnkitError, match="no submodule 'trunk': give one of backbone"):
        callback.setup(None, Classifier(), "fit")


class BackboneAndHead(pl.LightningModule):
    """The usual layout: `self.backbone` (a network without its classifier) and
    `self.head`, a sibling of the backbone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_the_documented_recipe_works_on_the_backbone_and_head_layout(tmp_path):
    model = BackboneAndHead()
    before, head = state(model.backbone), model.head.weight.detach().clone()
    callback = BNFinetuning(module="backbone", train_from="head", bn="frozen", on_problem="raise")
    fit(model, callback, tmp_path, epochs=2)
    after = state(model.backbone)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # weights and statistics
    assert not torch.equal(head, model.head.weight)
    assert callback.applied is not None and callback.applied.bn_counts() == {"frozen": 2}
    # a path from the LightningModule into the module counts as a path inside it
    model = BackboneAndHead()
    callback = BNFinetuning(module="backbone", train_from="backbone.3", bn="affine")
    fit(model, callback, tmp_path, epochs=1)
    assert callback.applied.bn_counts() == {"frozen": 1, "affine": 1}
