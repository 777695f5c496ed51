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
import itertools
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
    missing,
)
from bnkit.backends.torch.exported import (
    exported_bn,
    exported_example_shape,
    exported_graph,
    refuse_exported,
)
from bnkit.backends.torch.exported import moments_pass as graph_moments_pass
from bnkit.backends.torch.loading import build_model, load_weights
from bnkit.backends.torch.modules import (
    BN,
    FIXED_STATE,
    FIXED_TEXT,
    Node,
    as_input,
    call,
    carried,
    fake_quantized,
    fake_quantized_in,
    initialised,
    is_bn,
    is_fixed_bn,
    is_pinned,
    materialized,
    numel,
    observers_held,
    own_parameters,
    pinned_class,
    to_numpy,
    unpin_class,
    unwrapped,
    walk,
)
from bnkit.errors import BnkitError, BnkitWarning
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

# module -> the requires_grad of each of its own parameters before bnkit first touched it
_ORIGINAL: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()
# parameter-free module -> the trainable flag a plan gave it (torch has none to set)
_FLAGS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


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
    affine = any(p.requires_grad for _, p in own_parameters(bn))
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


PEFT_INACTIVE = "inactive"
PEFT_UNSAVED = "unsaved"
PEFT_UNSAVED_TEXT = (
    "its running statistics update in training, but the PEFT adapter does not hold them "
    "(not in modules_to_save): PeftModel.from_pretrained reloads the base model's "
    "statistics, so the reloaded model is not the one trained and validated"
)


