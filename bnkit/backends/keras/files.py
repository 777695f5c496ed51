"""Keras model files, checked without importing Keras (so that a wrong path or name is
reported at once, not after seconds of framework start-up)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from bnkit.errors import ModelFileError

SUFFIXES = (".keras",)


def check(path: Path) -> Path:
    """Returns `path` if it looks like a Keras model; raises ModelFileError saying why not."""
    if not path.exists():
        raise ModelFileError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory; give a '.keras' model file")
    if path.suffix not in SUFFIXES:
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
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ModelFileError(f"{path}: corrupt Keras archive ({err}); re-save the model") from None
    if bad is not None:
        raise ModelFileError(f"{path}: corrupt Keras archive (member {bad!r} fails its CRC)")
    if "config.json" not in names:
        raise ModelFileError(f"{path}: zip archive without config.json, not a Keras model")
    return path


def layer_names(path: Path) -> set[str]:
    """Every layer name in a `.keras` archive's config, read as JSON."""
    with zipfile.ZipFile(check(path)) as z:
        config = json.loads(z.read("config.json"))
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("config"), dict) and isinstance(node.get("class_name"), str):
                name = node["config"].get("name")
                if isinstance(name, str):
                    names.add(name)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return names
