"""The command line on PyTorch models: a model spec (library:name, module:factory,
file.py:factory) with --args and --weights; outputs as state_dict, plan JSON, .pt2 and
.onnx; one line and exit 2 for every bad input, inputs untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import _one_line, digest, run
from torch_nets import net

import bnkit

FACTORY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def build(classes=3):
    torch.manual_seed(0)
    return Net(classes)


def broken():
    raise RuntimeError("out of coffee")


def truncated():
    return torch.export.load(__file__.replace("models.py", "truncated.pt2")).module()


def offline():
    import urllib.error

    raise urllib.error.URLError("[Errno -2] Name or service not known")
"""


@pytest.fixture
def spec(tmp_path) -> str:
    (tmp_path / "models.py").write_text(FACTORY)
    return f"{tmp_path / 'models.py'}:build"


@pytest.fixture
def images(tmp_path) -> Path:
    path = tmp_path / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(2.0, 3.0, size=(12, 3, 6, 6)).astype("float32"),
             y=rng.integers(0, 3, size=12))  # fmt: skip
    return path


def test_freeze_writes_a_state_dict_and_a_plan_the_library_applies_again(capsys, spec, tmp_path):
    out = tmp_path / "frozen.pt"
    code, text, err = run(capsys, "freeze", spec, "-o", str(out), "--train-from", "block",
                          "--bn", "affine")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "frozen.plan.json").exists() and "wrote" in text
    model = net()  # the user's own model, the same architecture
    model.load_state_dict(torch.load(out, weights_only=True))
    plan = bnkit.Plan.from_json((tmp_path / "frozen.plan.json").read_text())
    bnkit.freeze(model, plan)
    modes = {r.path: r.bn_mode for r in bnkit.inspect(model).bn_layers}
    assert modes == {"stem.1": "frozen", "block.1": "affine"}
    with pytest.raises(bnkit.BnkitError, match="another model"):
        bnkit.freeze(torch.nn.Sequential(torch.nn.BatchNorm2d(2)), plan)


def test_adapt_shift_check_and_inspect_on_a_spec_with_weights(capsys, spec, images, tmp_path):
    adapted = tmp_path / "adapted.pt"
    code, _, err = run(capsys, "adapt", spec, str(images), "-o", str(adapted), "--json")
    assert code == 0, err
    code, out, err = run(capsys, "shift", spec, str(images), "--weights", str(adapted), "--json")
    assert code == 0, err
    assert json.loads(out)["score"] < 0.01  # the adapted statistics fit these images
    code, out, _ = run(capsys, "shift", spec, str(images), "--json")
    assert json.loads(out)["score"] > 0.1  # the built model's do not
    code, out, _ = run(capsys, "inspect", spec, "--args", '{"classes": 5}', "--json")
    assert code == 0 and json.loads(out)["totals"]["bn_layers"] == 2
    code, out, _ = run(capsys, "check", spec, "--batch-size", "1", "--val", str(images))
    assert code == 0 and "BN004" in out  # a warning: 36 values per channel in a batch of 1


