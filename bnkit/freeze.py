"""`freeze`: apply a policy to a model, pin its BN modes, and the inverse."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from bnkit.backends import get_backend
from bnkit.errors import BnkitError, BnkitWarning, check_str
from bnkit.policy import LayerDecision, Mode, Plan, Policy, Rule, parse_rule, resolve
from bnkit.records import LayerRecord, leaf_records

_PLANS: weakref.WeakKeyDictionary[Any, Plan] = weakref.WeakKeyDictionary()
_BUILT: weakref.WeakKeyDictionary[Any, Plan] = weakref.WeakKeyDictionary()


def freeze(
    model: Any,
    policy: Policy | Plan | Sequence[Rule | str] | None = None,
    *,
    train_from: str | None = None,
    bn: str | Mode | None = None,
    rules: Sequence[Rule | str] = (),
    recompile: bool = False,
) -> Plan:
    """Applies a freeze policy to `model` in place and returns the per-layer plan.

    Either pass `policy` (a Policy, a list of rules, later rules winning, or a Plan
    made before, e.g. read with `Plan.from_json` from `bnkit freeze`'s output), or
    the shortcut: `train_from` freezes every layer before the named one (BN
    `frozen`) and makes it and everything after it trainable, with its BN
    layers in mode `bn`; without `train_from`, `bn` sets every BN layer. Extra
    `rules` (Rule objects or `"SELECTOR=MODE"` strings) apply last.

    BN modes are pinned: they survive `fit`, `parent.trainable = True` and
    `model.train()` until `freeze` or `unfreeze` is called again. On a compiled
    Keras model the change needs a recompile: pass `recompile=True` or call
    `bnkit.recompile(model)`; in PyTorch, build the optimizer after `freeze`.

    Args:
        model: a Keras model or a PyTorch module, changed in place.
        policy: a `Policy`, a list of rules (`Rule` objects or `"SELECTOR=MODE"`
            strings), or a `Plan`; or None to use the shortcut below.
        train_from: the first layer that trains (everything before it frozen, BN
            `frozen`).
        bn: the BN mode of the trained part (`frozen`, `affine`, `train`, `adapt`);
            without `train_from`, of every BN layer.
        rules: extra rules, applied last (later rules win).
        recompile: recompile a compiled Keras model after the change.

    Returns:
        The `Plan`: one `LayerDecision` per leaf layer.

    Examples:
        >>> import keras, bnkit
        >>> base = keras.applications.ResNet50V2(weights=None, include_top=False,
        ...                                      input_shape=(32, 32, 3))
        >>> plan = bnkit.freeze(base, train_from="conv5_block1_1_conv", bn="frozen")
        >>> plan.bn_counts()
        {'frozen': 49}
        >>> import torchvision
        >>> net = torchvision.models.resnet18(weights=None)
        >>> bnkit.freeze(net, train_from="layer4", bn="affine").bn_counts()
        {'frozen': 15, 'affine': 5}
    """
    backend = get_backend(model)
    records, infos = leaf_records(backend.records(model))
    if isinstance(policy, Plan):
        if train_from is not None or bn is not None or rules:
            raise BnkitError("give either a plan or train_from/bn/rules, not both")
        decisions = _matching(policy, records)
        policy_text = policy.policy
    else:
        policy = _as_policy(policy, train_from, bn, rules)
        decisions = resolve(infos, [_current(r) for r in records], policy)
        policy_text = str(policy)
    backend.apply(model, decisions)
    notes: list[str] = []
    status = backend.compile_status(model)
    if status.stale and recompile:
        backend.recompile(model)
    elif status.stale:
        notes.append(status.message())
        warnings.warn(
            f"model '{getattr(model, 'name', '')}' was compiled before freeze: {status.message()}",
            BnkitWarning,
            stacklevel=2,
        )
    plan = Plan(
        decisions, policy_text, needs_recompile=status.stale and not recompile, notes=tuple(notes)
    )
    _PLANS[model] = plan
    return plan


def unfreeze(model: Any) -> int:
    """Undoes `freeze`: BN layers become plain BatchNormalization again and every
    layer gets back the trainable flag it had before the first `freeze`.

    Args:
        model: a model `freeze` changed, changed back in place.

    Returns:
        The number of BN layers released.

    Examples:
        >>> import keras, bnkit
        >>> base = keras.applications.MobileNetV2(weights=None, include_top=False,
        ...                                       input_shape=(32, 32, 3))
        >>> _ = bnkit.freeze(base, bn="frozen")
        >>> bnkit.unfreeze(base)
        52
        >>> import torchvision
        >>> net = torchvision.models.resnet18(weights=None)
        >>> _ = bnkit.freeze(net, bn="frozen")
        >>> bnkit.unfreeze(net), type(net.bn1).__name__
        (20, 'BatchNorm2d')
    """
    released = get_backend(model).unfreeze(model)
    _PLANS.pop(model, None)
    return released


def recompile(model: Any) -> None:
    """Recompiles `model` with the same loss, metrics and optimizer configuration and a
    fresh optimizer, so that the next `fit` trains exactly the current trainable set.

    Examples:
        >>> import keras, bnkit
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> m.compile(optimizer="adam", loss="mse")
        >>> bnkit.recompile(m)
        >>> m.compiled
        True
    """
    get_backend(model).recompile(model)


def last_plan(model: Any) -> Plan | None:
    """The plan of the last `freeze` on `model` in this process, if any."""
    return _PLANS.get(model)


def keep_built(model: Any, plan: Plan) -> None:
    """Records that an integration built `model` with `plan` pinned (bnkit.peft): the
    training callbacks keep that plan rather than apply their own."""
    _BUILT[model] = plan


def built_plan(model: Any) -> Plan | None:
    """The plan `keep_built` recorded for `model`, if any."""
    return _BUILT.get(model)


def _matching(plan: Plan, records: list[LayerRecord]) -> tuple[LayerDecision, ...]:
    """The plan's decisions, after checking they name this model's layers in order."""
    paths = [r.path for r in records]
    planned = [d.path for d in plan.layers]
    if paths != planned:
        first = next(
            (f"{a!r} vs {b!r}" for a, b in zip(paths, planned, strict=False) if a != b),
            f"{len(paths)} layers vs {len(planned)}",
        )
        raise BnkitError(
            f"this plan was made for another model (first difference: {first}); build the "
            "same architecture, or freeze again"
        )
    return plan.layers


def _current(record: LayerRecord) -> tuple[bool, str | None]:
    if record.is_bn and record.bn_state is not None:
        return record.bn_state.affine_trained, record.bn_mode
    return record.effective_trainable, None


def _as_policy(
    policy: Policy | Sequence[Rule | str] | None,
    train_from: str | None,
    bn: str | Mode | None,
    rules: Sequence[Rule | str],
) -> Policy:
    if train_from is not None:
        check_str(train_from, "train_from", "layer4")
    parsed = as_rules(rules)
    if policy is None:
        if train_from is None and bn is None and not parsed:
            raise BnkitError("freeze needs a policy, or train_from=, bn= or rules=")
        return Policy.build(train_from=train_from, bn=bn, rules=parsed)
    if train_from is not None or bn is not None or parsed:
        raise BnkitError("give either a policy or train_from/bn/rules, not both")
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) or not isinstance(policy, Sequence):
        raise BnkitError(
            f"policy must be a Policy, a Plan or a list of rules, got {type(policy).__name__}"
            ' (for one rule: ["bn=frozen"])'
        )
    return Policy(as_rules(policy))


def as_rules(rules: Any) -> tuple[Rule, ...]:
    """Rule objects and 'SELECTOR=MODE' strings as rules (one string is one rule);
    anything else refused."""
    if isinstance(rules, (str, Rule)):
        rules = (rules,)
    if not isinstance(rules, Iterable):
        raise BnkitError(
            f"rules must be a list of rules ('SELECTOR=MODE' strings or bnkit.Rule), got "
            f"{rules!r} ({type(rules).__name__})"
        )
    out = []
    for r in rules:
        if isinstance(r, str):
            out.append(parse_rule(r))
        elif isinstance(r, Rule):
            out.append(r)
        else:
            raise BnkitError(
                f"a rule is a bnkit.Rule or a 'SELECTOR=MODE' string such as 'bn=frozen', got "
                f"{r!r} ({type(r).__name__})"
            )
    return tuple(out)
