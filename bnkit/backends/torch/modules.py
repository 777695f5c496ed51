"""What every part of bnkit's PyTorch backend reads modules with: BN detection (torch's
classes and subclasses, timm's, torchvision's and timm's frozen ones), the pinned BN
classes bnkit swaps in, the walk over a module's submodules, and moving a NumPy batch in
and out of a model with quantization observers held."""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bnkit.data import DataError
from bnkit.policy import BNState, Mode

BN = nn.modules.batchnorm._BatchNorm


FIXED_STATE = BNState(affine_trained=False, stats_update=False, batch_stats=False)


FIXED_TEXT = "torchvision's FrozenBatchNorm2d keeps gamma, beta and statistics as buffers"


FIXED_BN_CLASSES = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")


def is_fixed_bn(module: Any) -> bool:
    """torchvision's FrozenBatchNorm2d or timm's FrozenBatchNormAct2d (found by name,
    without importing either): BN whose gamma, beta and statistics are buffers, always
    normalising with the statistics."""
    return type(module).__name__ in FIXED_BN_CLASSES and hasattr(module, "running_var")


def is_bn(module: Any) -> bool:
    """A BatchNorm module: torch's (and subclasses: timm's, SyncBatchNorm) or a fixed one."""
    return isinstance(module, BN) or is_fixed_bn(module)


def is_model(obj: Any) -> bool:
    """True for a torch.nn.Module."""
    return isinstance(obj, nn.Module)


class _TorchPin:
    """Mixin of the pinned BN classes: outside mode `train`, always the running statistics."""

    _bnkit_mode: str = "frozen"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bnkit_mode == Mode.TRAIN.value:
            return super().forward(x)  # type: ignore[misc]
        bn: Any = self
        bn._check_input_dim(x)
        out = F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
        return carried(bn, out)


def carried(bn: Any, out: torch.Tensor) -> torch.Tensor:
    """What a BN module applies after normalising: timm's BatchNormAct2d carries a drop and
    an activation inside (in that order); plain BN nothing."""
    for name in ("drop", "act"):
        step = getattr(bn, name, None)
        if isinstance(step, nn.Module):
            out = step(out)
    return out


class PinnedBatchNorm1d(_TorchPin, nn.BatchNorm1d):
    """A BatchNorm1d whose mode bnkit pinned."""


class PinnedBatchNorm2d(_TorchPin, nn.BatchNorm2d):
    """A BatchNorm2d whose mode bnkit pinned."""


class PinnedBatchNorm3d(_TorchPin, nn.BatchNorm3d):
    """A BatchNorm3d whose mode bnkit pinned."""


_PINNED: dict[type, type] = {
    nn.BatchNorm1d: PinnedBatchNorm1d,
    nn.BatchNorm2d: PinnedBatchNorm2d,
    nn.BatchNorm3d: PinnedBatchNorm3d,
}


_PLAIN: dict[type, type] = {v: k for k, v in _PINNED.items()}


def pinned_class(cls: type) -> type:
    """The pinned variant of a BN class: made on first use for subclasses (timm's
    BatchNormAct2d, SyncBatchNorm, a user's own), keeping their forward in mode `train`."""
    cls = unpin_class(cls)
    if cls not in _PINNED:
        made = type(f"Pinned{cls.__name__}", (_TorchPin, cls), {"__module__": __name__})
        _PINNED[cls] = made
        _PLAIN[made] = cls
    return _PINNED[cls]


def unpin_class(cls: type) -> type:
    """The plain BN class of a pinned one (the class itself otherwise)."""
    return _PLAIN.get(cls, cls)


@dataclass(frozen=True)
class Node:
    path: str
    module: Any
    children: bool
    parents: tuple[Any, ...]


def walk(model: Any) -> list[Node]:
    """Every submodule in registration order, with its dotted path and its parents."""
    nodes: list[Node] = []

    def visit(module: Any, prefix: str, parents: tuple[Any, ...]) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if is_bn(child):  # one layer, with what it carries inside (timm)
                nodes.append(Node(path, child, False, parents))
                continue
            kids = list(child.children())
            nodes.append(Node(path, child, bool(kids), parents))
            visit(child, path, (*parents, child))

    visit(model, "", (model,))
    return nodes


def is_pinned(module: Any) -> bool:
    return isinstance(module, _TorchPin)


def own_parameters(module: Any) -> list[tuple[str, Any]]:
    return list(module.named_parameters(recurse=False))


def initialised(t: Any) -> bool:
    """False for a lazy module's parameter or buffer before its first forward."""
    return not isinstance(t, nn.parameter.UninitializedTensorMixin)  # type: ignore[attr-defined]


