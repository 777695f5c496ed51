"""compare on PyTorch modules: identical numbers per seed, one in-memory start, the
divergence guard, new heads, frozen-prefix caching equal to the uncached weights, the
data forms PyTorch users hold, and real torchvision/timm architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_compare import _numbers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch_nets import net, state

import bnkit
from bnkit.backends.torch import train as torch_train
from bnkit.errors import BnkitError


@pytest.fixture
def splits():
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, size=(48, 3, 6, 6)).astype("float32")
    y = (x[:, 0].mean(axis=(1, 2)) > 0.5).astype(int) + (x[:, 1].mean(axis=(1, 2)) > 0.5)
    return (x[:32], y[:32]), (x[32:], y[32:])


def test_same_inputs_and_seeds_give_identical_numbers_and_model_is_untouched(splits):
    model = net()
    before = state(model)
    kwargs = {"epochs": 2, "seeds": 2, "batch_size": 8}
    a = bnkit.compare(model, *splits, ["frozen", "train", "adapt", "affine"], **kwargs)
    b = bnkit.compare(model, *splits, ["frozen", "train", "adapt", "affine"], **kwargs)
    assert _numbers(a) == _numbers(b)
    assert len(a.runs) == 8 and {r.status for r in a.runs} == {"ok"}
    after = state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not any(type(m).__name__.startswith("Pinned") for m in model.modules())
    by = {(r.strategy, r.seed): r for r in a.runs}
    # watch saw each strategy do what it says through model.train()
    assert by["frozen", 0].bn_stats_kept == 2 and by["adapt", 0].bn_stats_kept == 2
    assert by["affine", 0].bn_stats_kept == 2
    assert by["train", 0].bn_stats_kept == 0 and by["train", 0].epochs[0].bn_stats_moved == 2
    assert all(not r.plan_problems for r in a.runs)
    assert by["train", 0].final_val_loss != by["train", 1].final_val_loss


def test_every_run_starts_from_the_same_weights(splits):
    model = net()
    xv, yv = splits[1]
    model.eval()
    with torch.no_grad():
        expected = float(
            nn.functional.cross_entropy(model(torch.as_tensor(xv)), torch.as_tensor(yv))
        )
    nothing = ("nothing", ["all=frozen"])
    result = bnkit.compare(model, *splits, [nothing], epochs=1, seeds=3, batch_size=8)
    np.testing.assert_allclose([r.final_val_loss for r in result.runs], expected, rtol=1e-5)


def test_divergence_stops_the_run_restores_finite_weights_and_the_sweep_goes_on(splits):
    result = bnkit.compare(
        net(), *splits, ["train", "frozen"], epochs=3, seeds=2, batch_size=8, lr=1e12
    )
    assert len(result.runs) == 4
    diverged = [r for r in result.runs if r.status == "diverged"]
    assert diverged
    for r in diverged:
        assert r.diverged_epoch is not None and r.diverged_step is not None
        assert np.isfinite(r.final_val_loss)
    assert "diverged" in result.verdict or result.best not in {r.strategy for r in diverged}


def test_first_nonfinite_module_names_the_culprit():
    model = net()
    with torch.no_grad():
        model.block[0].weight[0, 0, 0, 0] = float("nan")
    x = np.ones((2, 3, 6, 6), "float32")
    assert torch_train.first_nonfinite_module(model, model, x) == "block.0"
    assert not model.block[0]._forward_hooks


def test_a_nan_weight_in_training_is_caught_and_named(splits):
    model = net()
    trainer = bnkit.backends.get_backend(model).trainer()
    trainer.prepare(model, 1e-3, True)
    with torch.no_grad():
        model.block[0].weight[0, 0, 0, 0] = float("nan")
    (x, y), val = splits
    out = trainer.guarded_fit(model, model, x, y, val, epochs=1, batch_size=8, seed=0)
    assert out is not None and out.step == 0 and out.layer == "block.0"


def test_new_head_when_the_classes_do_not_match(splits):
    model = net()  # 3 outputs
    (x, y), (xv, yv) = splits
    y5, yv5 = (y + 2) % 5, (yv + 2) % 5
    result = bnkit.compare(model, (x, y5), (xv, yv5), ["frozen"], epochs=1, seeds=1)
    assert result.head_replaced and "new head with 5 outputs" in " ".join(result.notes)
    assert model.head.out_features == 3  # the input model keeps its head
    new = torch_train.with_head(model, 5, None, x[:2])
    assert isinstance(new.head[1], nn.Linear) and new.head[1].out_features == 5
    mine = nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=1))
    result = bnkit.compare(model, (x, y5), (xv, yv5), ["frozen"], epochs=1, seeds=1, head=mine)
    assert np.isfinite(result.runs[0].final_val_loss)
    assert not torch_train.from_logits(torch_train.with_head(model, 5, mine, x[:2]))


def test_a_feature_map_output_gets_pooling_dropout_and_linear(splits):
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    (x, y), val = splits
    headed = torch_train.with_head(backbone, 3, None, x[:2])
    assert tuple(headed(torch.as_tensor(x[:4])).shape) == (4, 3)
    assert "bnkit_head.3.weight" in headed.state_dict() and "0.weight" in headed.state_dict()
    result = bnkit.compare(backbone, (x, y), val, ["train"], epochs=1, seeds=1)
    assert result.head_replaced and result.runs[0].status == "ok"


def test_frozen_prefix_cache_gives_the_uncached_weights(splits):
    (x, y), val = splits
    finals = []
    for cached in (True, False):
        model = net()
        bnkit.freeze(model, train_from="head", bn="frozen")
        split = torch_train.frozen_prefix(model, "head")
        assert split is not None
        target, xs, vs = model, x, val
        if cached:
            target, xs = split.suffix, torch_train.predict(split.prefix, x)
            vs = (torch_train.predict(split.prefix, val[0]), val[1])
        trainer = torch_train.TorchTrainer()
        trainer.prepare(target, 1e-2, logits=True)
        trainer.guarded_fit(target, model, xs, y, vs, epochs=3, batch_size=8, seed=0)
        finals.append(state(model))
    for key in finals[0]:
        np.testing.assert_allclose(finals[0][key], finals[1][key], rtol=1e-4, atol=1e-5)
    assert not np.allclose(finals[0]["head.weight"], state(net())["head.weight"])


def test_prefix_is_cached_only_when_it_is_frozen_and_deterministic(splits):
    model = net()
    on = bnkit.compare(model, *splits, ["frozen"], epochs=1, seeds=1, train_from="head")
    off = bnkit.compare(model, *splits, ["frozen"], epochs=1, seeds=1, train_from="head",
                        cache_prefix=False)  # fmt: skip
    assert on.runs[0].cached_prefix and not off.runs[0].cached_prefix
    np.testing.assert_allclose(on.runs[0].final_val_loss, off.runs[0].final_val_loss, rtol=1e-4)
    trains_bn = bnkit.compare(model, *splits, [("bn-train", ["from:head=train", "bn=train"])],
                              epochs=1, seeds=1, train_from="head")  # fmt: skip
    assert not trains_bn.runs[0].cached_prefix
    noisy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(64, 3))  # fmt: skip
    bnkit.freeze(noisy, train_from="4", bn="frozen")
    assert torch_train.frozen_prefix(noisy, "4") is None  # dropout is random in training
    bnkit.freeze(noisy, train_from="2", bn="frozen")
    assert torch_train.frozen_prefix(noisy, "2") is not None


def test_prefix_with_functional_dropout_in_training_is_not_cached():
    class Drops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            x = nn.functional.dropout(self.conv(x), 0.3, training=self.training)
            return self.head(x.mean(dim=(2, 3)))

    model = Drops()
    bnkit.freeze(model, train_from="head")
    assert torch_train.frozen_prefix(model, "head") is None


def test_data_as_a_dataset_a_dataloader_and_a_folder_give_the_same_numbers(splits, tmp_path):
    (x, y), val = splits
    kwargs = {"epochs": 1, "seeds": 1, "batch_size": 8}
    arrays = bnkit.compare(net(), (x, y), val, ["train"], **kwargs)
    ds = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    loader = DataLoader(ds, batch_size=5)
    for data in (ds, loader):
        other = bnkit.compare(net(), data, val, ["train"], **kwargs)
        assert _numbers(other) == _numbers(arrays)
    pixels = (np.random.default_rng(1).random((12, 6, 6, 3)) * 255).astype("uint8")
    for k, img in enumerate(pixels):
        folder = tmp_path / f"class{k % 3}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{k}.png")
    from_folder = bnkit.compare(net(), tmp_path, tmp_path, ["frozen"], **kwargs)
    assert from_folder.runs[0].status == "ok"  # (N, H, W, C) files arrive as (N, C, H, W)


def test_sgd_and_a_user_loss_are_used(splits):
    kwargs = {"epochs": 2, "seeds": 1, "batch_size": 8}
    adam = bnkit.compare(net(), *splits, ["train"], **kwargs).runs[0]
    sgd = bnkit.compare(net(), *splits, ["train"], optimizer="sgd", **kwargs).runs[0]
    smooth = nn.CrossEntropyLoss(label_smoothing=0.5)
    mine = bnkit.compare(net(), *splits, ["train"], loss=smooth, **kwargs).runs[0]
    assert len({adam.final_val_loss, sgd.final_val_loss, mine.final_val_loss}) == 3
    with pytest.raises(BnkitError, match="unknown optimizer 'rmsprop'"):
        bnkit.compare(net(), *splits, ["train"], optimizer="rmsprop", **kwargs)


def test_a_batchnorm1d_head_and_a_last_batch_of_one(splits):
    (x, y), val = splits
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(16, 3))  # fmt: skip
    x33, y33 = np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]])  # 4 batches + 1 sample
    result = bnkit.compare(model, (x33, y33), val, ["frozen", "train"], epochs=1, seeds=1,
                           batch_size=8)  # fmt: skip
    by = {r.strategy: r for r in result.runs}
    assert {r.status for r in result.runs} == {"ok"}
    assert by["frozen"].bn_stats_kept == 1 and by["train"].bn_stats_kept == 0


def test_torchvision_resnet18_head_only_is_cached_and_gets_a_new_head():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (24, 3, 32, 32)).astype("float32")
    y = rng.integers(0, 4, 24)
    result = bnkit.compare(model, (x[:16], y[:16]), (x[16:], y[16:]), ["frozen", "adapt"],
                           epochs=2, seeds=1, batch_size=8, train_from="fc")  # fmt: skip
    assert result.head_replaced and all(r.cached_prefix for r in result.runs)
    assert {r.status for r in result.runs} == {"ok"}
    assert all(r.bn_stats_kept == r.bn_layers == 20 for r in result.runs)
    assert model.fc.out_features == 1000


def test_timm_model_with_batchnormact_trains_its_head_under_frozen_bn():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (12, 3, 32, 32)).astype("float32")
    y = rng.integers(0, 3, 12)
    result = bnkit.compare(model, (x[:8], y[:8]), (x[8:], y[8:]), ["frozen", "train"],
                           epochs=1, seeds=1, batch_size=4)  # fmt: skip
    by = {r.strategy: r for r in result.runs}
    assert not result.head_replaced
    assert by["frozen"].bn_stats_kept == by["frozen"].bn_layers > 0
    assert by["train"].bn_stats_kept == 0
