"""`fold` and `export` on real torchvision and timm architectures (weights=None,
pretrained=False) with randomised BN statistics, and on plain modules."""

from __future__ import annotations

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
