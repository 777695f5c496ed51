"""The PyTorch backend, tested with plain torch modules: inspect sees the PyTorch traps,
freeze pins modes that survive model.train(), unfreeze undoes it, adapt and shift work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch_nets import batch, moved, net, state, train_steps

import bnkit


def test_inspect_sees_the_pytorch_traps():
    model = net()
    report = bnkit.inspect(model)
    assert report.totals()["bn_layers"] == 2 and report.bn_counts() == {"train": 2}
    bn = model.stem[1]
    bn.eval()  # the "frozen" BN of many tutorials
    for p in bn.parameters():
        p.requires_grad_(False)
    rec = next(r for r in bnkit.inspect(model).layers if r.path == "stem.1")
    assert rec.bn_mode == "stats-only"
    assert any("model.train() puts it back" in n.text for n in rec.notes)
    assert any("requires_grad=False does not stop" in n.text for n in rec.notes)
    before = state(bn)
    train_steps(model)  # model.train() undoes bn.eval(): the statistics move
    after = state(bn)
    assert moved(before, after, "running_mean") and not moved(before, after, "weight")


@pytest.mark.parametrize(
    ("mode", "stats_move", "affine_moves"),
    [("frozen", False, False), ("affine", False, True), ("train", True, True)],
)
def test_modes_survive_model_train(mode, stats_move, affine_moves):
    model = net()
    plan = bnkit.freeze(model, bn=mode)
    assert plan.bn_counts() == {mode: 2}
    before = {k: state(m) for k, m in (("bn", model.stem[1]), ("conv", model.stem[0]))}
    with bnkit.watch(model) as w:
        train_steps(model)
    assert w.report is not None and w.report.ok, w.report.problems()
    after = {k: state(m) for k, m in (("bn", model.stem[1]), ("conv", model.stem[0]))}
    assert moved(before["bn"], after["bn"], "running_mean") == stats_move
    assert moved(before["bn"], after["bn"], "weight") == affine_moves
    assert moved(before["conv"], after["conv"], "weight")
    if mode != "train":  # pinned: one image alone gives its row of the batch result
        model.train()
        x, _ = batch(5)
        with torch.no_grad():
            np.testing.assert_allclose(model(x[:1]).numpy(), model(x)[:1].numpy(), atol=1e-5)


def test_train_from_freezes_everything_before_and_unfreeze_restores():
    model = net()
    model.block[0].weight.requires_grad_(False)  # a user's own choice, restored later
    bnkit.freeze(model, train_from="head", bn="frozen")
    assert [p.requires_grad for p in model.head.parameters()] == [True, True]
    assert bnkit.inspect(model).totals()["trainable_layers"] == 1  # ReLU too is "fixed"
    before = state(model)
    train_steps(model)
    after = state(model)
    changed = {k for k in before if moved(before, after, k)}
    assert changed == {"head.weight", "head.bias"}
    assert type(model.stem[1]).__name__ == "PinnedBatchNorm2d"
    assert bnkit.unfreeze(model) == 2
    assert type(model.stem[1]) is nn.BatchNorm2d and not hasattr(model.stem[1], "_bnkit_mode")
    assert model.stem[0].weight.requires_grad and not model.block[0].weight.requires_grad


def test_adapt_matches_numpy_and_shift_measures_the_distance():
    model = net()
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(40, 3, 6, 6)).astype("float32")
    report = bnkit.adapt(model, x, batch_size=16)
    assert (report.batches, report.samples) == (3, 40)
    with torch.no_grad():
        conv_out = model.stem[0](torch.as_tensor(x)).numpy().astype(np.float64)
    np.testing.assert_allclose(
        model.stem[1].running_mean.numpy(), conv_out.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        model.stem[1].running_var.numpy(), conv_out.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-4
    )
    same = bnkit.shift(model, x)
    far = bnkit.shift(model, x * 3 - 5)
    assert same.score < 0.01 < far.score and [r.path for r in far.layers] == ["stem.1", "block.1"]
    assert model.training  # the passes left the model's mode as it was


class _Counted(nn.Module):
    """A head that counts its calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


