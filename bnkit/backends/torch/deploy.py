"""PyTorch deployment: BN folded into the Conv/Linear feeding it (torch's own fusion
arithmetic), the other BN fixed in inference mode, dropout removed; and the facts
`check` reads, from a `torch.fx` trace where the model traces, and from forward hooks
on one inference pass.

The copy is the user's own module class with some children replaced by plain torch
modules (`nn.Identity`, a torch.fx GraphModule calling batch norm with
`training=False`): no bnkit class, and its output does not depend on `train()`/`eval()`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import fusion

from bnkit.backends.torch.exported import (
    differences,
    exported_bn,
    exported_bn_nodes,
    exported_example_shape,
    exported_graph,
)
from bnkit.backends.torch.modules import (
    as_input,
    call,
    is_bn,
    is_pinned,
    materialized,
    observers_held,
    unpin_class,
    walk,
)
from bnkit.errors import BnkitError
from bnkit.records import BNFacts, Folded, unestimated

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
RANDOM_IN_TRAINING = ("StochasticDepth", "DropPath", "DropBlock2d", "DropBlock")
"""torchvision's and timm's stochastic-depth and drop-block modules: random in training,
the identity in inference."""
OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.RMSNorm)
FORMATS: tuple[str, ...] = ("pt2", "onnx")


# ---------------------------------------------------------------------- graph


@dataclass(frozen=True)
class _Graph:
    """What a torch.fx trace says about each module: how often it is called, the module
    whose output is its only input, and how many nodes use its output."""

    calls: dict[str, int]
    producer: dict[str, str | None]
    users: dict[str, int]


class _BNLeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping every BN module whole (timm's BatchNormAct2d included,
    whose forward would otherwise be traced into)."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return is_bn(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: Any) -> tuple[_Graph | None, str]:
    """The graph of `model` by `torch.fx.symbolic_trace`, or None and why not."""
    try:
        traced = _BNLeafTracer().trace(model)
    except Exception as err:  # fx raises many types on untraceable code
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        return None, f"the model does not trace with torch.fx ({first})"
    calls: dict[str, int] = {}
    producer: dict[str, str | None] = {}
    users: dict[str, int] = {}
    for node in traced.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        calls[target] = calls.get(target, 0) + 1
        users[target] = users.get(target, 0) + len(node.users)
        inputs = [a for a in node.all_input_nodes]
        src = inputs[0] if len(inputs) == 1 else None
        producer[target] = str(src.target) if src is not None and src.op == "call_module" else None
    return _Graph(calls, producer, users), ""


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Inference mode for one pass, every module's flag put back afterwards; a
    `torch.export` graph has no modes (its eval() raises) and runs as exported."""
    if exported_graph(model):
        yield
        return
    modules = list(model.modules())
    flags = [m.training for m in modules]
    if not any(flags):  # in inference mode already: nothing to set or put back
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            if m.training != flag:
                m.training = flag


