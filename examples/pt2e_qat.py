"""Quantization-aware training with torchao's PT2E, and the BN settings it loses. A BN
with eps 1e-3 and momentum 0.03 (YOLO's) comes out of `prepare_qat_pt2e` with 1e-5 and
0.1 (pytorch/ao#4107): QAT averages its statistics 3x faster than the model was trained
with, and `convert_pt2e` folds it with the wrong eps. bnkit.pt2e's drop-ins keep both;
`bnkit.check(graph, source=module)` finds the trap; `bnkit.adapt` re-estimates the
statistics of the prepared graph without touching the quantizer. The script runs both
flows on a small Conv+BN network and prints what each kept and how far its int8 model is
from the float one.

    python examples/pt2e_qat.py
"""

import numpy as np
import torch
from torch import nn
from torchao.quantization.pt2e import move_exported_model_to_eval
from torchao.quantization.pt2e import quantize_pt2e as torchao
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

import bnkit
import bnkit.pt2e
from bnkit.data import digits

images, _ = digits("target", size=16).train
x = torch.as_tensor(images[:64].transpose(0, 3, 1, 2))


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16, eps=1e-3, momentum=0.03), nn.ReLU(),
        nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8, eps=1e-3, momentum=0.03), nn.ReLU(),
    )  # fmt: skip
    bnkit.adapt(net, x.numpy())  # statistics of the data: "pretrained"
    return net


def qat(prepare, to_eval, convert) -> tuple[dict, float, list[str]]:
    """Export, prepare for QAT, 3 QAT steps, eval, calibrate, convert."""
    source = model()
    graph = torch.export.export(source.train(), (x[:16],)).module()
    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=True)
    )
    graph = prepare(graph, quantizer)
    found = [
        f.code for f in bnkit.check(graph, source=source).findings if f.code == "BN022"
    ]
    args = bnkit.pt2e.bn_args(graph)
    for step in range(3):
        graph(x[step * 16 : step * 16 + 16])
    graph = to_eval(graph)
    bnkit.adapt(graph, x.numpy(), batch_size=16)  # the statistics QAT moved, exactly
    for m in graph.modules():  # observers calibrated in inference
        if hasattr(m, "reset_min_max_vals"):
            m.reset_min_max_vals()
    graph(x[:16])
    int8 = convert(graph)
    float_model = model().eval()
    bnkit.adapt(float_model, x.numpy(), batch_size=16)
    with torch.no_grad():
        ref = float_model(x[:16])
        gap = float((int8(x[:16]) - ref).abs().max() / ref.abs().max())
    return args, gap, found


flows = {
    "torchao": (
        torchao.prepare_qat_pt2e,
        move_exported_model_to_eval,
        torchao.convert_pt2e,
    ),
    "bnkit.pt2e": (
        bnkit.pt2e.prepare_qat_pt2e,
        bnkit.pt2e.move_exported_model_to_eval,
        bnkit.pt2e.convert_pt2e,
    ),
}
print("| flow | BN momentum, eps after prepare | check | int8 vs float (max, rel.) |")
print("|---|---|---|---|")
for name, steps in flows.items():
    args, gap, found = qat(*steps)
    momentum, eps = args["1"]
    found_text = ", ".join(found) or "clean"
    print(f"| {name} | {momentum:g}, {eps:g} | {found_text} | {gap:.1%} |")
assert (momentum, eps) == (0.03, 1e-3) and np.isfinite(gap)
