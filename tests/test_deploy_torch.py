"""`fold` and `export` on real torchvision and timm architectures (weights=None,
pretrained=False) with randomised BN statistics, and on plain modules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch_nets import net, randomise_bn

import bnkit

SHAPE = (3, 32, 32)


def _torchvision(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


# (builder, name, BN folded, BN kept)
ARCHITECTURES = [
    (_torchvision, "resnet18", 20, 0),
    (_torchvision, "mobilenet_v3_small", 34, 0),
    (_torchvision, "efficientnet_b0", 49, 0),
    (_torchvision, "densenet121", 59, 62),
    (_timm, "efficientnet_b0", 49, 0),  # BatchNormAct2d: BN with its activation inside
    (_torchvision, "convnext_tiny", 0, 0),  # LayerNorm only: nothing to fold
    (_timm, "ghostnet_100", 80, 0),  # functional dropout in forward_head (drop_rate 0.2)
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "name", "folded", "kept"),
    ARCHITECTURES,
    ids=[f"{b.__name__[1:]}-{n}" for b, n, _, _ in ARCHITECTURES],
)
def test_fold_real_architectures(build, name, folded, kept):
    torch.manual_seed(0)
    model = build(name)
    randomise_bn(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = bnkit.fold(model, input_shape=SHAPE)
    assert (len(result.folded), len(result.kept)) == (folded, kept)
    assert max(result.max_diff_original, result.max_diff_single) < 1e-4
    assert result.max_diff_training == 0.0  # the copy has no training mode left
    assert all(not type(m).__module__.startswith("bnkit") for m in result.model.modules())
    assert all(why for _, why in result.kept)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_timm_bn_with_activation_keeps_its_activation_when_folded():
    model = _timm("efficientnet_b0")
    randomise_bn(model)
    result = bnkit.fold(model, input_shape=SHAPE)
    replaced = result.model.bn1
    assert isinstance(replaced, nn.Sequential) and isinstance(replaced[1], nn.SiLU)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_writes_a_program_that_reloads_without_bnkit(tmp_path, fmt):
    model = _torchvision("resnet18")
    randomise_bn(model)
    report = bnkit.export(model, tmp_path / f"m.{fmt}", input_shape=SHAPE)
    assert (report.format, report.folded, report.kept) == (fmt, 20, 0)
    x = np.random.default_rng(1).normal(size=(3, *SHAPE)).astype("float32")
    model.eval()
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    if fmt == "pt2":
        program = torch.export.load(str(tmp_path / "m.pt2")).module()
        got = program(torch.as_tensor(x)).detach().numpy()  # another batch size than checked
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))


def _qat(route: str) -> nn.Module:
    """A QAT model by torch.ao's eager route (`fuse_modules_qat`, `prepare_qat`) or its
    FX route (`prepare_qat_fx`), trained a few steps, in eval(): Conv+BN+ReLU and Conv+BN
    are fused QAT modules, each holding its BN inside."""
    import torch.ao.quantization as q
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = q.QuantStub(), q.DeQuantStub()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn2(self.conv2(self.relu(self.bn(self.conv(self.quant(x))))))
            return self.dequant(self.fc(self.pool(y).flatten(1)))

    torch.manual_seed(0)
    model = Net().train()
    if route == "eager":
        model.qconfig = q.get_default_qat_qconfig("x86")
        model = q.prepare_qat(q.fuse_modules_qat(model, [["conv", "bn", "relu"], ["conv2", "bn2"]]))
    else:
        mapping = q.get_default_qat_qconfig_mapping("x86")
        model = prepare_qat_fx(model, mapping, (torch.randn(2, 3, 16, 16),))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        loss = model(torch.randn(16, 3, 16, 16) + 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("route", ["eager", "fx"])
def test_fold_and_export_of_a_qat_model_fold_each_fused_bn_as_its_inference_pass_does(
    tmp_path, route
):
    """A fused QAT module folds its BN in its own forward (the weight scaled by gamma /
    std before fake quantization): the copy is the unfused QAT Conv with the folded
    weight, the same fake-quantizers and observers (so `convert` still takes it and
    gives the same int8 model), and the exports hold the fixed quantization (ONNX as
    QuantizeLinear/DequantizeLinear). The user's model, observers included, is left as
    it was."""
    import onnx
    import onnxruntime
    import torch.ao.quantization as q
    from torch.ao.quantization.quantize_fx import convert_fx

    model = _qat(route)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = bnkit.fold(model, input_shape=(3, 16, 16))
    assert sorted(result.folded) == ["conv.bn", "conv2.bn"] and not result.kept
    assert not [m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.as_tensor(np.random.default_rng(2).normal(1.0, 1.0, (5, 3, 16, 16))).float()
    model.apply(q.disable_observer)  # the reference passes must not move the ranges
    result.model.apply(q.disable_observer)
    with torch.no_grad():
        want = model(x)
        assert (want - copy.deepcopy(model).train()(x)).abs().max() > 1e-3  # batch stats
        np.testing.assert_allclose(result.model(x), want, atol=1e-5)
        convert = q.convert if route == "eager" else convert_fx
        int8 = convert(copy.deepcopy(model))(x)
        np.testing.assert_allclose(convert(copy.deepcopy(result.model))(x), int8, atol=1e-5)
    model.apply(q.enable_observer)
    for fmt in ("pt2", "onnx"):
        report = bnkit.export(model, tmp_path / f"m.{fmt}", input_shape=(3, 16, 16))
        assert report.folded == 2 and report.max_diff_original < 1e-4
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    np.testing.assert_allclose(program(x).detach(), want, atol=1e-5)
    as_written = onnxruntime.SessionOptions()  # no integer kernels: the file's arithmetic
    as_written.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), as_written)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class BatchDependent(nn.Module):
    """Subtracts the batch mean: one sample alone is not the same as in a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y - y.mean(dim=0, keepdim=True)


def test_a_failed_check_writes_nothing(tmp_path):
    with pytest.raises(bnkit.ExportError, match="one sample vs batch"):
        bnkit.export(BatchDependent(), tmp_path / "m.pt2", input_shape=(3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_kept_bn_say_why_and_bn1d_heads_fold():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2)
    )
    randomise_bn(model)
    result = bnkit.fold(model, input_shape=(4,))
    assert result.folded == ("1",)
    assert result.kept == (("3", "it follows 2, which is not a Conv1d/2d/3d or Linear of its "
                                 "channel count"),)  # fmt: skip
    kept = result.model[3]
    assert isinstance(kept, torch.fx.GraphModule) and "False" in kept.code  # training=False
    assert not type(kept).__module__.startswith("bnkit")


def test_pinned_modes_are_unpinned_in_the_copy():
    model = net()
    randomise_bn(model)
    bnkit.freeze(model, bn="affine")
    result = bnkit.fold(model, input_shape=(3, 6, 6))
    assert len(result.folded) == 2
    assert type(model.stem[1]).__name__ == "PinnedBatchNorm2d"  # the input keeps its pin
