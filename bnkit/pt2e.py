"""torchao's PT2E quantization with each BN's momentum and eps kept as the source module
had them. Imported only by its users (it imports torchao).

torchao's `prepare_qat_pt2e` rewrites each Conv+BN of an exported graph into its QAT
pattern with momentum 0.1 and eps 1e-5 whatever the module said, and
`move_exported_model_to_eval` / `_train` rewrite them again the same way
(pytorch/ao#4107): a `BatchNorm2d(eps=1e-3, momentum=0.03)` trains and folds as
`(eps=1e-5, momentum=0.1)`; its reporter lost 4 points of mAP on YOLO11s. The functions
here have torchao's signatures: each reads every BN operator's momentum and eps (by the
module path that holds its statistics) before calling torchao, puts them back after,
and warns for a BN operator it cannot map back to one it read.

Examples:
    >>> import torch, bnkit.pt2e
    >>> from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    ...     X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3),
    ...                           torch.nn.BatchNorm2d(8, eps=1e-3, momentum=0.03))
    >>> graph = torch.export.export(net, (torch.randn(2, 3, 8, 8),)).module()
    >>> quantizer = X86InductorQuantizer().set_global(
    ...     get_default_x86_inductor_quantization_config(is_qat=True))
    >>> prepared = bnkit.pt2e.prepare_qat_pt2e(graph, quantizer)
    >>> bnkit.pt2e.bn_args(prepared)
    {'1': (0.03, 0.001)}
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from torchao.quantization.pt2e import qat_utils as _qat_utils
from torchao.quantization.pt2e import quantize_pt2e as _ao
from torchao.quantization.pt2e.export_utils import (
    _move_exported_model_to_eval,
    _move_exported_model_to_train,
)

from bnkit.backends.torch.exported import BNArgs, set_bn_args
from bnkit.backends.torch.exported import bn_args as _graph_bn_args
from bnkit.errors import BnkitWarning

__all__ = [
    "bn_args",
    "convert_pt2e",
    "move_exported_model_to_eval",
    "move_exported_model_to_train",
    "prepare_pt2e",
    "prepare_qat_pt2e",
]

KEPT = "bnkit_bn_args"
"""Where a graph these functions returned keeps its BN operators' (momentum, eps)."""


def bn_args(model: Any) -> dict[str, BNArgs]:
    """Each BN operator of a `torch.export` graph (by the module path holding its
    statistics) -> (momentum, eps) as the graph holds them now."""
    return _graph_bn_args(model)


def prepare_pt2e(model: Any, quantizer: Any) -> Any:
    """`torchao...prepare_pt2e` (post-training quantization), BN momentum and eps kept."""
    return _kept(model, lambda: _ao.prepare_pt2e(model, quantizer), "prepare_pt2e")


def prepare_qat_pt2e(model: Any, quantizer: Any) -> Any:
    """`torchao...prepare_qat_pt2e`, each BN's momentum and eps kept as exported."""
    return _kept(model, lambda: _ao.prepare_qat_pt2e(model, quantizer), "prepare_qat_pt2e")


def convert_pt2e(
    model: Any, use_reference_representation: bool = False, fold_quantize: bool = True
) -> Any:
    """`torchao...convert_pt2e`, each QAT Conv+BN folded with the BN's own eps and the
    BN operators it keeps at the momentum and eps they were prepared with.

    torchao's convert replaces each QAT Conv+BN pattern with a new one whose BN operator
    has eps 1e-5, then folds that BN into the convolution: a BN trained with another eps
    is folded wrongly (a fine-tuned YOLO's BN has eps 1e-3). Here the fold reads the
    eps the graph was prepared with.
    """
    values = _values(model)

    def run() -> Any:
        with _folding_with(values):
            return _ao.convert_pt2e(model, use_reference_representation, fold_quantize)

    return _kept(model, run, "convert_pt2e")


def move_exported_model_to_eval(model: Any) -> Any:
    """`torchao.quantization.pt2e.move_exported_model_to_eval`, BN momentum and eps kept."""
    return _kept(model, lambda: _move_exported_model_to_eval(model), "move_exported_model_to_eval")


def move_exported_model_to_train(model: Any) -> Any:
    """`torchao.quantization.pt2e.move_exported_model_to_train`, BN momentum and eps
    kept."""
    return _kept(
        model, lambda: _move_exported_model_to_train(model), "move_exported_model_to_train"
    )


def _values(model: Any) -> dict[str, BNArgs]:
    """The (momentum, eps) this module recorded on the graph, else the graph's own."""
    return dict(getattr(model, "meta", {}).get(KEPT) or _graph_bn_args(model))


@contextlib.contextmanager
def _folding_with(values: dict[str, BNArgs]) -> Iterator[None]:
    """While open, torchao's fold of a BN operator into its convolution (called by
    convert on the pattern it made, with eps 1e-5) reads the BN's eps from `values`."""
    fold = _qat_utils.fold_bn_weights_into_conv_node

    def folding(conv: Any, weight: Any, bias: Any, bn: Any, m: Any) -> Any:
        stats = bn.args[3] if len(bn.args) > 3 else None
        path = str(getattr(stats, "target", "")).rpartition(".")[0]
        if path in values:
            bn.update_arg(7 if len(bn.args) > 7 else 6, values[path][1])
        return fold(conv, weight, bias, bn, m)

    _qat_utils.fold_bn_weights_into_conv_node = folding
    try:
        yield
    finally:
        _qat_utils.fold_bn_weights_into_conv_node = fold


def _kept(model: Any, run: Any, name: str) -> Any:
    """Runs torchao's `run` on `model`, then puts every BN operator's momentum and eps
    back: those this module recorded on the graph, else those the graph has now."""
    values = _values(model)
    out = run()
    out = model if out is None else out
    unmapped = set_bn_args(out, values)
    if unmapped:
        warnings.warn(
            f"{name}: {len(unmapped)} BN operators ({', '.join(unmapped[:3])}) hold statistics "
            "of no BN the graph had before, so their momentum and eps are torchao's (0.1, "
            "1e-5), not the source module's; check them with bnkit.check(graph, "
            "source=module)",
            BnkitWarning,
            stacklevel=3,
        )
    out.meta[KEPT] = {**values, **_graph_bn_args(out)}
    return out