def _hooked_pass(model: Any, example: np.ndarray) -> tuple[dict[str, int], dict[str, int]]:
    """Calls per BN module and values per channel per sample, from one inference pass."""
    bns = {n.path: n.module for n in walk(model) if is_bn(n.module)}
    calls: dict[str, int] = dict.fromkeys(bns, 0)
    spatial: dict[str, int] = {}
    handles = []

    def hook(path: str) -> Any:
        def record(module: Any, args: Any) -> None:
            calls[path] += 1
            x = args[0]
            spatial[path] = int(x[0].numel() // x.shape[1]) if x.dim() > 1 else 1

        return record

    for path, module in bns.items():
        handles.append(module.register_forward_pre_hook(hook(path)))
    try:
        with _eval_mode(model), torch.no_grad():
            call(model, example)
    finally:
        for h in handles:
            h.remove()
    return calls, spatial


def bn_facts(model: Any, example: np.ndarray | None = None) -> list[BNFacts]:
    """Facts about every BN module: call counts and values per channel from one inference
    pass on `example` (when given), the module feeding it from a torch.fx trace (when the
    model traces), statistics from its buffers."""
    graph, _ = _trace(model)
    calls: dict[str, int] = {}
    spatial: dict[str, int] = {}
    if example is not None and not exported_graph(model):  # a graph has no modes to switch
        calls, spatial = _hooked_pass(model, example)
    modules = {n.path: n.module for n in walk(model)}
    facts = []
    for path, module in modules.items():
        if not is_bn(module) or module.running_var is None:
            continue
        bn: Any = module
        mean = bn.running_mean.detach().double().cpu().numpy()
        var = bn.running_var.detach().double().cpu().numpy()
        src = graph.producer.get(path) if graph is not None else None
        src_module = modules.get(src) if src is not None else None
        own = list(src_module.parameters(recurse=False)) if src_module is not None else []
        if example is not None:  # the pass says: 0 for a BN off the inference path
            n_calls = calls.get(path, 0)
        else:
            n_calls = graph.calls.get(path, 1) if graph is not None else 1
        facts.append(
            BNFacts(
                path=path,
                calls=n_calls,
                spatial=spatial.get(path),
                epsilon=float(bn.eps),
                min_var=float(np.nanmin(var)) if np.isfinite(var).any() else float("nan"),
                nonfinite=int((~np.isfinite(mean)).sum() + (~np.isfinite(var)).sum()),
                pinned=is_pinned(bn),
                producer_trainable=any(p.requires_grad for p in own) if own else None,
                unestimated=_unestimated(bn, mean, var),
            )
        )
    return facts


def _unestimated(bn: Any, mean: np.ndarray, var: np.ndarray) -> bool:
    counted = getattr(bn, "num_batches_tracked", None)
    if counted is not None and int(counted) != 0:
        return False
    weights = [
        None if t is None else t.detach().double().cpu().numpy() for t in (bn.weight, bn.bias)
    ]
    return unestimated(mean, var, *weights)


def norm_layers(model: Any) -> dict[str, int]:
    """How many modules of each other normalisation class the model has."""
    counts: dict[str, int] = {}
    for node in walk(model):
        m = node.module
        norm_named = re.search(r"Norm(\dd)?$", type(m).__name__) is not None
        if isinstance(m, OTHER_NORMS) or (norm_named and not is_bn(m)):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


# ---------------------------------------------------------------------- folding


def identity_at_inference(module: Any) -> bool:
    """Dropout, stochastic depth and drop-block modules: random in training, the identity
    in inference."""
    return isinstance(module, DROPOUT) or type(module).__name__ in RANDOM_IN_TRAINING


def _set_child(root: Any, path: str, module: Any) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class _InferenceBN(nn.Module):
    """BatchNorm's inference computation with `training=False` written into the call, so
    that `train()` cannot change it. Only traced: the copy holds the torch.fx
    GraphModule made from it, a plain torch module."""

    def __init__(self, bn: Any) -> None:
        super().__init__()
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().clone())
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().clone())
        self.eps = float(bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean: Any = self.running_mean
        var: Any = self.running_var
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def _fixed(bn: Any) -> nn.Module:
    """A BN fixed in inference mode: the same fast kernel, whatever train() says."""
    return torch.fx.symbolic_trace(_InferenceBN(bn))


def fold_pairs(model: Any, graph: _Graph) -> dict[str, str]:
    """BN path -> the Conv/Linear path it folds into: that module is called once, its
    only use is this BN, which is called once and normalises its output channels."""
    modules = {n.path: n.module for n in walk(model)}
    pairs: dict[str, str] = {}
    for path, bn in modules.items():
        if not is_bn(bn) or bn.running_var is None or graph.calls.get(path) != 1:
            continue
        src = graph.producer.get(path)
        conv = modules.get(src) if src is not None else None
        if src is None or not isinstance(conv, FOLDABLE) or graph.calls.get(src) != 1:
            continue
        if graph.users.get(src) != 1 or _channels(conv) != _bn_channels(bn):
            continue
        pairs[path] = src
    return pairs


def _bn_channels(bn: Any) -> int:
    return int(bn.running_var.numel())


def _channels(module: Any) -> int:
    return int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)


