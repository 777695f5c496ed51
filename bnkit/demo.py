"""The demo: what each way people try to freeze BN really does, in Keras 3 and in
PyTorch, and the digits transfer story told in either framework.

Each approach starts from the same ResNet50V2 (Keras) or torchvision ResNet-50 (PyTorch)
weights (`weights=None`, no download), is set up the way guides, forum answers and the
libraries suggest, trained for a few steps on generated images, and measured with
`watch`. The framework's set-ups live in `demo_keras` and `demo_torch`, which have the
same function names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from rich.table import Table

from bnkit.errors import BnkitError
from bnkit.freeze import freeze
from bnkit.policy import Mode
from bnkit.pretrain import kit
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
    batch_stats: int = 0
    """BN layers that normalise with the batch's statistics in training (after the
    set-up, by `inspect`): their outputs differ from inference even where the
    statistics are kept."""


@dataclass(frozen=True)
class DemoResult:
    """The table `bnkit demo` prints."""

    backend: str
    steps: int
    rows: tuple[ApproachResult, ...]
    model: str = "ResNet50V2"

    def to_json(self) -> str:
        """The result as a JSON document."""
        return json.dumps(
            {
                "backend": self.backend,
                "model": self.model,
                "steps": self.steps,
                "rows": [asdict(r) for r in self.rows],
            },
            indent=2,
        )

    def table(self) -> Table:
        """The side-by-side table."""
        t = Table(title=f"{self.model} after {self.steps} training steps ({self.backend})")
        cols = ("approach", "BN touched", "kept statistics", "kept gamma/beta",
                "batch statistics in training", "watch")  # fmt: skip
        for col in cols:
            t.add_column(col, overflow="fold")
        for r in self.rows:
            t.add_row(
                r.approach,
                str(r.targeted),
                f"{r.stats_kept}/{r.bn_layers}",
                f"{r.affine_kept}/{r.bn_layers}",
                f"{r.batch_stats}/{r.bn_layers}",
                ""
                if r.problems < 0
                else ("as planned" if r.problems == 0 else f"{r.problems} off plan"),
            )
        return t

    def __rich__(self) -> Table:
        return self.table()


def demo_images(n: int, input_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generated images: noise plus a class-dependent colour offset, and their labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, DEMO_CLASSES, size=n)
    x = rng.normal(0.0, 1.0, size=(n, input_size, input_size, 3)).astype("float32")
    x[np.arange(n), :, :, y] += 1.5
    return x, y


def seed_demo(
    input_size: int = 32,
    steps: int = 2,
    batch_size: int = 8,
    seed: int = 0,
    framework: str = "keras",
) -> DemoResult:
    """Runs every approach from the same weights and reports what happened to BN:
    Keras' ResNet50V2, or torchvision's ResNet-50 with `framework="torch"`.

    Examples (not run as a doctest: a minute of training; tests/test_demo.py runs it):
        >>> result = seed_demo(steps=1)  # doctest: +SKIP
        >>> [r.stats_kept for r in result.rows][-1] == result.rows[-1].bn_layers  # doctest: +SKIP
        True
    """
    k = kit(framework)
    if input_size < 32 or steps < 1:
        raise BnkitError(
            f"the traps table needs input_size >= 32 ({k.TRAPS_TITLE}'s minimum) and "
            f"steps >= 1, got {input_size} and {steps}"
        )
    k.seed_everything(seed)
    model, _ = k.traps_model(input_size, DEMO_CLASSES)
    start = k.get_state(model)
    x, y = demo_images(steps * batch_size, input_size, seed)
    x = k.images(x)
    rows = []
    for label, setup in k.trap_approaches():
        rows.append(_run(k, label, setup, start, x, y, input_size, batch_size, use_plan=False))
    for mode in Mode:
        setup = _bnkit_setup(k, mode)
        rows.append(_run(k, k.bnkit_label(mode), setup, start, x, y, input_size, batch_size, True))
    return DemoResult(k.version(), steps, tuple(rows), k.TRAPS_TITLE)


def _bnkit_setup(k: Any, mode: Mode) -> Callable[[Any], int]:
    def setup(base: Any) -> int:
        plan = freeze(base, bn=mode)
        k.reenable(base)
        return sum(plan.bn_counts().values())

    return setup


def _run(
    kit: Any,
    label: str,
    setup: Callable[[Any], int],
    start: Any,
    x: np.ndarray,
    y: np.ndarray,
    input_size: int,
    batch_size: int,
    use_plan: bool,
) -> ApproachResult:
    from bnkit.report import inspect

    model, base = kit.traps_model(input_size, DEMO_CLASSES)
    kit.set_state(model, start)
    targeted = setup(base)
    batch_stats = sum(
        bool(r.bn_state is not None and r.bn_state.batch_stats) for r in inspect(base).bn_layers
    )
    with watch(base) as w:
        kit.fit_once(model, x, y, batch_size)
    assert w.report is not None
    k = w.report.counts()
    return ApproachResult(
        approach=label,
        targeted=targeted,
        bn_layers=k["bn_layers"],
        stats_kept=k["bn_stats_kept"],
        affine_kept=k["bn_affine_kept"],
        problems=k["problems"] if use_plan else -1,
        batch_stats=batch_stats,
    )


# ---------------------------------------------------------------------- the digits story

STORY_FILES = ("shift.png", "compare.png", "compare.json", "demo.json")


def story_files(framework: str = "keras") -> tuple[str, ...]:
    """The files `digits_story` writes: STORY_FILES for Keras, `-torch` names for
    PyTorch, so both stories can share a folder."""
    if framework == "keras":
        return STORY_FILES
    return tuple(n.replace(".", f"-{framework}.", 1) for n in STORY_FILES)


STORY_LABELS_PER_CLASS = 20
STORY_EPOCHS = 10
STORY_SEEDS = 3
STORY_LR = 3e-4
STORY_BATCH = 20


@dataclass(frozen=True)
class Story:
    """`bnkit demo` on the embedded digits: pretrained model, what inspect and shift say
    about the target, and the comparison of BN strategies on a few labelled target images."""

    pretrained_cached: bool
    source_accuracy: float
    evidence: Any
    """shift and AdaBN effect without labels (`bnkit.pretrain.Evidence`)."""
    inspect: Any
    shift: Any
    compare: Any
    labelled: int
    files: tuple[str, ...]
    framework: str
    """`keras` or `torch`."""
    versions: str
    """the framework's version (and Keras' backend), bnkit's."""
    epochs: int
    seeds: int

    def to_json(self) -> str:
        """The story's numbers as a JSON document."""
        return json.dumps(
            {
                "framework": self.framework,
                "versions": self.versions,
                "epochs": self.epochs,
                "seeds": self.seeds,
                "pretrained_cached": self.pretrained_cached,
                "source_accuracy": self.source_accuracy,
                "without_labels": asdict(self.evidence),
                "inspect": json.loads(self.inspect.to_json())["totals"],
                "shift": json.loads(self.shift.to_json()),
                "compare": json.loads(self.compare.to_json()),
                "labelled": self.labelled,
                "files": list(self.files),
            },
            indent=2,
        )


