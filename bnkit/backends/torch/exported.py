"""BN operators of `torch.export` graphs (`ExportedProgram.module()`) and of the graphs
torchao's PT2E quantization makes from them: each operator's momentum and eps as the
graph holds them, compared with or put back to its source module's, and a moments pass
that runs such a graph node by node (a graph has no BN module to patch)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from bnkit.backends.base import MomentPass
from bnkit.backends.torch.modules import BN, as_input, observers_held, walk
from bnkit.errors import BnkitError


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


BNArgs = tuple[float, float]
"""(momentum, eps) of a BN, in PyTorch's convention (momentum: the new batch's share)."""
_LEGIT = torch.ops.aten._native_batch_norm_legit.default


def _positions(node: Any) -> tuple[int, int]:
    """Where momentum and eps sit among a BN operator's arguments."""
    return (5, 6) if "no_training" in str(node.target) else (6, 7)


def bn_args(model: Any) -> dict[str, BNArgs]:
    """Each BN operator's module path -> (momentum, eps) as the graph holds them."""
    found: dict[str, BNArgs] = {}
    for node, path in exported_bn_nodes(model.graph):
        m, e = _positions(node)
        if len(node.args) > e:
            found[path] = (float(node.args[m]), float(node.args[e]))
    return found


def set_bn_args(model: Any, values: dict[str, BNArgs]) -> tuple[str, ...]:
    """Puts each BN operator's momentum and eps back to `values` (by module path), with
    the eps of the QAT pattern's weight scale, and recompiles the graph; returns the
    paths of the BN operators `values` does not name."""
    unmapped: list[str] = []
    changed = False
    for node, path in exported_bn_nodes(model.graph):
        m, e = _positions(node)
        if path not in values or len(node.args) <= e:
            unmapped.append(path)
            continue
        momentum, eps = values[path]
        if (node.args[m], node.args[e]) != (momentum, eps):
            node.update_arg(m, momentum)
            node.update_arg(e, eps)
            changed = True
        changed |= _set_scale_eps(node.args[4], eps)
    if changed:
        model.recompile()
    return tuple(dict.fromkeys(unmapped))


def _set_scale_eps(running_var: Any, eps: float) -> bool:
    """The QAT Conv+BN pattern of PT2E scales the convolution's weight by
    gamma / sqrt(running_var + eps) with its own eps constant (torchao writes 1e-5), and
    convert folds as if it were the BN's: `running_var + c` gets the BN's eps."""
    changed = False
    for user in list(getattr(running_var, "users", ())):
        adds = user.op == "call_function" and str(user.target).startswith("aten.add")
        constant = len(user.args) > 1 and isinstance(user.args[1], float)
        if adds and constant and user.args[1] != eps:
            user.update_arg(1, eps)
            changed = True
    return changed


def source_args(source: Any) -> dict[str, BNArgs]:
    """Each BN module of `source` (the module a graph was exported from) -> (momentum,
    eps); a cumulative average (momentum=None) has no momentum argument to compare."""
    return {
        n.path: (float(n.module.momentum), float(n.module.eps))
        for n in walk(source)
        if isinstance(n.module, BN) and n.module.momentum is not None
    }


def differences(model: Any, source: Any) -> list[tuple[str, str]]:
    """(path, what differs) for each BN of `model` (the operators of a `torch.export`
    graph, or a module's BN modules) whose momentum or eps is not that of the BN module
    of the same path in `source`, the module it was exported or copied from; a BN with
    no module of that path in `source` is named too."""
    want = source_args(source)
    have = bn_args(model) if exported_graph(model) else source_args(model)
    out = []
    for path, (momentum, eps) in have.items():
        if path not in want:
            out.append((path, "no BatchNorm module of this path in the source module"))
            continue
        src_momentum, src_eps = want[path]
        parts = []
        if not np.isclose(eps, src_eps, rtol=1e-6, atol=0.0):
            parts.append(f"eps {eps:g}, the source's {src_eps:g}")
        if not np.isclose(momentum, src_momentum, rtol=1e-6, atol=0.0):
            parts.append(f"momentum {momentum:g}, the source's {src_momentum:g}")
        if parts:
            out.append((path, "; ".join(parts)))
    return out


# ---------------------------------------------------------------------- moments


class _Moments(torch.fx.Interpreter):
    """Runs a graph node by node; at each listed BN operator, records the per-channel
    mean and population variance of its input and normalises with them (`batch`) or
    with the running statistics, as in inference (`running`). Running statistics are
    never changed (momentum 0)."""

    def __init__(self, gm: Any, paths: dict[Any, str], batch: bool, real: int) -> None:
        super().__init__(gm)
        self.paths = paths
        self.batch = batch
        self.real = real
        """the samples of the batch that count (the rest pad it to the graph's size)."""
        self.captured: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

    def run_node(self, n: Any) -> Any:
        path = self.paths.get(n)
        if path is None:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        x, weight, bias, mean, var = args[:5]
        eps = float(args[_positions(n)[1]])
        dims = [d for d in range(x.dim()) if d != 1]
        xd = x.detach()[: self.real].double()
        count = xd.numel() // xd.shape[1]
        self.captured[path] = (
            xd.mean(dims).cpu().numpy(),
            xd.var(dims, unbiased=False).cpu().numpy(),
            count,
        )
        if "no_training" in str(n.target):  # returns (out, mean, rstd), as _legit does
            return _LEGIT(x, weight, bias, mean, var, self.batch, 0.0, eps)
        if "_native_batch_norm_legit" in str(n.target):
            return _LEGIT(x, weight, bias, mean, var, self.batch, 0.0, eps)
        return F.batch_norm(x, mean, var, weight, bias, self.batch, 0.0, eps)


def _pooled(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, int]:
    """The mean and population variance of several chunks' values together."""
    if len(parts) == 1:
        return parts[0]
    total = sum(n for _, _, n in parts)
    mean = np.sum([n * m for m, _, n in parts], axis=0) / total
    var = np.sum([n * (v + (m - mean) ** 2) for m, v, n in parts], axis=0) / total
    return mean, var, total


@contextlib.contextmanager
def moments_pass(model: Any, paths: Sequence[str], *, normalize: str) -> Iterator[MomentPass]:
    """The Backend's `moments_pass` for a `torch.export` graph: each batch runs through
    the graph's nodes with quantization observers held (fake quantization still runs),
    and every BN operator of a listed path gives the moments of its input. A graph
    exported with a fixed batch size runs batches of that size: a batch is cut into
    chunks, the last padded with copies of its own samples, which count once."""
    nodes = {node: path for node, path in exported_bn_nodes(model.graph) if path in paths}
    missing = sorted(set(paths) - set(nodes.values()))
    if missing:
        raise BnkitError(f"{missing[0]}: no BN operator of the graph holds this layer's statistics")

    size = exported_example_shape(model)
    fixed = size[0] if size else None

    def run(x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        step = fixed or len(x)
        parts = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            real = len(chunk)
            if real < step:  # a graph exported with a fixed batch: pad with copies
                chunk = chunk[np.arange(step) % real]
            interpreter = _Moments(model, nodes, normalize == "batch", real)
            with torch.no_grad():
                interpreter.run(as_input(model, chunk))
            parts.append(interpreter.captured)
        return {path: _pooled([p[path] for p in parts]) for path in parts[0]}

    with observers_held(model):
        yield run
