"""Data in: image folders, `.npz` files, arrays, `tf.data`, `PyDataset` and iterables of
batches, checked and scaled before any model sees them; and the embedded demo data."""

from __future__ import annotations

import contextlib
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bnkit.errors import BnkitError, closest

DEFAULT_BATCH_SIZE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LISTED_FILES = 5
"""How many offending files an error message names."""

_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PREPROCESS_FAMILIES = {
    "caffe": ("resnet", "resnet50", "resnet101", "resnet152", "vgg16", "vgg19"),
    "tf": (
        "resnet_v2",
        "mobilenet",
        "mobilenet_v2",
        "inception_v3",
        "inception_resnet_v2",
        "xception",
        "nasnet",
    ),
    "torch": ("densenet",),
    "none": ("efficientnet", "efficientnet_v2", "convnext", "regnet", "mobilenet_v3"),
}
"""`keras.applications` modules by what their `preprocess_input` does to 0-255 RGB pixels."""


class DataError(BnkitError):
    """Data that bnkit cannot use: empty, unreadable, non-finite, or of the wrong shape."""


# ---------------------------------------------------------------------- scaling


@dataclass(frozen=True)
class Scaling:
    """How raw inputs are mapped to what the model expects: a factor, or a named
    `keras.applications` preprocessing (`caffe`, `tf`, `torch`, `none`, or a module
    name such as `resnet_v2`)."""

    factor: float = 1.0
    mode: str = "none"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x * np.float32(self.factor) if self.factor != 1.0 else x
        if self.mode == "tf":
            return x / np.float32(127.5) - np.float32(1.0)
        if self.mode == "torch":
            return (x / np.float32(255.0) - _TORCH_MEAN) / _TORCH_STD
        if self.mode == "caffe":
            return x[..., ::-1] - _CAFFE_MEAN_BGR
        return x

    def __str__(self) -> str:
        if self.mode != "none":
            return f"preprocess {self.mode}"
        return "none" if self.factor == 1.0 else f"x {self.factor:g}"


def parse_scaling(scale: float | str | None = None, preprocess: str | None = None) -> Scaling:
    """A Scaling from `scale` (a number or a fraction such as `"1/255"`) and/or a named
    preprocessing (a `keras.applications` module name or `caffe`/`tf`/`torch`/`none`).

    Examples:
        >>> parse_scaling("1/255").factor == 1 / 255
        True
        >>> parse_scaling(preprocess="resnet_v2").mode
        'tf'
    """
    factor = _parse_factor(scale) if scale is not None else 1.0
    if not np.isfinite(factor) or factor == 0.0:
        raise DataError(f"scale must be a finite, non-zero number such as 1/255, got {scale!r}")
    if preprocess is None:
        return Scaling(factor)
    name = preprocess.strip().lower()
    for mode, modules in PREPROCESS_FAMILIES.items():
        if name == mode or name in modules:
            return Scaling(factor, mode)
    known = sorted(
        {m for ms in PREPROCESS_FAMILIES.values() for m in ms} | set(PREPROCESS_FAMILIES)
    )
    near = closest(name, known)
    raise DataError(
        f"unknown preprocessing {preprocess!r}"
        + (f" ({near})" if near else "")
        + f"; known: {', '.join(known)}"
    )


def _parse_factor(scale: float | str) -> float:
    if isinstance(scale, int | float):
        return float(scale)
    text = scale.strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise DataError(
            f"cannot read scale {scale!r}: give a number such as 1/255 or 0.5"
        ) from None


# ---------------------------------------------------------------------- sources


