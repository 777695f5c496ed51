"""Model files in, outputs out: input checks and atomic writes.

bnkit never overwrites an input file, never removes or replaces what it did not write,
and never leaves a half-written output: every output is written to a fresh temporary
sibling and renamed into place, with the permissions the user's umask gives.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bnkit.errors import BnkitError

MARKER = ".bnkit-output"
"""A file bnkit puts in every folder it writes, naming what it wrote there: the proof that
a later run may replace the folder's bnkit files."""
_TEMP_PREFIX = ".bnkit-tmp-"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_SOFTWARE = "bnkit"
"""The `Software` text of every PNG bnkit writes: how `--overwrite` tells a figure bnkit
wrote from the user's own image."""
_PNG_MARK = b"Software\x00" + PNG_SOFTWARE.encode()


# ---------------------------------------------------------------------- output checks


def _exists(path: Path) -> bool:
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop raises RuntimeError in 3.11
        raise BnkitError(f"{path}: cannot resolve this path ({err}); give another") from None


_FS_IOC_GETFLAGS = 0x80086601
_FS_IMMUTABLE_FL = 0x10
_FS_APPEND_FL = 0x20


def _fs_flags(path: Path) -> int:
    """The file system's inode flags of `path` (`chattr`'s immutable and append-only), or 0
    where the file system cannot tell."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return 0
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 8)
        return int.from_bytes(buf[:4], "little")
    except OSError:
        return 0
    finally:
        os.close(fd)


def check_writable(folder: Path) -> None:
    """Raises BnkitError unless bnkit can create, rename and remove a file in `folder`
    (an immutable or append-only folder or a read-only file system refuses even root).
    Leaves nothing behind."""
    flags = _fs_flags(folder)
    if flags & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
        kind = "immutable" if flags & _FS_IMMUTABLE_FL else "append-only"
        raise BnkitError(
            f"{folder}: the folder is {kind} (chattr), so bnkit cannot put an output there; "
            "choose another output folder"
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=folder)
    except OSError as err:
        raise BnkitError(
            f"{folder}: cannot write here ({err.strerror or err}); choose another output folder"
        ) from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError as err:
        raise BnkitError(
            f"{folder}: can create files but not remove them ({err.strerror or err}; "
            f"bnkit left {Path(tmp).name} there); choose another output folder"
        ) from None


def _check_name(out: Path) -> None:
    try:
        limit = os.pathconf(out.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(out.name.encode()) > limit:
        raise BnkitError(
            f"{out.name[:40]}...: the output name has {len(out.name.encode())} bytes, more than "
            f"this file system allows ({limit}); choose a shorter name"
        )


JSON_KINDS = {
    "plan": ("policy", "layers", "bn_modes"),
    "tta": ("method", "settings", "batches"),
}
"""The keys of each JSON document bnkit writes: a `.json` file is bnkit's only if it holds
them all."""
_TORCH_PICKLE = "/data.pkl"
"""The member every `torch.save` zip archive holds."""


def same_kind(path: Path, suffix: str, json_kind: str | None = None) -> bool:
    """True when the existing file at `path` is what bnkit writes with `suffix` (so that
    replacing it cannot destroy anything else): a `.keras`, `.npz` or `.pt2` zip, a PNG, a
    `torch.save` archive for `.pt`, an ONNX model, or for `.json` a document of
    `json_kind` (see JSON_KINDS)."""
    if not path.name.endswith(suffix) or not _is_regular(path):
        return False
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError:
        return False
    if suffix in (".keras", ".npz", ".pt2"):
        return zipfile.is_zipfile(path)
    if suffix == ".pt":
        return _is_torch_archive(path)
    if suffix == ".png":
        return head == _PNG_MAGIC and _marked_png(path)
    if suffix.endswith(".json"):
        return _is_json_kind(path, json_kind)
    if suffix == ".onnx":
        return head[:1] == b"\x08"  # a ModelProto starts with its ir_version field
    return False


def _marked_png(path: Path) -> bool:
    """A PNG whose text chunks (before the image data) say bnkit wrote it."""
    try:
        with path.open("rb") as f:
            return _PNG_MARK in f.read(4096)
    except OSError:
        return False


def _is_torch_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(_TORCH_PICKLE) for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_json_kind(path: Path, kind: str | None) -> bool:
    if kind is None or path.stat().st_size > 256 * 2**20:
        return False
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and all(k in doc for k in JSON_KINDS[kind])


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


BOMB_RATIO = 100
"""A zip member declaring more than this many times its stored size (DEFLATE cannot pass
~1032:1, and model and array archives are stored uncompressed or nearly) is refused when
it is large: a decompression bomb."""
BOMB_FLOOR = 256 * 2**20
"""Members smaller than this (inflated) are never refused as bombs."""


def check_zip_members(path: Path, z: zipfile.ZipFile, error: type[BnkitError] = BnkitError) -> None:
    """Raises `error` for a member that would inflate far beyond its stored size (a zip
    bomb), or for members that together would not fit in memory, before reading any."""
    total = 0
    for info in z.infolist():
        total += info.file_size
        if info.file_size > BOMB_FLOOR and info.file_size > BOMB_RATIO * max(info.compress_size, 1):
            raise error(
                f"{path}: member {info.filename!r} inflates {info.file_size / 2**20:.0f} MiB "
                f"from {info.compress_size / 2**20:.1f} MiB stored (a decompression bomb, not "
                "data bnkit can use)"
            )
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if total > memory:
        raise error(
            f"{path}: its members inflate to {total / 2**30:.1f} GiB, more than this machine's "
            f"memory ({memory / 2**30:.1f} GiB); give a smaller file"
        )


def check_input(path: Path, what: str = "file", error: type[BnkitError] = BnkitError) -> Path:
    """Raises `error` unless `path` is an existing regular file or folder: a named pipe,
    socket or device would block bnkit or never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such file or folder ({what}); check the path") from None
    except OSError as err:
        raise error(f"{path}: cannot read this {what} ({err.strerror or err})") from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return path
    kind = (
        "a named pipe"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    raise error(f"{path}: is {kind}, not a {what} bnkit can read; give a regular file")


def check_output(
    out: Path,
    *inputs: Path,
    suffix: str | None = None,
    overwrite: bool = False,
    json_kind: str | None = None,
) -> Path:
    """Refuses an output path that is an input, a directory, in a missing or unwritable
    directory, too long, or an existing file (unless `overwrite`, and then only a file of
    the kind bnkit writes there: see `same_kind`)."""
    target = _resolve(out)
    for inp in inputs:
        if _exists(inp) and target == _resolve(inp):
            raise BnkitError(
                f"{out}: output is the input file; bnkit never overwrites its input, "
                "choose another -o path"
            )
    _outside_inputs(out, target, inputs)
    if suffix is not None and not out.name.endswith(suffix):
        raise BnkitError(f"{out}: output must end in '{suffix}'")
    _check_name(out)
    if _is_dir(out):
        raise BnkitError(f"{out}: is a directory; give a file name for -o")
    _check_parent(out)
    if _exists(out):
        kind = suffix or out.suffix
        if not overwrite:
            raise BnkitError(f"{out}: exists; pass --overwrite to replace it, or choose another")
        if not same_kind(out, kind, json_kind):
            raise BnkitError(
                f"{out}: exists and is not a '{kind}' file bnkit writes; bnkit will not replace "
                "it, choose another name"
            )
        if _fs_flags(out) & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
            raise BnkitError(f"{out}: exists and is immutable (chattr); bnkit cannot replace it")
    return out


def _outside_inputs(out: Path, target: Path, inputs: Sequence[Path]) -> None:
    """Refuses an output inside a folder the command reads (a folder of images, of
    classes): the next run would read bnkit's files as data, and `--overwrite` could
    replace one of the user's images."""
    for inp in inputs:
        if not _is_dir(inp):
            continue
        folder = _resolve(inp)
        if target != folder and folder in target.parents:
            raise BnkitError(
                f"{out}: is inside {inp}, a folder this command reads; write outputs "
                "outside the input folders"
            )


def _check_parent(out: Path) -> None:
    """The folder an output goes into exists, is a folder, and takes new files."""
    parent = out.parent
    if not _is_dir(parent):
        above = next((p for p in parent.parents if _exists(p)), None)
        if _exists(parent) or (above is not None and not _is_dir(above)):
            blocker = parent if _exists(parent) else above
            raise BnkitError(
                f"{blocker}: is a file, not a folder, so {out} cannot be written; "
                "choose another output path"
            )
        raise BnkitError(f"{parent}: output directory does not exist; create it first")
    check_writable(parent)


def check_out_dir(
    out_dir: Path, names: Sequence[str], *inputs: Path, overwrite: bool = False
) -> Path:
    """Refuses an output folder that is a file, inside a missing or unwritable parent, an
    input, or one already holding any of `names`: unless `overwrite`, and then only when
    bnkit wrote them (its marker file is there)."""
    target = _resolve(out_dir)
    for inp in inputs:
        if _exists(inp) and target == _resolve(inp):
            raise BnkitError(f"{out_dir}: output folder is an input; choose another")
    _outside_inputs(out_dir, target, inputs)
    _check_name(out_dir)
    if _exists(out_dir) and not _is_dir(out_dir):
        raise BnkitError(f"{out_dir}: exists and is not a directory; give a folder")
    parent = out_dir if _is_dir(out_dir) else out_dir.parent
    if not _is_dir(parent):
        raise BnkitError(f"{parent}: does not exist; create it first")
    check_writable(parent)
    clash = [n for n in names if _exists(out_dir / n)] if _is_dir(out_dir) else []
    if not clash:
        return out_dir
    if not (out_dir / MARKER).is_file():
        raise BnkitError(
            f"{out_dir}: already holds {', '.join(clash)}, which bnkit did not write; "
            "choose another folder"
        )
    if not overwrite:
        raise BnkitError(
            f"{out_dir}: already holds {', '.join(clash)} from an earlier run; pass "
            "--overwrite to replace them, or choose another folder"
        )
    return out_dir


# ---------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fresh(parent: Path, suffix: str, folder: bool = False) -> Path:
    if folder:
        return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, suffix=suffix, dir=parent))
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=suffix, dir=parent)
    os.close(fd)
    return Path(tmp)


