"""Lightning integration: a callback that applies a bnkit freeze plan when `fit` sets up,
keeps its BN modes through every `model.train()` Lightning makes, optionally unfreezes
more of the backbone at an epoch with a new parameter group, and watches BN each epoch.
Imported only by its users (it imports Lightning)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from bnkit.errors import BnkitError
from bnkit.freeze import freeze
from bnkit.policy import AllLayers, Mode, Plan, Rule, parse_mode
from bnkit.watch import ACTIONS, BNWatchError, Watch, WatchReport, act_on_problems, epoch_counts

__all__ = ["BNFinetuning", "BNWatchError"]


def _inside(target: Any, module: str | None, train_from: str | None) -> str | None:
    """`train_from` as a path inside `target` (a path from the LightningModule that
    starts with `module.` counts too), or None when it is not one."""
    if train_from is None:
        return None
    names = {name for name, _ in target.named_modules() if name}
    if train_from in names:
        return train_from
    if module and train_from.startswith(module + ".") and train_from[len(module) + 1 :] in names:
        return train_from[len(module) + 1 :]
    return None


UNFREEZE_LR_FACTOR = 0.1
"""Lightning's BackboneFinetuning starts the unfrozen part at the current rate / 10."""


class BNFinetuning(pl.Callback):
    """Fine-tunes a LightningModule with pinned BN modes and checks every epoch that
    they held.

    At `setup` (before Lightning calls `configure_optimizers`) it applies the plan to
    the module (or to its submodule `module`): everything before `train_from` frozen
    with BN `frozen`, the rest trainable with BN in mode `bn`, then `rules`; or `plan`,
    a `bnkit.Plan` made before. BN modes are pinned, so Lightning's `model.train()`
    calls do not undo them (unlike `bn.eval()`, or `BaseFinetuning.freeze`, which
    leaves BN normalising with batch statistics in training).

    With `unfreeze_at_epoch`, at the start of that epoch everything from
    `unfreeze_from` (the whole module when None) becomes trainable with BN in mode
    `unfreeze_bn`, and the parameters that newly require grad join the first
    optimizer as a new parameter group, at `unfreeze_lr` (by default the first group's
    rate times 0.1, as BackboneFinetuning does). The BN modes are honoured in both
    phases, unlike BackboneFinetuning's `train_bn` (Lightning issue 21531).

    Every epoch `watch` compares what changed with the plan. The counts go to the
    Trainer's logger and `callback_metrics` (`bn_layers`, `bn_stats_kept`,
    `bn_affine_kept`, `bn_problems`); a difference warns (`BnkitWarning`), stops the
    fit after the epoch, or raises `BNWatchError`, as `on_problem` says. `reports`
    keeps every epoch's `WatchReport`.

    Args:
        train_from: first trained module path (relative to `module`); None: all.
        bn: BN mode of the trained part (`frozen`, `affine`, `train`, `adapt`).
        rules: extra `"SELECTOR=MODE"` rules, applied last.
        plan: a plan to apply instead of `train_from`/`bn`/`rules`.
        module: the attribute path of the submodule to fine-tune (e.g. `backbone`);
            None: the whole LightningModule.
        unfreeze_at_epoch: the epoch (0-based) at which to unfreeze more.
        unfreeze_from: first module trained from then on; None: everything.
        unfreeze_bn: the BN mode of the trained part from then on (default: `bn`).
        unfreeze_lr: learning rate of the new parameter group.
        on_problem: `warn`, `stop` or `raise`.

    Examples:
        >>> import lightning.pytorch as pl, torch
        >>> from torch import nn
        >>> from bnkit.lightning_callbacks import BNFinetuning
        >>> class Classifier(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8),
        ...                                  nn.Linear(8, 2))
        ...     def training_step(self, batch, _):
        ...         x, y = batch
        ...         return nn.functional.cross_entropy(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.arange(16) % 2)
        >>> callback = BNFinetuning(train_from="net.2", bn="frozen", on_problem="raise")
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[callback], logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False,
        ...     enable_model_summary=False)
        >>> trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> [r.counts()["bn_stats_kept"] for r in callback.reports]
        [1, 1]
    """

    def __init__(
        self,
        train_from: str | None = None,
        bn: str | None = "frozen",
        rules: Sequence[Rule | str] = (),
        *,
        plan: Plan | None = None,
        module: str | None = None,
        unfreeze_at_epoch: int | None = None,
        unfreeze_from: str | None = None,
        unfreeze_bn: str | None = None,
        unfreeze_lr: float | None = None,
        on_problem: str = "warn",
    ) -> None:
        super().__init__()
        if on_problem not in ACTIONS:
            raise BnkitError(f"on_problem must be one of {', '.join(ACTIONS)}, got {on_problem!r}")
        if plan is not None and (train_from is not None or rules):
            raise BnkitError("give either plan= or train_from/bn/rules, not both")
        if unfreeze_at_epoch is not None and unfreeze_at_epoch < 0:
            raise BnkitError(f"unfreeze_at_epoch must be 0 or more, got {unfreeze_at_epoch}")
        self.train_from, self.bn, self.rules, self.plan = train_from, bn, tuple(rules), plan
        self.module = module
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.unfreeze_from = unfreeze_from
        self.unfreeze_bn = unfreeze_bn if unfreeze_bn is not None else bn
        self.unfreeze_lr = unfreeze_lr
        self.on_problem = on_problem
        self.reports: list[WatchReport] = []
        self.applied: Plan | None = None
        """the plan in force."""
        self._watch: Watch | None = None

    def _target(self, pl_module: Any) -> Any:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            names = ", ".join(n for n, _ in pl_module.named_children())
            raise BnkitError(
                f"the LightningModule has no submodule {self.module!r}: give one of {names}"
            ) from None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        target = self._target(pl_module)
        if self.plan is not None:
            self.applied = freeze(target, self.plan)
        else:
            self.applied = self._freeze(pl_module, target, self.train_from, self.bn)
        self.reports = []

    def _freeze(self, pl_module: Any, target: Any, train_from: str | None, bn: str | None) -> Plan:
        """`freeze(target, train_from=..., bn=...)`, where `train_from` may also name a
        module of the LightningModule outside `module` (the usual `self.backbone` and
        `self.head`, `module="backbone"`, `train_from="head"`): then all of `module`
        comes before it (frozen, BN `frozen`) or after it (trained, BN `bn`)."""
        inside = _inside(target, self.module, train_from)
        order = [name for name, _ in pl_module.named_modules()]
        if self.module is None or inside is not None or train_from not in order:
            return freeze(target, train_from=inside or train_from, bn=bn, rules=self.rules)
        before = order.index(train_from) > order.index(self.module or "")
        mode = Mode.FROZEN if before else (None if bn is None else parse_mode(bn))
        rule = Rule(AllLayers(), trainable=not before, bn=mode)
        return freeze(target, rules=(rule, *self.rules))

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        target = self._target(pl_module)
        if trainer.current_epoch == self.unfreeze_at_epoch:
            self._unfreeze(trainer, target)
        self._watch = Watch(target, self.applied)
        self._watch.start()

    def _unfreeze(self, trainer: Any, target: Any) -> None:
        if not trainer.optimizers:
            raise BnkitError("unfreeze_at_epoch needs an optimizer: configure_optimizers gave none")
        optimizer = trainer.optimizers[0]
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.applied = self._freeze(trainer.lightning_module, target, self.unfreeze_from,
                                    self.unfreeze_bn)  # fmt: skip
        new = [p for p in target.parameters() if p.requires_grad and id(p) not in known]
        if not new:
            return
        lr = self.unfreeze_lr
        if lr is None:
            lr = optimizer.param_groups[0]["lr"] * UNFREEZE_LR_FACTOR
        optimizer.add_param_group({"params": new, "lr": lr})

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._watch is None:
            return
        report = self._watch.stop()
        self._watch = None
        self.reports.append(report)
        metrics = {k: float(v) for k, v in epoch_counts(report).items()}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, logger=bool(trainer.loggers))
        if act_on_problems(report, trainer.current_epoch, self.on_problem):
            trainer.should_stop = True