def numel(t: Any) -> int:
    """The size of a parameter or buffer; 0 for a lazy module's, not yet initialised."""
    return int(t.numel()) if initialised(t) else 0


def fake_quantized(model: Any) -> bool:
    """True when the model holds fake-quantize modules (prepared for QAT)."""
    return fake_quantized_in(list(model.modules()))


def fake_quantized_in(modules: Sequence[Any]) -> bool:
    """True when one of `modules` is a fake-quantize module."""
    fakes, _ = _quantization_classes()
    return any(isinstance(m, fakes) for m in modules)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A copy of a tensor's values in NumPy (bfloat16, which NumPy lacks, as float32)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().copy()


def materialized(model: Any) -> None:
    """Raises BackendError when the module's weights are on the meta device: it has a
    structure but no values to measure, adapt or export."""
    from bnkit.errors import BackendError

    for module in model.modules():  # the names are looked up only when one is missing
        tensors = itertools.chain(module._parameters.values(), module._buffers.values())
        if any(t is not None and t.is_meta for t in tensors):
            break
    else:
        return
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = next((n for n, t in tensors if t.is_meta), None)
    if meta is not None:
        raise BackendError(
            f"the module's weights are on the meta device ({meta!r} has no values): load "
            "them first (model.to_empty(device='cpu'), then load_state_dict)"
        )


def as_input(model: Any, x: np.ndarray) -> torch.Tensor:
    """A NumPy batch as a tensor of the model's floating dtype, on its device."""
    t = torch.as_tensor(np.ascontiguousarray(x))
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is not None and t.is_floating_point():
        t = t.to(device=p.device, dtype=p.dtype)
    return t


def call(model: Any, x: np.ndarray, checked: bool = False) -> Any:
    """Runs `model` on a NumPy batch; a model that rejects the batch raises DataError
    naming the shape and, for channels-last images, the transpose that fixes them.
    `checked`: the caller has checked the model holds values (`materialized`)."""
    if not checked:
        materialized(model)
    try:
        return model(as_input(model, x))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        hint = ""
        if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            hint = (
                "; PyTorch modules take channels-first images (N, C, H, W): x.transpose(0, 3, 1, 2)"
            )
        raise DataError(
            f"the model cannot take a batch of shape {tuple(x.shape)} ({first}){hint}"
        ) from None


@contextlib.contextmanager
def observers_held(model: Any, modules: Sequence[Any] | None = None) -> Iterator[None]:
    """Quantization observers record nothing while bnkit runs its own passes, in training
    mode or not: QAT's fake-quantize modules (`prepare_qat`) and PTQ's observers
    (`prepare`, `prepare_fx`), torch.ao's and torchao's PT2E ones, would otherwise move
    their ranges, and with them the quantization scales, to the data of a re-estimation.
    Fake quantization itself still runs, so BN sees the inputs the quantized model gives
    it. Everything is put back. `modules`: the model's modules, when the caller has them."""
    fake_classes, observer_classes = _quantization_classes()
    modules = list(model.modules()) if modules is None else modules
    fakes: list[Any] = [m for m in modules if isinstance(m, fake_classes)]
    observers: list[Any] = [m for m in modules if isinstance(m, observer_classes)]
    enabled = [m.observer_enabled.clone() for m in fakes]
    try:
        for fake in fakes:
            fake.disable_observer()
        for observer in observers:
            observer.forward = _unobserved  # type: ignore[method-assign]
        yield
    finally:
        for fake, flag in zip(fakes, enabled, strict=True):
            fake.observer_enabled.copy_(flag)
        for observer in observers:
            if "forward" in vars(observer):
                del observer.forward


def _quantization_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The fake-quantize and observer base classes of torch.ao and, when the program
    imported it, of torchao's PT2E (its own copies, not subclasses of torch.ao's)."""
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    fakes: list[type] = [FakeQuantizeBase]
    observers: list[type] = [ObserverBase]
    ao_fake = sys.modules.get("torchao.quantization.pt2e.fake_quantize")
    ao_observer = sys.modules.get("torchao.quantization.pt2e.observer")
    if ao_fake is not None:
        fakes.append(ao_fake.FakeQuantizeBase)
    if ao_observer is not None:
        observers.append(ao_observer.ObserverBase)
    return tuple(fakes), tuple(observers)


def _unobserved(x: Any) -> Any:
    return x


def unwrapped(model: Any) -> Any:
    """The module inside DistributedDataParallel or DataParallel (whose own forward would
    broadcast buffers, a collective call every rank must make alike), else `model`."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model