def _publish_mode(path: Path) -> None:
    """Gives a finished output the permissions a plain `open()` would (umask honoured)."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


@contextlib.contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `out`; moves it onto `out` only if the block succeeds.
    A file system refusal while writing (a full disk) is reported naming `out`."""
    out = Path(out)
    tmp_path = _fresh(out.parent, out.suffix)
    try:
        with _naming(out):
            yield tmp_path
            _publish_mode(tmp_path)
            os.replace(tmp_path, out)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming(out: Path) -> Iterator[None]:
    """OSError without a file name (ENOSPC, EDQUOT, EIO from a write) as BnkitError naming
    the output being written."""
    try:
        yield
    except OSError as err:
        name = Path(str(err.filename)).name if err.filename else None
        if name is not None and not name.startswith(_TEMP_PREFIX) and name != out.name:
            raise
        raise BnkitError(
            f"{out}: could not be written ({err.strerror or err}); nothing was written there, "
            "free some space or choose another folder"
        ) from None


def check_dir_output(out: Path, *, kind: str, overwrite: bool = False) -> Path:
    """Refuses a folder output (a SavedModel, say) in a missing or unwritable parent, or
    that exists, unless `overwrite` and bnkit's marker says it is an output of `kind`."""
    _check_name(out)
    _check_parent(out)
    if not _exists(out):
        return out
    if not _is_dir(out):
        raise BnkitError(f"{out}: exists and is not a folder; bnkit will not replace it")
    if not overwrite:
        raise BnkitError(f"{out}: exists; pass --overwrite to replace it, or choose another")
    if _marker_kind(out) != kind:
        raise BnkitError(
            f"{out}: exists and is not a {kind} that bnkit wrote; bnkit will not remove it, "
            "choose another name"
        )
    return out