@dataclass
class Data:
    """Re-iterable batches `(x, y)` (`y` may be None), float32, scaled, checked.

    Make one with `load`. Iterating twice reads the source twice: nothing is held
    beyond one batch for folders and streams.
    """

    source: Any
    batch_size: int = DEFAULT_BATCH_SIZE
    scaling: Scaling = field(default_factory=Scaling)
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    num_classes: int | None = None
    description: str = "data"
    size: int | None = None
    class_names: tuple[str, ...] = ()
    channels_first: bool = False
    """yield image batches as (N, C, H, W), as PyTorch modules take them; array sources
    are then read as (N, C, H, W) too (folders always hold images channels-last)."""
    shard: tuple[int, int] | None = None
    """(rank, world): yield only the batches k with k % world == rank."""

    def sharded(self, rank: int, world: int) -> Data:
        """This process's share of the batches in a job of `world` processes: batch k
        goes to rank k % world (a rank may get none)."""
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is outside 0..{world - 1}")
        return replace(self, shard=(rank, world))

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """The batches; a last batch of one sample joins the one before it (BN cannot take
        a variance from one value per channel)."""
        before: tuple[np.ndarray, np.ndarray | None] | None = None
        last: tuple[np.ndarray, np.ndarray | None] | None = None
        for batch in self._checked():
            if before is not None:
                yield before
            before, last = last, batch
        if before is not None and last is not None and len(last[0]) == 1:
            yield _joined(before, last)
            return
        for rest in (before, last):
            if rest is not None:
                yield rest

    def _checked(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        seen = 0
        for k, (x, y) in enumerate(_pairs(self.source, self.batch_size)):
            seen += 1
            if self.shard is not None and k % self.shard[1] != self.shard[0]:
                continue
            x = to_numpy(x)
            check_array(x, f"batch {k} of {self.description}")
            x = np.asarray(x, dtype=np.float32)
            _check_finite(x, k)
            swap = self.channels_first and x.ndim == 4
            if swap and not isinstance(self.source, _FolderSource):
                x = x.transpose(0, 2, 3, 1)  # processed channels-last, handed back as given
            images = x.ndim == 4 and x.shape[-1] in (1, 3, 4)  # else no resize: a layout error
            if self.image_size is not None and images and x.shape[1:3] != self.image_size:
                x = _resize_batch(x, self.image_size)
            if self.channels is not None and x.ndim == 4 and x.shape[-1] != self.channels:
                x = _convert_channels(x, self.channels, k)
            if y is not None:
                y = to_numpy(y)
                check_labels_array(y, f"the labels of batch {k}")
                y = np.asarray(y)
                _check_labels(y, len(x), self.num_classes, k)
            if str(self.scaling) != "none":  # a factor can overflow or underflow float32
                _check_preprocess_channels(x, self.scaling, k)
                raw, x = x, self.scaling(x)
                _check_finite(x, k, scaled=True)
                if _constant(x) and not _constant(raw):
                    raise DataError(
                        f"batch {k}: every value is {float(x.flat[0]):g} after scaling "
                        f"({self.scaling}): the factor is too small for float32 and the data "
                        "underflows; check --scale"
                    )
            if swap:
                x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            yield x, y
        if seen == 0:
            raise DataError(f"{self.description} is empty: give at least one sample")

    def with_classes(self, names: Sequence[str]) -> Data:
        """This image folder with its labels given by class name in `names` (another
        folder's classes: training's, for validation data), not by folder position.
        DataError names a class folder that `names` lacks."""
        names = tuple(names)
        if not isinstance(self.source, _FolderSource) or self.class_names == names:
            return self
        have = {c for _, c in self.source.files}
        unknown = [n for i, n in enumerate(self.class_names) if i in have and n not in names]
        if unknown:
            raise DataError(
                f"{self.description}: class folders {', '.join(map(repr, unknown))} are not "
                f"among the training classes ({', '.join(names)}); remove them or add them "
                "to the training data"
            )
        index = {i: names.index(n) for i, n in enumerate(self.class_names) if n in names}
        files = tuple((path, index[c]) for path, c in self.source.files)
        return replace(self, source=replace(self.source, files=files), class_names=names)

    def inputs(self, max_batches: int | None = None) -> Iterator[np.ndarray]:
        """The input batches alone, at most `max_batches` of them."""
        for k, (x, _) in enumerate(self):
            if max_batches is not None and k >= max_batches:
                return
            yield x

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every batch concatenated: for data that fits in memory."""
        xs, ys = [], []
        for x, y in self:
            xs.append(x)
            if y is not None:
                ys.append(y)
        y_all = np.concatenate(ys) if len(ys) == len(xs) else None
        return np.concatenate(xs), y_all


def _joined(
    a: tuple[np.ndarray, np.ndarray | None], b: tuple[np.ndarray, np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray | None]:
    y = None if a[1] is None or b[1] is None else np.concatenate([a[1], b[1]])
    return np.concatenate([a[0], b[0]]), y


class _Replay:
    """A one-shot iterator (a generator of batches) made re-iterable: the first pass keeps
    the batches it reads, later passes replay them (bnkit's `tta` and `compare` read the
    data more than once; the batches are held in memory)."""

    def __init__(self, source: Iterator[Any]) -> None:
        self._source = source
        self._seen: list[Any] = []
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        yield from list(self._seen)
        if self._done:
            return
        for batch in self._source:
            self._seen.append(batch)
            yield batch
        self._done = True


def load(
    source: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    scale: float | str | None = None,
    preprocess: str | None = None,
    num_classes: int | None = None,
    channels_first: bool = False,
) -> Data:
    """Wraps any supported data source as checked, scaled batches.

    Args:
        source: a directory of class sub-folders of images, an `.npz` file with `x`
            (and optionally `y`), an array, an `(x, y)` tuple of arrays, a
            `tf.data.Dataset`, a `keras.utils.PyDataset`, a `torch.utils.data.Dataset`
            of samples (each `x` or `(x, y)`, batched here), a `DataLoader`, or any
            iterable of batches (each an array or an `(x, y)` pair).
        batch_size: batch size for folders and arrays (streams keep theirs).
        image_size: `(height, width)` to resize images to (the model's input size).
        channels: convert images to this many channels (1 or 3); an image folder
            with mixed channel counts needs it.
        scale: multiply inputs by this (`"1/255"` maps 0-255 pixels to 0-1).
        preprocess: a `keras.applications` preprocessing by module name (such as
            `"resnet_v2"`) or mode (`caffe`, `tf`, `torch`), applied after `scale`.
        num_classes: when given, labels must lie in `[0, num_classes)`.
        channels_first: image batches as (N, C, H, W), for PyTorch modules: folders are
            transposed, arrays are taken as (N, C, H, W); resizing, channel conversion
            and preprocessing work the same.

    Raises:
        DataError: naming the file or batch and what is wrong.

    Examples:
        >>> d = load(np.zeros((7, 8, 8, 1)), batch_size=3, scale="1/255")
        >>> [x.shape[0] for x, _ in d]  # a last batch of one sample joins the one before
        [3, 4]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be a whole number of at least 1, got {batch_size!r}")
    if image_size is not None:
        h, w = image_size
        check_fits_memory(
            (batch_size, h, w, 4), f"a batch of {batch_size} images of {h}x{w} (image_size)"
        )
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "scaling": parse_scaling(scale, preprocess),
        "image_size": tuple(image_size) if image_size is not None else None,
        "channels": channels,
        "num_classes": num_classes,
        "channels_first": channels_first,
    }
    if isinstance(source, Data):
        return source
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_dir():
            return _image_folder(path, common)
        if path.suffix == ".npz" or path.exists():
            x, y = load_npz(path)
            return Data((x, y), description=str(path), size=len(x), **common)
        raise DataError(f"{path}: no such file or directory; check the path")
    source = _from_tensors(source)
    if isinstance(source, np.ndarray) or (
        isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray)
    ):
        x = source if isinstance(source, np.ndarray) else source[0]
        check_array(x, "x")
        if isinstance(source, tuple) and source[1] is not None:
            check_labels_array(source[1], "y")
            if len(source[1]) != len(x):
                raise DataError(f"x has {len(x)} samples but y has {len(source[1])}: give one each")
        return Data(source, description="the array", size=len(x), **common)
    if _is_sample_dataset(source):
        return Data(_Samples(source), description=type(source).__name__, size=len(source), **common)
    if _is_pydataset(source) or isinstance(source, Iterable):
        description = type(source).__name__
        if isinstance(source, Iterator):
            source = _Replay(source)
        return Data(source, description=description, **common)
    raise DataError(
        f"cannot read data of type {type(source).__name__}: give a folder, an .npz file, "
        "an array, a tf.data.Dataset, a PyDataset, a torch Dataset or DataLoader, or an "
        "iterable of batches"
    )


