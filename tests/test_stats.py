"""adapt: population BN statistics, checked against NumPy on the layer inputs."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import bn_layers, randomise_bn, weights_of

import bnkit
from bnkit.data import DataError
from bnkit.errors import BnkitError, SelectorError
from bnkit.policy import Glob
from bnkit.stats import (
    ADAPT_THRESHOLD,
    LABELS_THRESHOLD,
    VARIANCE_EPSILON,
    Moments,
    gaussian_kl,
    pool_together,
    recommend,
)

EPS_TOL = 1e-4  # float32 forward passes against a float64 NumPy reference


def _reference(model, x, batch):
    """Per-layer population mean/var of BN inputs, each BN normalising with batch statistics."""
    sums: dict[str, list] = {}
    for i in range(0, len(x), batch):
        h = keras.ops.convert_to_tensor(x[i : i + batch])
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                a = keras.ops.convert_to_numpy(h).astype(np.float64)
                sums.setdefault(layer.name, []).append(a.reshape(-1, a.shape[-1]))
                mu, var = a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))
                g = keras.ops.convert_to_numpy(layer.gamma)
                b = keras.ops.convert_to_numpy(layer.beta)
                h = keras.ops.convert_to_tensor(
                    ((a - mu) / np.sqrt(var + layer.epsilon) * g + b).astype("float32")
                )
            else:
                h = layer(h)
    return {k: (np.concatenate(v).mean(0), np.concatenate(v).var(0)) for k, v in sums.items()}


@pytest.fixture
def conv_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="c1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(5, 3, name="c2"),
            keras.layers.BatchNormalization(name="bn2"),
        ]
    )


def test_adapt_matches_numpy_population_statistics(conv_model):
    rng = np.random.default_rng(0)
    x = (rng.normal(2.0, 3.0, size=(40, 8, 8, 3))).astype("float32")
    ref = _reference(conv_model, x, batch=16)  # uneven last batch: 16, 16, 8
    before = {layer.name: weights_of(layer) for layer in conv_model.layers}
    report = bnkit.adapt(conv_model, x, batch_size=16)
    assert (report.batches, report.samples) == (3, 40)
    for bn in bn_layers(conv_model):
        w = weights_of(bn)
        mean, var = ref[bn.name]
        np.testing.assert_allclose(w["moving_mean"], mean, rtol=EPS_TOL, atol=EPS_TOL)
        np.testing.assert_allclose(w["moving_variance"], var, rtol=EPS_TOL, atol=EPS_TOL)
        assert not np.allclose(w["moving_mean"], before[bn.name]["moving_mean"])
    for layer in conv_model.layers:
        after = weights_of(layer)
        for name, value in before[layer.name].items():
            if name not in ("moving_mean", "moving_variance"):
                assert np.array_equal(value, after[name]), (layer.name, name)
    # the layer's own call is back: inference uses the new running statistics
    out = keras.ops.convert_to_numpy(conv_model(x[:2], training=False))
    assert np.isfinite(out).all() and "call" not in vars(conv_model.layers[1])


def _batches(rng, shape, sizes):
    """Batches of values per channel (`shape`), each with its own offset: (values, mean,
    population variance, count) per batch."""
    out = []
    for n in sizes:
        v = rng.normal(rng.normal(0, 3), rng.uniform(0.5, 2), size=(n, *shape))
        out.append((v, v.mean(0).astype(np.float32), v.var(0).astype(np.float32), n))
    return out


@pytest.mark.parametrize("layout", ["same batches", "one layer pooled before", "uneven"])
def test_layers_pooled_together_match_numpy_over_every_value(layout):
    rng = np.random.default_rng(0)
    shapes = [(3,), (5,), (2, 4), (1,)]
    rounds = [[7, 9, 4], [6, 8]]  # two rounds of batches: the second adds to a pool
    group = [Moments() for _ in shapes]
    values: list[list[np.ndarray]] = [[] for _ in shapes]
    for r, sizes in enumerate(rounds):
        for i, (m, shape) in enumerate(zip(group, shapes, strict=True)):
            own = sizes[:-1] if layout == "uneven" and i == 2 else sizes
            for v, mean, var, n in _batches(rng, shape, own):
                m.add(mean, var, n)
                values[i].append(v)
        if layout == "one layer pooled before" and r == 0:
            group[1]._pool()  # its neighbours have not pooled: each then pools its own
        pool_together(group)
        assert all(not m._pending for m in group)
        for m, vs in zip(group, values, strict=True):
            every = np.concatenate(vs).astype(np.float64)
            result = m.result()
            assert result["mean"].shape == every.shape[1:] and m.n == len(every)
            # the batches' float32 moments against float64 NumPy over every value
            np.testing.assert_allclose(result["mean"], every.mean(0), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(result["var"], every.var(0), rtol=1e-6)


def test_the_adapt_report_gives_each_layers_changes_as_numpy_does(fw):
    model = fw.build()
    x = fw.inputs(40, seed=3) * 2 + 1
    before = fw.bn_values(model)
    report = bnkit.adapt(model, x, batch_size=16)
    after = fw.bn_values(model)
    assert {layer.path for layer in report.layers} == set(after)
    for layer in report.layers:
        old, new = before[layer.path], after[layer.path]
        ratio = new["var"].astype(np.float64) / np.maximum(old["var"], 1e-12)
        change = np.abs(new["mean"].astype(np.float64) - old["mean"]).max()
        assert layer.mean_change == pytest.approx(change, rel=1e-5, abs=1e-6) and change > 0
        assert layer.var_ratio_min == pytest.approx(ratio.min(), rel=1e-6)
        assert layer.var_ratio_max == pytest.approx(ratio.max(), rel=1e-6)
        assert layer.var_ratio_min < layer.var_ratio_max


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the JAX pass's XLA option")
def test_the_jax_pass_compiles_without_its_xla_option_where_xla_lacks_it(conv_model, monkeypatch):
    """The JAX pass asks XLA's CPU compiler to let reductions into its YNNPACK graphs;
    an XLA that does not know the option compiles the pass as `predict` does, with the
    same statistics."""
    import bnkit.backends.keras.core as core

    x = np.random.default_rng(0).normal(2.0, 3.0, size=(40, 8, 8, 3)).astype("float32")
    ref = _reference(conv_model, x, batch=16)
    for options in ({core._OPTION: "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE"},
                    {"xla_cpu_no_such_option": "1"}, core._JAX_CPU_PASS):  # fmt: skip
        monkeypatch.setattr(core, "_JAX_CPU_PASS", options)
        if core._OPTION not in options:
            monkeypatch.setattr(core, "_OPTION", "xla_cpu_no_such_option")
        core._PASSES.pop(conv_model, None)
        bnkit.adapt(conv_model, x, batch_size=16)
        for bn in bn_layers(conv_model):
            w, (mean, var) = weights_of(bn), ref[bn.name]
            np.testing.assert_allclose(w["moving_mean"], mean, rtol=EPS_TOL, atol=EPS_TOL)
            np.testing.assert_allclose(w["moving_variance"], var, rtol=EPS_TOL, atol=EPS_TOL)
        monkeypatch.undo()


def test_adapt_selected_layers_only_and_through_nested_models(transfer, data):
    model, base = transfer
    x, _ = data
    before = {b.name: weights_of(b) for b in bn_layers(base)}
    report = bnkit.adapt(model, x, select=Glob("block2_*"), max_batches=2, batch_size=8)
    assert [r.path for r in report.layers] == ["base/block2_preact_bn", "base/block2_bn"]
    assert report.samples == 16
    after = {b.name: weights_of(b) for b in bn_layers(base)}
    assert np.array_equal(before["stem_bn"]["moving_mean"], after["stem_bn"]["moving_mean"])
    assert not np.array_equal(before["block2_bn"]["moving_mean"], after["block2_bn"]["moving_mean"])


def test_adapt_rejects_bad_data(conv_model):
    with pytest.raises(DataError, match="NaN or inf"):
        bnkit.adapt(conv_model, np.full((4, 8, 8, 3), np.nan, dtype="float32"))
    with pytest.raises(DataError, match="empty"):
        bnkit.adapt(conv_model, np.zeros((0, 8, 8, 3), dtype="float32"))
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(bnkit.BnkitError, match="no BatchNormalization"):
        bnkit.adapt(plain, np.zeros((4, 4), dtype="float32"))


def _inference_inputs(model, x):
    """Each BN layer's inputs with the model in inference mode, float64."""
    seen: dict[str, np.ndarray] = {}
    h = keras.ops.convert_to_tensor(x)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            a = keras.ops.convert_to_numpy(h).astype(np.float64)
            seen[layer.name] = a.reshape(-1, a.shape[-1])
        h = layer(h, training=False)
    return seen


