"""Test-time adaptation on a Keras model and a PyTorch module: TENT trains only BN
gamma/beta, predicts before each update, refuses small batches with what to do instead,
resets on non-finite values and on collapse, resets every batch when episodic; and the
PyTorch path equals a straight implementation of the published algorithm."""

from __future__ import annotations

import json
import sys
from collections import deque

import numpy as np
import pytest

import bnkit
from bnkit.errors import BnkitError

tta_module = sys.modules["bnkit.tta"]


def test_tent_trains_only_bn_gamma_beta_and_reports_each_batch(fw):
    model = fw.build()
    x = fw.inputs(96)
    before = bnkit.backends.get_backend(model).snapshot(model)
    report = bnkit.tta(model, x, "tent", batch_size=32, guard=False, lr=1e-2)
    after = bnkit.backends.get_backend(model).snapshot(model)
    assert [b.size for b in report.batches] == [32, 32, 32] and report.accuracy is None
    assert all(b.adapted and b.reset is None for b in report.batches)
    bn_paths = {r.path for r in bnkit.inspect(model).bn_layers}
    for path, weights in before.weights.items():
        for name, value in weights.items():
            moved = not np.array_equal(value, after.weights[path][name])
            assert moved == (path in bn_paths), (path, name)
    # the statistics were re-estimated on the stream, so inference mode is usable
    assert any(not np.allclose(before.stats[p]["mean"], after.stats[p]["mean"]) for p in bn_paths)


def test_a_batch_below_the_minimum_is_refused_with_what_to_do(fw):
    with pytest.raises(BnkitError, match=r"at least 16 \(got 8\).*--method adapt"):
        bnkit.tta(fw.build(), fw.inputs(32), "tent", batch_size=8)


def test_the_last_short_batch_is_predicted_not_adapted(fw):
    report = bnkit.tta(fw.build(), fw.inputs(70), "tent", batch_size=32)
    assert [(b.size, b.adapted) for b in report.batches] == [(32, True), (32, True), (6, False)]


def test_runaway_weights_reset_to_the_start(fw):
    model = fw.build()
    report = bnkit.tta(model, fw.inputs(64), "tent", batch_size=32, lr=1e38, optimizer="sgd")
    assert report.resets  # caught as non-finite, or first as a collapse of the predictions
    assert all(("non-finite" in why) or ("collapse" in why) for _, why in report.resets)
    values = fw.bn_values(model)
    assert all(np.isfinite(v).all() for layer in values.values() for v in layer.values())


def test_the_finiteness_guard_finds_one_non_finite_bn_weight(fw):
    from bnkit.backends import get_backend

    model = fw.build()
    adapter = get_backend(model).test_time()
    adapter.prepare(model, 1e-3, "adam")
    assert adapter.finite(model)
    last = list(fw.bn_values(model))[-1]
    if fw.name == "torch":
        import torch

        with torch.no_grad():
            model.get_submodule(last).bias[-1] = float("inf")
    else:
        layer = fw.base.get_layer(last.split("/")[-1])
        import keras

        beta = np.array(keras.ops.convert_to_numpy(layer.beta))
        beta[-1] = np.nan
        layer.beta.assign(beta)
    assert not adapter.finite(model)
    adapter.finish(model)


def test_episodic_starts_every_batch_from_the_start_weights(fw):
    x = fw.inputs(32)
    stream = np.concatenate([x, x, x])
    episodic = bnkit.tta(fw.build(), stream, "tent", batch_size=32, episodic=True, lr=0.5)
    online = bnkit.tta(fw.build(), stream, "tent", batch_size=32, guard=False, lr=0.5)
    e = [b.entropy for b in episodic.batches]
    assert e[0] == pytest.approx(e[1], rel=1e-5) and e[1] == pytest.approx(e[2], rel=1e-5)
    o = [b.entropy for b in online.batches]
    assert o[2] < o[0]  # online, the entropy being minimised goes down


def test_none_changes_nothing_and_adapt_re_estimates(fw):
    model = fw.build()
    x = fw.inputs(64)
    y = np.zeros(64, int)
    before = fw.bn_values(model)
    none = bnkit.tta(model, (x, y), "none", batch_size=32)
    assert none.accuracy is not None and 0 <= none.accuracy <= 1
    same = fw.bn_values(model)
    assert all(np.array_equal(before[p][k], same[p][k]) for p in before for k in before[p])
    bnkit.tta(model, (x, y), "adapt", batch_size=32)
    after = fw.bn_values(model)
    assert not np.allclose(before[fw.first_bn]["mean"], after[fw.first_bn]["mean"])
    with pytest.raises(BnkitError, match="unknown method 'tnet'"):
        bnkit.tta(model, x, "tnet")
    with pytest.raises(BnkitError, match="unknown optimizer 'rmsprop'"):
        bnkit.tta(model, x, "tent", optimizer="rmsprop")


