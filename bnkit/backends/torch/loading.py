"""Building the model a PyTorch spec names (`torchvision:NAME`, `timm:NAME`,
`package.module:factory`, `file.py:factory`) and loading a state_dict into it with
`torch.load(weights_only=True)`: every way a factory or a weights file can fail becomes
one `ModelFileError` line."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnkit.errors import BnkitError
from bnkit.files import Terminated


def build_model(spec: Any, args: dict[str, Any]) -> Any:
    """The model the spec names, its factory called with `args`."""
    from bnkit.errors import ModelFileError

    factory = _factory(spec)
    try:
        with _stderr_held() as held:
            model = factory(**args)
        held.release()  # the factory worked: what it or torch wrote meanwhile is shown
    except (Exception, SystemExit) as err:  # the user's factory may raise anything
        if isinstance(err, (Terminated, BnkitError)):  # a signal, or bnkit's own --timeout
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if _unreadable_file(err):
            name = getattr(err, "filename", None)
            where = f" {name}" if name else ""
            raise ModelFileError(
                f"{spec}: the factory could not read a file it loads{where} "
                f"({type(err).__name__}: {first}): a truncated or corrupt file? check the "
                "files the factory reads"
            ) from None
        if _network_error(err):
            raise ModelFileError(
                f"{spec}: the factory tried to download and the network failed "
                f"({type(err).__name__}: {first}); bnkit downloads nothing: give --weights "
                "FILE (a state_dict saved where the network is) instead of pretrained "
                "weights in --args"
            ) from None
        raise ModelFileError(
            f"{spec}: the factory raised {type(err).__name__} ({first}); check --args"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"{spec}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


@contextlib.contextmanager
def _stderr_held() -> Iterator[Any]:
    """While open, what is written to stderr (torch logs a warning with a traceback when
    `torch.export.load` meets a truncated file) is held back: a factory that fails gets
    bnkit's one line alone; one that works has it written after (`.release()`)."""
    import io

    held = io.StringIO()
    real = sys.stderr

    def release() -> None:
        real.write(held.getvalue())

    held.release = release  # type: ignore[attr-defined]
    with contextlib.redirect_stderr(held):
        yield held


def _unreadable_file(err: BaseException) -> bool:
    """A file the factory loads is truncated or corrupt: a zip archive (`torch.load`,
    `torch.export.load`) or pickle stream cut short, torch's stream reader failing."""
    import pickle
    import zipfile

    if isinstance(err, (zipfile.BadZipFile, EOFError, pickle.UnpicklingError)):
        return True
    return isinstance(err, RuntimeError) and "PytorchStreamReader failed" in str(err)


def _network_error(err: BaseException) -> bool:
    """A download that failed: urllib's URLError/HTTPError, requests' and sockets' errors."""
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    known = {"URLError", "HTTPError", "ConnectionError", "gaierror", "SSLError", "Timeout"}
    return bool(names & known) or isinstance(err, ConnectionError)


def _factory(spec: Any) -> Any:
    import importlib
    import importlib.util

    from bnkit._imports import installed
    from bnkit.errors import ModelFileError, closest

    if spec.source in ("torchvision", "timm") and not installed(spec.source):
        raise ModelFileError(
            f"{spec}: {spec.source} is not installed: pip install {spec.source} (with the "
            "torch it was built for, e.g. torch==2.14.1 torchvision==0.29.1 timm==1.0.31)"
        )
    if spec.source == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if spec.factory not in names:
            hint = closest(spec.factory, names)
            raise ModelFileError(
                f"{spec}: torchvision has no model {spec.factory!r}"
                + (f" ({hint})" if hint else "")
            )
        return lambda **kw: torchvision.models.get_model(spec.factory, **{"weights": None, **kw})
    if spec.source == "timm":
        import timm

        if not timm.is_model(spec.factory):
            hint = closest(spec.factory, timm.list_models())
            raise ModelFileError(
                f"{spec}: timm has no model {spec.factory!r}" + (f" ({hint})" if hint else "")
            )
        return lambda **kw: timm.create_model(spec.factory, **{"pretrained": False, **kw})
    try:
        if spec.is_file:
            loader = importlib.util.spec_from_file_location("bnkit_user_model", spec.source)
            if loader is None or loader.loader is None:
                raise ImportError(spec.source)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(spec.source)
    except (Exception, SystemExit) as err:  # importing user code may raise anything
        if isinstance(err, (Terminated, BnkitError)):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelFileError(
            f"{spec}: cannot import {spec.source!r} ({type(err).__name__}: {first})"
        ) from None
    factory = getattr(module, spec.factory, None)
    if not callable(factory):
        names = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
        hint = closest(spec.factory, names)
        raise ModelFileError(
            f"{spec}: {spec.source} has no factory {spec.factory!r}"
            + (f" ({hint})" if hint else "")
        )
    _check_factory(spec, factory)
    return factory