def test_shift_matches_numpy_gaussian_kl_and_changes_nothing(conv_model):
    randomise_bn(conv_model)
    x = np.random.default_rng(1).normal(1.0, 2.0, size=(24, 8, 8, 3)).astype("float32")
    before = {layer.name: weights_of(layer) for layer in conv_model.layers}
    out_before = keras.ops.convert_to_numpy(conv_model(x, training=False))
    report = bnkit.shift(conv_model, x, batch_size=10)
    ref = _inference_inputs(conv_model, x)
    for row, bn in zip(report.layers, bn_layers(conv_model), strict=True):
        a = ref[bn.name]
        w = weights_of(bn)
        kl = gaussian_kl(
            a.mean(0),
            a.var(0) + VARIANCE_EPSILON,
            w["moving_mean"].astype(np.float64),
            w["moving_variance"].astype(np.float64) + VARIANCE_EPSILON,
        )
        assert row.channels == kl.size
        np.testing.assert_allclose(row.kl_mean, kl.mean(), rtol=1e-3)
        np.testing.assert_allclose(row.kl_max, kl.max(), rtol=1e-3)
    assert report.score == pytest.approx(np.mean([r.kl_mean for r in report.layers]))
    for layer in conv_model.layers:
        after = weights_of(layer)
        assert all(np.array_equal(v, after[k]) for k, v in before[layer.name].items())
    out_after = keras.ops.convert_to_numpy(conv_model(x, training=False))
    assert np.array_equal(out_before, out_after)


