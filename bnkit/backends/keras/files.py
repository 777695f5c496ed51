"""Keras model files, checked without importing Keras (so that a wrong path or name is
reported at once, not after seconds of framework start-up)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from bnkit.errors import ModelFileError
from bnkit.files import check_input, check_zip_members

SUFFIXES = (".keras",)
CONFIG_LIMIT = 256 * 2**20
"""The largest `config.json` read (bytes, uncompressed): Keras configs of the largest
models are a few MB; a larger one is damaged or hostile (a zip that inflates without end)."""


def check(path: Path) -> Path:
    """Returns `path` if it looks like a Keras model; raises ModelFileError saying why not."""
    check_input(path, "model file", ModelFileError)
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
            _refuse_bombs(path, z)
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ModelFileError(f"{path}: corrupt Keras archive ({err}); re-save the model") from None
    if bad is not None:
        raise ModelFileError(f"{path}: corrupt Keras archive (member {bad!r} fails its CRC)")
    if "config.json" not in names:
        raise ModelFileError(f"{path}: zip archive without config.json, not a Keras model")
    return path


def _refuse_bombs(path: Path, z: zipfile.ZipFile) -> None:
    config = z.getinfo("config.json") if "config.json" in z.namelist() else None
    if config is not None and config.file_size > CONFIG_LIMIT:
        raise ModelFileError(
            f"{path}: config.json inflates to {config.file_size / 2**20:.0f} MiB, more than a "
            f"Keras model's configuration ({CONFIG_LIMIT // 2**20} MiB at most); the file is "
            "damaged or not a model"
        )
    check_zip_members(path, z, ModelFileError)


def read_config(path: Path) -> Any:
    """A `.keras` archive's `config.json`, parsed; ModelFileError when it is larger than
    CONFIG_LIMIT or not JSON."""
    with zipfile.ZipFile(check(path)) as z, z.open("config.json") as f:
        raw = f.read(CONFIG_LIMIT)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ModelFileError(
            f"{path}: config.json is not valid JSON ({str(err)[:80]}); the file is damaged: "
            "re-save the model with model.save()"
        ) from None


def layer_names(path: Path) -> set[str]:
    """Every layer name in a `.keras` archive's config, read as JSON."""
    config = read_config(path)
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
