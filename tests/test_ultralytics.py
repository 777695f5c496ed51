"""Ultralytics YOLO with a real trainer on CPU, offline (YOLO_OFFLINE=1, a model built
from its yaml with no weights, a detection dataset generated here, plots=False,
amp=False): the freeze recipe its users share moves the frozen blocks' BN statistics and
`check` says so (BN017); `bnkit.ultralytics.freeze` keeps the blocks' weights and
statistics in the trained model, its EMA and the saved checkpoint, trains gamma/beta in
mode affine, and the pinned model still fuses."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import bnkit

os.environ.setdefault("YOLO_OFFLINE", "1")
pytestmark = pytest.mark.slow
YOLO = pytest.importorskip("ultralytics").YOLO
import bnkit.ultralytics  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def pillow_as_it_was():
    """Importing ultralytics replaces PIL.Image.open with a wrapper that, on a file it
    cannot identify, tries to pip-install pi-heif; the other tests of this process get
    Pillow's own function back."""
    from ultralytics.utils import patches

    yield
    import PIL.Image

    PIL.Image.open = patches._image_open


FROZEN = 10
SETTINGS = dict(epochs=2, imgsz=64, batch=4, nbs=4, warmup_epochs=0, workers=0, plots=False,
                amp=False, val=False, device="cpu", verbose=False, exist_ok=True)  # fmt: skip
"""nbs=batch: an optimizer step every batch; no warmup: the learning rate is not 0."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """Eight 64x64 images per split, each with one red or green box, in YOLO's layout."""
    from PIL import Image

    root = tmp_path_factory.mktemp("yolo-data")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(root / "config"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            x0, y0 = rng.integers(4, 30, 2)
            w, h = rng.integers(16, 30, 2)
            img[y0 : y0 + h, x0 : x0 + w] = (200, 40, 40) if i % 2 == 0 else (40, 200, 40)
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            box = f"{(x0 + w / 2) / 64:.4f} {(y0 + h / 2) / 64:.4f} {w / 64:.4f} {h / 64:.4f}"
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % 2} {box}\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n"
                    "  1: green\n")  # fmt: skip
    return str(data)


def bn_values(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {"mean": m.running_mean.detach().clone(), "var": m.running_var.detach().clone(),
               "gamma": m.weight.detach().clone(), "beta": m.bias.detach().clone()}
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    }  # fmt: skip


def frozen(values: dict) -> list[str]:
    return [n for n in values if int(n.split(".")[1]) < FROZEN]


def moved(before: dict, after: dict, keys: tuple[str, ...], cast=None) -> list[str]:
    def same(a, b):
        return torch.equal(cast(a), cast(b)) if cast else torch.equal(a, b)

    return [n for n in frozen(before) if not all(same(before[n][k], after[n][k]) for k in keys)]


def test_the_usual_freeze_recipe_moves_the_frozen_blocks_statistics(dataset, tmp_path):
    yolo = YOLO("yolo11n.yaml")
    start = {}

    def freeze_layer(trainer):  # requires_grad=False in on_train_start, as users share it
        names = [f"model.{x}." for x in range(FROZEN)]
        for k, v in trainer.model.named_parameters():
            v.requires_grad = not any(x in k for x in names)
        start.update(bn_values(trainer.model))

    yolo.add_callback("on_train_start", freeze_layer)
    yolo.train(data=dataset, project=str(tmp_path), name="recipe", **SETTINGS)
    before, after = start, bn_values(yolo.trainer.model)
    assert len(moved(before, after, ("mean",))) == len(frozen(before)) == 33
    assert not moved(before, after, ("gamma", "beta"))  # the weights did stay
    report = bnkit.check(yolo.trainer.model)
    (finding,) = [f for f in report.findings if f.code == "BN017"]
    assert finding.path == "model.0 ... model.9" and "freeze=10" in finding.fix


