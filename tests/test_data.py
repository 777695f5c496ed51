"""Data in: image folders, arrays, tf.data, PyDataset; scaling; the embedded digits;
and one clear error for each kind of bad data."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from bnkit.data import DataError, _split_indices, digits, load, parse_scaling


def _folder(root: Path, spec: dict[str, list[tuple[str, tuple[int, int]]]]) -> Path:
    """Writes images: spec maps class -> [(mode, (w, h))], pixel value = class index * 40."""
    rng = np.random.default_rng(0)
    for k, (cls, images) in enumerate(spec.items()):
        (root / cls).mkdir(parents=True)
        for i, (mode, (w, h)) in enumerate(images):
            shape = (h, w) if mode == "L" else (h, w, 3)
            pixels = np.clip(k * 40 + rng.integers(0, 5, size=shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / cls / f"{i}.png")
    return root


def test_image_folder_gives_labelled_resized_batches(tmp_path):
    root = _folder(
        tmp_path / "imgs",
        {"cat": [("RGB", (20, 10))] * 3, "dog": [("RGB", (12, 12))] * 2},
    )
    data = load(root, batch_size=2, image_size=(8, 8), scale="1/255")
    assert data.class_names == ("cat", "dog") and data.size == 5
    got = list(data)
    assert [len(x) for x, _ in got] == [2, 3]  # a last batch of one joins the one before
    x, y = (np.concatenate(p) for p in zip(*got, strict=True))
    assert x.shape == (5, 8, 8, 3) and y.tolist() == [0, 0, 0, 1, 1]
    assert x[:3].max() <= 5 / 255 and 39 / 255 < x[3:].mean() < 45 / 255
    assert [len(b) for b, _ in data] == [2, 3]  # re-iterable


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda r: r.mkdir(), "the directory is empty"),
        (lambda r: (r.mkdir(), (r / "a.png").write_bytes(b"x")), "no class folders"),
        (
            lambda r: (
                _folder(r, {"a": [("RGB", (4, 4))]}),
                (r / "a" / "notes.txt").write_text("hi"),
                (r / "a" / "broken.png").write_bytes(b"\x89PNG garbage"),
            ),
            "2 files are not readable images (a/broken.png, a/notes.txt)",
        ),
        (
            lambda r: _folder(r, {"a": [("RGB", (4, 4))], "b": [("L", (4, 4))] * 2}),
            "mixed channel counts: 2 with 1 (e.g. b/0.png), 1 with 3",
        ),
    ],
    ids=["empty", "no-class-folders", "unreadable", "mixed-channels"],
)
def test_bad_image_folders_say_what_is_wrong(tmp_path, make, message):
    root = tmp_path / "imgs"
    make(root)
    with pytest.raises(DataError) as err:
        load(root)
    assert message in str(err.value)


def test_mixed_channels_convert_when_asked(tmp_path):
    root = _folder(tmp_path / "imgs", {"a": [("RGB", (4, 4))], "b": [("L", (4, 4))] * 2})
    x, y = load(root, channels=3).arrays()
    assert x.shape == (3, 4, 4, 3) and y is not None and y.tolist() == [0, 1, 1]
    assert np.array_equal(x[1, ..., 0], x[1, ..., 2])  # grey repeated


def test_folder_streams_with_memory_bounded_by_the_batch(tmp_path):
    root = _folder(tmp_path / "imgs", {"a": [("RGB", (96, 96))] * 60})
    data = load(root, batch_size=4)
    one_batch = 4 * 96 * 96 * 3 * 4
    tracemalloc.start()
    n = sum(len(x) for x, _ in data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 60
    assert peak < 6 * one_batch < 60 * 96 * 96 * 3 * 4  # never the whole set at once


def test_arrays_nan_labels_and_shapes():
    x = np.zeros((6, 4, 4, 3), np.float32)
    with pytest.raises(DataError, match="x has 6 samples but y has 5"):
        load((x, np.zeros(5)))
    with pytest.raises(DataError, match=r"2 labels lie outside 0\.\.2"):
        list(load((x, np.array([0, 1, 2, 3, 4, 1])), num_classes=3))
    bad = x.copy()
    bad[3, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match="batch 1 holds 1 NaN or inf"):
        list(load(bad, batch_size=2))
    with pytest.raises(DataError, match="cannot read data of type int"):
        load(3)


def test_tf_data_and_pydataset_sources():
    import tensorflow as tf

    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    y = np.arange(10) % 3
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    got_x, got_y = load(ds, num_classes=3).arrays()
    assert np.array_equal(got_x, x) and got_y is not None and np.array_equal(got_y, y)

    class Slices(keras.utils.PyDataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int):  # past the end it returns empty slices, never raises
            return x[i * 4 : (i + 1) * 4], y[i * 4 : (i + 1) * 4]

    got_x, _ = load(Slices()).arrays()
    assert np.array_equal(got_x, x)


@pytest.mark.parametrize("module", ["resnet_v2", "densenet", "resnet50", "mobilenet_v2"])
def test_named_preprocessing_matches_keras_applications(module):
    pixels = np.random.default_rng(0).uniform(0, 255, size=(2, 5, 5, 3)).astype(np.float32)
    name = {"resnet50": "resnet"}.get(module, module)
    keras_fn = getattr(keras.applications, name).preprocess_input
    expected = keras.ops.convert_to_numpy(keras_fn(pixels.copy()))
    got = parse_scaling(preprocess=module)(pixels)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_scaling_errors_name_the_fix():
    with pytest.raises(DataError, match="give a number such as 1/255"):
        parse_scaling("one/255")
    with pytest.raises(DataError, match="closest: resnet_v2"):
        parse_scaling(preprocess="resnetv2")


def test_digits_domains_are_deterministic_shifted_and_split_disjointly():
    a, b = digits("source", size=16, seed=3), digits("source", size=16, seed=3)
    assert np.array_equal(a.train[0], b.train[0]) and np.array_equal(a.test[1], b.test[1])
    t = digits("target", size=16, seed=3)
    assert np.array_equal(a.test[1], t.test[1])  # same digits, same split
    assert not np.array_equal(digits("target", size=16, seed=4).train[0][:5], t.train[0][:5])
    for d in (a, t):
        x = np.concatenate([d.train[0], d.val[0], d.test[0]])
        assert x.shape == (1797, 16, 16, 3) and x.min() >= 0 and x.max() <= 1
    assert abs(float(t.train[0].mean() - a.train[0].mean())) > 0.03
    assert a.train[0][..., 0].std() > 0 and np.array_equal(a.train[0][..., 0], a.train[0][..., 2])
    assert not np.array_equal(t.train[0][..., 0], t.train[0][..., 2])  # colour patches
    labels = np.arange(1797) % 10
    parts = _split_indices(labels, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == 1797 and len(np.unique(joined)) == 1797
    for part, share in zip(parts, (0.6, 0.2, 0.2), strict=True):
        assert abs(len(part) / 1797 - share) < 0.01
        assert np.bincount(labels[part]).min() >= int(share * 179)  # every class in every split
    with pytest.raises(DataError, match="use 'source' or 'target'"):
        digits("mnist")