def _why_kept(path: str, bn: Any, graph: _Graph | None, why_not_traced: str, fold: bool) -> str:
    if not fold:
        return "folding was turned off"
    if graph is None:
        return why_not_traced
    if bn.running_var is None:
        return "it keeps no running statistics"
    if graph.calls.get(path, 0) != 1:
        return f"it is called {graph.calls.get(path, 0)} times"
    src = graph.producer.get(path)
    if src is None:
        return "its input is not the output of one module (a function, an add or a concat)"
    if graph.calls.get(src) != 1:
        return f"{src} is called {graph.calls.get(src)} times"
    if graph.users.get(src, 0) != 1:
        return f"{src}'s output feeds {graph.users.get(src)} nodes, not this BN alone"
    return f"it follows {src}, which is not a Conv1d/2d/3d or Linear of its channel count"


def _float32_only(model: Any) -> None:
    """Folding and its checks run in float32: a half-precision module is refused in one
    line (folding in float16 loses what the checks measure)."""
    materialized(model)
    other = {str(p.dtype) for p in model.parameters() if p.is_floating_point()} - {"torch.float32"}
    if other:
        raise BnkitError(
            f"the module's weights are {', '.join(sorted(other))}: bnkit folds and verifies in "
            "float32; export model.float() (and convert the exported model to half precision "
            "after, if you deploy in it)"
        )


def inference_copy(model: Any, fold: bool = True, example: np.ndarray | None = None) -> Folded:
    """A deep copy of `model` for deployment: each BN fed directly by a Conv1d/2d/3d or
    Linear whose output feeds nothing else is folded into it (with
    `torch.nn.utils.fusion`) and replaced by `nn.Identity`; every other BN becomes a
    `torch.fx` GraphModule calling batch norm with `training=False`; dropout becomes
    `nn.Identity`. The copy is in eval() and computes the same in train().

    A `torch.export` graph is folded in its graph (`fold_exported`)."""
    if exported_graph(model):
        return fold_exported(model, fold)
    _float32_only(model)
    graph, why = _trace(model)
    dup = copy.deepcopy(model)
    for node in walk(dup):
        if is_pinned(node.module):
            node.module.__class__ = unpin_class(type(node.module))
    folded, kept, dropped, reasons = [], [], [], []
    with torch.no_grad():
        if fold:
            folded += _fold_fused_qat(dup)
    modules = {n.path: n.module for n in walk(dup)}
    pairs = fold_pairs(dup, graph) if fold and graph is not None else {}
    with torch.no_grad():
        for bn_path, conv_path in pairs.items():
            _fold(modules[conv_path], modules[bn_path])
            _set_child(dup, bn_path, _with_activation(modules[bn_path], nn.Identity()))
            folded.append(bn_path)
        for path, module in modules.items():
            if path in pairs:
                continue
            if is_bn(module):
                if module.running_var is None:
                    raise BnkitError(
                        f"{path}: track_running_stats=False and no running statistics: it "
                        "normalises every batch with its own statistics, so there is nothing "
                        "to export it with; re-estimate statistics first (bnkit.adapt)"
                    )
                _set_child(dup, path, _with_activation(module, _fixed(module)))
                kept.append(path)
                reasons.append((path, _why_kept(path, module, graph, why, fold)))
            elif identity_at_inference(module):
                _set_child(dup, path, nn.Identity())
                dropped.append(path)
    dropped += _functional_dropout_off(dup)
    for p in dup.parameters():
        p.requires_grad_(False)
    dup.eval()
    return Folded(dup, tuple(folded), tuple(kept), tuple(dropped), tuple(reasons))


FOLDABLE_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
                "aten.linear.default")  # fmt: skip
"""The operators of an exported graph a BN operator after them folds into."""


