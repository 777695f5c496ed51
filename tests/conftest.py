"""Shared fixtures: small real Keras models and data. The Keras backend comes from
KERAS_BACKEND (torch when unset); `make test` runs the suite under torch, TensorFlow
and JAX."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one compute thread per worker, or the
    # frameworks' thread pools fight over the cores (the torch tests took 2.8x as long)
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault(
        "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )

# In one process, importing torch._dynamo (which torch.optim and torch.export import)
# after TensorFlow 2.21 crashes torch 2.14's bundled triton with a segmentation fault;
# imported first, both work. The suite mixes PyTorch modules into the TensorFlow run.
import torch._dynamo

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import keras
import numpy as np
import pytest

import bnkit  # noqa: F401  (registers the pinned BN layer)

USER_THREADS = os.environ.get("OMP_NUM_THREADS")
"""OMP_NUM_THREADS as pytest started: importing ultralytics (or Lightning's distributed
utilities) sets it to 1 in the worker's environment, and the processes a test starts after
that would run on one thread (tests/test_examples.py puts it back)."""

INPUT = (8, 8, 3)
CLASSES = 3


def build_transfer(seed: int = 0) -> tuple[keras.Model, keras.Model]:
    """A small residual 'pretrained' base called with training=False under a new head."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(INPUT)
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem_conv")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", name="block1_conv")(x)
    y = keras.layers.BatchNormalization(name="block1_bn")(y)
    x = keras.layers.Add(name="block1_add")([x, y])
    x = keras.layers.BatchNormalization(name="block2_preact_bn")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", name="block2_conv")(x)
    x = keras.layers.BatchNormalization(name="block2_bn")(x)
    x = keras.layers.ReLU(name="block2_relu")(x)
    base = keras.Model(inp, x, name="base")
    outer_in = keras.Input(INPUT)
    h = base(outer_in, training=False)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="head")(h)
    return keras.Model(outer_in, out, name="transfer"), base


@pytest.fixture(scope="session", autouse=True)
def bnkit_cache(tmp_path_factory):
    """bnkit's cache (the pretrained digits models) in one temporary folder per test run,
    shared by the xdist workers: the first to pretrain writes it (atomically), the others
    load it instead of pretraining again. `make test` names one folder for its four passes
    (BNKIT_TEST_CACHE, emptied at its start): the cached files carry the backend in their
    names, so the last pass's new processes load what the TensorFlow pass pretrained."""
    if os.environ.get("BNKIT_TEST_CACHE"):
        folder = Path(os.environ["BNKIT_TEST_CACHE"]).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["BNKIT_CACHE_DIR"] = str(folder)
        return folder
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / f"bnkit-cache-{keras.backend.backend()}"
    folder.mkdir(exist_ok=True)
    os.environ["BNKIT_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture
def transfer() -> tuple[keras.Model, keras.Model]:
    return build_transfer()


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 2.0, size=(32, *INPUT)).astype("float32")
    y = rng.integers(0, CLASSES, size=32)
    return x, y


def compile_fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int = 1) -> None:
    """Compiles (if needed) and fits with settings that move every trainable weight."""
    if not model.compiled:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)


def weights_of(layer: keras.layers.Layer) -> dict[str, np.ndarray]:
    """Copies of a layer's variables by name (np.array on torch tensors may alias)."""
    return {v.name: np.array(keras.ops.convert_to_numpy(v), copy=True) for v in layer.weights}


def bn_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def randomise_bn(model: keras.Model, seed: int = 0) -> None:
    """Non-trivial BN statistics and gamma/beta, so folding and shift measure something."""
    rng = np.random.default_rng(seed)
    for layer in bn_layers(model):
        c = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
        if layer.scale:
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        if layer.center:
            layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))


def changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray], name: str) -> bool:
    return not np.array_equal(before[name], after[name])


# ---------------------------------------------------------------------- both frameworks


