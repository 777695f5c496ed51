"""BN after pruning a PyTorch module: `adapt` re-estimates it exactly (the first BN
layer's statistics against NumPy on the pruned convolution's outputs) and says how far
each layer moved; `shift` measures it. Unstructured pruning with `torch.nn.utils.prune`
(its masks and hooks stay in place) and structured pruning with torch-pruning (channels
removed, BN shapes changed). After quantization-aware training: exact too, and the
quantization observers left as they were. The Keras side is test_pruning.py."""

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


def _qat_model():
    """A quantization-aware model as the eager-mode QAT recipe makes it: Conv+BN+ReLU
    fused (`fuse_modules_qat`), fake quantization (`prepare_qat`), a few training steps,
    then the BN statistics frozen (`freeze_bn_stats`)."""
    import torch
    import torch.ao.quantization as q
    from torch import nn
    from torch.ao.nn.intrinsic import qat

    torch.manual_seed(0)
    m = nn.Sequential(q.QuantStub(), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
                      q.DeQuantStub()).train()  # fmt: skip
    m = q.fuse_modules_qat(m, [["1", "2", "3"]])
    m.qconfig = q.get_default_qat_qconfig("x86")
    q.prepare_qat(m, inplace=True)
    for _ in range(3):
        m(torch.randn(16, 3, 8, 8))
    m.apply(qat.freeze_bn_stats)
    return m.eval()


def _quantization_state(model) -> dict:
    """Every fake-quantize and observer buffer: scales, zero points, ranges, flags."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if "fake_quant" in k or "activation_post_process" in k}  # fmt: skip


def test_adapt_after_qat_is_exact_and_leaves_the_quantization_ranges():
    """Re-estimation after QAT: the statistics are the moments of what the fused BN
    receives (the convolution with fake-quantized weights), and the observers, which run
    in inference mode too, record nothing, so the quantization scales stay those QAT
    learned; `convert` then builds the int8 model on the new statistics."""
    import copy

    import torch
    import torch.ao.quantization as q

    model = _qat_model()
    x = np.random.default_rng(0).normal(1.0, 2.0, (40, 3, 8, 8)).astype("float32")
    seen = []
    model.apply(q.disable_observer)  # the reference pass itself must not move them
    hook = model[1].bn.register_forward_pre_hook(lambda _, i: seen.append(i[0].double().numpy()))
    with torch.no_grad():
        model(torch.as_tensor(x))
    hook.remove()
    model.apply(q.enable_observer)
    ranges, before = _quantization_state(model), copy.deepcopy(model)
    layouts: list[bool] = []  # as given: float rounding that differs with the layout
    hook = model[1].register_forward_pre_hook(  # would move values across grid steps
        lambda _, i: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last))
    )
    report = bnkit.adapt(model, x, batch_size=16)
    hook.remove()
    assert layouts == [False] * 3
    mean, var = _moments(seen[0], 1)
    np.testing.assert_allclose(model[1].bn.running_mean.numpy(), mean, atol=EPS_TOL)
    np.testing.assert_allclose(model[1].bn.running_var.numpy(), var, rtol=EPS_TOL)
    assert [layer.path for layer in report.layers] == ["1.bn"]
    after = _quantization_state(model)
    assert all(torch.equal(after[k], v) for k, v in ranges.items()), "observers moved"
    assert int(model[1].weight_fake_quant.observer_enabled) == 1  # given back enabled
    for m in (model, before):
        m.apply(q.disable_observer)
    t = torch.as_tensor(x)
    with torch.no_grad():
        moved = (model(t) - before(t)).abs().max()
        int8 = q.convert(copy.deepcopy(model))(t)
    assert moved > 0.05 and (int8 - model(t)).abs().max() < moved / 2


def test_shift_and_predict_leave_ptq_observers_alone():
    """Post-training quantization's observers (`prepare`) record every forward; bnkit's
    passes (here `shift`, and the inference of `tta`'s `none`) must not calibrate them
    on their data."""
    import torch
    import torch.ao.quantization as q
    from torch_nets import net

    model = net().eval()
    model.qconfig = q.get_default_qconfig("x86")
    q.prepare(model, inplace=True)
    x = np.random.default_rng(0).normal(0.5, 2.0, (40, 3, 6, 6)).astype("float32")
    with torch.no_grad():
        model(torch.as_tensor(x))  # calibration
    ranges = _quantization_state(model)
    assert ranges and all(torch.isfinite(v.float()).all() for v in ranges.values())
    assert bnkit.shift(model, x * 3 - 5).score > 0.01
    bnkit.tta(model, x * 3 - 5, "none", batch_size=16)
    after = _quantization_state(model)
    assert all(torch.equal(after[k], v) for k, v in ranges.items()), "observers moved"
    with torch.no_grad():
        model(torch.as_tensor(x * 3 - 5))  # and they still work once bnkit is done
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in ranges.items())


def test_a_model_bnkit_folded_quantizes_to_int8_as_ptqs_own_fusion_does():
    """`bnkit.fold` before post-training quantization (torch.ao FX, x86): the folded
    model has no BN left and quantizes as well as PTQ fusing the same BN itself. (Not
    identically: the Identity left where a BN was keeps FX from fusing the Conv with the
    ReLU after it, so the convolution's output is quantized before the ReLU.)"""
    import warnings

    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    from torch_nets import net, train_steps

    model = net()
    train_steps(model, steps=5)  # statistics and weights away from their initial values
    model.eval()
    x = torch.as_tensor(
        np.random.default_rng(0).normal(1.0, 2.0, (64, 3, 6, 6)), dtype=torch.float32
    )

    def int8(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), (x[:1],))
            with torch.no_grad():
                prepared(x)
            return convert_fx(prepared)

    folded = bnkit.fold(model, x.numpy())
    assert len(folded.folded) == 2 and not folded.kept
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    with torch.no_grad():
        ref, own, ours = model(x), int8(model)(x), int8(folded.model)(x)
    scale = float(ref.abs().max())
    for int8_out in (own, ours):  # int8 error through the layers, on 4 channels
        assert float((int8_out - ref).abs().max()) < 0.12 * scale
        assert float((int8_out.argmax(1) == ref.argmax(1)).float().mean()) > 0.9
