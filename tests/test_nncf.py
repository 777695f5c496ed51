"""bnkit in NNCF's own flow (`nncf.quantize`, on CPU): `check` reads an NNCF-quantized
model (its quantizers hooked into the module), `adapt` re-estimates its BN statistics
exactly on the inputs the quantized model gives them, with NNCF's quantizer parameters
unchanged, and a model `bnkit.fold` folded quantizes with `nncf.quantize` as well as
the original (NNCF folds BN into the convolutions' quantized weights itself); after
`nncf.prune` (binary masks hooked onto the weights) `adapt` re-estimates the statistics
the masked model's activations have, exactly, with the masks unchanged."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import bnkit

# NNCF compiles its CPU quantization kernels on first use and gives up after 60 s, which a
# loaded 2-core machine exceeds (the fresh-clone run of 2026-12-06): allow 10 minutes.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
nncf = pytest.importorskip("nncf")


class Net(nn.Module):
    """Two Conv+BN+ReLU and a head. NNCF hooks its quantizers in as a child module, so
    the model's forward cannot be a bare nn.Sequential over its children."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def data(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.5, 1.0, (n, 3, 16, 16)) + shift).astype("float32")


def pretrained() -> Net:
    """Statistics of its data, gamma/beta per channel: as a trained model has them."""
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    bnkit.adapt(model, data(64, 0))
    return model.eval()


def quantized(model: nn.Module) -> nn.Module:
    calibration = torch.as_tensor(data(32, 1))
    dataset = nncf.Dataset(list(calibration.split(8)))
    return nncf.quantize(copy.deepcopy(model), dataset, subset_size=32)


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "nncf" in k}


@pytest.mark.slow  # the first NNCF quantization builds its CPU kernels
def test_check_reads_an_nncf_quantized_model():
    q = quantized(pretrained())
    assert quantizer_state(q)  # NNCF's quantizers are in the module
    report = bnkit.check(q, batch_size=32, input_shape=(3, 16, 16))
    assert not report.errors
    assert "BN009" not in {f.code for f in report.findings}
    assert len(bnkit.inspect(q).bn_layers) == 2


def assert_adapt_is_exact(model: nn.Module, x: np.ndarray) -> None:
    """`bnkit.adapt` on `model` gives each BN layer the mean and population variance of
    the inputs it gets in the model (NNCF's hooks included), computed here in NumPy."""
    reference = copy.deepcopy(model).eval()
    seen: dict[str, list[np.ndarray]] = {}
    for name, bn in reference.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.train()
            bn.track_running_stats = False  # batch statistics, as adapt normalises

            def keep(module, args, name=name):
                seen.setdefault(name, []).append(args[0].detach().double().numpy())

            bn.register_forward_pre_hook(keep)
    with torch.no_grad():
        for i in range(0, len(x), 16):
            reference(torch.as_tensor(x[i : i + 16]))
    layouts: list[bool] = []  # as given: the quantizers round to a grid (see _pass)
    hook = model.register_forward_pre_hook(
        lambda _, a: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    bnkit.adapt(model, x, batch_size=16)
    hook.remove()
    assert len(seen) == 2 and layouts and not any(layouts)
    for name, parts in seen.items():
        values = np.concatenate(parts)
        bn = model.get_submodule(name)
        np.testing.assert_allclose(bn.running_mean.numpy(), values.mean((0, 2, 3)), 1e-5, 1e-6)
        np.testing.assert_allclose(bn.running_var.numpy(), values.var((0, 2, 3)), 1e-5, 1e-7)


def test_adapt_on_an_nncf_quantized_model_is_exact_and_leaves_its_quantizers():
    q = quantized(pretrained())
    before = quantizer_state(q)
    assert_adapt_is_exact(q, data(40, 2, shift=1.0))
    after = quantizer_state(q)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_adapt_after_nncf_prune_is_exact_and_leaves_its_masks():
    model = pretrained()
    x = data(40, 2)
    pruned = nncf.prune(copy.deepcopy(model), nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_LOCAL,
                        ratio=0.5, examples_inputs=torch.as_tensor(x[:8]))  # fmt: skip
    masks = quantizer_state(pruned)
    assert any(k.endswith("binary_mask") for k in masks)
    assert 0.4 < float(np.mean([(m == 0).float().mean() for m in masks.values()])) < 0.6
    assert not bnkit.check(pruned, batch_size=16, input_shape=(3, 16, 16)).errors
    stale = {n: b.running_var.clone() for n, b in pruned.named_modules()
             if isinstance(b, nn.BatchNorm2d)}  # fmt: skip
    assert_adapt_is_exact(pruned, x)
    moved = [float((b.running_var - stale[n]).abs().max() / stale[n].abs().max())
             for n, b in pruned.named_modules() if isinstance(b, nn.BatchNorm2d)]  # fmt: skip
    assert max(moved) > 0.05  # pruning half the weights moved the statistics
    after = quantizer_state(pruned)
    assert masks.keys() == after.keys() and all(torch.equal(masks[k], after[k]) for k in masks)


def test_fold_before_nncf_quantize():
    model = pretrained()
    x = torch.as_tensor(data(32, 3))
    folded = bnkit.fold(model, x.numpy()).model
    with torch.no_grad():
        reference = model(x)
        plain = quantized(model)(x)
        after_fold = quantized(folded)(x)
    scale = float(reference.abs().max())
    assert float((after_fold - reference).abs().max()) / scale < 0.05
    assert float((after_fold - plain).abs().max()) / scale < 0.05