@contextlib.contextmanager
def atomic_dir(out: Path, *, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `out` to write a folder output into (a
    SavedModel, say); on success it becomes `out`. An existing `out` is replaced only
    when `overwrite` and bnkit's marker says it holds an output of the same `kind`;
    otherwise nothing is removed and BnkitError says why."""
    check_dir_output(out, kind=kind, overwrite=overwrite)
    staged = _fresh(out.parent, "", folder=True)
    try:
        yield staged
        (staged / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _publish_mode(staged)
        if _exists(out):
            trash = _fresh(out.parent, "", folder=True)
            os.replace(out, trash / "old")
            os.replace(staged, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staged, out)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def _marker_kind(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / MARKER).read_text()).get("kind"))
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def atomic_files(out_dir: Path, names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """Yields temporary paths for the files `names` in `out_dir`; when the block succeeds
    they are all moved into place together (no run leaves one without the others), and
    `out_dir` is created (and marked as bnkit's) if needed. On failure nothing is left."""
    created = not _exists(out_dir)
    if created:
        out_dir.mkdir(parents=True)
    staged = _fresh(out_dir, "", folder=True)
    try:
        paths = {n: staged / n for n in names}
        yield paths
        for path in paths.values():
            if not path.exists():
                raise BnkitError(f"internal: {path.name} was not written")
            _publish_mode(path)
        marker = out_dir / MARKER
        if not marker.exists():
            with atomic_path(marker) as tmp:
                tmp.write_text(json.dumps({"kind": "files"}) + "\n")
        for name, path in paths.items():
            os.replace(path, out_dir / name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    shutil.rmtree(staged, ignore_errors=True)


class Terminated(SystemExit):
    """SIGTERM, as bnkit's handler raises it: a signal, never the fault of the code it
    interrupted (a model factory, a data reader)."""


def terminate_cleanly() -> None:
    """Turns SIGTERM into SystemExit, so that temporary outputs are removed on the way out
    (the default action kills the process before any `finally` runs)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(128 + signum)

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)