def test_collapse_is_named_against_the_re_estimated_models_predictions():
    uniform = np.arange(64) % 4
    disagree = (uniform + 1) % 4
    why = tta_module._collapse(deque([(disagree, uniform)]), 4)
    assert why is not None and "0% of this batch's predictions agree" in why
    taken = np.zeros(64, int)  # the last batch agrees, the window is taken over by class 0
    why = tta_module._collapse(deque([(taken, uniform)] * 3 + [(uniform, uniform)]), 4)
    assert why is not None and ("class 0 takes" in why or "entropy" in why)
    assert tta_module._collapse(deque([(uniform, uniform)]), 4) is None
    sorted_stream = np.zeros(64, int)  # label shift: the reference agrees, no collapse
    assert tta_module._collapse(deque([(sorted_stream, sorted_stream)]), 4) is None
    taken = np.zeros(64, int)
    why = tta_module._collapse(deque([(taken, uniform)]), 4)
    assert why is not None  # 25% agree, one class takes everything


def test_torch_tent_equals_the_published_algorithm():
    """The TENT repository's configure_model / collect_params / forward_and_adapt,
    written out, against bnkit on the same stream."""
    import torch
    from torch import nn
    from torch_nets import net

    x = np.random.default_rng(0).normal(0.5, 2.0, (96, 3, 6, 6)).astype("float32")
    reference = net()
    reference.train()
    reference.requires_grad_(False)
    params = []
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            params += [m.weight, m.bias]
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    entropies = []
    for i in range(0, 96, 32):
        outputs = reference(torch.as_tensor(x[i : i + 32]))
        loss = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
        entropies.append(float(loss.mean()))
        loss.mean(0).backward()
        opt.step()
        opt.zero_grad()
    model = net()
    report = bnkit.tta(model, x, "tent", batch_size=32, guard=False)
    np.testing.assert_allclose([b.entropy for b in report.batches], entropies, rtol=1e-5)
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        np.testing.assert_allclose(mine.detach().numpy(), theirs.detach().numpy(), atol=1e-6)


def test_torch_tent_tries_two_memory_layouts_keeps_one_and_runs_a_view_as_given():
    """The first steps alternate the batch channels-last and as given, then keep one of
    the two (the faster); the values TENT reaches are the published algorithm's, run as
    given, to float rounding. A model that flattens its feature map with `view` cannot
    take channels-last, and runs as given after its first try."""
    import torch
    from torch import nn
    from torch_nets import net

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn(self.conv(x)))
            return self.fc(h.view(len(h), -1))

    x = np.random.default_rng(1).normal(0.5, 2.0, (192, 3, 6, 6)).astype("float32")
    for make, layouts in ((net, [True, False, True, False]), (Flat, [True, False, False])):
        model, reference = make(), make()
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        seen: list[bool] = []
        conv.register_forward_pre_hook(
            lambda m, a, seen=seen: seen.append(
                a[0].is_contiguous(memory_format=torch.channels_last)
            )
        )
        bnkit.tta(model, x, "tent", batch_size=32, guard=False)
        assert seen[: len(layouts)] == layouts
        assert len(set(seen[4:6])) == 1  # then the statistics pass, as given
        reference.train()
        reference.requires_grad_(False)
        params = [p for m in reference.modules() if isinstance(m, nn.BatchNorm2d)
                  for p in m.parameters()]  # fmt: skip
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
        for i in range(0, 192, 32):
            out = reference(torch.as_tensor(x[i : i + 32]))
            (-(out.softmax(1) * out.log_softmax(1)).sum(1)).mean().backward()
            opt.step()
            opt.zero_grad()
        for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            np.testing.assert_allclose(mine.detach().numpy(), theirs.detach().numpy(), atol=1e-6)


def test_online_re_estimation_equals_adapt_over_the_batches_so_far(fw):
    from bnkit.stats import OnlineAdapt

    grown, whole = fw.build(), fw.build()
    x = fw.inputs(64)
    online = OnlineAdapt(grown)
    online.update(x[:32])
    online.update(x[32:])
    bnkit.adapt(whole, x, batch_size=32)
    a, b = fw.bn_values(grown), fw.bn_values(whole)
    for path in a:
        for key in ("mean", "var"):
            np.testing.assert_allclose(a[path][key], b[path][key], rtol=1e-5, atol=1e-6)


def test_a_sample_of_a_batch_counts_as_the_batch_it_stands_for(fw):
    """`represents`: a batch's sample is weighted as the whole batch; a sample with the
    batch's moments (here the batch is the sample four times over) gives exactly what
    the whole batch gives."""
    from bnkit.stats import OnlineAdapt

    x = fw.inputs(48)
    first, part = x[:32], x[32:48]
    sampled, whole = fw.build(), fw.build()
    online = OnlineAdapt(sampled)
    online.update(first)
    online.update(part, represents=64)
    bnkit.adapt(whole, np.concatenate([first, *[part] * 4]), batch_size=32)
    a, b = fw.bn_values(sampled), fw.bn_values(whole)
    for path in a:
        for key in ("mean", "var"):
            np.testing.assert_allclose(a[path][key], b[path][key], rtol=1e-5, atol=1e-6)
    unweighted = fw.build()
    online = OnlineAdapt(unweighted)
    online.update(first)
    online.update(part)
    moved = fw.bn_values(unweighted)
    assert any(not np.allclose(moved[p]["mean"], a[p]["mean"], atol=1e-6) for p in a)


