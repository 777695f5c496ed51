"""The ImageNet-C corruptions of the digits: deterministic per seed, cached, checked."""

from __future__ import annotations

import numpy as np
import pytest

from bnkit.corruptions import CORRUPTIONS, SLOW, corrupt, corrupted_digits
from bnkit.errors import BnkitError

pytest.importorskip("imagecorruptions")


@pytest.mark.parametrize("name", [c for c in CORRUPTIONS if c not in SLOW])
def test_each_fast_corruption_changes_the_images_the_same_way_per_seed(name):
    x = np.random.default_rng(0).random((3, 32, 32, 3)).astype("float32")
    a, b = corrupt(x, name, 5, seed=1), corrupt(x, name, 5, seed=1)
    assert a.shape == x.shape and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - x).mean() > 0.01
    assert np.abs(corrupt(x, name, 1, seed=1) - x).mean() < np.abs(a - x).mean()


DRAW = """
import hashlib, sys
import numpy as np
from bnkit.corruptions import CORRUPTIONS, corrupt
x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
for name in CORRUPTIONS:
    print(name, hashlib.sha256(corrupt(x, name, 5, seed=3).tobytes()).hexdigest())
"""


def test_every_corruption_gives_the_same_bytes_in_another_process():
    """Each corruption is a function of (images, severity, seed): two fresh processes (no
    shared cache, NumPy's global generator in another state) draw the same bytes."""
    import subprocess
    import sys

    runs = [
        subprocess.run([sys.executable, "-c", DRAW], capture_output=True, text=True, timeout=600)
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    first, second = (dict(line.split() for line in r.stdout.splitlines()) for r in runs)
    assert set(first) == set(CORRUPTIONS)
    assert {n for n in CORRUPTIONS if first[n] != second[n]} == set()


def test_corrupted_digits_are_cached(tmp_path):
    x, y = corrupted_digits("gaussian_noise", 3, cache=tmp_path)
    files = list((tmp_path / "corruptions").glob("*.npz"))
    assert len(files) == 1 and x.shape == (len(y), 32, 32, 3)
    again, _ = corrupted_digits("gaussian_noise", 3, cache=tmp_path)
    np.testing.assert_array_equal(x, again)


def test_bad_arguments_say_what_to_use():
    x = np.zeros((1, 32, 32, 3), "float32")
    with pytest.raises(BnkitError, match="unknown corruption 'rain'"):
        corrupt(x, "rain", 5)
    with pytest.raises(BnkitError, match="severity must be 1 to 5"):
        corrupt(x, "fog", 6)
    with pytest.raises(BnkitError, match=r"\(N, H, W, 3\)"):
        corrupt(np.zeros((1, 3, 32, 32), "float32"), "fog", 5)
