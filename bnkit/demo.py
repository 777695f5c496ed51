"""The demo: what each way people try to freeze BN really does in Keras 3.

Each approach starts from the same ResNet50V2 weights (`weights=None`, no
download), is set up the way guides and forum answers suggest, trained for a
few steps on generated images, and measured with `watch`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from rich.table import Table

from bnkit.freeze import freeze
from bnkit.policy import Mode
from bnkit.watch import watch

DEMO_CLASSES = 3


@dataclass(frozen=True)
class ApproachResult:
    """What one approach did to the BN layers of the base model."""

    approach: str
    targeted: int
    """BN layers the approach's code touched."""
    bn_layers: int
    stats_kept: int
    """BN layers whose moving mean and variance did not change."""
    affine_kept: int
    """BN layers whose gamma and beta did not change."""
    problems: int
    """differences from the bnkit plan found by `watch` (bnkit approaches only)."""


@dataclass(frozen=True)
class DemoResult:
    """The table `bnkit demo` prints."""

    backend: str
    steps: int
    rows: tuple[ApproachResult, ...]

    def to_json(self) -> str:
        """The result as a JSON document."""
        return json.dumps(
            {"backend": self.backend, "steps": self.steps, "rows": [asdict(r) for r in self.rows]},
            indent=2,
        )

    def table(self) -> Table:
        """The side-by-side table."""
        t = Table(title=f"ResNet50V2 after {self.steps} training steps ({self.backend})")
        for col in ("approach", "BN touched", "kept statistics", "kept gamma/beta", "watch"):
            t.add_column(col, overflow="fold")
        for r in self.rows:
            t.add_row(
                r.approach,
                str(r.targeted),
                f"{r.stats_kept}/{r.bn_layers}",
                f"{r.affine_kept}/{r.bn_layers}",
                ""
                if r.problems < 0
                else ("as planned" if r.problems == 0 else f"{r.problems} off plan"),
            )
        return t

    def __rich__(self) -> Table:
        return self.table()


def _bn_layers(base: Any) -> list[Any]:
    import keras

    return [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]


def _set_bn_untrainable(base: Any, pick: Callable[[Any], bool]) -> int:
    chosen = [layer for layer in _bn_layers(base) if pick(layer)]
    for layer in chosen:
        layer.trainable = False
    return len(chosen)


def _bn_flag_then_unfreeze(base: Any) -> int:
    n = _set_bn_untrainable(base, lambda layer: True)
    base.trainable = False
    base.trainable = True
    return n


def _training_false_then_unfreeze(base: Any) -> int:
    base.trainable = False
    base.trainable = True
    return 0


def _keras_approaches() -> list[tuple[str, Callable[[Any], int]]]:
    return [
        ("bn.trainable = False (every BN)", lambda b: _set_bn_untrainable(b, lambda layer: True)),
        ("bn.trainable = False, then base.trainable = True", _bn_flag_then_unfreeze),
        ("base(x, training=False), then base.trainable = True", _training_false_then_unfreeze),
        (
            "BN picked by name.startswith('bn')",
            lambda b: _set_bn_untrainable(b, lambda layer: layer.name.startswith("bn")),
        ),
        (
            "BN picked by 'preact_bn' in name",
            lambda b: _set_bn_untrainable(b, lambda layer: "preact_bn" in layer.name),
        ),
    ]


def build_demo_model(input_size: int = 32) -> tuple[Any, Any]:
    """ResNet50V2 (`weights=None`) called with `training=False` under a new head, as guides do."""
    import keras

    base = keras.applications.ResNet50V2(
        weights=None, include_top=False, input_shape=(input_size, input_size, 3)
    )
    inputs = keras.Input((input_size, input_size, 3))
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(DEMO_CLASSES, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="transfer"), base


def demo_images(n: int, input_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generated images: noise plus a class-dependent colour offset, and their labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, DEMO_CLASSES, size=n)
    x = rng.normal(0.0, 1.0, size=(n, input_size, input_size, 3)).astype("float32")
    x[np.arange(n), :, :, y] += 1.5
    return x, y


def seed_demo(
    input_size: int = 32, steps: int = 2, batch_size: int = 8, seed: int = 0
) -> DemoResult:
    """Runs every approach from the same weights and reports what happened to BN.

    Example:
        >>> result = seed_demo(steps=1)
        >>> [r.stats_kept for r in result.rows][-1] == result.rows[-1].bn_layers
        True
    """
    import keras

    keras.utils.set_random_seed(seed)
    model, _ = build_demo_model(input_size)
    start = model.get_weights()
    x, y = demo_images(steps * batch_size, input_size, seed)
    rows = []
    for label, setup in _keras_approaches():
        rows.append(_run(label, setup, start, x, y, input_size, batch_size, use_plan=False))
    for mode in Mode:
        label = f"bnkit.freeze(bn='{mode.value}'), then base.trainable = True"
        rows.append(_run(label, _bnkit_setup(mode), start, x, y, input_size, batch_size, True))
    return DemoResult(f"keras {keras.__version__} ({keras.backend.backend()})", steps, tuple(rows))


def _bnkit_setup(mode: Mode) -> Callable[[Any], int]:
    def setup(base: Any) -> int:
        freeze(base, bn=mode)
        base.trainable = False
        base.trainable = True
        return len(_bn_layers(base))

    return setup


def _run(
    label: str,
    setup: Callable[[Any], int],
    start: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    input_size: int,
    batch_size: int,
    use_plan: bool,
) -> ApproachResult:
    import keras

    model, base = build_demo_model(input_size)
    model.set_weights(start)
    targeted = setup(base)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    with watch(base) as w:
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    assert w.report is not None
    k = w.report.counts()
    return ApproachResult(
        approach=label,
        targeted=targeted,
        bn_layers=k["bn_layers"],
        stats_kept=k["bn_stats_kept"],
        affine_kept=k["bn_affine_kept"],
        problems=k["problems"] if use_plan else -1,
    )
