"""Domains inside a stream (`bnkit.domains`): images of one corruption stay one domain,
a stream that mixes corruptions is told apart, in either layout and at any pixel scale;
and `tta(..., "robust")` normalises each domain's images with its own statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bnkit
from bnkit.data import digits
from bnkit.domains import MIN_IMAGES, Domains
from bnkit.stats import OnlineAdapt

pytest.importorskip("imagecorruptions")


def _batches(x: np.ndarray, size: int = 64) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def _mixed(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Test digits, each shown clean, with Gaussian noise or at low contrast, shuffled:
    the images (N, 32, 32, 3) and which of the three each is."""
    from bnkit.corruptions import corrupt

    x = digits("source", 32, seed).test[0][:240]
    parts = [x, corrupt(x, "gaussian_noise", 5, seed=seed), corrupt(x, "contrast", 5, seed=seed)]
    order = np.random.default_rng(seed).permutation(3 * len(x))
    return np.concatenate(parts)[order], np.repeat(np.arange(3), len(x))[order]


@pytest.mark.parametrize("channels_first", [False, True])
def test_a_mixed_stream_is_told_apart_and_one_domain_stays_one(channels_first):
    x, truth = _mixed()
    if channels_first:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    domains = Domains(channels_first)
    ids = np.concatenate([domains.assign(b) for b in _batches(x)])
    assert 3 <= len(domains.counts) <= 6 and sum(domains.counts) == len(x)
    purity = sum(np.bincount(truth[ids == d]).max() for d in np.unique(ids)) / len(x)
    assert purity > 0.97  # each domain holds one kind of image
    for kind in range(2):  # clean digits sorted by class, or noisy ones alone: one domain
        d = digits("source", 32, 0)
        order = np.argsort(d.test[1][:240], kind="stable")
        alone = Domains(channels_first)
        images = x[truth == kind] if kind else d.test[0][:240][order]
        if kind == 0 and channels_first:
            images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        for b in _batches(images):
            alone.assign(b)
        assert len(alone.counts) == 1


def test_the_domains_do_not_depend_on_the_pixel_scale_or_offset_units():
    x, _ = _mixed(1)
    a, b = Domains(False), Domains(False)
    ids = [a.assign(batch) for batch in _batches(x)]
    scaled = [b.assign(batch * 255.0) for batch in _batches(x)]
    assert all(np.array_equal(i, j) for i, j in zip(ids, scaled, strict=True))


def test_the_features_are_numpys_float64_moments_of_the_pixels_and_their_steps():
    from bnkit.domains import _step_variance

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(4, 2, 9, 7)).astype("float32")
    x[0, 0] = np.arange(7, dtype="float32") * 5 + 100  # a ramp: steps of one value
    x[1, 1] = 7.0  # a flat image
    d = Domains(channels_first=True)
    features = d._features(x)
    wide = x.astype(np.float64).reshape(4, 2, -1)
    scale = x.astype(np.float64).var(axis=(0, 2, 3)) + 1e-12
    eps = scale * 1e-3
    rows, cols = np.diff(x.astype(np.float64), axis=2), np.diff(x.astype(np.float64), axis=3)
    steps = rows.reshape(4, 2, -1).var(-1) + cols.reshape(4, 2, -1).var(-1)
    np.testing.assert_allclose(features[:, :2], wide.mean(-1) / np.sqrt(scale), rtol=1e-6)
    np.testing.assert_allclose(features[:, 2:4], np.log(wide.var(-1) + eps), atol=1e-5)
    np.testing.assert_allclose(features[:, 4:], np.log(steps + eps), atol=1e-5)
    for axis, steps_along in ((2, rows), (3, cols)):
        exact = steps_along.reshape(4, 2, -1).var(-1)
        np.testing.assert_allclose(_step_variance(x, axis), exact, rtol=1e-5, atol=1e-6)
    assert _step_variance(x, 3)[0, 0] == 0.0 and _step_variance(x, 2)[1, 1] == 0.0


def test_inputs_that_are_not_images_are_one_domain():
    domains = Domains(False)
    assert domains.assign(np.random.default_rng(0).normal(size=(32, 10))) is None
    assert domains.assign(np.zeros((8, 1, 1, 3), np.float32)) is None


def test_robust_normalises_each_domain_with_its_own_images_statistics(fw, monkeypatch):
    """A stream whose batches are half one domain, half another (the second scaled by 10
    and moved by 5): until a domain holds MIN_IMAGES images its images are predicted with
    the whole stream's statistics, then with those of its own images so far; the model
    ends with `adapt`'s statistics of the whole stream."""
    import sys

    monkeypatch.setattr(sys.modules["bnkit.tta"], "SHIFT_RUN", 10**9)  # no LAME here
    half, batches = 16, 8
    a = fw.inputs(half * batches, seed=0)
    b = fw.inputs(half * batches, seed=1) * 10 + 5
    stream = np.concatenate(
        [np.concatenate([a[k * half : (k + 1) * half], b[k * half : (k + 1) * half]])
         for k in range(batches)]
    )  # fmt: skip
    whole, own_a, own_b = OnlineAdapt(fw.build()), OnlineAdapt(fw.build()), OnlineAdapt(fw.build())
    adapter = bnkit.backends.get_backend(fw.build()).test_time()
    expected = []
    for k in range(batches):
        xa, xb = a[k * half : (k + 1) * half], b[k * half : (k + 1) * half]
        whole.update(np.concatenate([xa, xb]))
        own_a.update(xa)
        own_b.update(xb)
        mature = (k + 1) * half >= MIN_IMAGES
        for part, own in ((xa, own_a), (xb, own_b)):
            model = own._model if mature else whole._model
            expected.append(adapter.predict(model, part).argmax(1))
    labels = np.concatenate(expected)
    model = fw.build()
    report = bnkit.tta(model, (stream, labels), "robust", batch_size=2 * half)
    assert [r.domains for r in report.batches] == [2] * batches
    assert report.domains == 2 and "2 domains in the stream" in str(report)
    assert json.loads(report.to_json())["domains"] == 2
    assert report.accuracy == 1.0  # every prediction is the reference's
    reference = fw.build()
    bnkit.adapt(reference, stream, batch_size=2 * half)
    got, want = fw.bn_values(model), fw.bn_values(reference)
    for path in want:
        for key in ("mean", "var"):
            np.testing.assert_allclose(got[path][key], want[path][key], rtol=1e-5, atol=1e-6)
