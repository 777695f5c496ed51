"""Hugging Face integration: a `TrainerCallback` that applies a bnkit freeze plan when
training begins, keeps its BN modes through the `model.train()` the Trainer calls before
every step, optionally unfreezes more of the model at an epoch, and reports what `watch`
saw every epoch into the Trainer's logs. Imported only by its users (it imports
transformers)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from bnkit.finetune import Schedule
from bnkit.policy import Plan, Rule
from bnkit.watch import BNWatchError, WatchReport

__all__ = ["BNFinetuning", "BNWatchError"]

HANDLER_DEPTH = 6
"""How far up the call stack the Trainer's CallbackHandler is looked for."""


class BNFinetuning(TrainerCallback):
    """Fine-tunes a model with a Hugging Face `Trainer`, BN modes pinned and watched.

    The Trainer calls `model.train()` before every step, so BN layers put in `eval()`, or
    frozen with `requires_grad=False`, go back to updating their statistics. This
    callback applies a bnkit plan at `on_train_begin` to the model (or its submodule
    `module`, `"resnet"` for `ResNetForImageClassification`, `"timm_model"` for a
    `TimmWrapper` model): everything before `train_from` frozen with BN `frozen`, the rest
    trainable with BN in mode `bn`, then `rules`; or `plan`, a `bnkit.Plan`. The modes
    are pinned, so every `model.train()` keeps them. With `unfreeze_at_epoch`, from that
    epoch everything from `unfreeze_from` trains with BN in mode `unfreeze_bn`
    (parameters the optimizer lacks join it as a new group, at `unfreeze_lr`, by default
    a tenth of the first group's rate).

    Every epoch `watch` compares what changed with the plan. The counts (`bn_layers`,
    `bn_stats_kept`, `bn_affine_kept`, `bn_problems`) join the logs the Trainer writes at
    the end of the epoch: `state.log_history`, and TensorBoard, W&B or any other
    `report_to` integration. A difference warns (`BnkitWarning`), stops training after
    the epoch (`control.should_training_stop`), or raises `BNWatchError`, as
    `on_problem` says. Works with any `torch.nn.Module` the Trainer trains. On a model
    `bnkit.peft.get_peft_model` built, the callback keeps the BN modes given there (and
    saved with the adapter) and watches them: give it no `train_from`, `rules` or plan.

    Args:
        train_from: first trained module path (relative to `module`, or a module of the
            model outside it); None: all.
        bn: BN mode of the trained part (`frozen`, `affine`, `train`, `adapt`).
        rules: extra `"SELECTOR=MODE"` rules, applied last.
        plan: a plan to apply instead of `train_from`/`bn`/`rules`.
        module: the attribute path of the submodule the plan applies to; None: the
            whole model.
        unfreeze_at_epoch: the epoch (0-based) at which to unfreeze more.
        unfreeze_from: first module trained from then on; None: everything.
        unfreeze_bn: the BN mode of the trained part from then on (default: `bn`).
        unfreeze_lr: learning rate of the new parameter group.
        on_problem: `warn`, `stop` or `raise`.

    Examples:
        >>> import torch, transformers
        >>> from bnkit.transformers_callbacks import BNFinetuning
        >>> config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
        ...                                    depths=[1, 1], num_labels=3)
        >>> model = transformers.ResNetForImageClassification(config)
        >>> data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(8)]
        >>> callback = BNFinetuning(train_from="classifier", bn="frozen", on_problem="raise")
        >>> args = transformers.TrainingArguments("out", num_train_epochs=2, report_to=[],
        ...     per_device_train_batch_size=4, save_strategy="no", use_cpu=True)
        >>> trainer = transformers.Trainer(model, args, train_dataset=data,
        ...                                callbacks=[callback])
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'loss': ..., 'epoch': '1', 'bn_layers': 8, 'bn_stats_kept': 8, 'bn_affine_kept': 8, ...}
        {'loss': ..., 'epoch': '2', 'bn_layers': 8, 'bn_stats_kept': 8, 'bn_affine_kept': 8, ...}
        {'train_runtime': ...}
        >>> [h["bn_stats_kept"] for h in trainer.state.log_history if "bn_stats_kept" in h]
        [8, 8]
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
        self.schedule = Schedule(
            train_from, bn, rules, plan=plan, module=module,
            unfreeze_at_epoch=unfreeze_at_epoch, unfreeze_from=unfreeze_from,
            unfreeze_bn=unfreeze_bn, unfreeze_lr=unfreeze_lr, on_problem=on_problem,
        )  # fmt: skip
        self._pending: dict[str, int] | None = None

    @property
    def reports(self) -> list[WatchReport]:
        """Every epoch's `WatchReport`."""
        return self.schedule.reports

    @property
    def applied(self) -> Plan | None:
        """The plan in force."""
        return self.schedule.applied

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.schedule.apply(kwargs["model"])
        self._first_in_line()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = round(state.epoch or 0)
        self.schedule.epoch_started(kwargs["model"], epoch, kwargs.get("optimizer"))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ended = self.schedule.epoch_ended(round(state.epoch or 0))
        if ended is None:
            return
        counts, stop = ended
        self._pending = counts
        control.should_log = True  # the Trainer logs right after the epoch ends
        if stop:
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pending is None:
            return
        logs = kwargs.get("logs")
        if logs is not None:  # the integrations after this callback see the counts
            logs.update(self._pending)
        if state.log_history:
            state.log_history[-1].update(self._pending)
        self._pending = None

    def _first_in_line(self) -> None:
        """Moves this callback ahead of the Trainer's other callbacks, so that the counts
        it adds to the logs reach the `report_to` integrations (which the Trainer puts
        before the user's callbacks). Moving it to the front while the Trainer iterates
        the list skips and repeats nothing: the callbacks after it keep their places."""
        frame: FrameType | None = sys._getframe(1)
        for _ in range(HANDLER_DEPTH):
            if frame is None:
                return
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and self in handler.callbacks:
                handler.callbacks.remove(self)
                handler.callbacks.insert(0, self)
                return
            frame = frame.f_back