def test_after_the_window_robust_measures_pooled_samples_at_the_batch_size(fw, monkeypatch):
    """After the window `robust` takes a sample of each batch (an eighth, at least 8
    images) and measures the samples together once they fill a batch of the stream's
    first size (no new batch size to trace), each weighted as the batch it stands for;
    what is left is measured at the end. The guards' reference samples a quarter of a
    checked batch where a new size costs no trace."""
    from bnkit.stats import OnlineAdapt

    sizes: list[tuple[int, int | None]] = []
    update = OnlineAdapt.update

    def sized(self, x, **kwargs):
        sizes.append((len(x), kwargs.get("represents")))
        return update(self, x, **kwargs)

    monkeypatch.setattr(OnlineAdapt, "update", sized)
    x = fw.inputs(64 * 12)
    bnkit.tta(fw.build(), x, "robust", batch_size=64, window=2)
    # 2 whole batches, then 8 images of each of batches 2-9 in one pass of 64 standing
    # for 8 batches, then batches 10 and 11's samples at the end
    assert sizes == [(64, None), (64, None), (64, 64 * 8), (16, 64 * 2)]
    sizes.clear()
    bnkit.tta(fw.build(), x[: 64 * 3 + 40], "robust", batch_size=64, window=2)
    assert sizes == [(64, None), (64, None), (16, 64 + 40)]  # the short batch's 8 of 40
    sizes.clear()
    bnkit.tta(fw.build(), x[:128], "robust", batch_size=16, window=1)  # 16/8 < 8 images
    assert sizes == [(16, None), (16, 32), (16, 32), (16, 32), (8, 16)]
    sizes.clear()
    bnkit.tta(fw.build(), x[:7], "robust", batch_size=1, window=2)  # pairs after the window
    assert sizes == [(1, None), (1, None), (2, 2), (2, 2)]  # not the lone image left
    monkeypatch.setattr(tta_module, "ROBUST_POOLED", False)  # each sample at once
    monkeypatch.setattr(tta_module, "ROBUST_EVERY", 2)
    sizes.clear()
    bnkit.tta(fw.build(), x[: 64 * 5], "robust", batch_size=64, window=2)
    assert sizes == [(64, None), (64, None), (8, 64), (8, 64)]  # batches 0, 1, 2 and 4
    sizes.clear()
    bnkit.tta(fw.build(), x[: 64 * 4], "tent", batch_size=64, window=2, lr=1e-5)
    import keras

    traced = bnkit.backends.get_backend(fw.build()).test_time().traced
    assert traced == (fw.name == "keras" and keras.backend.backend() in ("tensorflow", "jax"))
    # the guards' checks 0, 1, 2: a sample after the window where no trace is paid
    assert sizes[:3] == [(64, 64), (64, 64), (64 if traced else 16, 64)]
    picked = tta_module._measured(np.arange(64)[:, None], settled=True)[:, 0]
    assert picked[0] == 0 and picked[-1] == 63 and len(set(np.diff(picked))) <= 2  # spread


def _spy_on_checks(monkeypatch) -> tuple[list[int], list[int]]:
    """(the indices of the batches the guards' reference checked, the batches done so
    far; `on_batch=lambda b: batches.append(b.index)` fills the second)."""
    from bnkit.stats import OnlineAdapt

    checked: list[int] = []
    batches: list[int] = []
    update = OnlineAdapt.update

    def counted(self, x, **kwargs):
        checked.append(len(batches))
        return update(self, x, **kwargs)

    monkeypatch.setattr(OnlineAdapt, "update", counted)
    return checked, batches


def test_the_guards_check_every_batch_at_first_then_ever_more_seldom(fw, monkeypatch):
    """The reference runs on the first `window` batches; after them the gap to the next
    check doubles after each calm check (1, 2, 4, 8, then at most CHECK_EVERY_MAX); the
    batches between are still adapted (and checked for non-finite values)."""
    checked, batches = _spy_on_checks(monkeypatch)
    x = fw.inputs(56 * 16)
    report = bnkit.tta(fw.build(), x, "tent", batch_size=16, lr=1e-5,
                       on_batch=lambda b: batches.append(b.index))  # fmt: skip
    assert report.resets == [] and report.held == []
    assert tta_module.CHECK_EVERY_MAX == 16
    assert checked == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 14, 22, 38, 54]
    assert all(b.adapted for b in report.batches)