def fold_exported(model: Any, fold: bool = True) -> Folded:
    """A copy of a `torch.export` graph (`ExportedProgram.module()`) with each BN operator
    (`aten.batch_norm`, inference mode) that a convolution or linear operator alone feeds
    folded into that operator's weight and bias (pytorch 141116); every other BN operator
    is kept, fixed as it is in the graph. A graph exported in training mode is refused:
    its BN normalises with batch statistics (BN019), which no fold reproduces."""
    batch = exported_bn(model) or {}
    if any(batch.values()):
        paths = ", ".join(p for p, b in batch.items() if b)
        raise BnkitError(
            f"{paths}: this graph was exported in training mode, so its BN normalises with "
            "the batch's statistics (check BN019) and has nothing fixed to fold; export "
            "again after model.eval()"
        )
    dup = copy.deepcopy(model)
    folded: list[str] = []
    kept: list[str] = []
    reasons: list[tuple[str, str]] = []
    graph = dup.graph
    for node, path in list(exported_bn_nodes(graph)):
        why = _why_not_foldable(node, fold)
        if why is not None:
            kept.append(path)
            reasons.append((path, why))
            continue
        _fold_node(dup, node, len(folded))
        folded.append(path)
    graph.eliminate_dead_code()
    dup.recompile()
    return Folded(dup, tuple(folded), tuple(kept), (), tuple(reasons))


def _why_not_foldable(bn: Any, fold: bool) -> str | None:
    producer = bn.args[0]
    if not fold:
        return "folding turned off"
    if str(bn.target) != "aten.batch_norm.default":
        return f"{bn.target} is not folded (only aten.batch_norm)"
    if not (
        isinstance(producer, torch.fx.Node)
        and producer.op == "call_function"
        and str(producer.target) in FOLDABLE_OPS
    ):
        return "not fed by a convolution or linear operator; kept fixed as exported"
    if len(producer.users) != 1:
        return "the operator before it also feeds others; kept fixed as exported"
    params = [a for a in producer.args[1:3] if a is not None]
    if not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in params):
        return "the weights of the operator before it are not constants of the graph"
    return None


