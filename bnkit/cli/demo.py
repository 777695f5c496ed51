"""`bnkit digits`, `bnkit demo` and `bnkit traps`: the embedded data, the whole story
on it, and the traps tables."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from bnkit.cli._app import (
    FRAMEWORK_CHOICE,
    MAX_DIGITS_SIZE,
    MAX_EPOCHS,
    _epilog,
    _err,
    _out,
    cli,
)
from bnkit.cli._options import _runs_options
from bnkit.cli.compare import _CompareProgress

DEMO_LEGEND = """\
Each row starts from the same weights and trains the whole network for the same steps.
- Keras' own bn.trainable = False works, until the usual base.trainable = True undoes it.
- base(x, training=False) freezes nothing once the base is trainable: fit overrides it.
- Selecting BN by name misses layers: no Keras 3 BN name starts with 'bn'.
- bnkit's modes are pinned and verified by watch: frozen keeps everything, affine trains
  only gamma/beta, train trains all four, adapt stays frozen until re-estimated."""


DEMO_LEGEND_TORCH = """\
Each row starts from the same weights and trains with the usual loop: model.train(), then
SGD over the parameters that require grad.
- requires_grad=False stops gamma/beta, not the statistics: train() still updates them.
- bn.eval() is undone by the next model.train().
- Lightning's BaseFinetuning.freeze keeps the statistics by setting track_running_stats=False,
  so BN normalises every training batch with its own statistics, unlike inference.
- timm's freeze and torchvision's FrozenBatchNorm2d swap the modules: frozen for good, and
  no mode but frozen (bnkit reports them as frozen).
- bnkit's modes are pinned through model.train() and verified by watch."""


@cli.command(
    "digits", epilog=_epilog("bnkit digits -o digits/", "bnkit digits -o d16/ --image-size 16",
                             model=False)
)  # fmt: skip
@click.option(
    "-o",
    "--output",
    "folder",
    type=click.Path(path_type=Path),
    default=Path("bnkit-digits"),
    show_default=True,
    help="The folder to write the data and the model into.",
)
@click.option("--seed", default=0, show_default=True, help="Split, patches and training seed.")
@click.option(
    "--image-size",
    "size",
    default=32,
    show_default=True,
    type=click.IntRange(8, MAX_DIGITS_SIZE),
    help="Image side in pixels.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace the files an earlier bnkit digits wrote there."
)
def digits_cmd(folder: Path, seed: int, size: int, overwrite: bool) -> None:
    """Write the embedded digits (source and MNIST-M-style target, train/val/test .npz) and
    the model pretrained on the source into FOLDER; print the shift and AdaBN evidence."""
    from bnkit.backends import save_model
    from bnkit.files import atomic_files, check_out_dir
    from bnkit.pretrain import DIGITS_FILES, adabn_evidence, pretrained_digits, write_digits

    model_name = "digits-resnet.keras"
    check_out_dir(folder, (model_name, *DIGITS_FILES), overwrite=overwrite)
    with _err.status("pretraining on the source digits (cached after the first run)..."):
        net = pretrained_digits(size=size, seed=seed)
    with atomic_files(folder, (model_name, *DIGITS_FILES)) as paths:
        save_model(net.model, paths[model_name])
        written = write_digits(paths[model_name].parent, size=size, seed=seed)
        with _err.status("measuring shift and the effect of adapt..."):
            evidence = adabn_evidence(net.model, size=size, seed=seed)
    _out.print(str(evidence), highlight=False)
    _out.print(
        f"wrote {folder / model_name} and {len(written)} .npz files "
        f"({', '.join(p.name for p in written)}) into {folder}",
        highlight=False,
    )