def _peft_role(node: Node) -> str | None:
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
        raise missing("trainer", "compare", self.name)

    def deployer(self) -> Deployer:
        raise missing("deployer", "check and export", self.name)

    def test_time(self) -> TestTimeAdapter:
        raise missing("test_time", "tta", self.name)

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
        qat = bool(exported) and fake_quantized(model)
        return [self._record(n, exported.get(n.path), qat) for n in walk(model)]

    def bn_paths(self, model: Any) -> list[str]:
        # the leaves `_record` gives BN fields: fixed BN, BN modules, an exported graph's
        exported = exported_bn(model) or {}
        return [
            n.path
            for n in walk(model)
            if not n.children
            and (is_fixed_bn(n.module) or isinstance(n.module, BN) or n.path in exported)
        ]

    def _record(
        self, node: Node, exported_batch: bool | None = None, qat: bool = False
    ) -> LayerRecord:
        """`exported_batch`: the module holds the statistics of a BN operator of an
        exported graph, which normalises with the batch's statistics (True) or not; `qat`:
        that graph is prepared for quantization-aware training (PT2E)."""
        module = node.module
        own = own_parameters(module)
        n_train = sum(numel(p) for _, p in own if p.requires_grad)
        n_fixed = sum(numel(p) for _, p in own if not p.requires_grad)
        n_fixed += sum(numel(b) for b in module.buffers(recurse=False) if b.is_floating_point())
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
            _ORIGINAL.setdefault(
                node.module, {n: p.requires_grad for n, p in own_parameters(node.module)}
            )
            if d.rule is None:
                continue
            if d.is_bn and d.bn_mode is not None:
                self.set_bn_mode(node.module, Mode(d.bn_mode))
            elif not own_parameters(node.module):
                _FLAGS[node.module] = d.trainable
            else:
                for _, p in own_parameters(node.module):
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
        _ORIGINAL.setdefault(bn, {n: p.requires_grad for n, p in own_parameters(bn)})
        bn.__class__ = pinned_class(type(bn))
        bn._bnkit_mode = mode.value
        for _, p in own_parameters(bn):
            p.requires_grad_(MODE_STATES[mode].affine_trained)

    def unfreeze(self, model: Any) -> int:
        released = 0
        for node in walk(model):
            module = node.module
            if is_pinned(module):
                module.__class__ = unpin_class(type(module))
                del module._bnkit_mode
                released += 1
            _FLAGS.pop(module, None)
            original = _ORIGINAL.pop(module, None)
            if original is not None:
                for name, p in own_parameters(module):
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
                {n: to_numpy(p) for n, p in own_parameters(module) if initialised(p)}
                if weights_too
                else {}
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

    def bn_stats(self, model: Any, paths: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for path in paths:
            bn: Any = model.get_submodule(path)
            out[path] = {"mean": to_numpy(bn.running_mean), "var": to_numpy(bn.running_var)}
        return out

    def set_bn_stats(self, model: Any, stats: dict[str, dict[str, np.ndarray]]) -> None:
        with torch.no_grad():
            for path, values in stats.items():
                bn: Any = model.get_submodule(path)
                bn.running_mean.copy_(torch.as_tensor(values["mean"]))  # copy_ casts
                bn.running_var.copy_(torch.as_tensor(values["var"]))

    @contextlib.contextmanager
    def moments_pass(
        self, model: Any, paths: Sequence[str], *, normalize: str
    ) -> Iterator[MomentPass]:
        materialized(model)
        if exported_graph(model):  # BN is an operator of the graph: run it node by node
            with graph_moments_pass(model, paths, normalize=normalize) as run:
                yield run
            return
        layers = [model.get_submodule(p) for p in paths]
        for path, layer in zip(paths, layers, strict=True):
            if layer.running_mean is None:
                raise BnkitError(f"{path}: track_running_stats=False, no statistics to measure")
        captured = _Captured(paths, [layer.running_mean.numel() for layer in layers])
        modules = list(model.modules())
        was_training = [m.training for m in modules]
        try:
            for path, layer in zip(paths, layers, strict=True):
                layer.forward = _moment_forward(layer, path, captured, normalize == "batch")
            if any(was_training):
                model.eval()
            with observers_held(model, modules):
                yield _pass(model, captured, as_given=_rounds_activations(modules))
        finally:
            for layer in layers:
                if "forward" in vars(layer):
                    del layer.forward
            for m, flag in zip(modules, was_training, strict=True):
                if m.training != flag:
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
        model = build_model(spec, args or {})
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


class _Captured:
    """One batch's input moments of the measured layers: every layer's mean and variance
    (with Bessel's correction, as the kernel leaves it) in one buffer per device, cut into
    the layers' views at once and read into NumPy at once, with the count of values per
    channel of each layer called."""

    def __init__(self, paths: Sequence[str], widths: Sequence[int]) -> None:
        self.slot = {path: 2 * i for i, path in enumerate(paths)}  # its mean's; var next
        self.sizes = [w for w in widths for _ in range(2)]
        self.starts = [0, *itertools.accumulate(self.sizes)]
        self.buffers: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.counts: dict[str, tuple[torch.device, int]] = {}
        self.calls = 0  # the measured layers' calls in this batch, repeats counted
        self.batches = 0
        self.stop_at: int | None = None
        """From the second batch on, a batch's pass ends once this many measured layers
        have their moments: all of them, where the first batch called each measured layer
        exactly once (a static graph), since the rest of the model (its head) would run
        for nothing. None: every pass runs whole."""

    def clear(self) -> None:
        self.buffers, self.counts, self.calls = {}, {}, 0

    def done(self) -> bool:
        """True once this batch has called every measured layer (see `stop_at`)."""
        return self.stop_at is not None and len(self.counts) == self.stop_at

    def take(self, path: str, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's fresh mean and variance buffers for this batch; zeros, so that a
        kernel at momentum 1 leaves exactly the batch's moments in them."""
        held = self.buffers.get(device)
        if held is None:
            buffer = torch.zeros(self.starts[-1], device=device)
            held = self.buffers[device] = (buffer, list(buffer.split(self.sizes)))
        self.counts[path] = (device, n)
        self.calls += 1
        i = self.slot[path]
        return held[1][i], held[1][i + 1]

    def moments(self) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        """Every layer's mean and population variance (0 for one value per channel) as
        NumPy arrays, views of one copy of this batch's buffer (none on the CPU)."""
        read = {device: t.cpu().numpy() for device, (t, _) in self.buffers.items()}
        out = {}
        for path, (device, n) in self.counts.items():
            at, middle, stop = self.starts[self.slot[path] : self.slot[path] + 3]
            values = read[device]
            variance = values[middle:stop]
            variance *= (n - 1) / n if n > 1 else 0.0
            out[path] = (values[at:middle], variance, n)
        if self.batches == 0 and self.calls == len(self.counts) == len(self.slot):
            self.stop_at = len(self.slot)
        self.batches += 1
        return out


class _PassDone(BaseException):
    """Ends a moments pass once every measured layer has its moments; a BaseException,
    so that a model's own `except Exception` does not swallow it."""


def _moment_forward(layer: Any, path: str, captured: _Captured, batch_stats: bool) -> Any:
    original = type(layer).forward
    weight, bias = (_float(layer.weight), _float(layer.bias)) if batch_stats else (None, None)
    eps, cudnn = layer.eps, torch.backends.cudnn.enabled
    carries = any(isinstance(getattr(layer, n, None), nn.Module) for n in ("drop", "act"))
    float32, last = torch.float32, torch.channels_last

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = moments(x)
        if captured.done():
            raise _PassDone
        return out

    def moments(x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype is float32 else x.float()
        channels = x.shape[1]
        n = x.numel() // channels
        if n == 1:  # one value per channel: the kernel refuses it in training mode
            if batch_stats:  # torch's own error: the batch cannot be normalised
                F.batch_norm(xf, None, None, weight, bias, True, 1.0, eps)
            mean, _ = captured.take(path, x.device, n)
            mean.copy_(xf.reshape(-1))
            return original(layer, x)
        # a channels-last map on the CPU: column sums (`_channels_last_moments`); else
        # one fused kernel normalises with the batch moments and, with momentum 1, leaves
        # them in the buffers given: the mean, and the variance with Bessel's correction
        # (taken off when read); torch.batch_norm is F.batch_norm less the Python checks
        # made above
        mean, var = captured.take(path, x.device, n)
        if xf.dim() == 4 and xf.is_contiguous(memory_format=last) and xf.device.type == "cpu":
            biased = _channels_last_moments(xf, mean, var)
            if not batch_stats:
                return original(layer, x)
            out = torch.batch_norm(xf, weight, bias, mean, biased, False, 0.0, eps, False)
        else:
            out = torch.batch_norm(xf, weight, bias, mean, var, True, 1.0, eps, cudnn)
            if not batch_stats:  # the moments only (a third of var_mean's time on CPU)
                return original(layer, x)
        if x.dtype is not float32:
            out = out.to(x.dtype)
        return carried(layer, out) if carries else out

    return forward


def _channels_last_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The batch moments of a channels-last CPU map into `mean` and `var` (with Bessel's
    correction, as the kernel leaves it); returns the population variance, which the
    inference kernel then normalises with. PyTorch's own channels-last kernel is faster
    still but sums in float32 one value after another (6e-6 relative error in the
    variance of 65,536 values per channel, 1e-4 of a standard deviation in a mean a
    hundred times it); here the map is a (values, channels) matrix whose column sums
    PyTorch takes pairwise (1.5e-7), and the squares are centred on the mean."""
    n = x.numel() // x.shape[1]
    values = x.permute(0, 2, 3, 1).reshape(n, x.shape[1])  # a view: no copy
    torch.sum(values, 0, out=mean).div_(n)
    torch.sum((values - mean).square_(), 0, out=var)
    biased = var / n
    var.div_(n - 1)
    return biased


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


def _pass(model: Any, captured: _Captured, as_given: bool = False) -> MomentPass:
    """A batch's pass. On a CPU an image batch runs channels-last: oneDNN's convolutions
    take it without reordering, and the moments of a channels-last map are column sums
    of a (values, channels) matrix, so the pass costs 0.9 to 1.5 inference passes as
    given where BN's batch-statistics kernel on the given layout makes it 1.2 to 1.9
    (benchmarks/README.md); the moments are the same to float rounding. A model that
    cannot take that layout (a `view` that flattens a feature map, an `assert` that its
    input is contiguous) fails on its first try and runs as given from then on; an error
    it raises as given too is the user's to see. `as_given`: a model that rounds its
    activations to a quantization grid runs as given, where float rounding that differs
    with the layout would put a few values on the next step of the grid."""
    inner = unwrapped(model)

    def run(x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        captured.clear()
        with torch.no_grad(), contextlib.suppress(_PassDone):
            given = as_given or inner in _GIVEN_LAYOUT
            last = None if given else _channels_last(inner, x)
            if last is None:
                call(inner, x, checked=True)  # moments_pass checked it
            else:
                try:
                    inner(last)
                except Exception:  # a view, or a model's own check of the layout
                    _GIVEN_LAYOUT.add(inner)
                    captured.clear()
                    call(inner, x, checked=True)
        return captured.moments()

    return run


_GIVEN_LAYOUT: weakref.WeakSet[Any] = weakref.WeakSet()
"""Models whose moments pass failed channels-last: they run as given."""

QUANTIZER_PACKAGES = ("nncf.", "aimet_torch.")
"""Packages whose modules quantize a model's activations in its forward."""


def _rounds_activations(modules: Sequence[Any]) -> bool:
    """True when a module fake-quantizes: torch.ao's and torchao's FakeQuantize (QAT), or
    a module of NNCF or AIMET (their quantizers)."""
    if fake_quantized_in(modules):
        return True
    return any(type(m).__module__.startswith(QUANTIZER_PACKAGES) for m in modules)


def _channels_last(model: Any, x: np.ndarray) -> torch.Tensor | None:
    """`x` as the model's input in channels-last layout, where it is a floating image
    batch for a model on the CPU; None otherwise."""
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        return None
    inputs = as_input(model, x)
    if inputs.device.type != "cpu":
        return None
    return inputs.contiguous(memory_format=torch.channels_last)