def test_a_check_that_is_not_calm_tightens_the_checks_to_every_batch(fw, monkeypatch):
    """A check where fewer than CALM of the predictions agree with the reference's (but
    more than a collapse) brings the next check to the next batch; the gap then grows
    again from one."""
    checked, batches = _spy_on_checks(monkeypatch)
    agreement = tta_module._agreement

    def uneasy(recent):  # the real agreement, but a worrying one on batch 14
        return 0.6 if len(batches) == 14 else agreement(recent)

    monkeypatch.setattr(tta_module, "_agreement", uneasy)
    report = bnkit.tta(fw.build(), fw.inputs(24 * 16), "tent", batch_size=16, lr=1e-5,
                       on_batch=lambda b: batches.append(b.index))  # fmt: skip
    assert report.resets == [] and report.held == []
    assert checked == [*range(9), 10, 14, 15, 17, 21]


def test_a_reset_on_an_unchecked_batch_falls_back_and_checks_every_batch_for_a_window(
    fw, monkeypatch
):
    """Non-finite outputs on a batch between checks (12: after the checks at 8, 10 and
    14's gap) reset to the start and predict that batch with the reference; the next
    `window` batches are then checked one by one before the gap grows again."""
    checked, batches = _spy_on_checks(monkeypatch)
    model = fw.build()
    adapter_class = type(bnkit.backends.get_backend(model).test_time())
    step = adapter_class.step

    def faulty(self, m, x):  # the real step; its outputs spoilt on batch 12
        out = step(self, m, x)
        return np.full_like(out, np.nan) if len(batches) == 12 else out

    monkeypatch.setattr(adapter_class, "step", faulty)
    report = bnkit.tta(model, fw.inputs(26 * 16), "tent", batch_size=16, lr=1e-5,
                       on_batch=lambda b: batches.append(b.index))  # fmt: skip
    assert report.resets[0][0] == 12 and "non-finite" in report.resets[0][1]
    assert np.isfinite(report.batches[12].entropy)  # the reference's prediction
    assert checked[:10] == [*range(9), 10] and 11 not in checked and 12 not in checked
    last = report.resets[-1][0]  # (a random model may collapse again right after)
    assert set(range(13, last + tta_module.WINDOW + 1)) <= set(checked)
    if not report.held and last == 12:  # then the gap grows from one again
        assert checked[10:] == [*range(13, 22), 23]


def test_the_label_shift_test_passes_iid_batches_and_catches_one_class_ones():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (5, 5))

    def batch(classes: np.ndarray) -> np.ndarray:
        return centres[classes] + rng.normal(0, 1, (len(classes), 5))

    seen = tta_module.Moments()
    fired = []
    for _ in range(200):  # an i.i.d. stream: at p < 0.001, no batch of 200 should fire
        out = batch(rng.integers(0, 5, 32))
        fired.append(tta_module._label_shift(out, seen))
        seen.add(out.mean(0), out.var(0), len(out))
    assert fired[0] is None and sum(f is not None for f in fired) == 0
    why = tta_module._label_shift(batch(np.full(32, 3)), seen)  # a one-class batch
    assert why is not None and why.startswith("label shift") and "p=" in why


def test_tent_is_held_from_the_batch_that_shows_the_stream_is_not_iid(fw):
    x = fw.inputs(128)
    stream = np.concatenate([x[:64], x[64:] + 4.0])  # the last two batches move away
    model = fw.build()
    report = bnkit.tta(model, stream, "tent", batch_size=32, lr=1e-2)
    assert report.held == [2, 3] and "held out of TENT" in str(report)
    assert [b.adapted for b in report.batches] == [True, True, False, False]
    assert '"held": [\n    2,\n    3\n  ]' in report.to_json()
    first_two = fw.build()
    bnkit.tta(first_two, x[:64], "tent", batch_size=32, lr=1e-2)
    a, b = fw.bn_values(model), fw.bn_values(first_two)  # nothing learnt from held batches
    for path in a:
        for key in ("gamma", "beta"):
            np.testing.assert_allclose(a[path][key], b[path][key], rtol=1e-6, atol=1e-7)
    unguarded = bnkit.tta(fw.build(), stream, "tent", batch_size=32, lr=1e-2, guard=False)
    assert unguarded.held == [] and all(b.adapted for b in unguarded.batches)