class KerasFramework:
    """The small residual transfer model, trained with compile and fit."""

    name = "keras"
    shape = INPUT

    def build(self):
        model, base = build_transfer()
        self.base = base
        return model

    def inputs(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.normal(0.5, 2.0, size=(n, *INPUT)).astype("float32")

    def train(self, model, steps: int = 2) -> None:
        x = self.inputs(8 * steps)
        y = np.random.default_rng(1).integers(0, CLASSES, size=8 * steps)
        compile_fit(model, x, y)

    def reenable(self, model) -> None:
        """The framework's own call that undoes a naive freeze: parent.trainable = True."""
        self.base.trainable = False
        self.base.trainable = True

    def bn_values(self, model) -> dict[str, dict[str, np.ndarray]]:
        names = {"moving_mean": "mean", "moving_variance": "var", "gamma": "gamma",
                 "beta": "beta"}  # fmt: skip
        return {
            f"base/{b.name}": {
                names[v.name]: np.array(keras.ops.convert_to_numpy(v)) for v in b.weights
            }
            for b in bn_layers(model)
        }

    first_bn = "base/stem_bn"
    folds = (3, 1)  # BN folded, kept (the pre-activation BN follows an Add)

    def first_bn_input(self, model, x: np.ndarray) -> np.ndarray:
        conv = keras.Model(self.base.inputs, self.base.get_layer("stem_conv").output)
        return np.asarray(keras.ops.convert_to_numpy(conv(x)), dtype=np.float64)

    def without_bn(self):
        return keras.Sequential([keras.Input(INPUT), keras.layers.Conv2D(2, 3),
                                 keras.layers.LayerNormalization()])  # fmt: skip

    def set_weights_nonfinite(self, model) -> None:
        layer = self.base.get_layer("block1_bn")
        v = keras.ops.convert_to_numpy(layer.moving_variance).copy()
        v[0] = np.nan
        layer.moving_variance.assign(v)


class TorchFramework:
    """The same kind of model as a plain torch module, trained with a plain loop."""

    name = "torch"
    shape = (3, 6, 6)

    def build(self):
        from torch_nets import net

        return net()

    def inputs(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.normal(0.5, 2.0, size=(n, *self.shape)).astype("float32")

    def train(self, model, steps: int = 2) -> None:
        from torch_nets import train_steps

        train_steps(model, steps=steps)

    def reenable(self, model) -> None:
        """The framework's own call that undoes a naive freeze: model.train()."""
        model.train()

    def bn_values(self, model) -> dict[str, dict[str, np.ndarray]]:
        import torch

        out = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                out[name] = {
                    "mean": m.running_mean.numpy().copy(), "var": m.running_var.numpy().copy(),
                    "gamma": m.weight.detach().numpy().copy(),
                    "beta": m.bias.detach().numpy().copy(),
                }  # fmt: skip
        return out

    first_bn = "stem.1"
    folds = (2, 0)

    def first_bn_input(self, model, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return model.stem[0](torch.as_tensor(x)).numpy().astype(np.float64)

    def without_bn(self):
        import torch

        return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.GroupNorm(1, 2))

    def set_weights_nonfinite(self, model) -> None:
        import torch

        with torch.no_grad():
            model.block[1].running_var[0] = float("nan")


@pytest.fixture(params=["keras", "torch"])
def fw(request):
    """Runs a framework-neutral test on a Keras model and on a PyTorch module."""
    return KerasFramework() if request.param == "keras" else TorchFramework()


def moved_keys(before: dict, after: dict) -> dict[str, set[str]]:
    """Per BN layer, which of mean/var/gamma/beta changed."""
    return {p: {k for k in v if not np.array_equal(v[k], after[p][k])} for p, v in before.items()}


PURE_TORCH = ("test_torch_backend.py", "test_check_torch.py", "test_deploy_torch.py",
              "test_cli_torch.py", "test_compare_torch.py", "test_lightning_callbacks.py",
              "test_demo_torch.py", "test_distributed.py", "test_ray.py",
              "test_transformers_callbacks.py", "test_ultralytics.py", "test_pruning_torch.py",
              "lightning_callbacks.py", "transformers_callbacks.py", "test_peft.py",
              "peft.py", "test_pt2e.py", "pt2e.py",
              "test_nncf.py", "test_corruptions.py")  # fmt: skip
"""Test files (and modules whose docstring examples) use no Keras (test_ray runs Keras
only on torch): run once, in the torch-backend pass of `make test`."""
ONE_KERAS_PASS = ("test_cli.py",)
"""Run in-process in the torch pass, and again in new processes on TensorFlow (KERAS_BACKEND
unset) in `make test`'s last pass; JAX's loading and saving are in test_cli_backends.py."""


def pytest_collection_modifyitems(config, items):
    """Under the TensorFlow and JAX backends, leave out what does not touch Keras (the pure
    PyTorch files, the PyTorch half of the two-framework fixture) and the CLI file, which
    runs in the torch pass and in the last, KERAS_BACKEND-unset pass. (Running the slow
    tests first was tried and measured: the TensorFlow pass took 5:27 against 4:54 in
    collection order, its workers idle more at the start.)"""
    if keras.backend.backend() == "torch":
        return
    keep, drop = [], []
    for item in items:
        pure = item.fspath.basename in (*PURE_TORCH, *ONE_KERAS_PASS)
        torch_half = "[torch" in item.name and "fw" in getattr(item, "fixturenames", ())
        (drop if pure or torch_half else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
