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

from bnkit.backends import get_backend, readable
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
    kept_reasons: tuple[tuple[str, str], ...] = ()
    """(BN layer, why it was not folded) for each BN kept as a fixed layer."""

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        if self.bn_layers == 0:
            return (
                f"exported {self.path} ({self.format}): the model has no BN layer, nothing "
                f"to fold; {len(self.dropped)} dropout/noise layers dropped; checked on "
                f"{self.samples} samples (relative tolerance {self.tolerance:g}): export vs "
                f"original {self.max_diff_original:.1e}"
            )
        return (
            f"exported {self.path} ({self.format}): {self.folded} of {self.bn_layers} BN "
            f"layers folded, {self.kept} kept frozen, {len(self.dropped)} dropout/noise layers "
            f"dropped; checked on {self.samples} samples (relative tolerance "
            f"{self.tolerance:g}): export vs original {self.max_diff_original:.1e}, one "
            f"sample vs batch {self.max_diff_single:.1e}, training=True vs inference "
            f"{self.max_diff_training:.1e}"
        ) + "".join(f"\n  kept {path}: {why}" for path, why in self.kept_reasons)


@dataclass(frozen=True)
class FoldResult:
    """An inference-only copy of a model, checked against it."""

    model: Any
    """the copy: BN folded or fixed, dropout removed; the input model is unchanged."""
    folded: tuple[str, ...]
    kept: tuple[tuple[str, str], ...]
    """(BN layer, why it was not folded) for each BN kept as a fixed layer."""
    dropped: tuple[str, ...]
    samples: int
    max_diff_original: float
    max_diff_single: float
    max_diff_training: float

    def __str__(self) -> str:
        if not self.folded and not self.kept:
            return (
                f"the model has no BN layer: nothing to fold; {len(self.dropped)} "
                f"dropout/noise layers dropped; checked on {self.samples} samples"
            )
        lines = [
            f"{len(self.folded)} of {len(self.folded) + len(self.kept)} BN layers folded, "
            f"{len(self.kept)} kept fixed, {len(self.dropped)} dropout/noise layers dropped; "
            f"checked on {self.samples} samples: vs original {self.max_diff_original:.1e}, "
            f"one sample vs batch {self.max_diff_single:.1e}, training vs inference "
            f"{self.max_diff_training:.1e}"
        ]
        lines += [f"  kept {path}: {why}" for path, why in self.kept]
        return "\n".join(lines)


def fold(
    model: Any,
    example: Any = None,
    *,
    enabled: bool = True,
    input_shape: tuple[int, ...] | None = None,
) -> FoldResult:
    """An inference-only copy of `model`, in memory, checked before it is returned.

    Each BN fed directly by a layer that can absorb it (Keras: Conv2D, DepthwiseConv2D,
    Dense; PyTorch: Conv1d/2d/3d, Linear) whose output feeds nothing else is folded into
    that layer; every other BN is kept fixed in inference mode (Keras: a non-trainable
    BatchNormalization; PyTorch: a per-channel affine module), each with the reason it
    could not be folded; dropout and noise layers are removed. The copy is made of the
    framework's own layers (no bnkit class) and computes the same in training and
    inference mode. Three checks run on `example` (8 samples of random normal inputs of
    the model's input shape, or of `input_shape`, when None): the copy matches the
    original in inference mode, each sample alone matches it in a batch, and training
    mode matches inference mode, each within TOLERANCE relative to the output scale;
    ExportError otherwise. For `torch.compile`, quantization or your own export.

    A `torch.export` program (or its `.module()`) is folded in its graph: each BN
    operator that a convolution or linear operator alone feeds goes into that operator's
    weight and bias, the others stay as exported; the result is a GraphModule to export
    again. A graph exported in training mode is refused (check BN019).

    Args:
        model: a Keras model or a PyTorch module (not modified).
        example: inputs to check on, anything `bnkit.data.load` reads.
        enabled: fold where possible (False keeps every BN as a fixed layer).
        input_shape: one sample's shape, for random check inputs (PyTorch modules
            have no declared input shape).

    Examples:
        >>> import torch, bnkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> r = bnkit.fold(net, input_shape=(3, 8, 8))
        >>> (r.folded, r.kept, type(r.model[1]).__name__)
        (('1',), (), 'Identity')
    """
    model = readable(model)
    backend = get_backend(model)
    deploy = backend.deployer()
    return _folded(deploy, model, _check_inputs(backend, model, example, input_shape), enabled)


def _folded(deploy: Any, model: Any, x: np.ndarray, enabled: bool) -> FoldResult:
    copy = deploy.inference_copy(model, fold=enabled, example=x)
    ref = deploy.outputs(model, x)
    scale = max(1.0, float(np.max(np.abs(ref))))
    diffs = _verify(deploy, copy.model, ref, x, scale, original=model)
    return FoldResult(copy.model, copy.folded, copy.reasons, copy.dropped, len(x), *diffs)