def test_compare_runs_tent_label_free_on_the_validation_inputs(fw):
    x = fw.inputs(96)
    y = np.arange(96) % 3
    model = fw.build()
    before = fw.bn_values(model)
    result = bnkit.compare(model, (x[:48], y[:48]), (x[48:], y[48:]), ["frozen", "tent"],
                           epochs=1, seeds=2, batch_size=16)  # fmt: skip
    tent = {r.seed: r for r in result.runs if r.strategy == "tent"}
    assert {r.strategy for r in result.runs} == {"frozen", "tent"} and len(tent) == 2
    assert all(r.epochs == () and r.status == "ok" for r in tent.values())
    after = fw.bn_values(model)  # the caller's model is untouched
    assert all(np.array_equal(before[p][k], after[p][k]) for p in before for k in before[p])
    # the run is tta on the validation inputs in the seed's order, scored in inference mode
    for seed, run in tent.items():
        alone = fw.build()
        order = np.random.default_rng(seed).permutation(48)
        bnkit.tta(alone, x[48:][order], "tent")  # one batch of 48: TENT's batch is 64
        backend = bnkit.backends.get_backend(alone)
        adapter = backend.test_time()
        hits = (adapter.predict(alone, x[48:]).argmax(1) == y[48:]).mean()
        assert run.final_val_accuracy == pytest.approx(hits, abs=1e-6)
    with pytest.raises(BnkitError, match="tent uses no labels, so it cannot train a new head"):
        bnkit.compare(model, (x[:48], y[:48]), (x[48:], y[48:]), ["tent"], num_classes=5)
    with pytest.raises(BnkitError, match="or the label-free tent"):
        bnkit.compare(model, (x[:48], y[:48]), (x[48:], y[48:]), ["tnet"])


def test_tent_on_tensorflow_runs_a_model_xla_cannot_compile():
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("XLA compilation is the TensorFlow backend's")
    import tensorflow as tf

    def through_python(t):  # tf.py_function: differentiable, not XLA-compilable
        out = tf.py_function(lambda a: a * 2.0, [t], tf.float32)
        return tf.reshape(out, tf.shape(t))

    inputs = keras.Input((6,))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Lambda(through_python)(h)))
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    gamma = np.array(model.layers[2].gamma.numpy(), copy=True)
    report = bnkit.tta(model, x, "tent", batch_size=32, guard=False, lr=0.1)
    assert len(report.batches) == 2 and all(b.adapted for b in report.batches)
    assert not np.allclose(model.layers[2].gamma.numpy(), gamma)  # it did train


def test_tent_on_batches_all_too_small_is_an_error_and_changes_nothing(fw):
    model = fw.build()
    x = fw.inputs(24)
    pairs = [(x[i : i + 4], np.zeros(4, int)) for i in range(0, 24, 4)]
    before = bnkit.backends.get_backend(model).snapshot(model)
    with pytest.raises(BnkitError, match=r"TENT adapted on no batch: all 6 batches.*fewer than 16"):
        bnkit.tta(model, pairs, "tent")
    after = bnkit.backends.get_backend(model).snapshot(model)
    for group in ("weights", "stats"):  # weights and the moving statistics alike
        old, new = getattr(before, group), getattr(after, group)
        assert all(np.array_equal(old[p][k], new[p][k]) for p in old for k in old[p]), group


def test_tent_warns_with_the_count_of_batches_it_could_not_adapt_on(fw):
    x = fw.inputs(40)
    pairs = [(x[:20], None), (x[20:24], None), (x[24:], None)]
    with pytest.warns(bnkit.BnkitWarning, match="1 of 3 batches hold fewer than 16 samples"):
        report = bnkit.tta(fw.build(), pairs, "tent")
    assert report.too_small == [1] and "1 batch(es) smaller than 16" in str(report)
    assert json.loads(report.to_json())["too_small"] == [1]


def test_a_generator_stream_is_read_once_and_replayed(fw):
    x = fw.inputs(64)
    consumed = []

    def stream():
        for i in range(0, 64, 32):
            consumed.append(i)
            yield x[i : i + 32]

    report = bnkit.tta(fw.build(), stream(), "tent")
    assert [b.size for b in report.batches] == [32, 32] and consumed == [0, 32]
    # the same numbers as a list of the same batches
    again = bnkit.tta(fw.build(), [x[:32], x[32:]], "tent")
    assert [b.entropy for b in report.batches] == pytest.approx([b.entropy for b in again.batches])


def test_the_adapters_compiled_inference_reads_the_statistics_of_each_call(fw):
    """Inference compiled once (XLA on TensorFlow, jit on JAX) still uses statistics
    written after it was traced, as `robust` and the guards' reference need."""
    model, x = fw.build(), fw.inputs(32)
    adapter = bnkit.backends.get_backend(model).test_time()
    before = adapter.predict(model, x)
    bnkit.adapt(model, fw.inputs(64, seed=1) * 3.0 + 2.0, batch_size=32)
    after = adapter.predict(model, x)
    traced_now = bnkit.backends.get_backend(model).test_time().predict(model, x)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, traced_now, rtol=1e-5, atol=1e-6)