class _Routed(nn.Module):
    """Calls its second BN on odd calls only (a graph that changes from batch to batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.head, self.step = _Counted(nn.Flatten()), 0

    def forward(self, x):
        x = self.bn1(self.conv(x))
        self.step += 1
        if self.step % 2 == 0:
            x = self.bn2(x)
        return self.head(x)


def test_adapt_stops_each_pass_after_the_last_bn_once_the_graph_is_known():
    """From the second batch on, the moments pass ends once every BN has its moments: the
    head after the last BN runs for the first batch only, and the statistics are still
    exact. A graph that does not call every BN on the first batch runs whole."""
    import copy

    x = np.random.default_rng(0).normal(3.0, 2.0, size=(40, 3, 6, 6)).astype("float32")
    model = net()
    model.head = _Counted(model.head)
    reference = copy.deepcopy(model)
    bnkit.adapt(model, x, batch_size=16)  # 3 batches
    assert model.head.calls == 1
    # each BN's inputs when every BN normalises with its batch's moments (training mode),
    # pooled over the 3 batches: what adapt must give, whether the passes stopped or not
    bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    seen: dict[int, list[np.ndarray]] = {i: [] for i in range(len(bns))}
    for i, bn in enumerate(bns):
        bn.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].double().numpy()))
    reference.train()
    with torch.no_grad():
        for start in range(0, 40, 16):
            reference(torch.as_tensor(x[start : start + 16]))
    adapted = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, bn in enumerate(adapted):
        inputs = np.concatenate(seen[i])
        np.testing.assert_allclose(bn.running_mean.numpy(), inputs.mean((0, 2, 3)), atol=1e-5)
        np.testing.assert_allclose(bn.running_var.numpy(), inputs.var((0, 2, 3)), rtol=1e-5)
    assert bnkit.shift(model, x).score < 0.01  # shift's pass (stored statistics) stops too
    assert model.head.calls == 2

    routed = _Routed()  # first batch: bn2 not called, so no pass may stop early
    report = bnkit.adapt(routed, x, batch_size=16)
    assert routed.head.calls == 3 and report.batches == 3


def test_adapt_runs_image_batches_channels_last_on_the_cpu_with_exact_moments():
    """The moments pass feeds a CPU model its image batches channels-last (faster kernels,
    benchmarks/README.md); the statistics stay exact: on 262,144 values per channel with
    a mean 50 times their spread, within a few float32 steps of the mean and 1e-6 of the
    variance (PyTorch's own channels-last kernel misses by 4e-4 and 3e-5)."""
    model = net()
    layouts: list[bool] = []
    model.stem[0].register_forward_pre_hook(
        lambda m, a: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(40, 3, 6, 6)).astype("float32")
    bnkit.adapt(model, x, batch_size=16)
    assert layouts == [True, True, True]
    assert model.stem[0].weight.is_contiguous()  # the model's own layout as it was

    wide = np.random.default_rng(0).normal(50.0, 1.0, size=(64, 4, 64, 64)).astype("float32")
    bn = nn.Sequential(nn.BatchNorm2d(4)).eval()
    bnkit.adapt(bn, wide, batch_size=64)
    mean, var = wide.astype(np.float64).mean((0, 2, 3)), wide.astype(np.float64).var((0, 2, 3))
    got_mean, got_var = (bn[0].running_mean.double().numpy(), bn[0].running_var.double().numpy())
    assert np.max(np.abs(got_mean - mean) / np.sqrt(var)) < 2e-5
    assert np.max(np.abs(got_var - var) / var) < 1e-6


class _Flattened(nn.Module):
    """A CNN whose head flattens its feature map with `view`, which a channels-last map
    refuses, and normalises the result with a BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.head, self.out = nn.Linear(64, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.out(self.head(x.view(x.shape[0], -1)))


class _Checked(nn.Module):
    """A CNN that asserts its input is contiguous, as some models' own checks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        assert x.is_contiguous(), "contiguous input expected"
        return self.bn(self.conv(x))


def test_a_model_that_refuses_channels_last_is_re_estimated_as_given_and_exact():
    import copy

    torch.manual_seed(0)
    model = _Flattened()
    reference = copy.deepcopy(model)
    layouts: list[bool] = []
    model.conv.register_forward_pre_hook(
        lambda m, a: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(40, 3, 6, 6)).astype("float32")
    report = bnkit.adapt(model, x, batch_size=16)
    bnkit.adapt(model, x, batch_size=16)  # the layout it refused is not tried again
    assert report.batches == 3 and layouts == [True] + [False] * 6
    seen: dict[str, list[np.ndarray]] = {"bn": [], "out": []}
    for name in seen:
        reference.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: seen[name].append(a[0].double().numpy())
        )
    reference.train()
    with torch.no_grad():
        for start in range(0, 40, 16):
            reference(torch.as_tensor(x[start : start + 16]))
    for name, axes in (("bn", (0, 2, 3)), ("out", (0,))):
        inputs, bn = np.concatenate(seen[name]), model.get_submodule(name)
        np.testing.assert_allclose(bn.running_mean.numpy(), inputs.mean(axes), atol=1e-5)
        np.testing.assert_allclose(bn.running_var.numpy(), inputs.var(axes), rtol=1e-5)

    checked = _Checked()  # its own assert refuses the layout: as given, and exact
    bnkit.adapt(checked, x, batch_size=40)
    with torch.no_grad():
        conv_out = checked.conv(torch.as_tensor(x)).double().numpy()
    np.testing.assert_allclose(checked.bn.running_var.numpy(), conv_out.var((0, 2, 3)), rtol=1e-5)


