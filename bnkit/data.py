"""Data in: arrays and iterables of batches, checked before any model sees them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from bnkit.errors import BnkitError

DEFAULT_BATCH_SIZE = 32


class DataError(BnkitError):
    """Data that bnkit cannot use: empty, non-finite, or of the wrong shape."""


def batches(
    data: Any, batch_size: int = DEFAULT_BATCH_SIZE, max_batches: int | None = None
) -> Iterator[np.ndarray]:
    """Yields float32 input batches from an array, an `(x, y)` tuple, or an iterable of batches.

    Each batch is checked for NaN and inf. Raises DataError for empty data.

    Example:
        >>> [b.shape for b in batches(np.zeros((5, 2)), batch_size=2)]
        [(2, 2), (2, 2), (1, 2)]
    """
    count = 0
    for k, batch in enumerate(_raw_batches(data, batch_size)):
        if max_batches is not None and k >= max_batches:
            break
        x = np.asarray(batch[0] if isinstance(batch, tuple | list) else batch, dtype=np.float32)
        if x.size == 0:
            continue
        if not np.isfinite(x).all():
            bad = int(np.size(x) - np.isfinite(x).sum())
            raise DataError(f"batch {k} holds {bad} NaN or inf values: clean or drop those samples")
        count += 1
        yield x
    if count == 0:
        raise DataError("the data is empty: give at least one sample")


def _raw_batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray):
        data = data[0]
    if isinstance(data, np.ndarray):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        return (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    if isinstance(data, Iterable):
        return data
    raise DataError(f"cannot read data of type {type(data).__name__}: give an array or batches")


def load_npz(path: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads `x` (and `y` if present) from an `.npz` file, checking it is usable.

    Raises DataError naming the file and what is wrong.
    """
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    if "x" not in arrays:
        raise DataError(f"{path}: no array named 'x' (found: {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays.get("y")
    if len(x) == 0:
        raise DataError(f"{path}: 'x' is empty")
    if y is not None and len(y) != len(x):
        raise DataError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return x, y
