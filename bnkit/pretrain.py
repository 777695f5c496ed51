"""The embedded demo's pretrained model: a small residual CNN trained on the source digits,
built once and cached in the user's cache directory (never shipped)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnkit.data import digits
from bnkit.errors import BnkitError

CACHE_ENV = "BNKIT_CACHE_DIR"
RECIPE_VERSION = 1
"""Bump when the architecture or training recipe changes: old cache entries are ignored."""
EPOCHS = 20
BATCH_SIZE = 64
LEARNING_RATE = 2e-3


FRAMEWORKS = ("keras", "torch")


def kit(framework: str) -> Any:
    """The demo set-ups of `framework` (`keras` or `torch`): `bnkit.demo_keras` or
    `bnkit.demo_torch`."""
    if framework == "keras":
        from bnkit import demo_keras

        return demo_keras
    if framework == "torch":
        from bnkit import demo_torch

        return demo_torch
    raise BnkitError(f"unknown framework {framework!r}: use one of {', '.join(FRAMEWORKS)}")


@dataclass(frozen=True)
class Pretrained:
    """A model pretrained on the source digits, and where it is cached."""

    model: Any
    path: Path
    cached: bool
    """True when it was loaded from the cache rather than trained now."""


def cache_dir() -> Path:
    """bnkit's cache directory: `$BNKIT_CACHE_DIR`, else the platform's user cache
    (`$XDG_CACHE_HOME/bnkit` or `~/.cache/bnkit` on Linux)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "bnkit"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "bnkit" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnkit"


def pretrained_digits(
    *,
    size: int = 32,
    seed: int = 0,
    epochs: int = EPOCHS,
    cache: Path | None = None,
    on_status: Callable[[str], None] | None = None,
    framework: str = "keras",
) -> Pretrained:
    """The residual CNN pretrained on `digits("source", size, seed)`'s training split, a
    Keras model or (`framework="torch"`) a PyTorch module.

    Trains for `epochs` with Adam, then re-estimates every BN layer's statistics on
    the training images (with Keras' momentum of 0.99 the moving statistics of a
    short training lag the weights badly; see DESIGN.md). The result is cached per
    recipe, size, seed, epochs and framework (Keras backend), so a second call loads it.

    Examples:
        >>> net = pretrained_digits(epochs=1, cache=Path(tempfile.mkdtemp()))  # doctest: +SKIP
        >>> net.model.output_shape  # doctest: +SKIP
        (None, 10)
    """
    from bnkit.backends import save_model
    from bnkit.stats import adapt

    k = kit(framework)
    folder = cache if cache is not None else cache_dir()
    name = f"digits-resnet-v{RECIPE_VERSION}-{size}px-seed{seed}-{epochs}ep"
    path = folder / f"{name}-{k.backend_name()}{k.MODEL_SUFFIX}"
    cached = _cached(k, path, on_status)
    if cached is not None:
        return Pretrained(cached, path, cached=True)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):  # another process may be training it
        cached = _cached(k, path, on_status)
        if cached is not None:
            return Pretrained(cached, path, cached=True)
        if on_status is not None:
            on_status(f"pretraining on the source digits ({epochs} epochs, cached in {folder})")
        data = digits("source", size=size, seed=seed)
        k.seed_everything(seed)
        model = k.digits_resnet(size, data.num_classes)
        k.train_classifier(
            model, *data.train, epochs=epochs, batch_size=BATCH_SIZE, seed=seed, lr=LEARNING_RATE
        )
        adapt(model, k.images(data.train[0]))
        save_model(model, path)
    return Pretrained(model, path, cached=False)


def _cached(k: Any, path: Path, on_status: Callable[[str], None] | None) -> Any | None:
    """The model cached at `path`; None when there is none, or when the entry cannot be
    read (a truncated or corrupt file in bnkit's own cache): it is trained again and the
    entry replaced."""
    if not path.exists():
        return None
    try:
        return k.load(path)
    except Exception as err:  # a corrupt entry raises whatever its reader raises
        if on_status is not None:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            on_status(f"the cached model {path} cannot be read ({first}): training it again")
        return None


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """An exclusive lock on `lock` (a file bnkit keeps beside the cached model) while one
    process pretrains: a second process waits, then loads what the first wrote."""
    import fcntl

    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Evidence:
    """What re-estimating BN statistics does for the pretrained digits model on the target."""

    shift_source: float
    """model shift score on held-out source test images."""
    shift_target: float
    """model shift score on target test images."""
    accuracy_source: float
    accuracy_target: float
    """target test accuracy with the source statistics."""
    accuracy_adapted: float
    """target test accuracy after `adapt` on unlabelled target training images."""

    def __str__(self) -> str:
        return (
            f"shift: held-out source {self.shift_source:.4f}, target {self.shift_target:.4f} "
            "nats\n"
            f"accuracy: source {self.accuracy_source:.1%}; target {self.accuracy_target:.1%} "
            f"with source statistics, {self.accuracy_adapted:.1%} after adapt on unlabelled "
            f"target images ({self.accuracy_adapted - self.accuracy_target:+.1%})"
        )


def adabn_evidence(
    model: Any, *, size: int = 32, seed: int = 0, framework: str = "keras"
) -> Evidence:
    """Measures shift and the AdaBN effect of `adapt` on a copy of the pretrained model
    (a Keras model, or a PyTorch module with `framework="torch"`).

    Examples:
        >>> ev = adabn_evidence(pretrained_digits().model)  # doctest: +SKIP
        >>> ev.accuracy_adapted > ev.accuracy_target  # doctest: +SKIP
        True
    """
    from bnkit.stats import adapt, shift

    k = kit(framework)
    source, target = digits("source", size, seed), digits("target", size, seed)
    copy = k.clone(model)
    before = k.accuracy(copy, *target.test)
    adapt(copy, k.images(target.train[0]))
    return Evidence(
        shift_source=shift(model, k.images(source.test[0])).score,
        shift_target=shift(model, k.images(target.test[0])).score,
        accuracy_source=k.accuracy(model, *source.test),
        accuracy_target=before,
        accuracy_adapted=k.accuracy(copy, *target.test),
    )


SPLITS = ("train", "val", "test")
DIGITS_FILES = tuple(f"{d}_{s}.npz" for d in ("source", "target") for s in SPLITS)
"""The files `write_digits` writes."""


def write_digits(folder: Path, *, size: int = 32, seed: int = 0) -> list[Path]:
    """Writes both domains' splits as `.npz` files (`x` in [0, 1], `y`) into `folder`,
    atomically; returns the paths."""
    import numpy as np

    from bnkit.files import atomic_path

    written = []
    for domain in ("source", "target"):
        d = digits(domain, size, seed)
        for split in SPLITS:
            x, y = getattr(d, split)
            path = folder / f"{domain}_{split}.npz"
            with atomic_path(path) as tmp, tmp.open("wb") as f:
                np.savez(f, x=x, y=y)
            written.append(path)
    return written
