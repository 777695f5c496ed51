"""Model files in, outputs out: input checks and atomic writes.

bnkit never overwrites an input file and never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnkit.errors import BnkitError, ModelFileError


def check_model_file(path: Path) -> Path:
    """Returns `path` if it looks like a Keras model; raises ModelFileError saying why not."""
    if not path.exists():
        raise ModelFileError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory; give a '.keras' model file")
    if path.suffix != ".keras":
        hint = " (legacy HDF5: load it and re-save as '.keras')" if path.suffix == ".h5" else ""
        raise ModelFileError(f"{path}: not a '.keras' model file{hint}")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path}: not a Keras archive (a '.keras' file is a zip); the file is corrupt "
            "or not a model: re-save it with model.save()"
        )
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelFileError(f"{path}: corrupt Keras archive ({err}); re-save the model") from None
    if bad is not None:
        raise ModelFileError(f"{path}: corrupt Keras archive (member {bad!r} fails its CRC)")
    if "config.json" not in names:
        raise ModelFileError(f"{path}: zip archive without config.json, not a Keras model")
    return path


def load_model(path: Path) -> Any:
    """Checks and loads a model file with the backend for its type."""
    from bnkit.backends import backend_for_file

    backend = backend_for_file(path)
    return backend.load(check_model_file(path))


def check_output(out: Path, *inputs: Path, suffix: str | None = None) -> Path:
    """Refuses an output path that is an input, a directory, or in a missing directory."""
    for inp in inputs:
        if out.resolve() == inp.resolve():
            raise BnkitError(
                f"{out}: output is the input file; bnkit never overwrites its input, "
                "choose another -o path"
            )
    if out.is_dir():
        raise BnkitError(f"{out}: is a directory; give a file name for -o")
    if not out.parent.exists():
        raise BnkitError(f"{out.parent}: output directory does not exist; create it first")
    if suffix is not None and out.suffix != suffix:
        raise BnkitError(f"{out}: output must end in '{suffix}'")
    return out


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """Yields a temporary path beside `out`; moves it onto `out` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, out)
    finally:
        tmp_path.unlink(missing_ok=True)


def save_model(model: Any, out: Path) -> None:
    """Saves `model` to `out` atomically with its backend."""
    from bnkit.backends import get_backend

    with atomic_path(out) as tmp:
        get_backend(model).save(model, tmp)
