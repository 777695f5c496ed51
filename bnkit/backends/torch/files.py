"""PyTorch models on the command line: a model spec, checked without importing torch.

A PyTorch model cannot be rebuilt from a weights file alone, so the command line takes
a spec that builds it: `torchvision:resnet18`, `timm:resnet18`, `package.module:factory`
or `path/to/file.py:factory` (arguments as JSON with `--args`), and optionally
`--weights ckpt.pt`, a state_dict loaded with `torch.load(weights_only=True)`: bnkit
never unpickles a file.
"""

from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnkit.errors import ModelFileError
from bnkit.files import check_input, check_zip_members


@dataclass(frozen=True)
class Spec:
    """A parsed model spec: where the factory lives and its name."""

    source: str
    """`torchvision`, `timm`, a module name, or a `.py` file path."""
    factory: str

    @property
    def is_file(self) -> bool:
        return self.source.endswith(".py")

    def __str__(self) -> str:
        return f"{self.source}:{self.factory}"


def is_spec(text: str) -> bool:
    """True for `source:factory` (and not a Keras file or an existing path)."""
    source, sep, factory = text.rpartition(":")
    return bool(sep and source and factory) and not Path(text).exists()


def parse(text: str) -> Spec:
    """The Spec of `text`; ModelFileError when it is not one."""
    source, sep, factory = str(text).rpartition(":")
    if not sep or not source or not factory.isidentifier():
        raise ModelFileError(
            f"{text}: not a model spec; give torchvision:NAME, timm:NAME, "
            "package.module:factory or path/to/file.py:factory"
        )
    return Spec(source, factory)


RUNS_CODE = (
    "A model spec runs Python code, as `python -c` does: the factory is called with --args "
    "and a .py file or module is imported; give only specs you trust."
)


def check(path: Path) -> Path:
    """Checks what can be checked before torch starts: the spec's form and its file, and
    that it does not name the standard library (a factory is a model class or a function
    that builds one; `shutil:rmtree` would run with the user's --args)."""
    spec = parse(str(path))
    top = spec.source.split(".")[0]
    if not spec.is_file and (top in sys.stdlib_module_names or top == "builtins"):
        raise ModelFileError(
            f"{spec}: {spec.source!r} is Python's standard library, not a model factory; a "
            "spec names a class or function that builds a torch.nn.Module "
            "(torchvision:resnet18, mypackage.models:build)"
        )
    if spec.is_file:
        check_input(Path(spec.source), f"file (model spec {spec})", ModelFileError)
        if not Path(spec.source).is_file():
            raise ModelFileError(f"{spec.source}: is a folder; the model spec {spec} names a .py")
    return path


def layer_names(path: Path) -> set[str] | None:
    """Unknown until the model is built."""
    return None


def check_weights(weights: Path) -> None:
    """Checks a weights file before torch starts."""
    check_input(weights, "weights file", ModelFileError)
    if weights.is_dir():
        raise ModelFileError(f"{weights}: is a directory; give a state_dict file (.pt)")
    if weights.stat().st_size == 0:
        raise ModelFileError(f"{weights}: the file is empty; save with torch.save(state_dict)")
    if zipfile.is_zipfile(weights):
        with zipfile.ZipFile(weights) as z:
            check_zip_members(weights, z, ModelFileError)


def parse_args(text: str | None) -> dict[str, Any]:
    """The factory's keyword arguments from `--args` JSON."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except ValueError as err:
        raise ModelFileError(
            f"--args is not valid JSON ({err}): give e.g. '{{\"num_classes\": 10}}'"
        ) from None
    if not isinstance(args, dict):
        raise ModelFileError(
            "--args must be a JSON object of keyword arguments, e.g. '{\"num_classes\": 10}'"
        )
    return args