def test_bnkit_freeze_keeps_weights_and_statistics_in_the_model_its_ema_and_checkpoint(
    dataset, tmp_path
):
    yolo = YOLO("yolo11n.yaml")
    callbacks = bnkit.ultralytics.freeze(yolo, freeze=FROZEN, bn="frozen", on_problem="raise")
    start = {}

    def remember(trainer):  # the trainer builds its own model from the yaml: its start
        start["bn"] = bn_values(trainer.model)
        start["weights"] = {k: v.detach().clone() for k, v in trainer.model.named_parameters()
                            if int(k.split(".")[1]) < FROZEN}  # fmt: skip

    yolo.add_callback("on_train_start", remember)
    yolo.train(data=dataset, project=str(tmp_path), name="bnkit", **SETTINGS)
    before, weights = start["bn"], start["weights"]
    trained, ema = yolo.trainer.model, yolo.trainer.ema.ema
    for model in (trained, ema):
        assert not moved(before, bn_values(model), ("mean", "var", "gamma", "beta"))
        params = dict(model.named_parameters())
        assert all(torch.equal(v, params[k]) for k, v in weights.items())
    assert not all(torch.equal(before[n]["mean"], v["mean"])  # the rest trained
                   for n, v in bn_values(trained).items() if n not in frozen(before))  # fmt: skip
    assert [r.counts()["bn_stats_kept"] for r in callbacks.reports] == [33, 33]
    # the checkpoint Ultralytics saved (its EMA, in half precision), loaded by Ultralytics:
    # its pickled modules cannot be read with torch.load(weights_only=True)
    saved = bn_values(YOLO(str(tmp_path / "bnkit" / "weights" / "last.pt")).model)
    assert not moved(before, saved, ("mean", "var", "gamma", "beta"), cast=torch.Tensor.half)


def test_affine_trains_the_frozen_blocks_gamma_beta_on_fixed_statistics(dataset, tmp_path):
    yolo = YOLO("yolo11n.yaml")
    bnkit.ultralytics.freeze(yolo, freeze=FROZEN, bn="affine", on_problem="raise")
    start = {}
    yolo.add_callback("on_train_start", lambda trainer: start.update(bn_values(trainer.model)))
    yolo.train(data=dataset, project=str(tmp_path), name="affine", **SETTINGS)
    before, after = start, bn_values(yolo.trainer.model)
    assert not moved(before, after, ("mean", "var"))
    assert len(moved(before, after, ("gamma",))) == 33


def test_a_pinned_yolo_model_fuses_and_inspect_check_watch_work():
    torch.manual_seed(0)
    model = YOLO("yolo11n.yaml").model
    plan = bnkit.freeze(model, rules=[bnkit.Rule(bnkit.Regex(r"^model\.[0-9]\."),
                                                 trainable=False, bn="frozen")])  # fmt: skip
    assert plan.bn_counts()["frozen"] == 33
    assert len(bnkit.inspect(model).bn_layers) == 81
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
        fused = model.fuse(verbose=False)
        after = fused(x)[0]
    assert torch.allclose(before, after, atol=1e-3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.model[:10].modules())
    report = bnkit.check(YOLO("yolo11n.yaml").model, batch_size=32, input_shape=(3, 64, 64))
    assert not report.errors


def test_bad_arguments_are_refused():
    yolo = YOLO("yolo11n.yaml")
    for bad in (["a"], 1.5, None, "3", [True], [-1]):
        with pytest.raises(bnkit.BnkitError, match="freeze must be"):
            bnkit.ultralytics.freeze(yolo, freeze=bad)
    assert bnkit.ultralytics.freeze(yolo, freeze=np.int64(3)).blocks == (0, 1, 2)  # as 3
    assert bnkit.ultralytics.freeze(yolo, freeze=[np.int64(0), 2]).blocks == (0, 2)
    with pytest.raises(bnkit.BnkitError, match="give frozen, affine or adapt"):
        bnkit.ultralytics.freeze(yolo, bn="train")
    with pytest.raises(bnkit.BnkitError, match="expected an ultralytics YOLO object"):
        bnkit.ultralytics.freeze(torch.nn.Linear(2, 2))