def test_compare_a_spec_writes_results_and_the_model_is_untouched(capsys, spec, images, tmp_path):
    weights = tmp_path / "start.pt"
    torch.save(net(seed=3).state_dict(), weights)
    before = digest(weights)
    out = tmp_path / "results"
    code, text, err = run(capsys, "compare", spec, str(images), "--val", str(images),
                          "--weights", str(weights), "--strategies", "frozen,adapt",
                          "--epochs", "1", "--seeds", "2", "--batch-size", "4",
                          "--optimizer", "sgd", "--train-from", "head", "-o", str(out),
                          "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(text)
    assert {r["strategy"] for r in doc["runs"]} == {"frozen", "adapt"} and len(doc["runs"]) == 4
    assert {r["cached_prefix"] for r in doc["runs"] if r["strategy"] == "frozen"} == {True}
    assert (out / "compare.json").exists() and (out / "compare.png").exists()
    assert digest(weights) == before
    code, _, err = run(capsys, "compare", spec, str(images), "--val", str(images),
                       "--optimizer", "lbfgs")  # fmt: skip
    assert code == 2 and "lbfgs" in err


def test_tta_writes_the_adapted_model_a_report_and_a_plot(capsys, spec, tmp_path):
    stream = tmp_path / "stream.npz"
    rng = np.random.default_rng(0)
    np.savez(stream, x=rng.normal(2.0, 3.0, size=(40, 3, 6, 6)).astype("float32"),
             y=rng.integers(0, 3, size=40))  # fmt: skip
    out, report, plot = tmp_path / "tent.pt", tmp_path / "tta.json", tmp_path / "tta.png"
    before = digest(stream)
    code, text, err = run(capsys, "tta", spec, str(stream), "--method", "tent", "-o", str(out),
                          "--report", str(report), "--plot", str(plot), "--batch-size", "16",
                          "--lr", "0.01")  # fmt: skip
    assert code == 0, err
    assert "tent: 40 samples in 3 batches, accuracy" in text
    assert "1 batch(es) smaller than 16 predicted without adapting" in text
    from bnkit.backends import load_model

    as_built = load_model(Path(spec)).eval()
    with torch.no_grad():
        logits = as_built(torch.as_tensor(np.load(stream)["x"]))
    alone = float((logits.argmax(1).numpy() == np.load(stream)["y"]).mean())
    assert f"without adaptation: accuracy {alone:.1%}" in text
    assert [line for line in text.splitlines() if line.startswith("wrote ")] == [
        f"wrote {out}",
        f"wrote {report}",
        f"wrote {plot}",
    ]
    doc = json.loads(report.read_text())
    assert doc["method"] == "tent" and [b["size"] for b in doc["batches"]] == [16, 16, 8]
    assert [b["adapted"] for b in doc["batches"]] == [True, True, False]
    assert doc["too_small"] == [2] and "bnkit: warning: 1 of 3 batches" in err
    assert plot.read_bytes()[:4] == b"\x89PNG" and digest(stream) == before
    model = net()
    model.load_state_dict(torch.load(out, weights_only=True))
    code, _, err = run(capsys, "tta", spec, str(stream), "--batch-size", "4", "--method",
                       "tent")  # fmt: skip
    assert code == 2 and "at least 16 (got 4)" in err and "--method adapt" in err
    assert len(err.strip().splitlines()) == 1


def test_tta_robust_reports_the_label_shift_it_corrected(capsys, spec, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(112, 3, 6, 6)).astype("float32")
    x[64:] += 6.0  # the stream moves away after four batches
    stream, out, report = tmp_path / "stream.npz", tmp_path / "robust.pt", tmp_path / "r.json"
    np.savez(stream, x=x)
    code, text, err = run(capsys, "tta", spec, str(stream), "--method", "robust", "-o", str(out),
                          "--report", str(report), "--batch-size", "16")  # fmt: skip
    assert code == 0, err
    assert "robust: 112 samples in 7 batches" in text and "label shift from batch 5" in text
    assert json.loads(report.read_text())["corrected"] == [5, 6]
    model, whole = net(), net()
    model.load_state_dict(torch.load(out, weights_only=True))
    bnkit.adapt(whole, x, batch_size=16)  # the written statistics: those of the whole stream
    for a, b in zip(model.modules(), whole.modules(), strict=True):
        if isinstance(a, torch.nn.BatchNorm2d):
            np.testing.assert_allclose(a.running_mean.numpy(), b.running_mean.numpy(), rtol=1e-5)


def test_tent_on_a_stream_of_batches_too_small_is_an_error_and_writes_nothing(
    capsys, spec, images, tmp_path
):
    out = tmp_path / "tent.pt"
    code, _, err = run(capsys, "tta", spec, str(images), "--method", "tent", "-o", str(out),
                       "--batch-size", "16")  # fmt: skip
    assert code == 2 and "TENT adapted on no batch" in err and "12" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_torchvision_spec_without_weights_says_its_weights_are_random(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", "torchvision:resnet18")
    assert code == 0 and "torchvision:resnet18 has random weights" in err
    assert "--weights FILE" in err
    torch.save(__import__("torchvision").models.resnet18().state_dict(), tmp_path / "w.pt")
    code, _, err = run(
        capsys, "inspect", "torchvision:resnet18", "--weights", str(tmp_path / "w.pt")
    )
    assert code == 0 and "random weights" not in err


def test_a_factory_that_loads_a_truncated_file_says_so(capsys, spec, tmp_path):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    program = torch.export.export(module, (torch.randn(2, 3, 8, 8),))
    torch.export.save(program, tmp_path / "full.pt2")
    data = (tmp_path / "full.pt2").read_bytes()
    (tmp_path / "truncated.pt2").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "check", spec.replace(":build", ":truncated"))
    line = _one_line(err)
    assert code == 2 and "could not read a file it loads" in line and "truncated" in line
    assert "check --args" not in line


def test_a_factory_that_cannot_download_names_the_network(capsys, spec):
    code, _, err = run(capsys, "inspect", spec.replace(":build", ":offline"))
    line = _one_line(err)
    assert code == 2 and "tried to download and the network failed" in line
    assert "--weights FILE" in line and "check --args" not in line


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_a_torchvision_model(capsys, tmp_path, fmt):
    out = tmp_path / f"r18.{fmt}"
    code, text, err = run(capsys, "export", "torchvision:resnet18", "-o", str(out),
                          "--input-shape", "3,32,32", "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(text)
    assert (doc["format"], doc["folded"], doc["kept"]) == (fmt, 20, 0) and out.exists()


def test_export_without_an_input_shape_says_what_to_give(capsys, spec, tmp_path):
    code, _, err = run(capsys, "export", spec, "-o", str(tmp_path / "m.pt2"))
    assert code == 2 and "--input-shape" in _one_line(err)


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("no_such_pkg.models:build", [], "cannot import 'no_such_pkg.models'"),
        ("{py}:buld", [], "closest: build"),
        ("{py}:broken", [], "raised RuntimeError (out of coffee)"),
        ("{dir}/missing.py:build", [], "no such file"),
        ("torchvision:resnet81", [], "closest: resnet18"),
        ("{py}:build", ["--args", "{{not json"], "not valid JSON"),
        ("{py}:build", ["--args", '{{"classes": 5}}', "--weights", "{weights}"], "do not fit"),
        ("{py}:build", ["--weights", "{pickled}"], "never unpickles"),
        ("{py}:build", ["--weights", "{corrupt}"], "cannot read this weights file"),
        ("{py}:build", ["--weights", "{dir}/nothing.pt"], "no such file"),
        ("{keras}", ["--weights", "{weights}"], "for PyTorch model specs"),
    ],
    ids=[
        "module",
        "factory",
        "raises",
        "file",
        "library",
        "args",
        "other-arch",
        "pickle",
        "corrupt",
        "no-weights",
        "keras-weights",
    ],
)
def test_bad_model_specs_get_one_line(capsys, tmp_path, spec, model, extra, message):
    weights = tmp_path / "w.pt"
    torch.save(net().state_dict(), weights)
    pickled = tmp_path / "whole.pt"
    torch.save(net(), pickled)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(weights.read_bytes()[:100])
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"PK")  # never read: the spec error comes first
    paths = {"py": spec.rsplit(":", 1)[0], "dir": tmp_path, "weights": weights,
             "pickled": pickled, "corrupt": corrupt, "keras": keras_file}  # fmt: skip
    before = {p: digest(p) for p in (weights, pickled, corrupt)}
    args = [a.format(**paths) for a in [model, *extra]]
    code, _, err = run(capsys, "inspect", *args)
    assert code == 2 and message in _one_line(err), err
    assert {p: digest(p) for p in before} == before


@pytest.mark.parametrize(
    ("blocked", "args", "message"),
    [
        (
            "torchvision",
            ["inspect", "torchvision:resnet18"],
            "torchvision is not installed: pip install torchvision",
        ),
        (
            "tensorflow",
            ["inspect", "{keras}"],
            "Keras' backend is tensorflow (Keras' default with KERAS_BACKEND unset), which is "
            "not installed: pip install tensorflow, or set KERAS_BACKEND",
        ),
    ],
    ids=["torchvision", "tensorflow"],
)
def test_a_missing_optional_package_is_named_in_one_line(tmp_path, blocked, args, message):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    model.save(tmp_path / "m.keras")
    args = [a.format(keras=tmp_path / "m.keras") for a in args]
    code = (
        f"import sys\nsys.modules[{blocked!r}] = None  # as if it were not installed\n"
        f"sys.argv = ['bnkit', *{args!r}]\nfrom bnkit.cli import main\nmain()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path / "keras-home")  # no keras.json: Keras' own default
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert message in lines[0]
