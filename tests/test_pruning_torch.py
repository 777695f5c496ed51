"""BN after pruning a PyTorch module: `adapt` re-estimates it exactly (the first BN
layer's statistics against NumPy on the pruned convolution's outputs) and says how far
each layer moved; `shift` measures it. Unstructured pruning with `torch.nn.utils.prune`
(its masks and hooks stay in place) and structured pruning with torch-pruning (channels
removed, BN shapes changed). The Keras side is test_pruning.py."""

from __future__ import annotations

import numpy as np
import pytest

import bnkit

EPS_TOL = 1e-4  # float32 forward passes against a float64 NumPy reference


def _moments(outputs: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(i for i in range(outputs.ndim) if i != channel % outputs.ndim)
    return outputs.mean(axis=axes), outputs.var(axis=axes)


def test_adapt_after_unstructured_pruning_is_exact_and_keeps_the_masks():
    import torch
    from torch.nn.utils import prune
    from torch_nets import net

    model = net()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        prune.l1_unstructured(conv, "weight", amount=0.5)
    x = np.random.default_rng(0).normal(0.5, 2.0, (40, 3, 6, 6)).astype("float32")
    report = bnkit.adapt(model, x, batch_size=16)
    with torch.no_grad():
        first = model.stem[0](torch.as_tensor(x)).double().numpy()  # masked weight
    mean, var = _moments(first, 1)
    np.testing.assert_allclose(model.stem[1].running_mean.numpy(), mean, atol=EPS_TOL)
    np.testing.assert_allclose(model.stem[1].running_var.numpy(), var, rtol=EPS_TOL)
    for conv in convs:  # the pruning is still a reparametrisation, its zeros still zero
        assert hasattr(conv, "weight_orig") and hasattr(conv, "weight_mask")
        assert prune.is_pruned(conv)
        assert float((conv.weight == 0).float().mean()) >= 0.5
    assert [layer.path for layer in report.layers] == ["stem.1", "block.1"]
    assert all(layer.mean_change > 0 for layer in report.layers)


@pytest.mark.slow
def test_adapt_and_shift_after_structured_pruning_of_resnet18():
    import torch
    import torch_pruning as tp
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    widths = [m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    pruner = tp.pruner.MetaPruner(
        model, torch.randn(1, 3, 32, 32), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5, ignored_layers=[model.fc],
    )  # fmt: skip
    pruner.step()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [w // 2 for w in widths]  # channels removed
    x = np.random.default_rng(1).normal(0.0, 1.0, (48, 3, 32, 32)).astype("float32")
    report = bnkit.adapt(model, x, batch_size=16)
    assert len(report.layers) == 20
    with torch.no_grad():
        first = model.conv1(torch.as_tensor(x)).double().numpy()
    mean, var = _moments(first, 1)
    np.testing.assert_allclose(model.bn1.running_mean.numpy(), mean, atol=EPS_TOL)
    np.testing.assert_allclose(model.bn1.running_var.numpy(), var, rtol=EPS_TOL)
    assert all(b.running_mean.shape == (b.num_features,) for b in bns)
    assert bnkit.shift(model, x).score < 0.01 < bnkit.shift(model, x * 3 - 5).score