def test_one_sample_is_measured_by_shift_and_refused_by_adapt():
    # one value per channel: shift reads it as its mean (variance 0); adapt, which
    # normalises with the batch, cannot, and says so in one line
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    x = np.random.default_rng(0).normal(size=(1, 3)).astype("float32")
    model[1].running_mean.copy_(model[0](torch.as_tensor(x)).detach()[0])
    before = model[1].running_var.clone()
    (layer,) = bnkit.shift(model, x).layers
    assert layer.mean_offset < 1e-6 and layer.std_ratio < 0.05  # its mean, no spread
    with pytest.raises(bnkit.BnkitError, match="more than 1 value per channel"):
        bnkit.adapt(model, x)
    assert torch.equal(model[1].running_var, before)


def test_adapt_takes_tensors_and_half_precision_models():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(24, 3, 6, 6)).astype("float32")
    from_numpy, from_tensor = net(), net()
    bnkit.adapt(from_numpy, x, batch_size=8)
    bnkit.adapt(from_tensor, torch.as_tensor(x), batch_size=8)  # what a PyTorch user passes
    assert torch.equal(from_numpy.stem[1].running_var, from_tensor.stem[1].running_var)
    half = net().half()
    bnkit.adapt(half, x, batch_size=8)
    assert half.stem[1].running_var.dtype == torch.float16
    np.testing.assert_allclose(
        half.stem[1].running_var.float().numpy(),
        from_numpy.stem[1].running_var.numpy(),
        rtol=2e-2,
    )


def test_channels_last_images_get_one_line_saying_how_to_transpose():
    x = np.zeros((4, 6, 6, 3), np.float32)
    before = state(net())
    model = net()
    with pytest.raises(bnkit.BnkitError, match=r"channels-first .*transpose\(0, 3, 1, 2\)"):
        bnkit.adapt(model, x)
    assert all(np.array_equal(v, state(model)[k]) for k, v in before.items())


def test_timm_bn_with_activation_is_pinned_and_keeps_its_activation():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert type(bns[0]).__name__ == "BatchNormAct2d" and len(bns) == 49
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    plan = bnkit.freeze(model, bn="frozen")
    assert plan.bn_counts() == {"frozen": 49}  # none skipped for carrying an activation
    before = state(model)
    train_steps_on(model, torch.randn(8, 3, 32, 32))
    after = state(model)
    assert not any(moved(before, after, k) for k in before if "running" in k)
    model.train()  # pinned: training mode normalises as inference does, activation included
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5)
    assert bnkit.unfreeze(model) == 49 and type(bns[0]).__name__ == "BatchNormAct2d"


def test_sync_batchnorm_is_pinned_too():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    bnkit.freeze(model, bn="frozen")
    before = state(model)
    model.train()
    model(torch.randn(4, 3, 6, 6))
    assert not moved(before, state(model), "1.running_mean")


def test_torchvision_frozen_batchnorm_is_reported_frozen_adapted_and_folded():
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = resnet18(weights=None, norm_layer=FrozenBatchNorm2d, num_classes=3)
    report = bnkit.inspect(model)
    assert len(report.bn_layers) == 20 and {r.bn_mode for r in report.bn_layers} == {"frozen"}
    assert all("buffers" in str(r.notes[0]) for r in report.bn_layers)
    with pytest.warns(bnkit.BnkitWarning, match="cannot take mode 'train'"):
        plan = bnkit.freeze(model, bn="train")
    x = torch.randn(8, 3, 32, 32) * 2 + 1
    with bnkit.watch(model, plan) as w:
        train_steps_on(model, x)
    assert w.report.counts()["bn_stats_kept"] == 20  # nothing moved: watch says so
    assert any("bn1" in p for p in w.report.problems())  # against a plan that said train
    bnkit.unfreeze(model)
    result = bnkit.adapt(model, x.numpy())
    assert len(result.layers) == 20
    assert abs(float(model.bn1.running_mean.mean())) > 0  # re-estimated from the data
    folded = bnkit.fold(model, example=x[:2].numpy())
    assert len(folded.folded) == 20
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(folded.model(x).numpy(), model(x).numpy(), rtol=1e-4)