EXAMPLE_BATCH = 8
"""Samples of random inputs that check and export run when given only an input shape."""
MEMORY_SHARE = 0.5
"""The largest share of this machine's memory one batch of float32 inputs may take."""


def check_fits_memory(shape: Sequence[int], what: str) -> None:
    """Raises DataError when a float32 array of `shape` (one batch) would take more than
    MEMORY_SHARE of this machine's memory, before anything is allocated."""
    import os

    need = 4 * float(np.prod([float(d) for d in shape]))
    try:
        have = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return
    if need > MEMORY_SHARE * have:
        raise DataError(
            f"{what} takes {_bytes(need)} as float32, more than half of this machine's "
            f"memory ({_bytes(have)}); give a smaller size"
        )


def _bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def _is_tensor(obj: Any) -> bool:
    """A framework tensor (torch, TensorFlow, JAX) that converts to NumPy, recognised
    without importing any framework."""
    return (
        not isinstance(obj, np.ndarray)
        and hasattr(obj, "shape")
        and hasattr(obj, "dtype")
        and (hasattr(obj, "detach") or hasattr(obj, "numpy") or hasattr(obj, "__array__"))
    )


def to_numpy(obj: Any) -> Any:
    """A tensor as a NumPy array (torch tensors detached and moved to the CPU); anything
    else unchanged."""
    if not _is_tensor(obj):
        return obj
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu()
        if str(obj.dtype) in ("torch.bfloat16",):
            obj = obj.float()
    return np.asarray(obj)


