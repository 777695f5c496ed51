"""What the PyTorch training front-ends' callbacks share (Lightning's Trainer, Hugging
Face's Trainer, Ultralytics): a freeze plan applied to a module or one of its submodules
when training starts, an optional unfreeze at an epoch with the newly trainable
parameters put into the optimizer, and `watch` over every epoch against the plan in
force. Imports no framework: modules and optimizers are used through their methods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bnkit.errors import BnkitError, check_int, check_rate, check_str
from bnkit.freeze import as_rules, built_plan, freeze
from bnkit.policy import AllLayers, Mode, Plan, Rule, parse_mode
from bnkit.watch import ACTIONS, Watch, WatchReport, act_on_problems, epoch_counts

UNFREEZE_LR_FACTOR = 0.1
"""Lightning's BackboneFinetuning starts the unfrozen part at the current rate / 10."""


class Schedule:
    """A fine-tuning schedule for BN: see the front-ends' callbacks for the arguments."""

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
        if on_problem not in ACTIONS:
            raise BnkitError(f"on_problem must be one of {', '.join(ACTIONS)}, got {on_problem!r}")
        rules = as_rules(rules)
        if plan is not None and (train_from is not None or rules):
            raise BnkitError("give either plan= or train_from/bn/rules, not both")
        if plan is not None and not isinstance(plan, Plan):
            raise BnkitError(f"plan must be a bnkit.Plan, got {type(plan).__name__}")
        for name, value in (("train_from", train_from), ("unfreeze_from", unfreeze_from)):
            if value is not None:
                check_str(value, name, "layer4")
        for mode in (bn, unfreeze_bn):
            if mode is not None:
                parse_mode(mode)
        if unfreeze_at_epoch is not None:
            check_int(unfreeze_at_epoch, "unfreeze_at_epoch", minimum=0)
        if unfreeze_lr is not None:
            check_rate(unfreeze_lr, "unfreeze_lr")
        self.train_from, self.bn, self.rules, self.plan = train_from, bn, rules, plan
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

    def target(self, root: Any) -> Any:
        """The module the plan applies to: `root`, or its submodule `module`."""
        if self.module is None:
            return root
        try:
            return root.get_submodule(self.module)
        except AttributeError:
            names = ", ".join(n for n, _ in root.named_children())
            raise BnkitError(
                f"the model has no submodule {self.module!r}: give one of {names}"
            ) from None

    def apply(self, root: Any) -> Plan:
        """Applies the plan (at the start of training)."""
        target = self.target(root)
        built = built_plan(target)
        if built is not None:
            self.applied = self._keep(built)
        elif self.plan is not None:
            self.applied = freeze(target, self.plan)
        else:
            self.applied = self._freeze(root, target, self.train_from, self.bn)
        self.reports = []
        return self.applied

    def _keep(self, built: Plan) -> Plan:
        """The plan of a model bnkit.peft built: its BN modes were set with the adapter
        (and the BN layers they train saved with it), so they are kept and watched."""
        if self.plan is not None or self.train_from is not None or self.rules:
            raise BnkitError(
                "this model was built by bnkit.peft.get_peft_model, which set its BN modes "
                "with the adapter: give train_from, rules or bn there, not to the callback"
            )
        if self.unfreeze_at_epoch is not None:
            raise BnkitError(
                "unfreeze_at_epoch is not for a model bnkit.peft built: its trainable "
                "part is the adapter's"
            )
        return built

    def epoch_started(self, root: Any, epoch: int, optimizer: Any) -> None:
        """Unfreezes at `unfreeze_at_epoch`, then starts watching the epoch."""
        target = self.target(root)
        if epoch == self.unfreeze_at_epoch:
            self._unfreeze(root, target, optimizer)
        self._watch = Watch(target, self.applied)
        self._watch.start()

    def epoch_ended(self, epoch: int) -> tuple[dict[str, int], bool] | None:
        """The epoch's counts, and whether training should stop; None when no epoch was
        watched. Warns or raises as `on_problem` says."""
        if self._watch is None:
            return None
        report = self._watch.stop()
        self._watch = None
        self.reports.append(report)
        return epoch_counts(report), act_on_problems(report, epoch, self.on_problem)

    def _freeze(self, root: Any, target: Any, train_from: str | None, bn: str | None) -> Plan:
        """`freeze(target, train_from=..., bn=...)`, where `train_from` may also name a
        module of `root` outside `module` (the usual `self.backbone` and `self.head`,
        `module="backbone"`, `train_from="head"`): then all of `module` comes before it
        (frozen, BN `frozen`) or after it (trained, BN `bn`)."""
        inside = _inside(target, self.module, train_from)
        order = [name for name, _ in root.named_modules()]
        if self.module is None or inside is not None or train_from not in order:
            return freeze(target, train_from=inside or train_from, bn=bn, rules=self.rules)
        before = order.index(train_from) > order.index(self.module)
        mode = Mode.FROZEN if before else (None if bn is None else parse_mode(bn))
        rule = Rule(AllLayers(), trainable=not before, bn=mode)
        return freeze(target, rules=(rule, *self.rules))

    def _unfreeze(self, root: Any, target: Any, optimizer: Any) -> None:
        if optimizer is None:
            raise BnkitError("unfreeze_at_epoch needs an optimizer: the trainer gave none")
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if self.unfreeze_from is None:  # everything trains from here, BN in its mode
            mode = None if self.unfreeze_bn is None else parse_mode(self.unfreeze_bn)
            rule = Rule(AllLayers(), trainable=True, bn=mode)
            self.applied = freeze(target, rules=(rule, *self.rules))
        else:
            self.applied = self._freeze(root, target, self.unfreeze_from, self.unfreeze_bn)
        new = [p for p in target.parameters() if p.requires_grad and id(p) not in known]
        if not new:
            return
        lr = self.unfreeze_lr
        if lr is None:
            lr = optimizer.param_groups[0]["lr"] * UNFREEZE_LR_FACTOR
        optimizer.add_param_group({"params": new, "lr": lr})


def _inside(target: Any, module: str | None, train_from: str | None) -> str | None:
    """`train_from` as a path inside `target` (a path from the root that starts with
    `module.` counts too), or None when it is not one."""
    if train_from is None:
        return None
    names = {name for name, _ in target.named_modules() if name}
    if train_from in names:
        return train_from
    if module and train_from.startswith(module + ".") and train_from[len(module) + 1 :] in names:
        return train_from[len(module) + 1 :]
    return None