def _fold_node(gm: Any, bn: Any, index: int) -> None:
    """Folds the BN operator `bn` into the operator feeding it, with new constants."""
    producer = bn.args[0]

    def value(arg: Any) -> Any:
        if arg is None:
            return None
        owner = gm
        for part in str(arg.target).split("."):
            owner = getattr(owner, part)
        return owner

    weight = value(producer.args[1])
    bias = value(producer.args[2]) if len(producer.args) > 2 else None
    gamma, beta, mean, var = (value(a) for a in bn.args[1:5])
    eps = float(bn.args[7])
    with torch.no_grad():
        scale = torch.rsqrt(var.double() + eps)
        if gamma is not None:
            scale = scale * gamma.double()
        shift = -mean.double() * scale + (beta.double() if beta is not None else 0.0)
        if bias is not None:
            shift = shift + bias.double() * scale
        new_w = (weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
        new_b = shift.to(weight.dtype)
    names = (f"_bnkit_folded_{index}_weight", f"_bnkit_folded_{index}_bias")
    for name, tensor in zip(names, (new_w, new_b), strict=True):
        gm.register_buffer(name, tensor)
    with gm.graph.inserting_before(producer):
        w_node, b_node = (gm.graph.get_attr(name) for name in names)
    rest = producer.args[3:]
    producer.args = (producer.args[0], w_node, b_node, *rest)
    bn.replace_all_uses_with(producer)
    gm.graph.erase_node(bn)


def _functional_dropout_off(model: nn.Module) -> list[str]:
    """timm's models apply dropout in `forward_head` as `F.dropout(x, p=self.drop_rate,
    training=self.training)`, with no module to replace: the copy gets `drop_rate` 0 (the
    identity, as dropout is at inference). Returns the paths changed."""
    changed = []
    for path, module in model.named_modules():
        rate = getattr(module, "drop_rate", None)
        if isinstance(rate, float) and rate > 0:
            module.drop_rate = 0.0
            changed.append(f"{path}.drop_rate" if path else "drop_rate")
    return changed


def _fused_qat_targets() -> dict[type, Any]:
    """torch.ao's fused QAT Conv+BN and Linear+BN classes (`prepare_qat` after
    `fuse_modules_qat`, and `prepare_qat_fx`) -> the QAT class computing the same
    in inference once BN is folded."""
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.qat as nnqat

    return {
        nniqat.ConvBn1d: nnqat.Conv1d, nniqat.ConvBn2d: nnqat.Conv2d,
        nniqat.ConvBn3d: nnqat.Conv3d, nniqat.ConvBnReLU1d: nniqat.ConvReLU1d,
        nniqat.ConvBnReLU2d: nniqat.ConvReLU2d, nniqat.ConvBnReLU3d: nniqat.ConvReLU3d,
        nniqat.LinearBn1d: nnqat.Linear,
    }  # fmt: skip


def _fold_fused_qat(model: nn.Module) -> list[str]:
    """Folds the BN of each fused QAT module in place, the way its inference pass
    computes it (the weight scaled by gamma / std, then fake-quantized; the bias shifted):
    the module becomes the unfused QAT Conv (with its ReLU) or Linear, holding the folded
    weight and bias, the same weight fake-quantizer, and the output observer and hooks
    `prepare_qat` gave it, so torch.ao's `convert` still takes the copy. Returns the
    paths of the BN modules folded."""
    targets = _fused_qat_targets()
    folded = []
    for path, module in list(model.named_modules()):
        target = targets.get(type(module))
        if target is None or module.bn.running_var is None:
            continue
        bn = module.bn
        new: Any
        if issubclass(target, nn.Linear):
            new = target(module.in_features, module.out_features, True, qconfig=module.qconfig)
            w, b = fusion.fuse_linear_bn_weights(
                module.weight, module.bias, bn.running_mean, bn.running_var, bn.eps,
                bn.weight, bn.bias,
            )  # fmt: skip
        else:
            new = target(
                module.in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, True, module.padding_mode,
                qconfig=module.qconfig,
            )  # fmt: skip
            w, b = fusion.fuse_conv_bn_weights(
                module.weight, module.bias, bn.running_mean, bn.running_var, bn.eps,
                bn.weight, bn.bias,
            )  # fmt: skip
        new.weight, new.bias = w, b
        new.weight_fake_quant = module.weight_fake_quant
        for name, child in module.named_children():
            if name not in ("bn", "weight_fake_quant"):
                new.add_module(name, child)
        new._forward_pre_hooks.update(module._forward_pre_hooks)
        new._forward_hooks.update(module._forward_hooks)
        new.train(module.training)
        _set_child(model, path, new)
        folded.append(f"{path}.bn" if path else "bn")
    return folded


def _with_activation(bn: Any, replacement: nn.Module) -> nn.Module:
    """`replacement`, followed by the activation a BN module carries inside (timm's
    BatchNormAct2d: BN, then `drop`, then `act`); the drop is the identity in inference."""
    act = getattr(bn, "act", None)
    if not isinstance(act, nn.Module) or isinstance(act, nn.Identity):
        return replacement
    return nn.Sequential(replacement, act)


def _fold(conv: Any, bn: Any) -> None:
    """Folds `bn` (inference) into `conv` in place, with torch's fusion arithmetic."""
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    if isinstance(conv, nn.Linear):
        w, b = fusion.fuse_linear_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, weight, bias
        )
    else:
        w, b = fusion.fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, weight, bias
        )
    conv.weight = w
    conv.bias = b


# ---------------------------------------------------------------------- outputs and files


def outputs(model: Any, x: np.ndarray, training: bool = False) -> np.ndarray:
    """The model's output on `x` as float64, in eval() (or train()), mode put back after.
    A `torch.export` graph has no modes (its train() raises): it runs as exported, and
    where its batch size is fixed, `x` goes in batches of that size, the last one padded
    with copies of its first sample (the outputs kept are those of `x`)."""
    if exported_graph(model):
        return _exported_outputs(model, x)
    flags = [m.training for m in model.modules()]
    model.train(training)
    try:
        with torch.no_grad(), observers_held(model):
            out = call(model, x)
    finally:
        for m, flag in zip(model.modules(), flags, strict=True):
            m.training = flag
    return _first_output(out)


