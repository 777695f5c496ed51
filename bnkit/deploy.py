"""Deployment: every BN in inference mode and folded where it can be, the export verified
(original against export, one sample against a batch, training against inference) before
anything is written."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnkit.backends import get_backend
from bnkit.backends.base import CHANNELS_FIRST
from bnkit.data import DataError, check_input_shape, load
from bnkit.errors import BnkitError
from bnkit.files import atomic_dir, atomic_path, check_dir_output, check_output

TOLERANCE = 1e-4
"""Largest accepted difference, relative to max(1, largest absolute reference output)."""
CHECK_SAMPLES = 8
FOLDER_FORMATS = ("savedmodel",)
"""Formats written as a folder rather than a file named `*.{format}`."""


class ExportError(BnkitError):
    """An export whose checks failed; nothing was written."""


@dataclass(frozen=True)
class ExportReport:
    """What `export` wrote and what its checks measured."""

    path: str
    format: str
    bn_layers: int
    folded: int
    kept: int
    dropped: tuple[str, ...]
    samples: int
    tolerance: float
    max_diff_original: float
    """largest |export - original in inference| (relative to the output scale)."""
    max_diff_single: float
    """largest |one sample alone - the same sample in the batch|, relative."""
    max_diff_training: float
    """largest |called with training=True - inference|, relative."""

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        return (
            f"exported {self.path} ({self.format}): {self.folded} of {self.bn_layers} BN "
            f"layers folded, {self.kept} kept frozen, {len(self.dropped)} dropout/noise layers "
            f"dropped; checked on {self.samples} samples (relative tolerance "
            f"{self.tolerance:g}): export vs original {self.max_diff_original:.1e}, one "
            f"sample vs batch {self.max_diff_single:.1e}, training=True vs inference "
            f"{self.max_diff_training:.1e}"
        )


def export(
    model: Any,
    path: str | Path,
    *,
    fold: bool = True,
    format: str = "keras",
    check_data: Any = None,
    overwrite: bool = False,
) -> ExportReport:
    """Writes an inference-only copy of `model` that is safe to deploy, after checking it.

    Every BN is put in inference mode; with `fold`, each BN fed directly by a Conv2D,
    DepthwiseConv2D or Dense layer that feeds nothing else is folded into that layer's
    kernel and bias; the others stay as frozen BatchNormalization layers; dropout and
    noise layers are dropped. The copy uses plain Keras layers only, so it loads with
    `keras.models.load_model` without bnkit. Before writing, three checks run on
    `check_data` (8 samples of random normal inputs when None): the export matches the
    original model in inference mode, each sample predicted alone matches it predicted
    in a batch, and calling the export with `training=True` matches inference; each
    within TOLERANCE relative to the output scale. A failed check raises ExportError
    with the numbers and writes nothing. `model` is not modified.

    Args:
        model: a Keras model.
        path: where to write (`.keras` file, SavedModel folder, or `.onnx` file).
        fold: fold BN into the preceding layer where possible.
        format: `keras`, `savedmodel` (TensorFlow backend) or `onnx` (needs the
            backend's exporter: onnx and onnxscript on torch).
        check_data: inputs to check on, anything `bnkit.data.load` reads.
        overwrite: replace an existing output, only when it is one bnkit wrote of the
            same format (a SavedModel folder carries bnkit's marker file).

    Example:
        >>> import keras, bnkit, tempfile, pathlib
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
        ...                       keras.layers.BatchNormalization()])
        >>> r = bnkit.export(m, pathlib.Path(tempfile.mkdtemp()) / "m.keras")
        >>> (r.folded, r.kept)
        (1, 0)
    """
    backend = get_backend(model)
    deploy = backend.deployer()
    if format not in deploy.formats:
        raise BnkitError(
            f"unknown export format {format!r}: use one of {', '.join(deploy.formats)}"
        )
    out = Path(path)
    _check_path(out, format, overwrite)
    problem = deploy.format_problem(format)
    if problem is not None:
        raise BnkitError(problem)
    copy = deploy.inference_copy(model, fold=fold)
    x = _check_inputs(backend, model, check_data)
    ref = deploy.outputs(model, x)
    scale = max(1.0, float(np.max(np.abs(ref))))
    diffs = _verify(deploy, copy.model, ref, x, scale)
    if format in FOLDER_FORMATS:
        with atomic_dir(out, kind=format, overwrite=overwrite) as staged:
            _write(deploy, copy.model, staged / "model", format, x, ref, scale)
            for item in (staged / "model").iterdir():
                os.replace(item, staged / item.name)
            (staged / "model").rmdir()
    else:
        with atomic_path(out) as staged:
            staged.unlink()  # exporters refuse or append to an existing file
            _write(deploy, copy.model, staged, format, x, ref, scale)
    bn_layers = len(copy.folded) + len(copy.kept)
    return ExportReport(
        path=str(out),
        format=format,
        bn_layers=bn_layers,
        folded=len(copy.folded),
        kept=len(copy.kept),
        dropped=copy.dropped,
        samples=len(x),
        tolerance=TOLERANCE,
        max_diff_original=diffs[0],
        max_diff_single=diffs[1],
        max_diff_training=diffs[2],
    )


def _check_path(out: Path, format: str, overwrite: bool) -> None:
    """Checks the output before any work: a file output as `check_output` does; a
    SavedModel folder must be new, or a SavedModel bnkit wrote (with `overwrite`)."""
    suffix = None if format in FOLDER_FORMATS else f".{format}"
    if suffix is not None and out.suffix != suffix:
        raise BnkitError(f"{out}: a {format} export must end in '{suffix}'")
    if suffix is not None:
        check_output(out, suffix=suffix, overwrite=overwrite)
        return
    check_dir_output(out, kind=format, overwrite=overwrite)


def _check_inputs(backend: Any, model: Any, check_data: Any) -> np.ndarray:
    shape = backend.input_shape(model)
    if check_data is not None:
        x = next(iter(load(check_data, batch_size=CHECK_SAMPLES).inputs()))
        if shape is not None:
            check_input_shape(x, shape, "check data", backend.layout == CHANNELS_FIRST)
        return x
    if shape is None or any(d is None for d in shape):
        raise DataError(
            "the model's input shape is not fixed: give check_data (--check DATA) to verify "
            "the export on"
        )
    rng = np.random.default_rng(0)
    return rng.normal(size=(CHECK_SAMPLES, *shape)).astype(np.float32)


def _relative(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    if a.shape != b.shape:
        return float("inf")
    diff = np.abs(a - b)
    if not np.isfinite(diff).all():
        return float("inf")
    return float(diff.max()) / scale


def _verify(deploy: Any, copy: Any, ref: np.ndarray, x: np.ndarray, scale: float) -> tuple:
    got = deploy.outputs(copy, x)
    alone = np.concatenate([deploy.outputs(copy, x[i : i + 1]) for i in range(len(x))])
    training = deploy.outputs(copy, x, training=True)
    diffs = (
        _relative(got, ref, scale),
        _relative(alone, got, scale),
        _relative(training, got, scale),
    )
    names = ("export vs original", "one sample vs batch", "training=True vs inference")
    failed = [f"{n} {d:.2e}" for n, d in zip(names, diffs, strict=True) if d > TOLERANCE]
    if failed:
        raise ExportError(
            f"export check failed (relative tolerance {TOLERANCE:g}): {'; '.join(failed)}; "
            "nothing was written"
        )
    return diffs


def _write(
    deploy: Any, model: Any, staged: Path, format: str, x: np.ndarray, ref: np.ndarray, scale: float
) -> None:
    """Writes the export to `staged` and checks what was written against `ref`."""
    deploy.write(model, staged, format, x)
    got = deploy.run_written(staged, format, x)
    diff = _relative(got, ref, scale)
    if diff > TOLERANCE:
        raise ExportError(
            f"the written {format} export differs from the original by {diff:.2e} (relative "
            f"tolerance {TOLERANCE:g}); nothing was written"
        )
