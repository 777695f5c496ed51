"""check: every finding comes with a test that shows the bad behaviour really happening."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import INPUT, build_transfer, compile_fit, weights_of

import bnkit


def codes(report, severity=None):
    return {f.code for f in report.findings if severity is None or f.severity == severity}


def test_bn001_training_false_is_overridden_by_fit(data):
    model, base = build_transfer()
    report = bnkit.check(model)
    assert {f.path for f in report.findings if f.code == "BN001"} == {
        "base/stem_bn", "base/block1_bn", "base/block2_preact_bn", "base/block2_bn",
    }  # fmt: skip
    assert report.errors
    before = weights_of(base.get_layer("stem_bn"))["moving_mean"]
    compile_fit(model, *data)
    assert not np.allclose(before, weights_of(base.get_layer("stem_bn"))["moving_mean"])
    model2, _ = build_transfer()
    bnkit.freeze(model2, bn="frozen")
    assert "BN001" not in codes(bnkit.check(model2))


def test_bn002_train_mode_bn_after_frozen_layer_moves_alone():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, name="d"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(2, name="out"),
        ]
    )
    model.get_layer("d").trainable = False
    report = bnkit.check(model)
    assert [(f.code, f.severity, f.path) for f in report.findings] == [("BN002", "info", "bn")]
    kernel = weights_of(model.get_layer("d"))["kernel"]
    mean = weights_of(model.get_layer("bn"))["moving_mean"]
    x = np.random.default_rng(0).normal(3, 1, (32, 6)).astype("float32")
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((32, 2)), batch_size=8, verbose=0)
    assert np.array_equal(kernel, weights_of(model.get_layer("d"))["kernel"])
    assert not np.allclose(mean, weights_of(model.get_layer("bn"))["moving_mean"])


def test_bn003_momentum_keeps_the_predicted_share_of_old_statistics():
    model = keras.Sequential([keras.Input((1,)), keras.layers.BatchNormalization(momentum=0.999)])
    steps = 40
    report = bnkit.check(model, steps=steps)
    finding = next(f for f in report.findings if f.code == "BN003")
    assert f"{0.999**steps:.0%} of the running statistics" in finding.problem
    model.compile(optimizer="sgd", loss="mse")
    x = np.full((steps * 4, 1), 10.0, "float32")
    model.fit(x, x, batch_size=4, epochs=1, shuffle=False, verbose=0)
    moved = float(keras.ops.convert_to_numpy(model.layers[0].moving_mean)[0])
    np.testing.assert_allclose((10.0 - moved) / 10.0, 0.999**steps, rtol=1e-3)
    assert "BN003" not in codes(bnkit.check(model, steps=5000))


def test_bn004_batch_of_one_gives_beta_for_every_input():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization()]
    )
    assert codes(bnkit.check(model, batch_size=1), "error") == {"BN004"}
    assert codes(bnkit.check(model, batch_size=4), "warning") == {"BN004"}
    assert "BN004" not in codes(bnkit.check(model, batch_size=64))
    a = keras.ops.convert_to_numpy(model(np.array([[1.0, 2, 3]], "float32"), training=True))
    b = keras.ops.convert_to_numpy(model(np.array([[-5.0, 0, 9]], "float32"), training=True))
    beta = keras.ops.convert_to_numpy(model.layers[1].beta)
    np.testing.assert_allclose(a[0], beta, atol=1e-6)
    np.testing.assert_allclose(b[0], beta, atol=1e-6)


@pytest.mark.parametrize(
    ("variance", "epsilon", "severity"),
    [(np.nan, 1e-3, "error"), (-1.0, 1e-3, "error"), (1e-9, 1e-9, "warning")],
    ids=["nan", "negative", "tiny"],
)
def test_bn005_bad_moving_variance_breaks_inference(variance, epsilon, severity):
    model = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(epsilon=epsilon)])
    bn = model.layers[0]
    bn.moving_variance.assign(np.array([1.0, variance], "float32"))
    assert codes(bnkit.check(model), severity) == {"BN005"}
    out = keras.ops.convert_to_numpy(model(np.array([[0.5, 0.5]], "float32"), training=False))
    if severity == "error":
        assert np.isnan(out[0, 1]) and np.isfinite(out[0, 0])
    else:
        assert abs(out[0, 1]) > 1e4 * abs(out[0, 0])


def test_bn006_shared_bn_normalises_one_call_site_with_the_others_statistics():
    a, b = keras.Input((3,)), keras.Input((3,))
    bn = keras.layers.BatchNormalization(momentum=0.0, name="shared")
    model = keras.Model([a, b], keras.layers.Concatenate()([bn(a), bn(b)]))
    assert [(f.code, f.path) for f in bnkit.check(model).findings] == [("BN006", "shared")]
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(0, 1, (16, 3)), rng.normal(10, 1, (16, 3))
    model.fit([xa, xb], np.zeros((16, 6)), batch_size=16, verbose=0)
    mean = keras.ops.convert_to_numpy(bn.moving_mean)
    assert np.all(np.abs(mean - xb.mean(0)) < 1e-3)  # the last call site's statistics
    out = keras.ops.convert_to_numpy(model([xa, xb], training=False))
    assert out[:, :3].mean() < -3.0  # site a, normalised with site b's statistics


def test_bn007_bn_picked_by_name_leaves_the_rest_training(data):
    model, base = build_transfer()
    base.trainable = True
    for layer in base.layers:
        if "preact_bn" in layer.name:
            layer.trainable = False
    report = bnkit.check(model)
    partial = [f for f in report.findings if f.code == "BN007"]
    assert partial and "1 of 4 BN layers in 'base'" in partial[0].problem
    sel = bnkit.check(model, select="re:preact_bn$")
    assert any("selects 1 of the model's 4 BN layers" in f.problem for f in sel.findings)
    before = weights_of(base.get_layer("block2_bn"))["moving_mean"]
    compile_fit(model, *data)
    assert not np.allclose(before, weights_of(base.get_layer("block2_bn"))["moving_mean"])


def test_bn008_trainable_changed_after_fit_without_recompile(data):
    model, base = build_transfer()
    base.trainable = False
    compile_fit(model, *data)
    base.trainable = True
    assert codes(bnkit.check(model), "error") >= {"BN008"}
    kernel = weights_of(base.get_layer("stem_conv"))["kernel"]
    try:
        compile_fit(model, *data)
    except ValueError as err:  # torch, JAX: the optimizer does not know the new variables
        assert "Unknown variable" in str(err) or "optimizer was built with" in str(err)
        if keras.backend.backend() == "jax":  # and the failed step left no variable a value
            with pytest.raises(TypeError):
                weights_of(base.get_layer("stem_conv"))
            return
    else:  # TensorFlow: the stale train function trains nothing new
        assert np.array_equal(kernel, weights_of(base.get_layer("stem_conv"))["kernel"])
    bnkit.recompile(model)
    assert "BN008" not in codes(bnkit.check(model))


def test_bn009_no_bn_is_a_note_not_a_crash():
    model = keras.Sequential(
        [keras.Input(INPUT), keras.layers.Conv2D(4, 3), keras.layers.LayerNormalization()]
    )
    report = bnkit.check(model)
    assert [(f.code, f.severity) for f in report.findings] == [("BN009", "info")]
    assert "1 LayerNormalization" in report.findings[0].problem and not report.errors


# ---------------------------------------------------------------------- both frameworks


def test_no_bn_and_non_finite_variance_on_both_frameworks(fw):
    report = bnkit.check(fw.without_bn())
    assert [f.code for f in report.findings] == ["BN009"]
    assert "Norm" in report.findings[0].problem
    model = fw.build()
    fw.set_weights_nonfinite(model)
    errors = {f.code for f in bnkit.check(model).errors}
    assert "BN005" in errors


def test_findings_of_one_cause_are_one_group(fw):
    model = fw.build()
    if fw.name == "torch":  # requires_grad=False on every BN: BN011 on each
        for m in model.modules():
            if isinstance(m, __import__("torch").nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
    report = bnkit.check(model)
    code = "BN001" if fw.name == "keras" else "BN011"
    per_layer = [f for f in report.findings if f.code == code]
    groups = [g for g in report.groups() if g.code == code]
    assert len(per_layer) == (4 if fw.name == "keras" else 2) and len(groups) == 1
    (group,) = groups
    assert list(group.paths) == [f.path for f in per_layer]
    assert group.where == ("base" if fw.name == "keras" else "")
    assert (
        group.layers.startswith(f"{len(per_layer)} layers") and per_layer[-1].path in group.layers
    )
    doc = json.loads(report.to_json())
    assert len(doc["findings"]) == len(report.findings) and len(doc["groups"]) == len(
        report.groups()
    )
    assert str(report.table(verbose=True).row_count) == str(len(report.findings))
    assert report.table().row_count == len(report.groups())


def _train_affine_only(fw, model) -> int:
    """Gives every BN per-channel gamma and beta, as training does, its statistics left at
    their initial values: weights loaded without the BN buffers. Returns the BN count."""
    rng = np.random.default_rng(0)
    if fw.name == "keras":
        layers = [
            lyr
            for lyr in model._flatten_layers()
            if isinstance(lyr, keras.layers.BatchNormalization)
        ]
        for bn in layers:
            bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape).astype("float32"))
            bn.beta.assign(rng.normal(0, 0.1, bn.beta.shape).astype("float32"))
        return len(layers)
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.as_tensor(rng.uniform(0.5, 1.5, bn.num_features)))
            bn.bias.copy_(torch.as_tensor(rng.normal(0, 0.1, bn.num_features)))
            bn.reset_running_stats()
    return len(bns)


def test_bn021_statistics_that_never_saw_data_on_both_frameworks(fw):
    model = fw.build()
    assert "BN021" not in {f.code for f in bnkit.check(model).findings}  # as initialised
    n = _train_affine_only(fw, model)
    found = [f for f in bnkit.check(model).findings if f.code == "BN021"]
    assert len(found) == n and found[0].severity == "warning"
    assert "bnkit.adapt" in found[0].fix
    bnkit.adapt(model, fw.inputs(32))
    assert all(np.any(v["mean"] != 0) for v in fw.bn_values(model).values())
    assert "BN021" not in {f.code for f in bnkit.check(model).findings}
