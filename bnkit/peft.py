"""PEFT (Hugging Face `peft`) adapters on BN networks, with BN doing what its mode says
and saved by PEFT's own `save_pretrained`. Imported only by its users (it imports peft).

PEFT freezes the base model with `requires_grad=False`, which does not stop BN running
statistics from updating in `train()`; the adapter saves LoRA weights and
`modules_to_save`, not those statistics, so the model `PeftModel.from_pretrained`
reloads is not the model that was trained and validated (huggingface/peft#1732). PEFT's
advice, BN layers added to `modules_to_save` by name, trains their gamma/beta too and
misses every BN whose name does not match. `get_peft_model` here finds BN by type and
gives each BN mode its meaning:

| mode | BN in training | what the adapter saves for BN |
|---|---|---|
| `frozen` | nothing moves | nothing |
| `affine` | gamma/beta train, statistics fixed | the BN layers (PEFT saves whole modules) |
| `train` | statistics and gamma/beta move | the BN layers |
| `adapt` | statistics re-estimated once on `data`, then fixed | the BN layers |

A saved BN layer is a `modules_to_save` entry of the adapter's config, so a plain
`PeftModel.from_pretrained(base, folder)` in a process without bnkit reloads it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import peft as _peft
from peft.utils.other import ModulesToSaveWrapper

from bnkit.backends import get_backend
from bnkit.backends.torch.core import TorchBackend
from bnkit.data import DEFAULT_BATCH_SIZE
from bnkit.errors import BackendError, BnkitError
from bnkit.freeze import as_rules, built_plan, freeze, keep_built
from bnkit.policy import AllBN, LayerDecision, Mode, Plan, Policy, Regex, Rule, resolve
from bnkit.records import FIXED_BN, leaf_records
from bnkit.stats import adapt

__all__ = ["AdapterReport", "adapter_report", "get_peft_model"]


def get_peft_model(
    model: Any,
    peft_config: Any,
    bn: str | Mode = "frozen",
    *,
    train_from: str | None = None,
    rules: Sequence[Rule | str] = (),
    data: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    adapter_name: str = "default",
    **kwargs: Any,
) -> Any:
    """`peft.get_peft_model(model, peft_config)` with every BN layer in mode `bn` and
    whatever that mode changes saved by the adapter.

    BN layers are found by type (BatchNorm1d/2d/3d, SyncBatchNorm, timm's
    BatchNormAct2d, any subclass), never by name. `train_from` keeps every BN before
    that module `frozen` and puts it and every later BN in mode `bn`; `rules`
    (`"SELECTOR=MODE"`) apply last. The trainability of other layers is PEFT's: the
    adapter's weights and the config's own `modules_to_save` train, the rest is fixed.
    Every BN not `frozen` is added to the adapter config's `modules_to_save` under the
    shortest name that matches it alone, so `save_pretrained` writes it and a plain
    `PeftModel.from_pretrained` reloads it; the modes are pinned, so `model.train()`
    and the Hugging Face `Trainer` keep them. `merge_and_unload()` keeps the result.

    Args:
        model: a PyTorch module (torchvision, timm, transformers' ResNet, your own).
        peft_config: a PEFT config (`peft.LoraConfig(...)`); not changed.
        bn: the BN mode: `frozen`, `affine`, `train` or `adapt`.
        train_from: the first module whose BN layers take mode `bn` (None: all).
        rules: extra `"SELECTOR=MODE"` rules, applied last.
        data: the data `adapt` re-estimates on (anything `bnkit.data.load` reads);
            needed by mode `adapt` and refused otherwise.
        batch_size: batch size when `data` is an array or folder.
        adapter_name: the adapter's name, as in PEFT.
        **kwargs: passed to `peft.get_peft_model`.

    Returns:
        The `PeftModel`.

    Examples:
        >>> import torch, torchvision, peft, bnkit.peft
        >>> base = torchvision.models.resnet18(weights=None, num_classes=4)
        >>> config = peft.LoraConfig(target_modules=["conv1", "conv2"], r=4,
        ...                          modules_to_save=["fc"])
        >>> model = bnkit.peft.get_peft_model(base, config, bn="affine")
        >>> print(bnkit.peft.adapter_report(model))  # doctest: +ELLIPSIS
        adapter 'default': 20 BN layers (affine 20); 20 saved with it, 77.0 KB (38.4 KB ...
    """
    _check_model(model)
    modes = _bn_modes(model, bn, train_from, rules)
    adapting = any(m == Mode.ADAPT for m in modes.values())
    if adapting and data is None:
        raise BnkitError("bn mode 'adapt' re-estimates BN statistics on data: pass data=")
    if data is not None and not adapting:
        raise BnkitError("data= is for BN mode 'adapt', which no BN layer has here")
    saved = [p for p, m in modes.items() if m != Mode.FROZEN]
    config = copy.deepcopy(peft_config)
    if saved:
        config.modules_to_save = [*(config.modules_to_save or []), *_names(model, saved, modes)]
    peft_model = _peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    prefix = _base_prefix(peft_model)
    _check_wrapped(peft_model, prefix, saved)
    plan = _pin(peft_model, modes, prefix, adapter_name, _policy_text(bn, train_from, rules))
    if adapting:
        copies = [_copy_path(prefix + p, adapter_name) for p, m in modes.items() if m == "adapt"]
        pattern = "^(" + "|".join(re.escape(c) for c in copies) + ")$"
        adapt(peft_model, data, select=Regex(pattern), batch_size=batch_size)
    keep_built(peft_model, plan)
    return peft_model


@dataclass(frozen=True)
class AdapterReport:
    """What a PEFT adapter's `save_pretrained` writes, BN layers apart."""

    adapter: str
    modes: dict[str, int]
    """BN layers per mode."""
    bn_saved: int
    """BN layers whose weights and statistics the adapter holds."""
    bn_bytes: int
    """everything saved of those layers: gamma, beta, statistics, batch counts."""
    bn_stats_bytes: int
    """their running means and variances."""
    adapter_bytes: int
    """the PEFT method's own weights (LoRA's A and B, ...)."""
    other_bytes: int
    """the rest of `modules_to_save` (a new head, ...)."""

    def __str__(self) -> str:
        modes = ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items()))
        return (
            f"adapter {self.adapter!r}: {sum(self.modes.values())} BN layers ({modes}); "
            f"{self.bn_saved} saved with it, {_kb(self.bn_bytes)} ({_kb(self.bn_stats_bytes)} "
            f"of running statistics), beside {_kb(self.adapter_bytes)} of adapter weights "
            f"and {_kb(self.other_bytes)} of other modules"
        )


