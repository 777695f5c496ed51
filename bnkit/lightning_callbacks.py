"""Lightning integration: a callback that applies a bnkit freeze plan when `fit` sets up,
keeps its BN modes through every `model.train()` Lightning makes, optionally unfreezes
more of the backbone at an epoch with a new parameter group, and watches BN each epoch.
Imported only by its users (it imports Lightning)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from bnkit.finetune import Schedule
from bnkit.policy import Plan, Rule
from bnkit.watch import BNWatchError, WatchReport

__all__ = ["BNFinetuning", "BNWatchError"]


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
    keeps every epoch's `WatchReport`. On a model `bnkit.peft.get_peft_model` built, the
    callback keeps the BN modes given there (and saved with the adapter) and watches
    them: give it no `train_from`, `rules` or plan.

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
        self.schedule = Schedule(
            train_from, bn, rules, plan=plan, module=module,
            unfreeze_at_epoch=unfreeze_at_epoch, unfreeze_from=unfreeze_from,
            unfreeze_bn=unfreeze_bn, unfreeze_lr=unfreeze_lr, on_problem=on_problem,
        )  # fmt: skip

    @property
    def reports(self) -> list[WatchReport]:
        """Every epoch's `WatchReport`."""
        return self.schedule.reports

    @property
    def applied(self) -> Plan | None:
        """The plan in force."""
        return self.schedule.applied

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.schedule.apply(pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.schedule.epoch_started(pl_module, trainer.current_epoch, optimizer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        ended = self.schedule.epoch_ended(trainer.current_epoch)
        if ended is None:
            return
        counts, stop = ended
        metrics = {k: float(v) for k, v in counts.items()}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, logger=bool(trainer.loggers))
        if stop:
            trainer.should_stop = True
