"""The command line as users run it: a fresh process, with TensorFlow, torch and JAX all
installed, `KERAS_BACKEND` set to each backend or unset, on `.keras` files saved on every
backend, compiled or not. In-process tests cannot show these failures: the test runner's
own import order hides them (torch 2.14's triton crashes when first imported after
TensorFlow, and a model compiled on the torch backend names a torch-only optimizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

BACKENDS = ("torch", "tensorflow", "jax")
"""Each loads what each saved; with KERAS_BACKEND unset (Keras picks TensorFlow, as in a
new notebook) every command runs on the torch-compiled model below, and the whole CLI
test file runs once more in new processes."""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        keras.backend.backend() != "torch",
        reason="runs its own processes on every backend: once, in the torch pass",
    ),
]

BUILD = """
import sys, numpy as np, keras
inp = keras.Input((8, 8, 3))
x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
x = keras.layers.BatchNormalization(name="bn")(x)
x = keras.layers.ReLU()(x)
x = keras.layers.GlobalAveragePooling2D()(x)
out = keras.layers.Dense(3, activation="softmax", name="head")(x)
model = keras.Model(inp, out)
model.save(sys.argv[1] + "/plain.keras")
model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
rng = np.random.default_rng(0)
model.fit(rng.normal(size=(16, 8, 8, 3)), rng.integers(0, 3, 16), epochs=1, verbose=0)
model.save(sys.argv[1] + "/compiled.keras")
"""


def bnkit(*args: str, backend: str) -> subprocess.CompletedProcess[str]:
    """`bnkit ARGS` in a new process, with KERAS_BACKEND as a user would have it."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    if backend != "unset":
        env["KERAS_BACKEND"] = backend
    return subprocess.run(
        [sys.executable, "-m", "bnkit.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def crashed(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(backend, 'plain' or 'compiled'): a model saved there by plain Keras}."""
    root = tmp_path_factory.mktemp("saved")
    files = {}
    for backend in BACKENDS:
        folder = root / backend
        folder.mkdir()
        env = {**os.environ, "KERAS_BACKEND": backend}
        proc = subprocess.run(
            [sys.executable, "-c", BUILD, str(folder)], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        for kind in ("plain", "compiled"):
            files[backend, kind] = folder / f"{kind}.keras"
    return files


def _next(loader: str) -> str:
    """Another loader than `loader`, to read what it wrote (unset: Keras picks TensorFlow)."""
    return "unset" if loader in ("torch", "jax") else "torch"


@pytest.mark.parametrize("kind", ["plain", "compiled"])
@pytest.mark.parametrize("loader", BACKENDS)
@pytest.mark.parametrize("saver", BACKENDS)
def test_freeze_then_inspect_work_whatever_backend_saved_or_loads(
    saved, tmp_path, saver, loader, kind
):
    source = saved[saver, kind]
    before = source.read_bytes()
    out = tmp_path / "frozen.keras"
    proc = bnkit("freeze", str(source), "-o", str(out), "--bn", "frozen", "--json", backend=loader)
    assert proc.returncode == 0, crashed(proc)
    assert json.loads(proc.stdout)["layers"], proc.stdout
    assert source.read_bytes() == before
    if (saver, kind) != ("torch", "compiled"):
        return
    # what bnkit wrote reads on another backend, with its pinned mode
    proc = bnkit("inspect", str(out), "--json", backend=_next(loader))
    assert proc.returncode == 0, crashed(proc)
    modes = [r["bn_mode"] for r in json.loads(proc.stdout)["layers"] if r["is_bn"]]
    assert modes == ["frozen"]


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "stream.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(1.0, 2.0, (48, 8, 8, 3)).astype("float32"), y=np.arange(48) % 3)
    return path


COMMANDS = [
    ["inspect", "{model}"],
    ["check", "{model}", "--batch-size", "32"],
    ["export", "{model}", "-o", "{tmp}/deploy.keras"],
    ["adapt", "{model}", "{data}", "-o", "{tmp}/adapted.keras"],
    ["shift", "{model}", "{data}"],
    ["tta", "{model}", "{data}", "--method", "tent", "--batch-size", "16"],
    ["tta", "{model}", "{data}", "--method", "robust", "--batch-size", "16"],
    ["compare", "{model}", "{data}", "--val", "{data}", "--epochs", "1", "--seeds", "1",
     "--strategies", "frozen,train"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_runs_on_a_torch_compiled_model_with_keras_backend_unset(
    saved, stream, tmp_path, command
):
    args = [a.format(model=saved["torch", "compiled"], data=stream, tmp=tmp_path) for a in command]
    proc = bnkit(*args, backend="unset")
    assert proc.returncode == 0, crashed(proc)
    assert "Traceback" not in proc.stderr


def test_triton_is_refused_after_tensorflow_instead_of_crashing():
    code = (
        "import bnkit, tensorflow, sys\n"
        "import torch._dynamo, torch.optim\n"
        "try:\n    import triton\nexcept ImportError as err:\n    print('refused:', err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, crashed(proc)
    assert "refused: triton is not imported after TensorFlow" in proc.stdout