def test_robust_predicts_each_batch_with_the_statistics_of_the_stream_so_far(fw, monkeypatch):
    """No gradient step: batch k is predicted in inference mode with the statistics of
    batches 0..k (what OnlineAdapt writes), and the model ends with `adapt`'s."""
    from bnkit.stats import OnlineAdapt

    monkeypatch.setattr(tta_module, "SPLIT_OWN", -1.0)  # the young-batch agreement rule off
    x = fw.inputs(96)
    model = fw.build()
    report = bnkit.tta(model, x, "robust", batch_size=32)
    assert report.method == "robust" and report.corrected == [] and len(report.batches) == 3
    grown = fw.build()
    online = OnlineAdapt(grown)
    adapter = bnkit.backends.get_backend(grown).test_time()
    for k, record in enumerate(report.batches):
        online.update(x[32 * k : 32 * k + 32])
        expected = tta_module._score(k, adapter.predict(grown, x[32 * k : 32 * k + 32]),
                                     None, None, True, 0.0).record  # fmt: skip
        assert record.entropy == pytest.approx(expected.entropy, rel=1e-4)
    whole = fw.build()
    bnkit.adapt(whole, x, batch_size=32)
    a, b = fw.bn_values(model), fw.bn_values(whole)
    for path in a:
        for key in ("mean", "var"):
            np.testing.assert_allclose(a[path][key], b[path][key], rtol=1e-5, atol=1e-6)
        for key in ("gamma", "beta"):  # nothing trained
            np.testing.assert_array_equal(a[path][key], fw.bn_values(fw.build())[path][key])