def _from_tensors(source: Any) -> Any:
    if _is_tensor(source):
        return to_numpy(source)
    if isinstance(source, tuple | list) and len(source) == 2 and _is_tensor(source[0]):
        return to_numpy(source[0]), None if source[1] is None else to_numpy(source[1])
    return source


def batches(
    data: Any, batch_size: int = DEFAULT_BATCH_SIZE, max_batches: int | None = None
) -> Iterator[np.ndarray]:
    """Yields float32 input batches from any source `load` reads, checked for NaN and inf.

    Examples:
        >>> [b.shape for b in batches(np.zeros((6, 2)), batch_size=4)]
        [(4, 2), (2, 2)]
    """
    return load(data, batch_size=batch_size).inputs(max_batches)


def check_input_shape(
    x: np.ndarray,
    expected: Sequence[int | None],
    what: str = "data",
    channels_first: bool = False,
) -> None:
    """Raises DataError when samples of `x` cannot go into a model taking `expected`
    (images channels-last, or channels-first with `channels_first`)."""
    got = tuple(x.shape[1:])
    want = tuple(expected)
    if len(got) == len(want) and all(w is None or w == g for g, w in zip(got, want, strict=True)):
        return
    hint = ""
    if len(got) == len(want) == 3:
        hint = _image_hint(got, want, channels_first)
    raise DataError(
        f"{what} has samples of shape {got} but the model takes {_shape_str(want)}{hint}"
    )


def _image_hint(got: tuple[int, ...], want: tuple[int | None, ...], channels_first: bool) -> str:
    """What to do about an image batch of the wrong shape: transpose, convert or resize."""
    channels = want[0] if channels_first else want[-1]
    size = want[1:] if channels_first else want[:2]
    swapped = got[-1] == channels if channels_first else got[0] == channels
    if swapped and channels in (1, 3, 4):
        layout, fix = (
            ("first (N, C, H, W)", "x.transpose(0, 3, 1, 2)")
            if channels_first
            else ("last (N, H, W, C)", "x.transpose(0, 2, 3, 1)")
        )
        return f"; the model takes channels-{layout} images: {fix}"
    if (got[0] if channels_first else got[-1]) != channels:
        return f"; convert the channels (channels={channels}, --channels {channels})"
    return f"; resize the images (image_size={tuple(size)})"