def adapter_report(model: Any, adapter_name: str = "default") -> AdapterReport:
    """What `model.save_pretrained` writes for `adapter_name`: the BN layers it holds and
    their size beside the adapter's own weights, read from PEFT's
    `get_peft_model_state_dict` (what `save_pretrained` saves).

    Examples:
        >>> import torch, peft, bnkit.peft
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> m = bnkit.peft.get_peft_model(net, peft.LoraConfig(target_modules=["0"], r=2),
        ...                               bn="train")
        >>> r = bnkit.peft.adapter_report(m)
        >>> r.bn_saved, r.bn_bytes  # weight, bias, mean, var (8 float32 each), count
        (1, 136)
    """
    state = _peft.get_peft_model_state_dict(model, adapter_name=adapter_name)
    wrapped = {
        path: _is_bn(module.original_module)
        for path, module in model.named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    }
    sizes = {"bn": 0, "stats": 0, "other": 0, "adapter": 0}
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        kind = "adapter" if owner not in wrapped else "bn" if wrapped[owner] else "other"
        sizes[kind] += tensor.numel() * tensor.element_size()
        if kind == "bn" and name in ("running_mean", "running_var"):
            sizes["stats"] += tensor.numel() * tensor.element_size()
    plan = built_plan(model)
    modes: dict[str, int] = {}
    if plan is not None:
        for d in plan.layers:
            if d.is_bn and not _inactive(d.path):
                modes[str(d.bn_mode)] = modes.get(str(d.bn_mode), 0) + 1
    saved = sum(wrapped.values())
    return AdapterReport(
        adapter_name, modes, saved, sizes["bn"], sizes["stats"], sizes["adapter"], sizes["other"]
    )


# ---------------------------------------------------------------------- internals


def _check_model(model: Any) -> None:
    if isinstance(model, _peft.PeftModel):
        raise BnkitError(
            "the model is a PeftModel already: pass the base model to "
            "bnkit.peft.get_peft_model, which calls peft.get_peft_model itself"
        )
    if not isinstance(get_backend(model), TorchBackend):
        raise BackendError("PEFT adapts PyTorch modules: got a Keras model")