def few_labels(
    x: np.ndarray, y: np.ndarray, per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` examples of every class, chosen by `seed`."""
    from bnkit.data import DataError

    rng = np.random.default_rng(seed)
    fewest = min(int((y == c).sum()) for c in np.unique(y))
    if not 1 <= per_class <= fewest:
        raise DataError(f"labels per class must lie in 1..{fewest} here, got {per_class}")
    idx = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    pick = np.sort(np.concatenate(idx))
    return x[pick], y[pick]


def digits_story(
    out_dir: Any,
    *,
    labels_per_class: int = STORY_LABELS_PER_CLASS,
    epochs: int = STORY_EPOCHS,
    seeds: int = STORY_SEEDS,
    progress: Any = None,
    on_status: Callable[[str], None] | None = None,
    framework: str = "keras",
    overwrite: bool = False,
) -> Story:
    """Pretrains (or loads from the cache) the residual CNN on the source digits, inspects
    it, measures its shift on the target, and compares the four BN strategies fine-tuning
    the whole network on `labels_per_class` labelled target images per class, validated
    on the target validation split. Writes shift.png, compare.png, compare.json and
    demo.json into `out_dir` (`-torch` names with `framework="torch"`, where the CNN is a
    PyTorch module, pretrained with a plain loop). Files of an earlier story there are
    replaced only with `overwrite`.
    """
    from pathlib import Path

    from bnkit import __version__
    from bnkit.compare import compare
    from bnkit.data import digits
    from bnkit.files import atomic_files, check_out_dir
    from bnkit.plots import compare_plot, shift_plot
    from bnkit.pretrain import adabn_evidence, pretrained_digits
    from bnkit.report import inspect
    from bnkit.stats import shift

    k = kit(framework)
    names = story_files(framework)
    out = check_out_dir(Path(out_dir), names, overwrite=overwrite)
    source, target = digits("source"), digits("target")
    tx, ty = few_labels(*target.train, labels_per_class)
    train = (k.images(tx), ty)
    net = pretrained_digits(on_status=on_status, framework=framework)
    shift_report = shift(net.model, k.images(target.train[0]))
    result = compare(
        net.model,
        train,
        (k.images(target.val[0]), target.val[1]),
        epochs=epochs,
        seeds=seeds,
        batch_size=STORY_BATCH,
        lr=STORY_LR,
        progress=progress,
    )
    files = tuple(str(out / n) for n in names)
    story = Story(
        pretrained_cached=net.cached,
        source_accuracy=k.accuracy(net.model, *source.test),
        evidence=adabn_evidence(net.model, framework=framework),
        inspect=inspect(net.model),
        shift=shift_report,
        compare=result,
        labelled=len(train[1]),
        files=files,
        framework=framework,
        versions=f"{k.version()}, bnkit {__version__}",
        epochs=epochs,
        seeds=seeds,
    )
    with atomic_files(out, names) as paths:
        shift_png, compare_png, compare_json, demo_json = (paths[n] for n in names)
        shift_plot(shift_report, shift_png, title="shift of the target digits from the source")
        compare_plot(result, compare_png)
        compare_json.write_text(result.to_json())
        demo_json.write_text(story.to_json())
    return story