@cli.command(
    "demo", epilog=_epilog("bnkit demo", "bnkit demo --framework torch --skip-traps --epochs 5",
                           model=False)
)  # fmt: skip
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("bnkit-demo"),
    show_default=True,
    help="Folder for the figures and JSON.",
)
@click.option(
    "--labels-per-class",
    default=20,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Labelled target images per class for the fine-tunes.",
)
@_runs_options(epochs=10)
@click.option("--skip-traps", is_flag=True, help="Leave out the traps tables.")
@click.option(
    "--overwrite", is_flag=True, help="Replace the figures and JSON an earlier demo wrote there."
)
@click.option(
    "--framework",
    type=FRAMEWORK_CHOICE,
    default="both",
    show_default=True,
    help="Tell the story with Keras, with PyTorch, or with both.",
)
def demo_cmd(
    out_dir: Path,
    labels_per_class: int,
    epochs: int,
    seeds: int,
    skip_traps: bool,
    overwrite: bool,
    framework: str,
) -> None:
    """The whole story on the embedded data, in Keras and in PyTorch: the traps, a model
    pretrained on the source digits, inspect and shift on the target, and compare of the
    BN strategies."""
    from bnkit.demo import story_files
    from bnkit.files import check_out_dir

    frameworks = ["keras", "torch"] if framework == "both" else [framework]
    names = tuple(n for f in frameworks for n in story_files(f))
    check_out_dir(out_dir, names, overwrite=overwrite)
    if "torch" in frameworks:
        # torch 2.14's first import of torch._dynamo (torch.optim makes it) crashes once
        # TensorFlow is loaded (its bundled triton): import it before Keras loads TF
        import torch._dynamo  # noqa: F401
    for f in frameworks:
        _story(f, out_dir, labels_per_class, epochs, seeds, skip_traps, overwrite)


def _story(
    framework: str,
    out_dir: Path,
    labels_per_class: int,
    epochs: int,
    seeds: int,
    skip: bool,
    overwrite: bool,
) -> None:
    from bnkit.demo import digits_story, kit

    name = "Keras 3" if framework == "keras" else "PyTorch"
    if not skip:
        _out.rule(
            f"{name} 1. What each way of freezing BN really does ({kit(framework).TRAPS_TITLE})"
        )
        _traps(steps=2, input_size=32, framework=framework)
    _out.rule(f"{name} 2. Transfer to a shifted domain: digits -> MNIST-M-style digits")
    with _CompareProgress() as bars:
        story = digits_story(
            out_dir, labels_per_class=labels_per_class, epochs=epochs, seeds=seeds,
            progress=bars, on_status=lambda msg: _err.print(msg), framework=framework,
            overwrite=overwrite,
        )  # fmt: skip
    cached = "loaded from the cache" if story.pretrained_cached else "trained now, then cached"
    _out.print(
        f"pretrained residual CNN ({cached}): {story.source_accuracy:.1%} on held-out source "
        "digits",
        highlight=False,
    )
    _out.print(f"inspect: {story.inspect.summary().splitlines()[0]}", highlight=False)
    _out.print(story.shift.table())
    _out.print(f"shift: {story.shift}", highlight=False)
    ev = story.evidence
    _out.print(
        f"without labels: target accuracy {ev.accuracy_target:.1%} with the source statistics, "
        f"{ev.accuracy_adapted:.1%} after adapt on unlabelled target images "
        f"({ev.accuracy_adapted - ev.accuracy_target:+.1%})",
        highlight=False,
    )
    _out.print(
        f"compare: whole network fine-tuned on {story.labelled} labelled target images, "
        f"{epochs} epochs, validated on the target validation split",
        highlight=False,
    )
    _out.print(story.compare.table())
    _out.print(str(story.compare), highlight=False)
    _out.print(f"wrote {', '.join(story.files)}", highlight=False)


@cli.command(
    "traps", epilog=_epilog("bnkit traps", "bnkit traps --framework torch --json", model=False)
)
@click.option(
    "--train-steps",
    "steps",
    default=2,
    show_default=True,
    type=click.IntRange(1, MAX_EPOCHS),
    help="Training steps per approach.",
)
@click.option(
    "--image-size",
    "input_size",
    default=32,
    show_default=True,
    type=click.IntRange(min=32),
    help="Image side in pixels (ResNet50V2 and ResNet-50 need 32 or more).",
)
@click.option(
    "--framework",
    type=click.Choice(["keras", "torch"]),
    default="keras",
    show_default=True,
    help="Keras 3's ResNet50V2, or torchvision's ResNet-50 with PyTorch's, Lightning's, "
    "timm's and PEFT's ways.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def traps_cmd(steps: int, input_size: int, framework: str, as_json: bool) -> None:
    """Show what each way of freezing BN really does, in Keras 3 or in PyTorch."""
    _traps(steps, input_size, as_json, framework)


def _traps(steps: int, input_size: int, as_json: bool = False, framework: str = "keras") -> None:
    from bnkit.demo import kit, seed_demo

    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing chatter per approach
    with _err.status(f"training {kit(framework).TRAPS_TITLE} once per approach..."):
        result = seed_demo(input_size=input_size, steps=steps, framework=framework)
    if as_json:
        click.echo(result.to_json())
        return
    _out.print(result.table())
    _out.print(DEMO_LEGEND if framework == "keras" else DEMO_LEGEND_TORCH, highlight=False)