def _shape_str(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _pairs(source: Any, batch_size: int) -> Iterable[tuple[Any, Any]]:
    if isinstance(source, _FolderSource):
        return iter(source)
    if isinstance(source, _Samples):
        return source.batches(batch_size)
    if isinstance(source, np.ndarray):
        return ((source[i : i + batch_size], None) for i in range(0, len(source), batch_size))
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        x, y = source
        return (
            (x[i : i + batch_size], None if y is None else y[i : i + batch_size])
            for i in range(0, len(x), batch_size)
        )
    if _is_pydataset(source):
        return (_split(source[i]) for i in range(_num_batches(source)))
    return (_split(b) for b in source)


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, tuple | list):
        if len(batch) == 0:
            raise DataError("a batch is an empty tuple: give x or (x, y)")
        return batch[0], batch[1] if len(batch) > 1 else None
    if isinstance(batch, dict):
        raise DataError("batches of dicts are not supported: give x or (x, y) arrays")
    return batch, None


def _is_sample_dataset(source: Any) -> bool:
    """A map-style dataset of single samples (a `torch.utils.data.Dataset`): indexable and
    sized, not iterable, not a PyDataset."""
    return (
        hasattr(source, "__getitem__")
        and hasattr(source, "__len__")
        and not hasattr(source, "__iter__")
        and not _is_pydataset(source)
    )


@dataclass(frozen=True)
class _Samples:
    """A map-style dataset read as batches: samples `x` or `(x, y)`, stacked."""

    dataset: Any

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        n = len(self.dataset)
        for i in range(0, n, batch_size):
            items = [self.dataset[j] for j in range(i, min(i + batch_size, n))]
            pairs = [_split(item) for item in items]
            x = np.stack([np.asarray(to_numpy(p[0])) for p in pairs])
            labelled = all(p[1] is not None for p in pairs)
            y = np.stack([np.asarray(to_numpy(p[1])) for p in pairs]) if labelled else None
            yield x, y


def _is_pydataset(source: Any) -> bool:
    return hasattr(source, "num_batches") and hasattr(source, "__getitem__")


def _num_batches(source: Any) -> int:
    n = source.num_batches
    if n is None:
        raise DataError("this PyDataset is infinite (num_batches is None): give a finite one")
    return int(n)


def _constant(x: np.ndarray) -> bool:
    return x.size > 1 and bool(np.all(x == x.flat[0]))


def _check_preprocess_channels(x: np.ndarray, scaling: Scaling, k: int) -> None:
    """`torch` and `caffe` preprocessing work on RGB channels: refuse other counts."""
    if scaling.mode not in ("torch", "caffe"):
        return
    channels = x.shape[-1] if x.ndim == 4 else None
    if channels != 3:
        got = f"{channels} channels" if channels is not None else f"shape {tuple(x.shape)}"
        raise DataError(
            f"batch {k}: preprocess {scaling.mode!r} normalises 3-channel RGB images, these "
            f"have {got}; convert them with --channels 3 (channels=3)"
        )


def _check_finite(x: np.ndarray, k: int, scaled: bool = False) -> None:
    finite = np.isfinite(x)
    if finite.all():
        return
    bad = int(finite.size - finite.sum())
    if scaled:
        raise DataError(
            f"batch {k} holds {bad} NaN or inf values after scaling: values too large for "
            "float32 after the scale factor; check --scale"
        )
    raise DataError(f"batch {k} holds {bad} NaN or inf values: clean or drop those samples")