def _first_output(out: Any) -> np.ndarray:
    if isinstance(out, tuple | list):
        out = out[0]
    return np.asarray(out.detach().double().cpu().numpy())


def _exported_outputs(model: Any, x: np.ndarray) -> np.ndarray:
    shape = exported_example_shape(model)
    fixed = shape[0] if shape else None
    if fixed is None or len(x) == fixed:
        with torch.no_grad():
            return _first_output(call(model, x))
    parts = []
    for i in range(0, len(x), fixed):
        chunk = x[i : i + fixed]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], fixed - len(chunk), axis=0)])
        with torch.no_grad():
            parts.append(_first_output(call(model, padded))[: len(chunk)])
    return np.concatenate(parts)


def format_problem(format: str) -> str | None:
    """Why `format` cannot be written here, or None when it can."""
    if format != "onnx":
        return None
    missing = sorted(m for m in ("onnx", "onnxscript", "onnxruntime") if not _has(m))
    if missing:
        return f"ONNX export needs {', '.join(missing)}: pip install {' '.join(missing)}"
    return None


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _program(model: Any, example: np.ndarray) -> Any:
    """A `torch.export` program of `model` with a free batch dimension."""
    x = as_input(model, example)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dims = {0: batch, **{i: torch.export.Dim.STATIC for i in range(1, x.dim())}}
    return torch.export.export(model, (x,), dynamic_shapes=(dims,))


def write(model: Any, path: Path, format: str, example: np.ndarray) -> None:
    """Writes a `torch.export` program (`.pt2`) or an ONNX file."""
    if exported_graph(model):
        raise BnkitError(
            "bnkit export writes modules, and this is a graph torch.export produced: fold "
            "it with bnkit.fold(program) and save the result yourself "
            "(torch.export.save(torch.export.export(result.model, args), 'model.pt2'))"
        )
    model = _quantization_fixed(model, elementary=format == "pt2")
    if format == "pt2":
        torch.export.save(_program(model, example), str(path))
        return
    x = as_input(model, example)
    try:  # TorchScript's exporter first: fast, and what most deployments were built on
        with _stdout_dropped():  # it prints the graph it failed on, from C++
            torch.onnx.export(
                model,
                (x,),
                str(path),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                dynamo=False,
            )
        return
    except Exception as err:  # an operator it cannot express (alexnet's adaptive pooling)
        first = _first_line(err)
    try:  # then torch.export's exporter, which handles more operators
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamo=True,
            dynamic_shapes=({0: batch},),
            verbose=False,
            report=False,
        )
    except Exception as err:
        raise BnkitError(
            f"neither of torch's ONNX exporters can write this module: TorchScript's says "
            f"{first!r}, torch.export's {_first_line(err)!r}; export to .pt2 instead"
        ) from None