def _bn_modes(
    model: Any, bn: str | Mode, train_from: str | None, rules: Sequence[Rule | str]
) -> dict[str, Mode]:
    """Each BN layer's path in `model` and its mode: every BN `frozen`, then the usual
    fine-tune policy for BN."""
    records, infos = leaf_records(get_backend(model).records(model))
    user = Policy.build(train_from=train_from, bn=bn, rules=as_rules(rules))
    policy = Policy((Rule(AllBN(), bn=Mode.FROZEN), *user.rules))
    current = [(r.effective_trainable, r.bn_mode) for r in records]
    fixed = {r.path for r in records if any(n.code == FIXED_BN for n in r.notes)}
    return {
        d.path: Mode.FROZEN if d.path in fixed else Mode(str(d.bn_mode))
        for d in resolve(infos, current, policy)
        if d.is_bn
    }


def _policy_text(bn: str | Mode, train_from: str | None, rules: Sequence[Rule | str]) -> str:
    parts = [f"bnkit.peft bn={Mode(bn).value if isinstance(bn, Mode) else bn}"]
    if train_from is not None:
        parts.append(f"train_from={train_from}")
    parts += [str(r) for r in rules]
    return "; ".join(parts)


def _base_prefix(peft_model: Any) -> str:
    """The path of the user's model inside the PEFT model, with a trailing dot."""
    base = peft_model.get_base_model()
    for path, module in peft_model.named_modules():
        if module is base:
            return f"{path}." if path else ""
    raise BnkitError("PEFT's model does not hold the base model given")  # pragma: no cover


def _names(model: Any, saved: list[str], modes: dict[str, Mode]) -> list[str]:
    """For each BN path in `saved`, the name to add to `modules_to_save`: the shortest
    dotted suffix that PEFT's matching (`key.endswith(name)` over the model's module
    paths) finds only at BN layers to save, else at BN layers only (the others it
    catches are saved too, `frozen`), else the full path."""
    keys = [k for k, _ in model.named_modules(remove_duplicate=False) if k]
    wanted = set(saved)
    names = []
    for path in saved:
        parts = path.split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]
        hits = {s: [k for k in keys if k.endswith(s)] for s in suffixes}
        name = next((s for s in suffixes if set(hits[s]) <= wanted), None)
        if name is None:
            name = next((s for s in suffixes if all(k in modes for k in hits[s])), path)
        names.append(name)
    return list(dict.fromkeys(names))


def _check_wrapped(peft_model: Any, prefix: str, saved: list[str]) -> None:
    """Every BN to save is wrapped by PEFT, and nothing but BN was wrapped for bnkit."""
    for path in saved:
        module = peft_model.get_submodule(prefix + path)
        if not isinstance(module, ModulesToSaveWrapper):  # pragma: no cover - PEFT's matching
            raise BnkitError(f"{path}: PEFT did not put this BN layer in modules_to_save")


def _copy_path(wrapper: str, adapter_name: str) -> str:
    return f"{wrapper}.modules_to_save.{adapter_name}"


def _inactive(path: str) -> bool:
    return path.endswith(".original_module")


def _pin(
    peft_model: Any, modes: dict[str, Mode], prefix: str, adapter_name: str, policy: str
) -> Plan:
    """Pins every BN of the PEFT model: the trained copy of a saved BN in its mode, the
    rest (unsaved BN and the originals PEFT keeps beside the copies) `frozen`; other
    layers keep the trainability PEFT gave them. Returns the plan `freeze` applied."""
    wanted = {prefix + p: m for p, m in modes.items()}
    wanted.update({_copy_path(prefix + p, adapter_name): m for p, m in modes.items()})
    records, _ = leaf_records(get_backend(peft_model).records(peft_model))
    decisions = []
    for r in records:
        if not r.is_bn:
            decisions.append(
                LayerDecision(r.path, r.class_name, False, r.effective_trainable, None, None)
            )
            continue
        mode = Mode.FROZEN if _inactive(r.path) else wanted.get(r.path, Mode.FROZEN)
        trainable = mode in (Mode.AFFINE, Mode.TRAIN)
        decisions.append(LayerDecision(r.path, r.class_name, True, trainable, mode.value, 0))
    return freeze(peft_model, Plan(tuple(decisions), policy))


def _is_bn(module: Any) -> bool:
    from bnkit.backends.torch.modules import is_bn

    return is_bn(module)


def _kb(n: int) -> str:
    return f"{n / 1000:.1f} KB"