def _check_labels(y: np.ndarray, n: int, num_classes: int | None, k: int) -> None:
    if len(y) != n:
        raise DataError(f"batch {k} has {n} inputs but {len(y)} labels: give one label each")
    if num_classes is None:
        return
    if y.ndim == 2 and y.shape[1] > 1:
        if y.shape[1] != num_classes:
            raise DataError(
                f"one-hot labels have {y.shape[1]} columns but the model has {num_classes} "
                "classes: a new head is needed, or labels for this model"
            )
        return
    flat = y.reshape(len(y), -1)[:, 0]
    if not np.issubdtype(flat.dtype, np.integer) and not np.all(np.mod(flat, 1) == 0):
        raise DataError(f"batch {k} has non-integer class labels: give class indices")
    bad = (flat < 0) | (flat >= num_classes)
    if bad.any():
        raise DataError(
            f"batch {k}: {int(bad.sum())} labels lie outside 0..{num_classes - 1} "
            f"(e.g. {flat[bad][0]:g}): the data has more classes than the model's output"
        )


def _convert_channels(x: np.ndarray, channels: int, k: int) -> np.ndarray:
    have = x.shape[-1]
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=-1)
    if have in (3, 4) and channels == 3:
        return x[..., :3]
    if have in (3, 4) and channels == 1:
        return (x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    raise DataError(f"batch {k}: cannot convert {have} channels to {channels}")


def _resize_batch(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = size
    out = np.empty((len(x), h, w, x.shape[-1]), np.float32)
    for i, img in enumerate(x):
        for c in range(x.shape[-1]):
            plane = Image.fromarray(np.ascontiguousarray(img[..., c]), mode="F")
            out[i, ..., c] = np.asarray(plane.resize((w, h), Image.Resampling.BILINEAR))
    return out


# ---------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class _FolderSource:
    files: tuple[tuple[Path, int], ...]
    batch_size: int
    image_size: tuple[int, int] | None
    channels: int

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, len(self.files), self.batch_size):
            chunk = self.files[i : i + self.batch_size]
            images = [self._read(p) for p, _ in chunk]
            odd = next((k for k, a in enumerate(images) if a.shape != images[0].shape), None)
            if odd is not None:
                sizes = [f"{a.shape[1]}x{a.shape[0]}" for a in (images[0], images[odd])]
                raise DataError(
                    f"{chunk[odd][0]}: is {sizes[1]} where {chunk[0][0]} is {sizes[0]}, "
                    "and the model declares no input size to resize them to: give "
                    "--image-size N (in Python: image_size=(N, N))"
                )
            yield np.stack(images), np.array([c for _, c in chunk], dtype=np.int64)

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with _bounded_images(), Image.open(path) as opened:
                img = opened.convert("L" if self.channels == 1 else "RGB")
            if self.image_size is not None:
                h, w = self.image_size
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
        except (
            OSError,
            ValueError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as err:
            raise DataError(f"{path}: cannot read this image ({err}); remove it") from None
        return arr[..., None] if arr.ndim == 2 else arr


def _is_regular(path: Path) -> bool:
    import stat

    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def _bounded_images() -> Iterator[None]:
    """Pillow's decompression-bomb warning (an image claiming more than 89 million pixels)
    as an error: such a file is refused, not decoded."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _image_folder(root: Path, common: dict[str, Any]) -> Data:
    """Scans `root/<class>/<image>` headers (not pixels) and checks them up front."""
    entries = sorted(root.iterdir())
    if not entries:
        raise DataError(f"{root}: the directory is empty; put images in one sub-folder per class")
    classes = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not classes:
        raise DataError(
            f"{root}: no class folders; put images in one sub-folder per class "
            f"({root}/cat/1.jpg, {root}/dog/2.jpg)"
        )
    files, bad, channels = _scan(classes)
    if bad:
        listed = ", ".join(str(p.relative_to(root)) for p in bad[:LISTED_FILES])
        more = f" and {len(bad) - LISTED_FILES} more" if len(bad) > LISTED_FILES else ""
        raise DataError(
            f"{root}: {len(bad)} files are not readable images ({listed}{more}); "
            "remove them or move them out of the class folders"
        )
    if not files:
        raise DataError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    want = common.pop("channels")
    if want is None and len(channels) > 1:
        counts = ", ".join(
            f"{len(v)} with {c} (e.g. {v[0].relative_to(root)})"
            for c, v in sorted(channels.items())
        )
        raise DataError(
            f"{root}: images have mixed channel counts: {counts}; "
            "choose one with channels=1 or 3 (--channels)"
        )
    n_channels = want if want is not None else next(iter(channels))
    source = _FolderSource(tuple(files), common["batch_size"], common["image_size"], n_channels)
    return Data(
        source,
        channels=None,
        description=str(root),
        size=len(files),
        class_names=tuple(p.name for p in classes),
        **common,
    )


def _scan(classes: list[Path]) -> tuple[list[tuple[Path, int]], list[Path], dict[int, list[Path]]]:
    from PIL import Image, UnidentifiedImageError

    bands = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 1, "CMYK": 3, "I": 1, "F": 1}
    files: list[tuple[Path, int]] = []
    bad: list[Path] = []
    channels: dict[int, list[Path]] = {}
    for label, folder in enumerate(classes):
        for path in sorted(folder.rglob("*")):
            if path.is_dir() or path.name.startswith("."):
                continue
            if not _is_regular(path):  # a pipe or device would block the read for ever
                raise DataError(
                    f"{path}: is not a regular file (a named pipe, socket or device); "
                    "move it out of the image folder"
                )
            try:
                with _bounded_images(), Image.open(path) as img:
                    mode = img.mode
            except (
                OSError,
                UnidentifiedImageError,
                ValueError,
                Image.DecompressionBombError,
                Image.DecompressionBombWarning,
                ImportError,  # a plugin another library hooked into Image.open, missing
            ):
                bad.append(path)
                continue
            c = bands.get(mode, 3)
            channels.setdefault(1 if c == 1 else 3, []).append(path)
            files.append((path, label))
    return files, bad, channels


# ---------------------------------------------------------------------- .npz


def check_source(path: Any) -> Path:
    """What can be checked of a data path before a framework starts (the command line runs
    it first): an existing regular file or folder; a folder with class sub-folders; an
    `.npz` that is a zip holding `x`. Raises DataError."""
    from bnkit.files import check_input, check_zip_members

    path = check_input(Path(path), "data file or folder", DataError)
    if path.is_dir():
        entries = list(path.iterdir())
        if not entries:
            raise DataError(
                f"{path}: the directory is empty; put images in one sub-folder per class"
            )
        if not any(p.is_dir() and not p.name.startswith(".") for p in entries):
            raise DataError(
                f"{path}: no class folders; put images in one sub-folder per class "
                f"({path}/cat/1.jpg, {path}/dog/2.jpg), or give an .npz file"
            )
        return path
    _check_npz_file(path)
    try:
        with zipfile.ZipFile(path) as z:
            check_zip_members(path, z, DataError)
            names = [n.removesuffix(".npy") for n in z.namelist()]
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    if "x" not in names:
        raise DataError(f"{path}: no array named 'x' (found: {', '.join(names) or 'none'})")
    return path


def _check_npz_file(path: Path) -> None:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); give an .npz file with x")
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"{path}: not a readable .npz file (not a zip archive; truncated or another "
            "format): write it with numpy.savez(path, x=..., y=...)"
        )


def load_npz(path: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads `x` (and `y` if present) from an `.npz` file, checking it is usable.

    Raises DataError naming the file and what is wrong.
    """
    from bnkit.files import check_input, check_zip_members

    path = Path(path)
    check_input(path, "data file", DataError)
    if path.is_dir():
        raise DataError(f"{path}: is a directory without class folders; give an .npz file")
    _check_npz_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_members(path, archive, DataError)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    if "x" not in arrays:
        raise DataError(f"{path}: no array named 'x' (found: {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays.get("y")
    check_array(x, f"{path}: 'x'")
    if y is not None:
        check_labels_array(y, f"{path}: 'y'")
    if y is not None and len(y) != len(x):
        raise DataError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return x, y


def check_array(x: Any, what: str) -> None:
    """Raises DataError unless `x` is a non-empty numeric array of samples."""
    x = np.asarray(x) if not hasattr(x, "dtype") else x
    if x.ndim == 0:
        raise DataError(f"{what} is a single value, not an array of samples")
    if not (np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)):
        raise DataError(f"{what} holds {x.dtype} values, not numbers: give numeric arrays")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(
            f"{what} holds complex numbers ({x.dtype}): give real values (x.real or abs(x), "
            "as your model expects)"
        )
    if len(x) == 0:
        raise DataError(f"{what} is empty: give at least one sample")


def check_labels_array(y: Any, what: str) -> None:
    """Raises DataError unless `y` holds class indices (or one-hot rows) as numbers."""
    y = np.asarray(y)
    if y.ndim == 0:
        raise DataError(f"{what} is a single value, not one label per sample")
    if not (np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.bool_)) or (
        np.issubdtype(y.dtype, np.complexfloating)
    ):
        raise DataError(
            f"{what} holds {y.dtype} labels: give class indices 0..N-1 (map names to numbers)"
        )


# ---------------------------------------------------------------------- embedded data

DIGIT_DOMAINS = ("source", "target")
SPLIT_SHARES = (0.6, 0.2, 0.2)
"""Train, validation and test shares of scikit-learn's 1,797 digits, per class."""


@dataclass(frozen=True)
class Digits:
    """One domain of the embedded digits: `(x, y)` splits with float32 images in [0, 1],
    shape `(n, size, size, 3)`, and integer labels 0-9."""

    domain: str
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    num_classes: int = 10


def digits(domain: str = "source", size: int = 32, seed: int = 0) -> Digits:
    """scikit-learn's bundled handwritten digits as a source domain, or blended with colour
    patches cut from its bundled photographs as a shifted target domain (the MNIST-M
    construction of Ganin & Lempitsky, 2015: each pixel is |patch - digit|).

    The split into train, validation and test (60/20/20 per class) depends only on
    `seed` and is the same for both domains, so the target test digits are never in
    the source training set. Deterministic for a seed.

    Examples:
        >>> d = digits("target", size=16, seed=1)
        >>> d.train[0].shape[1:], d.train[0].dtype.name
        ((16, 16, 3), 'float32')
    """
    if domain not in DIGIT_DOMAINS:
        raise DataError(f"unknown digits domain {domain!r}: use 'source' or 'target'")
    if size < 8:
        raise DataError(f"digits size must be at least 8 pixels, got {size}")
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = _resize_batch((raw.images / 16.0).astype(np.float32)[..., None], (size, size))
    images = np.clip(np.repeat(images, 3, axis=-1), 0.0, 1.0)
    labels = raw.target.astype(np.int64)
    if domain == "target":
        images = np.abs(_photo_patches(len(images), size, seed) - images)
    parts = _split_indices(labels, seed)
    train, val, test = ((images[i], labels[i]) for i in parts)
    return Digits(domain, train, val, test)


def _split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a = round(len(idx) * SPLIT_SHARES[0])
        b = a + round(len(idx) * SPLIT_SHARES[1])
        for part, chunk in zip(parts, (idx[:a], idx[a:b], idx[b:]), strict=True):
            part.append(chunk)
    train, val, test = (rng.permutation(np.concatenate(p)) for p in parts)
    return train, val, test


def _photo_patches(n: int, size: int, seed: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, np.float32) / 255.0 for p in load_sample_images().images]
    rng = np.random.default_rng([seed, 1])
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        top = rng.integers(photo.shape[0] - size + 1)
        left = rng.integers(photo.shape[1] - size + 1)
        out[i] = photo[top : top + size, left : left + size]
    return out
