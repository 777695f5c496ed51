"""benchmarks/zoo.py (the whole model zoo, recorded in benchmarks/README.md) kept from
rotting: its checks run on one model of each source, an unusual one each (GoogLeNet's
auxiliary heads off the inference path, LeViT's BatchNorm1d, a nested Keras model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ZOO = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(keras.backend.backend() != "torch", reason="once, in the torch pass"),
]


@pytest.mark.parametrize(
    ("source", "model", "bn"),
    [
        ("torchvision", "googlenet", 59),
        ("timm", "levit_128s", 52),
        ("keras", "MobileNetV3Small", 34),
    ],
)
def test_the_zoo_sweep_passes_on_one_model_of_each_source(tmp_path, source, model, bn):
    out = tmp_path / "rows.json"
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.run(
        [sys.executable, str(ZOO), source, "--models", model, "--json", str(out)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["status"] == "ok" and row["bn"] == bn and row["hold"] == "frozen ok, affine ok"
    assert f"| {model} |" in proc.stdout  # the Markdown table benchmarks/README.md shows
