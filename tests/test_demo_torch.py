"""The demo told in PyTorch: what each PyTorch, Lightning, timm and torchvision way of
freezing BN does to a real torchvision ResNet-50, and the digits story with a PyTorch
residual CNN pretrained once and cached."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bnkit.demo import seed_demo
from bnkit.pretrain import pretrained_digits


@pytest.mark.slow
def test_torch_traps_show_what_each_approach_does():
    result = seed_demo(steps=1, framework="torch")
    rows = {r.approach: r for r in result.rows}
    assert len(rows) == 11 and all(r.bn_layers == 53 for r in result.rows)
    grad_off = rows["requires_grad=False on every BN"]
    assert (grad_off.stats_kept, grad_off.affine_kept, grad_off.batch_stats) == (0, 53, 53)
    assert rows["bn.eval() on every BN, then model.train()"].stats_kept == 0
    assert rows["requires_grad=False on the backbone"].stats_kept == 0
    lightning = rows["Lightning BaseFinetuning.freeze(backbone, train_bn=False)"]
    assert (lightning.stats_kept, lightning.batch_stats) == (53, 53)  # kept, yet batch stats
    lora = rows["peft.get_peft_model(model, LoraConfig(...))"]  # the adapter will not hold them
    assert (lora.targeted, lora.stats_kept, lora.affine_kept, lora.batch_stats) == (0, 0, 53, 53)
    for swap in ("timm.utils.freeze(backbone)", "torchvision FrozenBatchNorm2d in place of BN"):
        assert (rows[swap].stats_kept, rows[swap].batch_stats) == (53, 0)
    expected = {"frozen": (53, 53, 0), "affine": (53, 0, 0), "train": (0, 0, 53),
                "adapt": (53, 53, 0)}  # fmt: skip
    for mode, want in expected.items():
        row = rows[f"bnkit.freeze(bn='{mode}'), then model.train()"]
        assert (row.stats_kept, row.affine_kept, row.batch_stats) == want and row.problems == 0
    assert json.loads(result.to_json())["model"] == "torchvision ResNet-50"


def test_demo_command_tells_the_torch_story_and_caches_the_model(tmp_path, capsys, bnkit_cache):
    from test_cli import run

    out = tmp_path / "demo"
    code, text, err = run(
        capsys, "demo", "--framework", "torch", "--skip-traps", "-o", str(out),
        "--labels-per-class", "3", "--epochs", "1", "--seeds", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "PyTorch 2. Transfer" in text and "after adapt" in text
    doc = json.loads((out / "demo-torch.json").read_text())
    assert doc["labelled"] == 30 and doc["inspect"]["bn_layers"] == 9
    assert doc["source_accuracy"] > 0.9
    ev = doc["without_labels"]
    assert ev["shift_target"] > 5 * ev["shift_source"]
    assert ev["accuracy_adapted"] > ev["accuracy_target"]
    assert len(doc["compare"]["runs"]) == 8
    assert (out / "compare-torch.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "demo.json").exists()  # the Keras story was not asked for
    net = pretrained_digits(framework="torch")  # pretrained by the demo, cached
    assert net.cached and net.path.parent == bnkit_cache and net.path.suffix == ".pt"
    again = pretrained_digits(framework="torch")
    x = torch.randn(4, 3, 32, 32)
    net.model.eval()
    again.model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(again.model(x).numpy(), net.model(x).numpy(), atol=1e-6)