def _three_bn(fw):
    """The framework's model with at least three BN layers (the gate needs a middle and a
    deep part): Keras' test model has four; the PyTorch one is built here."""
    if fw.name == "keras":
        return fw.build()
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        *(m for c_in, c_out in ((3, 4), (4, 4), (4, 6))
          for m in (nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )  # fmt: skip
    with torch.no_grad():  # outputs far from uniform, so that entropies tell them apart
        model[-1].weight.mul_(20)
    return model


def test_robust_predicts_its_first_batches_with_the_source_statistics_where_the_gate_keeps_them(
    fw, monkeypatch
):
    """While the stream is young (SOURCE_GATE_BATCHES), a batch whose middle BN layers did
    not move from the source statistics and whose deep ones did is predicted with the
    source statistics; a gate half open predicts with the two Gaussians' mixture; from
    the third batch on, and in the model at the end, the stream's statistics."""
    from bnkit.stats import OnlineAdapt, _layer_shift

    x = fw.inputs(128)
    adapter = bnkit.backends.get_backend(_three_bn(fw)).test_time()

    def entropy(outputs):
        return tta_module._score(0, outputs, None, None, True, 0.0).record.entropy

    monkeypatch.setattr(tta_module, "SOURCE_GATE", (1e9, 2e9))  # the middle: unmoved
    monkeypatch.setattr(tta_module, "SOURCE_GATE_RATIO", (-2.0, -1.0))  # the deep: moved
    monkeypatch.setattr(tta_module, "SOURCE_SPLIT_MARGIN", np.inf)  # the gate alone (below)
    monkeypatch.setattr(tta_module, "SOURCE_GATE_CLASSES", np.inf)  # however spread
    model = _three_bn(fw)
    report = bnkit.tta(model, x, "robust", batch_size=32)
    source, grown = _three_bn(fw), _three_bn(fw)
    online = OnlineAdapt(grown)
    for k, record in enumerate(report.batches):
        batch = x[32 * k : 32 * k + 32]
        online.update(batch)
        expected = adapter.predict(source if k < tta_module.SOURCE_GATE_BATCHES else grown, batch)
        if record.corrected:  # the source's outputs set the label-shift test off: LAME
            expected = tta_module.lame(expected)
        assert record.entropy == pytest.approx(entropy(expected), rel=1e-4)
    for path, values in fw.bn_values(model).items():  # the stream's, as adapt gives them
        for key in ("mean", "var"):
            np.testing.assert_allclose(values[key], fw.bn_values(grown)[path][key], rtol=1e-5)

    # half open: the first batch with the mixture of the source's and its own statistics
    first, twin = _three_bn(fw), _three_bn(fw)
    backend = bnkit.backends.get_backend(first)
    online = OnlineAdapt(twin)
    stored = backend.bn_stats(twin, online.paths)
    online.update(x[:32])
    streamed = online.statistics()
    middle = online.paths[1 : max(2, 2 * len(online.paths) // 3)]
    mid = np.mean([_layer_shift(p, 0, streamed[p], stored[p]).kl_mean for p in middle])
    monkeypatch.setattr(tta_module, "SOURCE_GATE", (mid - 1.0, mid + 1.0))  # half
    report = bnkit.tta(first, x[:32], "robust", batch_size=32)
    mixture = {}
    for p in online.paths:
        ms, vs = stored[p]["mean"].astype(np.float64), stored[p]["var"].astype(np.float64)
        mt, vt = streamed[p]["mean"], streamed[p]["var"]
        mean = (ms + mt) / 2
        var = (vs + (ms - mean) ** 2 + vt + (mt - mean) ** 2) / 2
        mixture[p] = {"mean": mean, "var": var}
    backend.set_bn_stats(twin, mixture)
    expected = adapter.predict(twin, x[:32])
    assert report.batches[0].entropy == pytest.approx(entropy(expected), rel=1e-4)
    assert report.batches[0].entropy != pytest.approx(
        entropy(adapter.predict(_three_bn(fw), x[:32])), rel=1e-3
    )  # not the source's alone


def _assert_robust_first_batch(fw, x, expected, means) -> None:
    """`robust` on one batch `x` predicts it as `expected` (compared by mean entropy) and
    leaves the model with the stream's statistics (`means` per BN layer), whichever
    candidate predicted."""
    model = _three_bn(fw)
    report = bnkit.tta(model, x, "robust", batch_size=len(x))
    assert report.batches[0].entropy == pytest.approx(tta_module._mean_entropy(expected), rel=1e-4)
    for path, values in fw.bn_values(model).items():
        np.testing.assert_allclose(values["mean"], means[path], rtol=1e-5)


def test_classes_seen_counts_the_classes_the_predictions_spread_over():
    one = np.tile([0.1, 0.7, 0.2], (8, 1))
    assert tta_module._classes_seen(one) == pytest.approx(1.0)
    even = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]]  # two of each of four classes
    assert tta_module._classes_seen(even) == pytest.approx(4.0)
    skewed = np.eye(4)[[0, 0, 0, 0, 0, 0, 1, 2]]
    assert 1.0 < tta_module._classes_seen(skewed) < 3.0
    assert tta_module._spread(even) and not tta_module._spread(one)  # 4 of 4; 1 of 3
    assert not tta_module._spread(np.linspace(0, 1, 8)[:, None])  # one column: no count


def test_robust_gate_gives_way_to_the_stream_where_the_source_predictions_spread_over_the_classes(
    fw, monkeypatch
):
    """The gate keeps the source statistics for a young batch whose deep layers moved far
    more than its middle ones; where the predictions made so fall in at least
    SOURCE_GATE_CLASSES of the classes, the batch holds many classes (a domain moved the
    deep layers), and the stream's statistics predict it; below, the source's."""
    x = fw.inputs(32)
    monkeypatch.setattr(tta_module, "SOURCE_GATE", (1e9, 2e9))  # the middle: unmoved
    monkeypatch.setattr(tta_module, "SOURCE_GATE_RATIO", (-2.0, -1.0))  # the deep: moved
    monkeypatch.setattr(tta_module, "SOURCE_SPLIT_MARGIN", np.inf)  # the gate alone
    monkeypatch.setattr(tta_module, "SPLIT_OWN", -1.0)
    adapter = bnkit.backends.get_backend(_three_bn(fw)).test_time()
    source = adapter.predict(_three_bn(fw), x)
    own = _three_bn(fw)
    bnkit.adapt(own, x, batch_size=32)
    streamed = adapter.predict(own, x)
    seen = tta_module._classes_seen(source)  # the share set just below it, then above
    gap = tta_module._mean_entropy(source) - tta_module._mean_entropy(streamed)
    assert abs(gap) > 1e-3  # two different predictions
    width = min(source.shape)
    means = {p: v["mean"] for p, v in fw.bn_values(own).items()}
    for share, expected in ((seen / width - 1e-6, streamed), (seen / width + 1e-6, source)):
        monkeypatch.setattr(tta_module, "SOURCE_GATE_CLASSES", share)
        _assert_robust_first_batch(fw, x, expected, means)


def _young_batch_candidates(fw, x):
    """A stream's first batch `x` on the three-BN model, predicted with the source
    statistics, with its own, and split (its own in the first SOURCE_SPLIT of the BN
    layers, the source's after them); and its own statistics' means per BN layer."""
    from bnkit.stats import OnlineAdapt

    twin = _three_bn(fw)
    backend = bnkit.backends.get_backend(twin)
    adapter = backend.test_time()
    kept = adapter.predict(twin, x)
    online = OnlineAdapt(twin)
    source = backend.bn_stats(twin, online.paths)
    online.update(x)  # writes the batch's statistics into twin
    own = adapter.predict(twin, x)
    early = max(1, round(len(online.paths) * tta_module.SOURCE_SPLIT))
    streamed = online.statistics()
    backend.set_bn_stats(
        twin, {p: streamed[p] if i < early else source[p] for i, p in enumerate(online.paths)}
    )
    split = adapter.predict(twin, x)
    return kept, own, split, {p: v["mean"] for p, v in streamed.items()}


def test_robust_predicts_a_young_batch_split_where_those_predictions_are_the_surer(fw, monkeypatch):
    """On a young stream's batch, the predictions with the stream's statistics in the first
    third of the BN layers and the source's after them (split) replace the gate's where
    their mean entropy is lower by SOURCE_SPLIT_MARGIN nats, and only there."""
    x = fw.inputs(32)
    monkeypatch.setattr(tta_module, "SOURCE_GATE", (-2.0, -1.0))  # the gate: the stream's
    monkeypatch.setattr(tta_module, "SPLIT_OWN", -1.0)  # the agreement rule off
    _, own, split, means = _young_batch_candidates(fw, x)
    gap = tta_module._mean_entropy(own) - tta_module._mean_entropy(split)
    assert abs(gap) > 1e-3  # two different predictions
    for margin, expected in ((gap - 1e-4, split), (gap + 1e-4, own)):
        monkeypatch.setattr(tta_module, "SOURCE_SPLIT_MARGIN", margin)
        _assert_robust_first_batch(fw, x, expected, means)


def test_robust_predicts_a_young_batch_split_where_split_agrees_with_the_source_not_with_its_own(
    fw, monkeypatch
):
    """Where the split candidate's predictions agree with the batch's own on less than
    SPLIT_OWN of the batch and with the source statistics' on at least SPLIT_SOURCE, the
    split's are taken (the domain is one the model handles, the batch's own statistics
    erased its classes); otherwise the gate's stand."""
    x = fw.inputs(32)
    monkeypatch.setattr(tta_module, "SOURCE_GATE", (-2.0, -1.0))  # the gate: the stream's
    monkeypatch.setattr(tta_module, "SOURCE_SPLIT_MARGIN", np.inf)  # not by entropy
    kept, own, split, means = _young_batch_candidates(fw, x)
    assert abs(tta_module._mean_entropy(own) - tta_module._mean_entropy(split)) > 1e-3
    with_own, with_source = tta_module._agree(split, own), tta_module._agree(split, kept)
    cases = (
        (with_own + 1e-6, with_source - 1e-6, split),
        (with_own + 1e-6, with_source + 1e-6, own),  # split and source disagree
        (with_own - 1e-6, with_source - 1e-6, own),  # split and own agree
    )
    for own_share, source_share, expected in cases:
        monkeypatch.setattr(tta_module, "SPLIT_OWN", own_share)
        monkeypatch.setattr(tta_module, "SPLIT_SOURCE", source_share)
        _assert_robust_first_batch(fw, x, expected, means)


def test_robust_corrects_the_predictions_from_the_second_batch_in_a_row_that_shows_label_shift(
    fw, monkeypatch
):
    # the last three batches move away; every image counted in one domain (the domains
    # are tested below), so that the move reaches the outputs as label shift would
    monkeypatch.setattr(sys.modules["bnkit.domains"], "NEW_DOMAIN", np.inf)
    monkeypatch.setattr(tta_module, "SPLIT_OWN", -1.0)  # the young batches: the stream's
    x = fw.inputs(160)
    stream = np.concatenate([x[:64], x[64:] + 4.0])
    report = bnkit.tta(fw.build(), stream, "robust", batch_size=32)
    assert {r.domains for r in report.batches} == {1}
    assert report.corrected == [3, 4]
    assert report.batches[3].corrected.startswith("label shift")
    assert "label shift from batch 3: predictions of 2 batch(es) corrected" in str(report)
    assert json.loads(report.to_json())["corrected"] == [3, 4]
    once = np.concatenate([x[:128], x[128:] + 4.0])  # one odd batch alone: not corrected
    assert bnkit.tta(fw.build(), once, "robust", batch_size=32).corrected == []


def test_lame_draws_neighbours_to_agree_and_reads_logits_and_probabilities_alike():
    rng = np.random.default_rng(0)
    # a batch of one class (a class-sorted stream): 20 rows lean to class 0, two rows
    # are unsure and lean to classes 1 and 2
    logits = np.c_[rng.uniform(0.5, 2.0, 20), rng.normal(0, 0.2, (20, 2))]
    logits = np.r_[logits, [[0.5, 0.6, 0.0], [0.5, 0.0, 0.6]]]
    assert list(logits.argmax(1)[-2:]) == [1, 2]
    assert (tta_module.lame(logits).argmax(1) == 0).all()  # the batch agrees
    # two classes, each with its own confident rows: both stay
    two = np.r_[logits[:20], logits[:20][:, [1, 0, 2]]]
    np.testing.assert_array_equal(tta_module.lame(two).argmax(1), two.argmax(1))
    e = np.exp(logits - logits.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(tta_module.lame(logits), tta_module.lame(probs), atol=1e-5)
    small = logits[:5]  # no more rows than neighbours: the log-probabilities unchanged
    np.testing.assert_allclose(np.exp(tta_module.lame(small)), probs[:5], rtol=1e-6)


def test_compare_runs_robust_label_free(fw):
    x = fw.inputs(96)
    y = np.arange(96) % 3
    result = bnkit.compare(fw.build(), (x[:48], y[:48]), (x[48:], y[48:]), ["robust"],
                           epochs=1, seeds=1, batch_size=16)  # fmt: skip
    (run,) = result.runs
    alone = fw.build()
    bnkit.tta(alone, x[48:][np.random.default_rng(0).permutation(48)], "robust")
    adapter = bnkit.backends.get_backend(alone).test_time()
    hits = (adapter.predict(alone, x[48:]).argmax(1) == y[48:]).mean()
    assert run.strategy == "robust" and run.epochs == ()
    assert run.final_val_accuracy == pytest.approx(hits, abs=1e-6)