def export(
    model: Any,
    path: str | Path,
    *,
    fold: bool = True,
    format: str | None = None,
    check_data: Any = None,
    input_shape: tuple[int, ...] | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Writes an inference-only copy of `model` that is safe to deploy, after checking it.

    The copy is `bnkit.fold`'s: BN folded into the layer feeding it where possible, the
    rest fixed in inference mode, dropout removed, the framework's own layers only (a
    Keras export loads with `keras.models.load_model` without bnkit; a PyTorch export
    runs with `torch.export.load` or onnxruntime). Before writing, three checks run on
    `check_data` (8 samples of random normal inputs when None): the export matches the
    original model in inference mode, each sample predicted alone matches it predicted
    in a batch, and training mode matches inference; each within TOLERANCE relative to
    the output scale. Then the written file is loaded and checked against the original
    once more. A failed check raises ExportError with the numbers and writes nothing.
    `model` is not modified.

    Args:
        model: a Keras model or a PyTorch module.
        path: where to write: `.keras`, SavedModel folder or `.onnx` (Keras); `.pt2`
            (a `torch.export` program) or `.onnx` (PyTorch).
        fold: fold BN into the preceding layer where possible.
        format: `keras`, `savedmodel` (TensorFlow backend), `onnx` or `pt2`; by default
            the one `path`'s suffix names, else the backend's first (`keras`, `pt2`).
        check_data: inputs to check on, anything `bnkit.data.load` reads.
        input_shape: one sample's shape, for random check inputs (PyTorch modules).
        overwrite: replace an existing output, only when it is one bnkit wrote of the
            same format (a SavedModel folder carries bnkit's marker file).

    Examples:
        >>> import keras, bnkit, tempfile, pathlib
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
        ...                       keras.layers.BatchNormalization()])
        >>> r = bnkit.export(m, pathlib.Path(tempfile.mkdtemp()) / "m.keras")
        >>> (r.folded, r.kept)
        (1, 0)
    """
    model = readable(model)
    backend = get_backend(model)
    deploy = backend.deployer()
    if not isinstance(path, str | os.PathLike):
        raise BnkitError(
            f"path must be a file name, got {path!r} ({type(path).__name__}); e.g. 'model.onnx'"
        )
    out = Path(path)
    if format is None:
        by_suffix = out.suffix[1:]
        format = by_suffix if by_suffix in deploy.formats else deploy.formats[0]
    if format not in deploy.formats:
        raise BnkitError(
            f"unknown export format {format!r} for this model: use one of "
            f"{', '.join(deploy.formats)}"
        )
    _check_path(out, format, overwrite)
    problem = deploy.format_problem(format)
    if problem is not None:
        raise BnkitError(problem)
    x = _check_inputs(backend, model, check_data, input_shape)
    result = _folded(deploy, model, x, fold)
    ref = deploy.outputs(model, x)
    scale = max(1.0, float(np.max(np.abs(ref))))
    if format in FOLDER_FORMATS:
        with atomic_dir(out, kind=format, overwrite=overwrite) as staged:
            _write(deploy, result.model, staged / "model", format, x, ref, scale)
            for item in (staged / "model").iterdir():
                os.replace(item, staged / item.name)
            (staged / "model").rmdir()
    else:
        with atomic_path(out) as staged:
            staged.unlink()  # exporters refuse or append to an existing file
            _write(deploy, result.model, staged, format, x, ref, scale)
    return ExportReport(
        path=str(out),
        format=format,
        bn_layers=len(result.folded) + len(result.kept),
        folded=len(result.folded),
        kept=len(result.kept),
        dropped=result.dropped,
        samples=len(x),
        tolerance=TOLERANCE,
        max_diff_original=result.max_diff_original,
        max_diff_single=result.max_diff_single,
        max_diff_training=result.max_diff_training,
        kept_reasons=result.kept,
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


def _check_inputs(
    backend: Any, model: Any, check_data: Any, input_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    shape = backend.input_shape(model) if input_shape is None else tuple(input_shape)
    if isinstance(check_data, np.ndarray) and check_data.dtype == np.float32:
        return check_data
    if check_data is not None:
        x = next(iter(load(check_data, batch_size=CHECK_SAMPLES).inputs()))
        if shape is not None:
            check_input_shape(x, shape, "check data", backend.layout == CHANNELS_FIRST)
        return x
    if shape is None or any(d is None for d in shape):
        raise DataError(
            "the model's input shape is not fixed or not known: give check_data (--val "
            "DATA) or input_shape (--input-shape) to verify the export on"
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


def _verify(
    deploy: Any,
    copy: Any,
    ref: np.ndarray,
    x: np.ndarray,
    scale: float,
    original: Any = None,
) -> tuple:
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
            f"nothing was written{_unstable(deploy, original, ref, x, scale)}"
        )
    return diffs


def _unstable(deploy: Any, original: Any, ref: np.ndarray, x: np.ndarray, scale: float) -> str:
    """Why a check may fail through no fault of the export: the model itself answers a
    sample alone differently than in a batch, in inference (rounding differences grow
    through a network with random weights, or statistics far from its activations)."""
    if original is None:
        return ""
    alone = np.concatenate([deploy.outputs(original, x[i : i + 1]) for i in range(len(x))])
    gap = _relative(alone, ref, scale)
    if gap <= TOLERANCE:
        return ""
    return (
        f"; the model itself answers one sample alone and in a batch {gap:.2e} apart in "
        "inference, so no export can match it: it is numerically unstable (random weights, "
        "or BN statistics far from its activations: bnkit.adapt first)"
    )


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
