"""torchao's PT2E quantization and BN: the trap itself (torchao resets a BN's eps and
momentum, pytorch/ao#4107, so QAT trains with the wrong momentum and convert folds with
the wrong eps), bnkit.pt2e's drop-ins keeping them through prepare, eval, train and
convert, `check(graph, source=module)` finding the trap in torchao's own output,
re-estimation on a prepared QAT graph exact against NumPy with the quantizer's state
unchanged, and bnkit.fold before PT2E post-training quantization."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bnkit

pytest.importorskip("torchao")
from torchao.quantization.pt2e import move_exported_model_to_eval as ao_eval
from torchao.quantization.pt2e import move_exported_model_to_train as ao_train
from torchao.quantization.pt2e import quantize_pt2e as ao
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

import bnkit.pt2e

EPS, MOMENTUM = 1e-3, 0.03
"""What the user set (YOLO's BN: eps 1e-3, momentum 0.03); torchao writes 1e-5 and 0.1."""
X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def source() -> nn.Module:
    """Conv+BN+ReLU twice; small running variances, so that eps matters."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=EPS, momentum=MOMENTUM), nn.ReLU(),
        nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4, eps=EPS, momentum=MOMENTUM), nn.ReLU(),
    )  # fmt: skip
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_var.uniform_(1e-4, 3e-4)
            bn.running_mean.normal_(0, 0.05)
    return m


def quantizer(qat: bool = True) -> X86InductorQuantizer:
    return X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=qat)
    )


def exported(train: bool = True) -> torch.fx.GraphModule:
    m = source()
    return torch.export.export(m.train() if train else m.eval(), (X,)).module()


STEPS = {
    "torchao": (ao.prepare_qat_pt2e, ao_eval, ao_train, ao.convert_pt2e),
    "bnkit": (
        bnkit.pt2e.prepare_qat_pt2e,
        bnkit.pt2e.move_exported_model_to_eval,
        bnkit.pt2e.move_exported_model_to_train,
        bnkit.pt2e.convert_pt2e,
    ),
}


def without_fake_quant(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    out = copy.deepcopy(graph)
    for m in out.modules():
        if hasattr(m, "disable_fake_quant"):
            m.disable_fake_quant()
    return out


def calibrate(graph: torch.fx.GraphModule) -> None:
    """The observers' ranges from this graph's own outputs (they were set in training)."""
    for m in graph.modules():
        if hasattr(m, "reset_min_max_vals"):
            m.reset_min_max_vals()
    graph(X)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("who", ["torchao", "bnkit"])
def test_momentum_and_eps_through_prepare_eval_train_and_convert(who):
    prepare, to_eval, to_train, convert = STEPS[who]
    want = (MOMENTUM, EPS) if who == "bnkit" else (0.1, 1e-5)  # the trap, until ao 4107
    graph = prepare(exported(), quantizer())
    assert set(bnkit.pt2e.bn_args(graph).values()) == {want}
    before = graph.get_buffer("1.running_mean").clone()
    with torch.no_grad():
        batch_mean = source()[0](X).mean((0, 2, 3))
        graph(X)  # one QAT training step's forward
    share = (graph.get_buffer("1.running_mean") - before) / (batch_mean - before)
    assert float(share.median()) == pytest.approx(want[0], rel=0.02)
    graph = to_eval(graph)
    assert set(bnkit.pt2e.bn_args(graph).values()) == {want}
    assert set(bnkit.pt2e.bn_args(to_train(graph)).values()) == {want}
    graph = to_eval(graph)
    with torch.no_grad():
        for path in ("1", "4"):  # the source's statistics, to compare with the source
            for name in ("running_mean", "running_var"):
                graph.get_buffer(f"{path}.{name}").copy_(
                    source().get_submodule(path).get_buffer(name)
                )
        reference = source().eval()(X)
        prepared = without_fake_quant(graph)(X)
        calibrate(graph)
        converted = convert(graph)(X)
    if who == "bnkit":
        assert relative(prepared, reference) < 1e-5
        assert relative(converted, reference) < 0.05  # int8 alone
    else:
        assert relative(prepared, reference) > 0.5
        assert relative(converted, reference) > 0.5


def test_check_finds_the_trap_in_torchaos_own_output():
    plain = ao.prepare_qat_pt2e(exported(), quantizer())
    found = [f for f in bnkit.check(plain, source=source()).findings if f.code == "BN022"]
    assert [f.path for f in found] == ["1", "4"] and found[0].severity == "error"
    assert "eps 1e-05, the source's 0.001" in found[0].problem
    assert "momentum 0.1, the source's 0.03" in found[0].problem
    assert "bnkit.pt2e" in found[0].fix
    kept = bnkit.pt2e.prepare_qat_pt2e(exported(), quantizer())
    assert "BN022" not in {f.code for f in bnkit.check(kept, source=source()).findings}
    qat = {f.code for f in bnkit.check(kept).findings}
    assert "BN018" in qat and "BN019" not in qat  # a QAT graph in training, not a mistake


def test_a_bn_it_cannot_map_back_is_named():
    graph = exported()
    graph.meta[bnkit.pt2e.KEPT] = {"elsewhere": (MOMENTUM, EPS)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnkit.pt2e.prepare_qat_pt2e(graph, quantizer())
    message = next(str(w.message) for w in caught if issubclass(w.category, bnkit.BnkitWarning))
    assert "2 BN operators (1, 4)" in message and "source=module" in message


def _bn_inputs(graph: torch.fx.GraphModule, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Every BN operator's input over `batches`, each BN normalising with its batch's
    statistics as in re-estimation (`graph` is in training mode; observers off)."""
    g = copy.deepcopy(graph)
    for m in g.modules():
        if hasattr(m, "disable_observer"):
            m.disable_observer()
    kept = {k: v.clone() for k, v in g.named_buffers() if "running" in k}
    nodes = {n: str(n.args[3].target).rpartition(".")[0] for n in g.graph.nodes
             if "batch_norm" in str(n.target)}  # fmt: skip
    seen: dict[str, list[np.ndarray]] = {p: [] for p in nodes.values()}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            if n in nodes:
                args, _ = self.fetch_args_kwargs_from_env(n)
                seen[nodes[n]].append(args[0].detach().double().numpy())
            return super().run_node(n)

    with torch.no_grad():
        for x in batches:
            Capture(g).run(x)
            for k, v in kept.items():  # the statistics scale QAT's weights: keep them
                g.get_buffer(k).copy_(v)
    return {p: np.concatenate(v) for p, v in seen.items()}


def test_adapt_on_a_prepared_qat_graph_is_exact_and_leaves_the_quantizer_alone():
    graph = bnkit.pt2e.prepare_qat_pt2e(exported(), quantizer())
    graph(X)  # a QAT step: the observers hold ranges now
    quant = {k: v.clone() for k, v in graph.state_dict().items() if "activation_post" in k}
    data = np.random.default_rng(1).normal(0.5, 2.0, (37, 3, 16, 16)).astype("float32")
    chunks = [torch.as_tensor(data[i : i + 8]) for i in range(0, 37, 8)]
    last = chunks[-1]  # the graph takes batches of 8: the last is padded with copies
    chunks[-1] = last[torch.arange(8) % len(last)]
    inputs = _bn_inputs(graph, chunks[:-1])  # before: the statistics scale the weights
    tail = _bn_inputs(graph, [chunks[-1]])
    report = bnkit.adapt(graph, data, batch_size=8)
    assert report.samples == 37 and len(report.layers) == 2
    for path, values in inputs.items():
        every = np.concatenate([values, tail[path][: len(last)]])
        mean, var = every.mean((0, 2, 3)), every.var((0, 2, 3))
        got_mean = graph.get_buffer(f"{path}.running_mean").double().numpy()
        got_var = graph.get_buffer(f"{path}.running_var").double().numpy()
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_var, var, rtol=1e-5, atol=1e-7)
    after = {k: v for k, v in graph.state_dict().items() if "activation_post" in k}
    assert quant.keys() == after.keys()
    assert all(torch.equal(quant[k], after[k]) for k in quant)


def test_fold_before_pt2e_post_training_quantization():
    m = source().eval()
    folded = bnkit.fold(m, X.numpy()).model
    reference = m(X)
    results = {}
    for name, model in (("bnkit.fold", folded), ("PT2E's own fusion", m)):
        graph = torch.export.export(model, (X,)).module()
        prepared = bnkit.pt2e.prepare_pt2e(graph, quantizer(qat=False))
        prepared(X)  # calibration
        results[name] = bnkit.pt2e.convert_pt2e(prepared)(X)
    assert relative(results["bnkit.fold"], reference) < 0.05
    assert relative(results["bnkit.fold"], results["PT2E's own fusion"]) < 0.05
