"""export: BN folded and frozen, dropout dropped, verified on real keras.applications
architectures with randomised statistics, loadable without bnkit; and the speed-free
facts of each format."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import INPUT, build_transfer, randomise_bn

import bnkit
from bnkit.deploy import TOLERANCE, ExportError

NOT_ON_JAX = pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="which BN folds is read off the Keras graph, the same on every backend (checked "
    "on torch and TensorFlow); JAX compiles each operator per input shape, over a minute "
    "for this model, so its pass checks the numbers on MobileNetV2 and ResNet50V2",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "folded", "kept", "dropped"),
    [
        ("MobileNetV2", 52, 0, 0),
        ("ResNet50V2", 32, 17, 0),  # 16 pre-activation BNs and post_bn follow an Add/pooling
        pytest.param("EfficientNetB0", 49, 0, 10, marks=NOT_ON_JAX),
        pytest.param("DenseNet121", 59, 62, 0, marks=NOT_ON_JAX),  # after a Concatenate: kept
    ],
)
def test_export_folds_and_verifies_real_architectures(tmp_path, arch, folded, kept, dropped):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None, input_shape=(32, 32, 3), classes=10)
    randomise_bn(model)
    before = [np.array(w, copy=True) for w in model.get_weights()]
    report = bnkit.export(model, tmp_path / "m.keras")
    assert (report.folded, report.kept, len(report.dropped)) == (folded, kept, dropped)
    for diff in (report.max_diff_original, report.max_diff_single, report.max_diff_training):
        assert diff <= TOLERANCE
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    loaded = keras.models.load_model(tmp_path / "m.keras")
    bn = [x for x in loaded._flatten_layers() if isinstance(x, keras.layers.BatchNormalization)]
    assert len(bn) == kept and not any(x.trainable for x in bn)
    x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype("float32")
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    got = keras.ops.convert_to_numpy(loaded(x, training=True))  # inference even so
    np.testing.assert_allclose(got, ref, atol=TOLERANCE * max(1.0, np.abs(ref).max()))


def test_export_of_a_model_saved_by_freeze_loads_without_bnkit(tmp_path):
    model, _ = build_transfer()
    randomise_bn(model)
    bnkit.freeze(model, train_from="block2_conv", bn="affine")
    model.save(tmp_path / "frozen.keras")
    loaded = keras.models.load_model(tmp_path / "frozen.keras")
    report = bnkit.export(loaded, tmp_path / "deploy.keras")
    assert (report.folded, report.kept) == (3, 1)  # block2_preact_bn follows an Add
    x = np.random.default_rng(0).normal(size=(3, *INPUT)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ref.npy", keras.ops.convert_to_numpy(model(x, training=False)))
    script = (
        "import keras, numpy as np, sys\n"
        "d = sys.argv[1]\n"
        "m = keras.models.load_model(d + '/deploy.keras')\n"
        "out = keras.ops.convert_to_numpy(m(np.load(d + '/x.npy'), training=True))\n"
        "np.testing.assert_allclose(out, np.load(d + '/ref.npy'), atol=1e-4)\n"
        "print('bnkit' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_only_a_layer_that_feeds_nothing_else_is_folded(tmp_path):
    inputs = keras.Input((6,))
    dense = keras.layers.Dense(4, use_bias=True, name="shared_out")(inputs)
    a = keras.layers.BatchNormalization(name="bn_a")(dense)
    b = keras.layers.Dense(4, name="b")(dense)  # dense also feeds another layer
    c = keras.layers.Dense(4, use_bias=False, name="c")(inputs)
    c = keras.layers.BatchNormalization(name="bn_c")(c)
    out = keras.layers.Dropout(0.5, name="drop")(keras.layers.Concatenate()([a, b, c]))
    model = keras.Model(inputs, out)
    randomise_bn(model)
    report = bnkit.export(model, tmp_path / "m.keras")
    assert (report.folded, report.kept, report.dropped) == (1, 1, ("drop",))
    no_fold = bnkit.export(model, tmp_path / "n.keras", fold=False)
    assert (no_fold.folded, no_fold.kept) == (0, 2)


def test_sequential_models_export_too(tmp_path):
    inner = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization()],
        name="inner",
    )
    model = keras.Sequential(
        [inner, keras.layers.RandomFlip(), keras.layers.Flatten(), keras.layers.Dense(3),
         keras.layers.BatchNormalization(), keras.layers.Dropout(0.3)]
    )  # fmt: skip
    randomise_bn(model)
    report = bnkit.export(model, tmp_path / "m.keras")
    assert (report.folded, report.kept, len(report.dropped)) == (2, 0, 2)


class TrainOnly(keras.layers.Layer):
    def call(self, x, training=None):
        return x + 1.0 if training else x


def test_failed_check_raises_with_numbers_and_writes_nothing(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, TrainOnly()(keras.layers.BatchNormalization()(inputs)))
    with pytest.raises(ExportError, match=r"training=True vs inference \d"):
        bnkit.export(model, tmp_path / "m.keras")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="SavedModel: TF backend")
def test_savedmodel_export_is_checked_against_keras(tmp_path):
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    randomise_bn(model)
    report = bnkit.export(model, tmp_path / "saved", format="savedmodel")
    assert (tmp_path / "saved" / "saved_model.pb").exists() and report.folded == 52


@pytest.mark.skipif(
    keras.backend.backend() != "torch" or importlib.util.find_spec("onnxscript") is None,
    reason="ONNX via torch.onnx needs the torch backend with onnx and onnxscript",
)
def test_onnx_export_is_checked_with_onnxruntime(tmp_path):
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    randomise_bn(model)
    report = bnkit.export(model, tmp_path / "m.onnx", format="onnx")
    assert (tmp_path / "m.onnx").stat().st_size > 0 and report.folded == 52


def test_unavailable_format_says_what_to_do(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    if keras.backend.backend() == "tensorflow":
        with pytest.raises(bnkit.BnkitError, match="tf2onnx"):
            bnkit.export(model, tmp_path / "m.onnx", format="onnx")
    else:
        with pytest.raises(bnkit.BnkitError, match="needs the TensorFlow backend"):
            bnkit.export(model, tmp_path / "saved", format="savedmodel")
    with pytest.raises(bnkit.BnkitError, match=r"must end in '\.keras'"):
        bnkit.export(model, tmp_path / "m.h5")


# ---------------------------------------------------------------------- both frameworks


def test_fold_on_both_frameworks(fw):
    model = fw.build()
    fw.train(model, steps=3)  # statistics and gamma/beta away from their initial values
    result = bnkit.fold(model, fw.inputs(8, seed=5))
    assert (len(result.folded), len(result.kept)) == fw.folds
    assert max(result.max_diff_original, result.max_diff_single) < 1e-4
    assert result.max_diff_training < 1e-4  # the copy computes the same in training mode
    assert all(why for _, why in result.kept)


@keras.saving.register_keras_serializable("bnkit_tests")
class ConvBNBlock(keras.layers.Layer):
    """A layer of the user's own code with a BN inside, its sublayers named by Keras (so a
    clone's sublayers get other names), as KerasHub's blocks are."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def test_bn_inside_a_layer_of_the_users_own_code_exports_with_its_statistics(tmp_path):
    inputs = keras.Input(INPUT)
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3)(inputs))
    x = ConvBNBlock(8)(ConvBNBlock(8)(x))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    data = np.random.default_rng(0).normal(1.0, 2.0, (32, *INPUT)).astype("float32")
    bnkit.adapt(model, data)  # statistics of their own in every BN: a copy must carry them
    report = bnkit.check(model)
    assert "BN016" not in {f.code for f in report.findings}  # called, from the block's code
    exported = bnkit.export(model, tmp_path / "m.keras", check_data=data)
    assert (exported.folded, exported.kept) == (1, 2)
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(data)),
        keras.ops.convert_to_numpy(model(data, training=False)),
        rtol=1e-4,
        atol=1e-5,
    )
