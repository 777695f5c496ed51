"""PyTorch backend (plain `torch.nn.Module` models).

PyTorch's switches mapped onto bnkit's BN state:
- `requires_grad` of weight and bias: gamma/beta trained;
- the module's `training` flag, which `model.train()` sets on every child (undoing an
  earlier `bn.eval()`): batch statistics, and their update when `track_running_stats`;
- a pinned BN (`PinnedBatchNorm1d/2d/3d`, a class swap in place, no weights copied)
  normalises with its running statistics and never updates them outside mode `train`,
  whatever `train()`/`eval()` say.

A model's "BN mode" is what it does in a training loop, after `model.train()`.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bnkit.backends.base import (
    CHANNELS_FIRST,
    Deployer,
    MomentPass,
    Snapshot,
    TestTimeAdapter,
    Trainer,
)
from bnkit.data import DataError
from bnkit.errors import BnkitError, BnkitWarning
from bnkit.files import Terminated
from bnkit.policy import MODE_STATES, BNState, LayerDecision, Mode, mode_of
from bnkit.records import (
    BATCH_STATS_AT_TRAINING_ONLY,
    CUMULATIVE_AVERAGE,
    EVAL_UNDONE_BY_TRAIN,
    EXPORTED_BATCH_STATS,
    FIXED_BN,
    NO_RUNNING_STATS,
    PEFT_UNSAVED_STATS,
    QAT_STATS_UPDATE,
    STATS_WITHOUT_AFFINE,
    SYNC_WITHOUT_GROUP,
    CompileStatus,
    LayerRecord,
    Note,
)

BN = nn.modules.batchnorm._BatchNorm
FIXED_STATE = BNState(affine_trained=False, stats_update=False, batch_stats=False)
FIXED_TEXT = "torchvision's FrozenBatchNorm2d keeps gamma, beta and statistics as buffers"
# module -> the requires_grad of each of its own parameters before bnkit first touched it
_ORIGINAL: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()
# parameter-free module -> the trainable flag a plan gave it (torch has none to set)
_FLAGS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


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


def exported_example_shape(model: Any) -> tuple[int | None, ...] | None:
    """For the module of a `torch.export` program (`ExportedProgram.module()`): the shape
    of the input it was exported with, None where a dimension is dynamic; None for any
    other module (only export leaves example values on a graph's inputs)."""
    if not isinstance(model, torch.fx.GraphModule):
        return None
    for node in model.graph.nodes:
        if node.op == "placeholder" and "val" in node.meta:
            shape = getattr(node.meta["val"], "shape", ())
            return tuple(d if isinstance(d, int) else None for d in shape)
    return None


def exported_graph(model: Any) -> bool:
    """True for the module of a `torch.export` program."""
    return exported_example_shape(model) is not None


def exported_bn_nodes(graph: Any) -> Iterator[tuple[Any, str]]:
    """Each BN operator of an exported graph with its module path (the owner of its
    running statistics)."""
    for node in graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        stats = node.args[3] if len(node.args) > 3 else None
        if isinstance(stats, torch.fx.Node) and stats.op == "get_attr":
            yield node, str(stats.target).rpartition(".")[0]


def exported_bn(model: Any) -> dict[str, bool] | None:
    """For the module of a `torch.export` program, where BN is an operator of the graph
    rather than a module: each BN's module path and whether the graph normalises it with
    the batch's statistics (exported in training mode); None for any other module or a
    graph without BN."""
    if not exported_graph(model):
        return None
    found: dict[str, bool] = {}
    for node, path in exported_bn_nodes(model.graph):
        args = node.args
        batch = "no_training" not in str(node.target) and len(args) > 5 and bool(args[5])
        found[path] = found.get(path, False) or batch
    return found or None


def refuse_exported(model: Any, what: str) -> None:
    """BnkitError when `model` is a `torch.export` graph: its layers are operators fixed in
    the graph (its `train()` and `eval()` raise), so bnkit reads and checks it but does
    not `what` it."""
    if exported_graph(model):
        raise BnkitError(
            f"this module is a graph torch.export produced: its layers are fixed in the "
            f"graph (its train() and eval() raise), so bnkit cannot {what} it; {what} the "
            "module before exporting it (bnkit.check, inspect, adapt, shift and fold take "
            "the graph)"
        )


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
class _Node:
    path: str
    module: Any
    children: bool
    parents: tuple[Any, ...]


def walk(model: Any) -> list[_Node]:
    """Every submodule in registration order, with its dotted path and its parents."""
    nodes: list[_Node] = []

    def visit(module: Any, prefix: str, parents: tuple[Any, ...]) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if is_bn(child):  # one layer, with what it carries inside (timm)
                nodes.append(_Node(path, child, False, parents))
                continue
            kids = list(child.children())
            nodes.append(_Node(path, child, bool(kids), parents))
            visit(child, path, (*parents, child))

    visit(model, "", (model,))
    return nodes


def is_pinned(module: Any) -> bool:
    return isinstance(module, _TorchPin)


def _own(module: Any) -> list[tuple[str, Any]]:
    return list(module.named_parameters(recurse=False))


def _initialised(t: Any) -> bool:
    """False for a lazy module's parameter or buffer before its first forward."""
    return not isinstance(t, nn.parameter.UninitializedTensorMixin)  # type: ignore[attr-defined]


def _numel(t: Any) -> int:
    """The size of a parameter or buffer; 0 for a lazy module's, not yet initialised."""
    return int(t.numel()) if _initialised(t) else 0


def _qat_fused(module: Any) -> bool:
    """An eager-mode QAT fused Conv+BN module (torch.ao.nn.intrinsic.qat ConvBn*d and
    ConvBnReLU*d, from `prepare_qat`); its module is imported only if the model uses it."""
    fused = sys.modules.get("torch.ao.nn.intrinsic.qat.modules.conv_fused")
    return fused is not None and isinstance(module, fused._ConvBnNd)


def _held_in_eval(parents: tuple[Any, ...]) -> bool:
    """True when a parent keeps the BN in eval() across model.train(): a QAT fused
    Conv+BN after `freeze_bn_stats` (its train() leaves its children alone)."""
    return any(_qat_fused(p) and p.freeze_bn for p in parents)


def _bn_state(bn: Any, parents: tuple[Any, ...] = ()) -> BNState:
    affine = any(p.requires_grad for _, p in _own(bn))
    if _held_in_eval(parents) and not bn.training:
        return BNState(affine, False, False)
    if is_pinned(bn):
        if bn._bnkit_mode == Mode.TRAIN.value:
            return BNState(affine, bn.track_running_stats, True)
        return BNState(affine, False, False)
    return BNState(affine, bool(bn.track_running_stats), True)


def _bn_mode_name(bn: Any, state: BNState) -> str:
    if is_pinned(bn) and bn._bnkit_mode == Mode.ADAPT.value:
        return Mode.ADAPT.value
    return mode_of(state)


def _bn_notes(bn: Any, state: BNState, parents: tuple[Any, ...] = ()) -> list[Note]:
    if is_pinned(bn):
        return []
    notes: list[Note] = []
    if any(_qat_fused(p) for p in parents) and state.stats_update:
        notes.append(
            Note(
                QAT_STATS_UPDATE,
                "fused Conv+BN of quantization-aware training: its statistics update at "
                "every training step and the fake-quantized weights are folded with them",
            )
        )
    if not bn.training and bn.track_running_stats and not _held_in_eval(parents):
        notes.append(
            Note(
                EVAL_UNDONE_BY_TRAIN,
                "in eval() now, but model.train() puts it back in training mode: its "
                "statistics will update (pin it with bnkit.freeze)",
            )
        )
    if not state.affine_trained and state.stats_update:
        notes.append(
            Note(
                STATS_WITHOUT_AFFINE,
                "requires_grad=False does not stop running-statistic updates in train(): "
                "gamma/beta are fixed but the statistics still move",
            )
        )
    return notes + _stats_notes(bn)


def _stats_notes(bn: Any) -> list[Note]:
    """Notes on how the running statistics are kept (or not) and synchronised."""
    notes: list[Note] = []
    if not bn.track_running_stats and bn.running_mean is None:
        notes.append(
            Note(
                NO_RUNNING_STATS,
                "track_running_stats=False without running statistics: it normalises with "
                "batch statistics in eval() too, so one image alone gets different outputs "
                "than in a batch",
            )
        )
    elif not bn.track_running_stats:
        notes.append(
            Note(
                BATCH_STATS_AT_TRAINING_ONLY,
                "track_running_stats=False with running statistics kept (as Lightning's "
                "BaseFinetuning.freeze leaves BN): it normalises with batch statistics in "
                "train() and with the stored ones in eval(), so training and inference differ",
            )
        )
    elif bn.momentum is None:
        notes.append(
            Note(
                CUMULATIVE_AVERAGE,
                "momentum=None: the running statistics are a cumulative average over every "
                "batch since the last reset, so late batches (the trained weights) count "
                "less and less",
            )
        )
    if isinstance(bn, nn.SyncBatchNorm):
        on_cpu = bn.running_var is None or bn.running_var.device.type == "cpu"
        if not _process_group():
            notes.append(
                Note(
                    SYNC_WITHOUT_GROUP,
                    "SyncBatchNorm with no torch.distributed process group: it trains as a "
                    "plain, unsynchronised BatchNorm on this process's batch"
                    + (
                        ", and on CPU its training forward raises once a group exists"
                        if on_cpu
                        else ""
                    ),
                )
            )
        elif on_cpu:
            notes.append(
                Note(
                    SYNC_WITHOUT_GROUP,
                    "SyncBatchNorm on CPU inside a process group: its training forward raises "
                    "(it synchronises on GPU/XPU only)",
                )
            )
    return notes


PT2E_QAT_TEXT = (
    "BN of a graph prepared for quantization-aware training (PT2E) in training mode: its "
    "statistics update at every step and the fake-quantized weights are scaled with them"
)


def _fake_quantized(model: Any) -> bool:
    """True when the model holds fake-quantize modules (prepared for QAT)."""
    fakes, _ = _quantization_classes()
    return any(isinstance(m, fakes) for m in model.modules())


PEFT_INACTIVE = "inactive"
PEFT_UNSAVED = "unsaved"
PEFT_UNSAVED_TEXT = (
    "its running statistics update in training, but the PEFT adapter does not hold them "
    "(not in modules_to_save): PeftModel.from_pretrained reloads the base model's "
    "statistics, so the reloaded model is not the one trained and validated"
)


def _peft_role(node: _Node) -> str | None:
    """Where a BN sits in a PEFT model (None outside one, PEFT imported or not):
    `inactive` for the original PEFT keeps beside a `modules_to_save` copy (it runs only
    with the adapter disabled), `saved` for a module the adapter holds, `unsaved` for any
    other BN of the model."""
    other = sys.modules.get("peft.utils.other")
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if other is None or tuners is None:
        return None
    wrapper = other.ModulesToSaveWrapper
    if node.parents and isinstance(node.parents[-1], wrapper):
        return PEFT_INACTIVE if node.path.endswith(".original_module") else "saved"
    if any(isinstance(p, wrapper) for p in node.parents):
        return "saved"
    if any(isinstance(p, tuners.BaseTuner) for p in node.parents):
        return PEFT_UNSAVED
    return None


def _process_group() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


class TorchBackend:
    """bnkit's operations on PyTorch modules."""

    name = "torch"
    layout = CHANNELS_FIRST
    model_suffix = ".pt"

    def __init__(self) -> None:
        self.name = f"torch {torch.__version__}"

    def trainer(self) -> Trainer:
        from bnkit.backends.torch.train import TorchTrainer

        return TorchTrainer()

    def deployer(self) -> Deployer:
        from bnkit.backends.torch.deploy import TorchDeployer

        return TorchDeployer()

    def test_time(self) -> TestTimeAdapter:
        from bnkit.backends.torch.tta import TorchTestTime

        return TorchTestTime()

    def collective(self) -> TorchCollective | None:
        """The default process group of an initialised `torch.distributed` job with more
        than one rank (torchrun, `mp.spawn`), else None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return TorchCollective(dist.get_rank(), dist.get_world_size())

    @contextlib.contextmanager
    def launched_job(
        self, world: int, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[tuple[int, int]]:
        """Joins the default process group from torchrun's environment (NCCL on a GPU,
        else gloo) unless it is joined already, and leaves it at the end."""
        import torch.distributed as dist

        started = not dist.is_initialized()
        if started:
            _join_group(dist, world, on_wait)
        try:
            yield dist.get_rank(), dist.get_world_size()
        finally:
            if started:
                dist.destroy_process_group()

    # ------------------------------------------------------------------ reading

    def records(self, model: Any) -> list[LayerRecord]:
        exported = exported_bn(model) or {}
        qat = bool(exported) and _fake_quantized(model)
        return [self._record(n, exported.get(n.path), qat) for n in walk(model)]

    def _record(
        self, node: _Node, exported_batch: bool | None = None, qat: bool = False
    ) -> LayerRecord:
        """`exported_batch`: the module holds the statistics of a BN operator of an
        exported graph, which normalises with the batch's statistics (True) or not; `qat`:
        that graph is prepared for quantization-aware training (PT2E)."""
        module = node.module
        own = _own(module)
        n_train = sum(_numel(p) for _, p in own if p.requires_grad)
        n_fixed = sum(_numel(p) for _, p in own if not p.requires_grad)
        n_fixed += sum(_numel(b) for b in module.buffers(recurse=False) if b.is_floating_point())
        sub = [p for p in module.parameters()]
        trainable = any(p.requires_grad for p in sub) if sub else _FLAGS.get(module, True)
        bn_fields: dict[str, Any] = {}
        notes: list[Note] = []
        if is_fixed_bn(module):
            bn_fields = dict(is_bn=True, bn_mode=Mode.FROZEN.value, bn_state=FIXED_STATE)
            notes = [Note(FIXED_BN, FIXED_TEXT)]
        elif isinstance(module, BN):
            state = _bn_state(module, node.parents)
            notes = _bn_notes(module, state, node.parents)
            role = _peft_role(node)
            if role == PEFT_INACTIVE:
                notes = []
            elif role == PEFT_UNSAVED and state.stats_update:
                notes.append(Note(PEFT_UNSAVED_STATS, PEFT_UNSAVED_TEXT))
            momentum = None if module.momentum is None else 1.0 - float(module.momentum)
            bn_fields = dict(
                is_bn=True,
                bn_mode=_bn_mode_name(module, state),
                bn_state=state,
                momentum=momentum,
            )
        elif exported_batch is not None:
            affine = any(p.requires_grad for _, p in own)
            state = BNState(affine, exported_batch, exported_batch)
            bn_fields = dict(is_bn=True, bn_mode=mode_of(state), bn_state=state)
            if exported_batch and qat:
                notes = [Note(QAT_STATS_UPDATE, PT2E_QAT_TEXT)]
            elif exported_batch:
                notes = [
                    Note(
                        EXPORTED_BATCH_STATS,
                        "exported in training mode: the graph normalises with the batch's "
                        "statistics and updates the stored ones, in inference too, so one "
                        "image gets another answer than in a batch",
                    )
                ]
        return LayerRecord(
            path=node.path,
            name=node.path.rsplit(".", 1)[-1],
            class_name=type(module).__name__,
            is_container=node.children,
            trainable=trainable,
            effective_trainable=n_train > 0 if own else trainable,
            trainable_params=n_train,
            non_trainable_params=n_fixed,
            notes=tuple(notes),
            **bn_fields,
        )

    def compile_status(self, model: Any) -> CompileStatus:
        return CompileStatus(compiled=False)

    def input_shape(self, model: Any) -> tuple[int | None, ...] | None:
        """None (a module declares none), but for a `torch.export` graph the shape of one
        sample of the input it was exported with (None where a dimension is dynamic)."""
        shape = exported_example_shape(model)
        return None if shape is None else shape[1:]

    # ------------------------------------------------------------------ changing

    def apply(self, model: Any, decisions: Sequence[LayerDecision]) -> None:
        refuse_exported(model, "freeze")
        leaves = [n for n in walk(model) if not n.children]
        if len(leaves) != len(decisions):
            raise BnkitError("the plan does not match this model's modules: run freeze again")
        for node, d in zip(leaves, decisions, strict=True):
            _ORIGINAL.setdefault(node.module, {n: p.requires_grad for n, p in _own(node.module)})
            if d.rule is None:
                continue
            if d.is_bn and d.bn_mode is not None:
                self.set_bn_mode(node.module, Mode(d.bn_mode))
            elif not _own(node.module):
                _FLAGS[node.module] = d.trainable
            else:
                for _, p in _own(node.module):
                    p.requires_grad_(d.trainable)

    def set_bn_mode(self, layer: Any, mode: Mode) -> None:
        if is_fixed_bn(layer):
            if MODE_STATES[mode].affine_trained or MODE_STATES[mode].stats_update:
                warnings.warn(
                    f"a FrozenBatchNorm2d cannot take mode {mode.value!r} ({FIXED_TEXT}): "
                    "it stays frozen; swap it for nn.BatchNorm2d to train it",
                    BnkitWarning,
                    stacklevel=4,
                )
            return
        if not isinstance(layer, BN):
            raise BnkitError(
                f"{type(layer).__name__} is not a BatchNorm module: bnkit cannot pin it"
            )
        bn: Any = layer
        _ORIGINAL.setdefault(bn, {n: p.requires_grad for n, p in _own(bn)})
        bn.__class__ = pinned_class(type(bn))
        bn._bnkit_mode = mode.value
        for _, p in _own(bn):
            p.requires_grad_(MODE_STATES[mode].affine_trained)

    def unfreeze(self, model: Any) -> int:
        released = 0
        for node in walk(model):
            module = node.module
            if is_pinned(module):
                module.__class__ = _PLAIN[type(module)]
                del module._bnkit_mode
                released += 1
            _FLAGS.pop(module, None)
            original = _ORIGINAL.pop(module, None)
            if original is not None:
                for name, p in _own(module):
                    p.requires_grad_(original.get(name, p.requires_grad))
        return released

    def recompile(self, model: Any) -> None:
        raise BnkitError(
            "PyTorch models are not compiled: build the optimizer after freeze, from the "
            "parameters that require grad"
        )

    # ------------------------------------------------------------------ weights

    def snapshot(self, model: Any, weights_too: bool = True) -> Snapshot:
        materialized(model)
        weights: dict[str, dict[str, np.ndarray]] = {}
        stats: dict[str, dict[str, np.ndarray]] = {}
        graph_bn = exported_bn(model) or {}  # holders of an exported graph's BN statistics
        for node in walk(model):
            module = node.module
            own = (
                {n: to_numpy(p) for n, p in _own(module) if _initialised(p)} if weights_too else {}
            )
            if own:
                weights[node.path] = own
            holds = is_bn(module) or node.path in graph_bn
            if holds and getattr(module, "running_mean", None) is not None:
                bn: Any = module
                stats[node.path] = {
                    "mean": to_numpy(bn.running_mean),
                    "var": to_numpy(bn.running_var),
                }
        return Snapshot(weights, stats)

    def set_bn_stats(self, model: Any, stats: dict[str, dict[str, np.ndarray]]) -> None:
        modules = {n.path: n.module for n in walk(model)}
        with torch.no_grad():
            for path, values in stats.items():
                bn = modules[path]
                bn.running_mean.copy_(torch.as_tensor(values["mean"], dtype=bn.running_mean.dtype))
                bn.running_var.copy_(torch.as_tensor(values["var"], dtype=bn.running_var.dtype))

    @contextlib.contextmanager
    def moments_pass(
        self, model: Any, paths: Sequence[str], *, normalize: str
    ) -> Iterator[MomentPass]:
        materialized(model)
        if exported_graph(model):  # BN is an operator of the graph: run it node by node
            from bnkit.backends.torch import exported

            with exported.moments_pass(model, paths, normalize=normalize) as run:
                yield run
            return
        modules = {n.path: n.module for n in walk(model)}
        layers = [modules[p] for p in paths]
        for path, layer in zip(paths, layers, strict=True):
            if layer.running_mean is None:
                raise BnkitError(f"{path}: track_running_stats=False, no statistics to measure")
        captured: dict[str, tuple[Any, Any, Any]] = {}
        was_training = [m.training for m in model.modules()]
        try:
            for path, layer in zip(paths, layers, strict=True):
                layer.forward = _moment_forward(layer, path, captured, normalize == "batch")
            model.eval()
            with observers_held(model):
                yield _pass(model, captured)
        finally:
            for layer in layers:
                if "forward" in vars(layer):
                    del layer.forward
            for m, flag in zip(model.modules(), was_training, strict=True):
                m.training = flag

    def forward(self, model: Any, x: np.ndarray) -> None:
        with torch.no_grad(), observers_held(model):
            call(model, x)

    # ------------------------------------------------------------------ files

    def load(
        self, path: Path, args: dict[str, Any] | None = None, weights: Path | None = None
    ) -> Any:
        """Builds the model a spec names (`torchvision:resnet18`, `timm:NAME`,
        `package.module:factory`, `file.py:factory`), then loads `weights`."""
        from bnkit.backends.torch.files import parse

        spec = parse(str(path))
        model = _build(spec, args or {})
        if weights is not None:
            load_weights(model, weights, str(spec))
        return model

    def save(self, model: Any, path: Path) -> None:
        """The state_dict (pinned BN modules keep plain BatchNorm's keys)."""
        torch.save(model.state_dict(), str(path))


RENDEZVOUS_SECONDS = 300
"""How long a rank waits for the others to join (BNKIT_RENDEZVOUS_TIMEOUT overrides it);
torch's own default is 30 minutes."""


def _join_group(dist: Any, world: int, on_wait: Callable[[str], None] | None = None) -> None:
    """`init_process_group` from torchrun's environment, with a timeout, and SIGTERM left
    to kill the process while it waits (the wait is in C++, where Python's handler never
    runs); one line when the other ranks do not come."""
    import datetime
    import os
    import signal

    from bnkit.errors import BackendError

    try:
        seconds = float(os.environ.get("BNKIT_RENDEZVOUS_TIMEOUT", RENDEZVOUS_SECONDS))
    except ValueError:
        seconds = RENDEZVOUS_SECONDS
    if on_wait is not None:
        address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        on_wait(
            f"rank {os.environ.get('RANK')} of {world}: waiting up to {seconds:g} s at "
            f"{address} for the other ranks to join (BNKIT_RENDEZVOUS_TIMEOUT sets the wait)"
        )
    try:
        previous: Any = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: signals are the main thread's business
        previous = None
    try:
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(seconds=seconds),
        )
    except Exception as err:  # torch raises DistStoreError, RuntimeError, ValueError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise BackendError(
            f"the {world} processes of this job did not all join at {address} within "
            f"{seconds:g} s ({first}); start every rank (torchrun does), or set "
            "BNKIT_RENDEZVOUS_TIMEOUT"
        ) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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

    meta = next(
        (n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None
    )
    if meta is not None:
        raise BackendError(
            f"the module's weights are on the meta device ({meta!r} has no values): load "
            "them first (model.to_empty(device='cpu'), then load_state_dict)"
        )


def _build(spec: Any, args: dict[str, Any]) -> Any:
    from bnkit.errors import ModelFileError

    factory = _factory(spec)
    try:
        with _stderr_held() as held:
            model = factory(**args)
        held.release()  # the factory worked: what it or torch wrote meanwhile is shown
    except (Exception, SystemExit) as err:  # the user's factory may raise anything
        if isinstance(err, (Terminated, BnkitError)):  # a signal, or bnkit's own --timeout
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if _unreadable_file(err):
            name = getattr(err, "filename", None)
            where = f" {name}" if name else ""
            raise ModelFileError(
                f"{spec}: the factory could not read a file it loads{where} "
                f"({type(err).__name__}: {first}): a truncated or corrupt file? check the "
                "files the factory reads"
            ) from None
        if _network_error(err):
            raise ModelFileError(
                f"{spec}: the factory tried to download and the network failed "
                f"({type(err).__name__}: {first}); bnkit downloads nothing: give --weights "
                "FILE (a state_dict saved where the network is) instead of pretrained "
                "weights in --args"
            ) from None
        raise ModelFileError(
            f"{spec}: the factory raised {type(err).__name__} ({first}); check --args"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"{spec}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


@contextlib.contextmanager
def _stderr_held() -> Iterator[Any]:
    """While open, what is written to stderr (torch logs a warning with a traceback when
    `torch.export.load` meets a truncated file) is held back: a factory that fails gets
    bnkit's one line alone; one that works has it written after (`.release()`)."""
    import io

    held = io.StringIO()
    real = sys.stderr

    def release() -> None:
        real.write(held.getvalue())

    held.release = release  # type: ignore[attr-defined]
    with contextlib.redirect_stderr(held):
        yield held


def _unreadable_file(err: BaseException) -> bool:
    """A file the factory loads is truncated or corrupt: a zip archive (`torch.load`,
    `torch.export.load`) or pickle stream cut short, torch's stream reader failing."""
    import pickle
    import zipfile

    if isinstance(err, (zipfile.BadZipFile, EOFError, pickle.UnpicklingError)):
        return True
    return isinstance(err, RuntimeError) and "PytorchStreamReader failed" in str(err)


def _network_error(err: BaseException) -> bool:
    """A download that failed: urllib's URLError/HTTPError, requests' and sockets' errors."""
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    known = {"URLError", "HTTPError", "ConnectionError", "gaierror", "SSLError", "Timeout"}
    return bool(names & known) or isinstance(err, ConnectionError)


def _factory(spec: Any) -> Any:
    import importlib
    import importlib.util

    from bnkit.backends import installed
    from bnkit.errors import ModelFileError, closest

    if spec.source in ("torchvision", "timm") and not installed(spec.source):
        raise ModelFileError(
            f"{spec}: {spec.source} is not installed: pip install {spec.source} (with the "
            "torch it was built for, e.g. torch==2.14.1 torchvision==0.29.1 timm==1.0.31)"
        )
    if spec.source == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if spec.factory not in names:
            hint = closest(spec.factory, names)
            raise ModelFileError(
                f"{spec}: torchvision has no model {spec.factory!r}"
                + (f" ({hint})" if hint else "")
            )
        return lambda **kw: torchvision.models.get_model(spec.factory, **{"weights": None, **kw})
    if spec.source == "timm":
        import timm

        if not timm.is_model(spec.factory):
            hint = closest(spec.factory, timm.list_models())
            raise ModelFileError(
                f"{spec}: timm has no model {spec.factory!r}" + (f" ({hint})" if hint else "")
            )
        return lambda **kw: timm.create_model(spec.factory, **{"pretrained": False, **kw})
    try:
        if spec.is_file:
            loader = importlib.util.spec_from_file_location("bnkit_user_model", spec.source)
            if loader is None or loader.loader is None:
                raise ImportError(spec.source)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(spec.source)
    except (Exception, SystemExit) as err:  # importing user code may raise anything
        if isinstance(err, (Terminated, BnkitError)):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelFileError(
            f"{spec}: cannot import {spec.source!r} ({type(err).__name__}: {first})"
        ) from None
    factory = getattr(module, spec.factory, None)
    if not callable(factory):
        names = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
        hint = closest(spec.factory, names)
        raise ModelFileError(
            f"{spec}: {spec.source} has no factory {spec.factory!r}"
            + (f" ({hint})" if hint else "")
        )
    _check_factory(spec, factory)
    return factory


def _check_factory(spec: Any, factory: Any) -> None:
    """A factory is a class or a function defined outside the standard library: a name
    that reaches `os.remove` or `shutil.rmtree` through a module is refused, not called
    with the user's --args."""
    import inspect
    import sys

    from bnkit.errors import ModelFileError

    if not (inspect.isclass(factory) or inspect.isfunction(factory)):
        raise ModelFileError(
            f"{spec}: {spec.factory!r} is a {type(factory).__name__}, not a class or function "
            "that builds a model"
        )
    home = str(getattr(factory, "__module__", "") or "").split(".")[0]
    if home in sys.stdlib_module_names or home == "builtins":
        raise ModelFileError(
            f"{spec}: {spec.factory!r} is {home}.{factory.__qualname__} from Python's standard "
            "library, not a model factory; name a class or function that builds a "
            "torch.nn.Module"
        )


STATE_KEYS = ("state_dict", "model", "model_state_dict", "module")
"""Where Lightning, timm and common training scripts keep the weights in a checkpoint."""
MISMATCH_LISTED = 3


def load_weights(model: Any, path: Path, what: str) -> None:
    """Loads a state_dict file into `model` with `torch.load(weights_only=True)` (bnkit
    never unpickles a file): the dict itself, or one under `state_dict`/`model`; a
    prefix such as `model.` (Lightning) or `module.` (DDP) is removed when that makes
    the keys fit."""
    import pickle

    from bnkit.errors import ModelFileError

    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol it met
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not _saved_by_torch_or_pickle(path):
            raise ModelFileError(
                f"{path}: not a weights file (neither a torch.save archive nor a pickle: "
                "text, or another format?); save with torch.save(model.state_dict(), path)"
            ) from None
        raise ModelFileError(
            f"{path}: holds pickled Python objects (a whole module?), which bnkit never "
            "unpickles; save the weights with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as err:  # a corrupt file raises various types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelFileError(f"{path}: cannot read this weights file ({first})") from None
    state = _state_dict(loaded, path)
    _check_tensors(state, path)
    want = model.state_dict()
    state = _strip_prefix(state, set(want))
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:MISMATCH_LISTED])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:MISMATCH_LISTED])}")
        if shapes:
            k = shapes[0]
            parts.append(f"{k} is {tuple(state[k].shape)}, the model's {tuple(want[k].shape)}")
        raise ModelFileError(
            f"{path}: these weights do not fit {what} ({'; '.join(parts)}): another "
            "architecture, or other --args?"
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelFileError(f"{path}: these weights do not load into {what} ({first})") from None


def _check_tensors(state: dict[Any, Any], path: Path) -> None:
    """Keys are names; values are dense tensors holding data (not sparse, not on the meta
    device, where a state_dict loads nothing)."""
    from bnkit.errors import ModelFileError

    for key, value in state.items():
        if not isinstance(key, str):
            raise ModelFileError(
                f"{path}: has a key {key!r} of type {type(key).__name__}; a state_dict maps "
                "parameter names to tensors (save with torch.save(model.state_dict(), path))"
            )
        if value.is_complex():
            raise ModelFileError(
                f"{path}: {key!r} holds complex numbers ({value.dtype}); a model's weights "
                "are real: save the real-valued state_dict"
            )
        if value.layout != torch.strided or value.is_meta:
            kind = "on the meta device (no data)" if value.is_meta else f"{value.layout}"
            raise ModelFileError(
                f"{path}: {key!r} is a tensor {kind}; give dense tensors with their values "
                "(torch.save(model.state_dict(), path))"
            )


def _saved_by_torch_or_pickle(path: Path) -> bool:
    """A zip archive (torch.save's format) or a pickle stream (protocol 2 and up)."""
    import zipfile

    with path.open("rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and head[1] >= 2)


def _state_dict(loaded: Any, path: Path) -> dict[str, Any]:
    from bnkit.errors import ModelFileError

    if isinstance(loaded, dict):
        for key in STATE_KEYS:
            inner = loaded.get(key)
            if (
                isinstance(inner, dict)
                and inner
                and all(torch.is_tensor(v) for v in inner.values())
            ):
                return inner
        if loaded and all(torch.is_tensor(v) for v in loaded.values()):
            return loaded
    raise ModelFileError(
        f"{path}: not a state_dict (a dict of tensors, or one under "
        f"{', '.join(STATE_KEYS)}); save with torch.save(model.state_dict(), path)"
    )


def _strip_prefix(state: dict[str, Any], want: set[str]) -> dict[str, Any]:
    if set(state) & want:
        return state
    for prefix in ("model.", "module.", "net.", "backbone."):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(stripped) & want:
            return stripped
    return state


def as_input(model: Any, x: np.ndarray) -> torch.Tensor:
    """A NumPy batch as a tensor of the model's floating dtype, on its device."""
    t = torch.as_tensor(np.ascontiguousarray(x))
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is not None and t.is_floating_point():
        t = t.to(device=p.device, dtype=p.dtype)
    return t


def call(model: Any, x: np.ndarray) -> Any:
    """Runs `model` on a NumPy batch; a model that rejects the batch raises DataError
    naming the shape and, for channels-last images, the transpose that fixes them."""
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
def observers_held(model: Any) -> Iterator[None]:
    """Quantization observers record nothing while bnkit runs its own passes, in training
    mode or not: QAT's fake-quantize modules (`prepare_qat`) and PTQ's observers
    (`prepare`, `prepare_fx`), torch.ao's and torchao's PT2E ones, would otherwise move
    their ranges, and with them the quantization scales, to the data of a re-estimation.
    Fake quantization itself still runs, so BN sees the inputs the quantized model gives
    it. Everything is put back."""
    fake_classes, observer_classes = _quantization_classes()
    fakes: list[Any] = [m for m in model.modules() if isinstance(m, fake_classes)]
    observers: list[Any] = [m for m in model.modules() if isinstance(m, observer_classes)]
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


def _moment_forward(
    layer: Any, path: str, captured: dict[str, tuple[Any, Any, Any]], batch_stats: bool
) -> Any:
    original = type(layer).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        n = x.numel() // x.shape[1]
        if not batch_stats and n == 1:  # one value per channel: the kernel refuses it
            captured[path] = (xf.reshape(-1), torch.zeros_like(xf.reshape(-1)), n)
            return original(layer, x)
        # one fused kernel normalises with the batch moments and, with momentum 1, leaves
        # them in the buffers given: the mean, and the variance with Bessel's correction
        mean = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        var = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
        weight, bias = (_float(layer.weight), _float(layer.bias)) if batch_stats else (None, None)
        out = F.batch_norm(xf, mean, var, weight, bias, True, 1.0, layer.eps)
        captured[path] = (mean, var * ((n - 1) / n) if n > 1 else var * 0.0, n)
        if not batch_stats:  # the moments only (a third of var_mean's time on CPU)
            return original(layer, x)
        return carried(layer, out.to(x.dtype))

    return forward


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


@dataclass
class TorchCollective:
    """The default `torch.distributed` process group (gloo, or NCCL on GPUs)."""

    rank: int
    world: int

    def all_gather(self, values: np.ndarray) -> list[np.ndarray]:
        import torch.distributed as dist

        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        mine = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64), device=device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)
        return [t.cpu().numpy() for t in out]


def unwrapped(model: Any) -> Any:
    """The module inside DistributedDataParallel or DataParallel (whose own forward would
    broadcast buffers, a collective call every rank must make alike), else `model`."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _pass(model: Any, captured: dict[str, tuple[Any, Any, Any]]) -> MomentPass:
    inner = unwrapped(model)

    def run(x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        captured.clear()
        with torch.no_grad():
            call(inner, x)
        return {p: (m.cpu().numpy(), v.cpu().numpy(), int(n)) for p, (m, v, n) in captured.items()}

    return run


def backend() -> TorchBackend:
    """This module's backend object."""
    return TorchBackend()