def test_shift_is_near_zero_on_the_data_the_statistics_came_from(conv_model):
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(64, 8, 8, 3)).astype("float32")
    bnkit.adapt(conv_model, x)
    same = bnkit.shift(conv_model, x)
    moved = bnkit.shift(conv_model, x * 3.0 + 2.0)
    # adapt normalises deeper layers with batch statistics, shift with the stored ones:
    # the two agree once the statistics fit, so the divergence is close to zero
    assert same.score < 0.01 and same.recommendation == "frozen"
    assert moved.score > 50 * same.score and moved.recommendation != "frozen"
    assert moved.layers[0].mean_offset > 1.0 and moved.layers[0].std_ratio > 2.0
    doc = json.loads(moved.to_json())
    assert doc["recommendation"] == moved.recommendation and len(doc["layers"]) == 2


def test_recommendation_follows_the_calibrated_thresholds():
    assert recommend(0.0) == "frozen"
    assert recommend(ADAPT_THRESHOLD) == "adapt"
    assert recommend(LABELS_THRESHOLD) == "labels"
    assert recommend((ADAPT_THRESHOLD + LABELS_THRESHOLD) / 2) == "adapt"
    assert ADAPT_THRESHOLD < LABELS_THRESHOLD


def test_the_adapt_advice_names_robust_for_streams_sorted_by_class(conv_model):
    from dataclasses import replace

    x = np.random.default_rng(2).normal(0.0, 1.0, size=(64, 8, 8, 3)).astype("float32")
    report = replace(bnkit.shift(conv_model, x), recommendation="adapt", score=ADAPT_THRESHOLD)
    assert "bnkit adapt" in report.advice and "tta --method robust" in report.advice
    assert "tta --method robust" in str(report)


def test_shift_and_adapt_read_streams_and_reject_wrong_shapes(conv_model):
    import tensorflow as tf

    x = np.random.default_rng(3).normal(size=(20, 8, 8, 3)).astype("float32")
    from_array = bnkit.shift(conv_model, x, batch_size=5)
    from_tf = bnkit.shift(conv_model, tf.data.Dataset.from_tensor_slices(x).batch(5))
    assert from_tf.samples == 20
    np.testing.assert_allclose(from_tf.score, from_array.score, rtol=1e-5)
    with pytest.raises(DataError, match=r"shape \(8, 8, 1\) but the model takes \(8, 8, 3\)"):
        bnkit.adapt(conv_model, np.zeros((4, 8, 8, 1), "float32"))


# ---------------------------------------------------------------------- both frameworks


def test_adapt_matches_numpy_and_shift_measures_it(fw):
    from conftest import moved_keys

    model = fw.build()
    x = fw.inputs(40, seed=3) * 2 + 1
    before = fw.bn_values(model)
    bnkit.adapt(model, x, batch_size=16)
    after = fw.bn_values(model)
    reference = fw.first_bn_input(model, x)
    channel = 1 if fw.name == "torch" else -1
    axes = tuple(i for i in range(reference.ndim) if i != channel % reference.ndim)
    np.testing.assert_allclose(after[fw.first_bn]["mean"], reference.mean(axis=axes), atol=EPS_TOL)
    np.testing.assert_allclose(after[fw.first_bn]["var"], reference.var(axis=axes), rtol=EPS_TOL)
    assert all(m <= {"mean", "var"} for m in moved_keys(before, after).values())
    same = bnkit.shift(model, x)
    far = bnkit.shift(model, x * 3 - 5)
    assert same.score < 0.01 < far.score
    assert fw.bn_values(model)[fw.first_bn]["mean"].tolist() == after[fw.first_bn]["mean"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size", "aux"),
    [
        ("googlenet", 64, ["aux1.conv.bn", "aux2.conv.bn"]),
        ("inception_v3", 75, ["AuxLogits.conv0.bn", "AuxLogits.conv1.bn"]),
    ],
)
def test_bn_layers_off_the_inference_path_are_kept_and_named(name, size, aux):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, init_weights=True)
    x = np.random.default_rng(0).normal(size=(8, 3, size, size)).astype("float32")
    before = {p: model.get_submodule(p).running_mean.clone() for p in aux}
    report = bnkit.adapt(model, x)
    assert list(report.off_path) == aux and "not on the inference path" in str(report)
    assert all(torch.equal(before[p], model.get_submodule(p).running_mean) for p in aux)
    assert not any(layer.path in aux for layer in report.layers)
    shifted = bnkit.shift(model, x)
    assert list(shifted.off_path) == aux and "were not measured" in str(shifted)
    assert json.loads(shifted.to_json())["off_path"] == aux
    tta = bnkit.tta(model, x, "adapt", batch_size=8)
    assert list(tta.off_path) == aux


