"""Ultralytics YOLO integration: `freeze=N` that keeps the first N blocks' weights and
their BN statistics, through the trainer's `model.train()` calls, its EMA copy, the
checkpoints it saves and `model.fuse()`. Imported only by its users; it imports no
Ultralytics module itself (the trainer and its model are used through their attributes).

In Ultralytics 8.4 the trainer's own `freeze=N` puts the frozen blocks' BatchNorm2d in
`eval()` at the start of each epoch, but the recipe its users share for freezing
(`requires_grad=False` in an `on_train_start` callback, or on the model before
`train()`) leaves every BN in those blocks updating its statistics, and the trainer sets
`requires_grad=True` again on every layer outside its own `freeze` list.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from bnkit.errors import BnkitError
from bnkit.freeze import freeze as bnkit_freeze
from bnkit.policy import Mode, Plan, Regex, Rule, parse_mode
from bnkit.watch import ACTIONS, Watch, WatchReport, act_on_problems

__all__ = ["FreezeCallbacks", "freeze", "frozen_blocks"]


def frozen_blocks(freeze: int | Sequence[int]) -> tuple[int, ...]:
    """The block indices `freeze` names, as Ultralytics reads it: N means blocks 0..N-1,
    a list names the blocks (NumPy integers count as integers, as in Ultralytics)."""
    wrong = (
        f"freeze must be a number of blocks or a list of block indices (0, 1, ...), got "
        f"{freeze!r} ({type(freeze).__name__})"
    )
    if isinstance(freeze, numbers.Integral) and not isinstance(freeze, bool):
        if int(freeze) < 0:
            raise BnkitError(f"freeze must be 0 or more, got {freeze}")
        return tuple(range(int(freeze)))
    if isinstance(freeze, (str, bytes)) or not isinstance(freeze, Iterable):
        raise BnkitError(wrong)
    blocks = tuple(freeze)
    whole = [b for b in blocks if isinstance(b, numbers.Integral) and not isinstance(b, bool)]
    if len(whole) != len(blocks) or any(int(b) < 0 for b in whole):
        raise BnkitError(wrong)
    return tuple(int(b) for b in whole)


class FreezeCallbacks:
    """The callbacks `freeze` registers on a YOLO object, and what they saw: `plan` (the
    plan applied to the trainer's model) and `reports` (one `WatchReport` per epoch)."""

    def __init__(self, blocks: tuple[int, ...], bn: Mode, on_problem: str) -> None:
        self.blocks = blocks
        self.bn = bn
        self.on_problem = on_problem
        self.plan: Plan | None = None
        self.reports: list[WatchReport] = []
        self._watch: Watch | None = None

    @property
    def selector(self) -> Regex:
        """The layers of the frozen blocks (`model.3.conv`, `model.3.bn`, ...)."""
        names = "|".join(str(b) for b in self.blocks)
        return Regex(rf"^model\.(?:{names})\.")

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        """After the trainer built its model, optimizer and EMA: pin the plan. The EMA
        copy stays in inference mode and averages statistics that no longer move."""
        rule = Rule(self.selector, trainable=False, bn=self.bn)  # BN in mode bn, the rest fixed
        self.plan = bnkit_freeze(trainer.model, rules=[rule])
        self.reports = []

    def on_train_epoch_start(self, trainer: Any) -> None:
        self._watch = Watch(trainer.model, self.plan)
        self._watch.start()

    def on_train_epoch_end(self, trainer: Any) -> None:
        if self._watch is None:
            return
        report = self._watch.stop()
        self._watch = None
        self.reports.append(report)
        if act_on_problems(report, int(getattr(trainer, "epoch", 0)), self.on_problem):
            trainer.stop = True


def freeze(
    model: Any,
    freeze: int | Sequence[int] = 10,
    bn: str | Mode = "frozen",
    *,
    on_problem: str = "warn",
) -> FreezeCallbacks:
    """Makes the next `model.train(...)` of an Ultralytics YOLO object keep the first
    `freeze` blocks (or the blocks listed) fixed: their weights, and their BN layers in
    mode `bn` (`frozen`: statistics and gamma/beta fixed; `affine`: gamma/beta trained on
    fixed statistics; `adapt`: as frozen). The modes are pinned on the trainer's model
    when its training routine is ready, so every `model.train()` the trainer calls keeps
    them; the EMA copy the trainer keeps (and saves) averages statistics that no longer
    move, and `model.fuse()` folds the pinned BN like any other. Every epoch `watch`
    checks the plan held; a difference warns, stops training (`trainer.stop`) or raises
    `BNWatchError`, as `on_problem` says.

    Pass the same `freeze` to `model.train(...)` or not: either way the blocks are
    frozen here.

    Args:
        model: an `ultralytics.YOLO` (or any object with `add_callback`).
        freeze: the number of leading blocks, or a list of block indices.
        bn: the BN mode of the frozen blocks.
        on_problem: `warn`, `stop` or `raise`.

    Returns:
        The registered callbacks, whose `plan` and `reports` fill during training.
    """
    if on_problem not in ACTIONS:
        raise BnkitError(f"on_problem must be one of {', '.join(ACTIONS)}, got {on_problem!r}")
    mode = parse_mode(bn)
    if mode is Mode.TRAIN:
        raise BnkitError("bn='train' in frozen blocks is what Ultralytics' own training does; "
                         "give frozen, affine or adapt")  # fmt: skip
    if not hasattr(model, "add_callback"):
        raise BnkitError(
            f"expected an ultralytics YOLO object (with add_callback), got {type(model).__name__}"
        )
    callbacks = FreezeCallbacks(frozen_blocks(freeze), mode, on_problem)
    for event in ("on_pretrain_routine_end", "on_train_epoch_start", "on_train_epoch_end"):
        model.add_callback(event, getattr(callbacks, event))
    return callbacks