def test_timm_freeze_swaps_in_frozen_bn_act_which_is_reported_and_folded():
    import timm
    from timm.utils.model import freeze

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3)
    freeze(model, [name for name, _ in model.named_children() if name != "classifier"])
    report = bnkit.inspect(model)
    assert {r.class_name for r in report.bn_layers} == {"FrozenBatchNormAct2d"}
    assert len(report.bn_layers) == 49 and {r.bn_mode for r in report.bn_layers} == {"frozen"}
    x = torch.randn(2, 3, 32, 32)
    folded = bnkit.fold(model, example=x.numpy())
    assert len(folded.folded) == 49 and folded.max_diff_original < 1e-4  # activation kept


def train_steps_on(model: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_library_misuse_gets_bnkit_errors_not_internal_ones(tmp_path):
    with pytest.raises(bnkit.BnkitError, match=r"a rule is a bnkit\.Rule or a .SELECTOR=MODE."):
        bnkit.freeze(net(), policy=[1, 2, 3])
    with pytest.raises(bnkit.BnkitError, match="train_from must be a string, got 123"):
        bnkit.freeze(net(), train_from=123)
    with pytest.raises(bnkit.BnkitError, match="path must be a file name, got 123"):
        bnkit.export(net(), 123, input_shape=(3, 6, 6))
    with pytest.raises(
        bnkit.BnkitError, match=r"torch\.float16: bnkit folds and verifies in float32"
    ):
        bnkit.export(net().half(), tmp_path / "m.pt2", input_shape=(3, 6, 6))
    assert not (tmp_path / "m.pt2").exists()
    meta = net().to("meta")
    x = np.random.default_rng(0).normal(size=(8, 3, 6, 6)).astype("float32")
    for call in (lambda: bnkit.adapt(meta, x), lambda: bnkit.check(meta, input_shape=(3, 6, 6))):
        with pytest.raises(bnkit.BackendError, match="on the meta device"):
            call()
    assert len(bnkit.inspect(meta).bn_layers) == 2  # the structure is there to inspect


def test_a_bfloat16_module_is_re_estimated_in_float32_and_kept_in_bfloat16():
    model = net().to(torch.bfloat16)
    x = np.random.default_rng(0).normal(1.0, 2.0, size=(16, 3, 6, 6)).astype("float32")
    bnkit.adapt(model, x)
    bn = model.stem[1]
    assert bn.running_mean.dtype == torch.bfloat16
    with torch.no_grad():
        h = model.stem[0](torch.as_tensor(x).to(torch.bfloat16)).float()
    want = h.mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean.float(), want, rtol=2e-2, atol=2e-2)


def test_the_bn_paths_adapt_reads_are_the_bn_selectors_on_real_architectures():
    """`adapt` and `tta` find BN without building the records (issue 31's time): the
    paths must be exactly what the `bn` selector picks from them, on every kind of BN."""
    import timm
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    from bnkit.backends import get_backend
    from bnkit.policy import AllBN
    from bnkit.records import leaf_records

    torch.manual_seed(0)
    shared = nn.BatchNorm2d(4)
    graph = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    models = {
        "resnet18": resnet18(weights=None, num_classes=3),
        "frozen BN": resnet18(weights=None, norm_layer=FrozenBatchNorm2d, num_classes=3),
        "timm BatchNormAct2d": timm.create_model("efficientnet_b0", pretrained=False),
        "one BN twice": nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Conv2d(4, 4, 1), shared),
        "exported": torch.export.export(graph, (torch.randn(2, 3, 8, 8),)).module(),
    }
    for name, model in models.items():
        backend = get_backend(model)
        _, infos = leaf_records(backend.records(model))
        expected = [infos[i].path for i in AllBN().match(infos)]
        assert expected, name
        assert backend.bn_paths(model) == expected, name


@pytest.mark.parametrize("train", [False, True])
def test_predict_runs_in_inference_mode_and_leaves_each_modules_flag(train):
    from bnkit.backends.torch.train import predict

    model = net()
    model.train(train)
    if train:
        model.stem[1].eval()  # one BN held in eval inside a model in training
    flags = [m.training for m in model.modules()]
    x = np.random.default_rng(0).normal(size=(1, 3, 6, 6)).astype("float32")
    stats = state(model)
    one = predict(model, x)
    assert [m.training for m in model.modules()] == flags
    assert all(np.array_equal(v, stats[k]) for k, v in state(model).items())  # none moved
    model.eval()
    with torch.no_grad():
        np.testing.assert_array_equal(one, model(torch.from_numpy(x)).numpy())