def _check_factory(spec: Any, factory: Any) -> None:
    """A factory is a class or a function defined outside the standard library: a name
    that reaches `os.remove` or `shutil.rmtree` through a module is refused, not called
    with the user's --args."""
    import inspect
    import sys

    from bnkit.errors import ModelFileError

    if not (inspect.isclass(factory) or inspect.isfunction(factory)):
        raise ModelFileError(
            f"{spec}: {spec.factory!r} is a {type(factory).__name__}, not a class or function "
            "that builds a model"
        )
    home = str(getattr(factory, "__module__", "") or "").split(".")[0]
    if home in sys.stdlib_module_names or home == "builtins":
        raise ModelFileError(
            f"{spec}: {spec.factory!r} is {home}.{factory.__qualname__} from Python's standard "
            "library, not a model factory; name a class or function that builds a "
            "torch.nn.Module"
        )


STATE_KEYS = ("state_dict", "model", "model_state_dict", "module")
"""Where Lightning, timm and common training scripts keep the weights in a checkpoint."""


MISMATCH_LISTED = 3


def load_weights(model: Any, path: Path, what: str) -> None:
    """Loads a state_dict file into `model` with `torch.load(weights_only=True)` (bnkit
    never unpickles a file): the dict itself, or one under `state_dict`/`model`; a
    prefix such as `model.` (Lightning) or `module.` (DDP) is removed when that makes
    the keys fit."""
    import pickle

    from bnkit.errors import ModelFileError

    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol it met
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not _saved_by_torch_or_pickle(path):
            raise ModelFileError(
                f"{path}: not a weights file (neither a torch.save archive nor a pickle: "
                "text, or another format?); save with torch.save(model.state_dict(), path)"
            ) from None
        raise ModelFileError(
            f"{path}: holds pickled Python objects (a whole module?), which bnkit never "
            "unpickles; save the weights with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as err:  # a corrupt file raises various types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelFileError(f"{path}: cannot read this weights file ({first})") from None
    state = _state_dict(loaded, path)
    _check_tensors(state, path)
    want = model.state_dict()
    state = _strip_prefix(state, set(want))
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:MISMATCH_LISTED])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:MISMATCH_LISTED])}")
        if shapes:
            k = shapes[0]
            parts.append(f"{k} is {tuple(state[k].shape)}, the model's {tuple(want[k].shape)}")
        raise ModelFileError(
            f"{path}: these weights do not fit {what} ({'; '.join(parts)}): another "
            "architecture, or other --args?"
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelFileError(f"{path}: these weights do not load into {what} ({first})") from None


def _check_tensors(state: dict[Any, Any], path: Path) -> None:
    """Keys are names; values are dense tensors holding data (not sparse, not on the meta
    device, where a state_dict loads nothing)."""
    from bnkit.errors import ModelFileError

    for key, value in state.items():
        if not isinstance(key, str):
            raise ModelFileError(
                f"{path}: has a key {key!r} of type {type(key).__name__}; a state_dict maps "
                "parameter names to tensors (save with torch.save(model.state_dict(), path))"
            )
        if value.is_complex():
            raise ModelFileError(
                f"{path}: {key!r} holds complex numbers ({value.dtype}); a model's weights "
                "are real: save the real-valued state_dict"
            )
        if value.layout != torch.strided or value.is_meta:
            kind = "on the meta device (no data)" if value.is_meta else f"{value.layout}"
            raise ModelFileError(
                f"{path}: {key!r} is a tensor {kind}; give dense tensors with their values "
                "(torch.save(model.state_dict(), path))"
            )


def _saved_by_torch_or_pickle(path: Path) -> bool:
    """A zip archive (torch.save's format) or a pickle stream (protocol 2 and up)."""
    import zipfile

    with path.open("rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and head[1] >= 2)


def _state_dict(loaded: Any, path: Path) -> dict[str, Any]:
    from bnkit.errors import ModelFileError

    if isinstance(loaded, dict):
        for key in STATE_KEYS:
            inner = loaded.get(key)
            if (
                isinstance(inner, dict)
                and inner
                and all(torch.is_tensor(v) for v in inner.values())
            ):
                return inner
        if loaded and all(torch.is_tensor(v) for v in loaded.values()):
            return loaded
    raise ModelFileError(
        f"{path}: not a state_dict (a dict of tensors, or one under "
        f"{', '.join(STATE_KEYS)}); save with torch.save(model.state_dict(), path)"
    )


def _strip_prefix(state: dict[str, Any], want: set[str]) -> dict[str, Any]:
    if set(state) & want:
        return state
    for prefix in ("model.", "module.", "net.", "backbone."):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(stripped) & want:
            return stripped
    return state