def test_a_last_batch_of_one_sample_joins_the_one_before(fw):
    """BatchNorm1d after a Linear cannot take a variance from one sample: adapt, shift and
    tta read 33 samples in batches of 32 as one batch of 33."""
    torch = pytest.importorskip("torch")
    if fw.name == "keras":
        layers = [keras.layers.Dense(8), keras.layers.BatchNormalization(), keras.layers.Dense(3)]
        model = keras.Sequential([keras.Input((4,)), *layers])
    else:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                    torch.nn.Linear(8, 3))  # fmt: skip
    x = np.random.default_rng(0).normal(size=(33, 4)).astype("float32")
    report = bnkit.adapt(model, x, batch_size=32)
    assert (report.batches, report.samples) == (1, 33)
    assert bnkit.shift(model, x, batch_size=32).batches == 1
    assert [b.size for b in bnkit.tta(model, x, "adapt", batch_size=32).batches] == [33]
    # the statistics are those of all 33 samples, as NumPy computes them
    snap = bnkit.backends.get_backend(model).snapshot(model).stats
    (stats,) = snap.values()
    dense = model.layers[0] if fw.name == "keras" else None
    h = (
        np.asarray(keras.ops.convert_to_numpy(dense(x)))
        if dense is not None
        else model[0](torch.as_tensor(x)).detach().numpy()
    )
    np.testing.assert_allclose(stats["mean"], h.mean(0), rtol=1e-4, atol=1e-5)


def test_library_arguments_of_the_wrong_kind_get_bnkit_errors(conv_model):
    x = np.random.default_rng(0).normal(size=(8, *conv_model.input_shape[1:])).astype("float32")
    with pytest.raises(SelectorError, match="matches no layer"):
        bnkit.adapt(conv_model, x, select="nomatch")
    with pytest.raises(SelectorError, match="invalid regular expression"):
        bnkit.shift(conv_model, x, select="re:[")
    with pytest.raises(BnkitError, match="batch_size must be a whole number, got '32'"):
        bnkit.adapt(conv_model, x, batch_size="32")
    with pytest.raises(SelectorError, match="a selector is a bnkit Selector"):
        bnkit.adapt(conv_model, x, select=3)
    report = bnkit.adapt(conv_model, x, select="bn")  # the text form of a selector works
    assert report.samples == 8


def test_all_constant_data_has_no_statistics(conv_model):
    x = np.zeros((8, *conv_model.input_shape[1:]), "float32")
    with pytest.raises(DataError, match=r"every input value in .* is 0"):
        bnkit.adapt(conv_model, x)


def test_unscaled_inputs_are_named_before_any_advice(fw):
    """Images given as 0-255 to a model whose statistics saw 0-1: no shift advice (the
    score is thousands of nats), but the scale, with the option that fixes it."""
    model = fw.build()
    x = np.abs(fw.inputs(64, seed=3)) / 4.0  # in 0..1 (mostly)
    bnkit.adapt(model, x)
    assert bnkit.shift(model, x).recommendation == "frozen"
    report = bnkit.shift(model, np.round(x * 255.0))
    assert report.recommendation == "scale" and report.score > 100
    assert "--scale 1/255" in report.advice and "wider" in report.advice
    assert "check the inputs' scale" in str(report)


def test_the_bn_paths_adapt_reads_are_the_bn_selectors(transfer):
    """Keras: `bn_paths` is what the `bn` selector picks from the records, nested models
    included."""
    from bnkit.backends import get_backend
    from bnkit.policy import AllBN
    from bnkit.records import leaf_records

    model, _ = transfer
    backend = get_backend(model)
    _, infos = leaf_records(backend.records(model))
    expected = [infos[i].path for i in AllBN().match(infos)]
    assert len(expected) > 1 and backend.bn_paths(model) == expected