class _FixedFakeQuant(nn.Module):
    """A torch.ao fake-quantize module as it computes with its observer off: the scale
    and zero point it holds, fixed. For ONNX, torch's fake-quantize operator (written as
    QuantizeLinear/DequantizeLinear); for torch.export, which has no kernel for that
    operator, the same arithmetic in elementary operators (round half to even, as torch
    does). The fused observer operator QAT uses has no ONNX form and updates its ranges
    on every call."""

    def __init__(self, fake: Any, elementary: bool) -> None:
        super().__init__()
        self.axis = int(fake.ch_axis) if _per_channel(fake) else None
        self.register_buffer("scale", fake.scale.detach().clone().float())
        self.register_buffer("zero_point", fake.zero_point.detach().clone().int())
        self.quant_min, self.quant_max = int(fake.quant_min), int(fake.quant_max)
        self.tensor_scale = float(fake.scale.reshape(-1)[0])  # per tensor: constants
        self.tensor_zero_point = int(fake.zero_point.reshape(-1)[0])
        self.enabled = bool(fake.fake_quant_enabled[0])
        self.elementary = elementary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.elementary:
            scale: Any = self.tensor_scale
            zero: Any = self.tensor_zero_point
            if self.axis is not None:
                shape = [1] * x.dim()
                shape[self.axis] = -1
                scale_t: Any = self.scale
                zero_t: Any = self.zero_point
                scale, zero = scale_t.reshape(shape), zero_t.reshape(shape).float()
            q = torch.clamp(torch.round(x * (1.0 / scale)) + zero, self.quant_min, self.quant_max)
            return (q - zero) * scale
        if self.axis is not None:
            channel_scale: Any = self.scale
            channel_zero: Any = self.zero_point
            return torch.fake_quantize_per_channel_affine(
                x, channel_scale, channel_zero, self.axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(
            x, self.tensor_scale, self.tensor_zero_point, self.quant_min, self.quant_max
        )


def _per_channel(fake: Any) -> bool:
    return fake.qscheme in (torch.per_channel_affine, torch.per_channel_symmetric)


def _quantization_fixed(model: nn.Module, elementary: bool) -> nn.Module:
    """`model`, or a copy where each torch.ao fake-quantize module is `_FixedFakeQuant`
    and each observer (a prepared, not converted, model's) the identity it computes: the
    written file holds fixed quantization and no statistics that change as it runs."""
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    stateful = (FakeQuantizeBase, ObserverBase)
    if not any(isinstance(m, stateful) for m in model.modules()):
        return model
    dup = copy.deepcopy(model)
    fixed: dict[int, nn.Module] = {}  # one replacement per module, shared where it is
    replaced: list[str] = []
    for path, module in list(dup.named_modules(remove_duplicate=False)):
        if any(path.startswith(f"{done}.") for done in replaced):
            continue
        held: Any = module
        if isinstance(module, FakeQuantizeBase) and int(held.scale.numel()) > 0:
            new = fixed.setdefault(id(module), _FixedFakeQuant(module, elementary))
        elif isinstance(module, ObserverBase):
            new = fixed.setdefault(id(module), nn.Identity())
        else:
            continue
        _set_child(dup, path, new)
        replaced.append(path)
    return dup


@contextlib.contextmanager
def _stdout_dropped() -> Iterator[None]:
    """The process's standard output (file descriptor 1, which C++ writes to) sent to
    /dev/null for the block: `--json` output stays JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def run_written(path: Path, format: str, x: np.ndarray) -> np.ndarray:
    """Loads what `write` wrote, as a user without bnkit would, and runs it on `x`."""
    if format == "pt2":
        module = torch.export.load(str(path)).module()
        with torch.no_grad():
            out = module(torch.as_tensor(np.ascontiguousarray(x)))
        return np.asarray(out.detach().double().numpy())
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if any(node.op_type == "QuantizeLinear" for node in onnx.load(str(path)).graph.node):
        # onnxruntime's optimizer turns QuantizeLinear/DequantizeLinear around a Conv
        # into integer kernels, whose rounding differs from fake quantization by a step
        # here and there; the check is of what the file says, so it runs as written
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x.astype(np.float32)})[0], dtype=np.float64)


def source_differences(model: Any, source: Any) -> list[tuple[str, str]]:
    """See `Deployer.source_differences`."""

    if not isinstance(source, nn.Module):
        raise BnkitError(
            f"source must be the torch.nn.Module the graph was exported from, got "
            f"{type(source).__name__}"
        )
    return differences(model, source)


class TorchDeployer:
    """The Deployer capability for PyTorch modules (see `bnkit.backends.base.Deployer`)."""

    formats: tuple[str, ...] = FORMATS
    bn_facts = staticmethod(bn_facts)
    norm_layers = staticmethod(norm_layers)
    inference_copy = staticmethod(inference_copy)
    outputs = staticmethod(outputs)
    format_problem = staticmethod(format_problem)
    write = staticmethod(write)
    run_written = staticmethod(run_written)
    source_differences = staticmethod(source_differences)
