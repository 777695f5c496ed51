"""Outputs: atomic, with the user's umask, never replacing what bnkit did not write, and
cleaned up when the process is terminated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bnkit.errors import BnkitError
from bnkit.files import (
    MARKER,
    atomic_dir,
    atomic_files,
    atomic_path,
    check_dir_output,
    check_out_dir,
    check_output,
)


def test_atomic_path_honours_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(ValueError), atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("half")
        raise ValueError("interrupted")
    assert (tmp_path / "a.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_files_moves_every_file_or_none(tmp_path):
    out = tmp_path / "results"
    with pytest.raises(RuntimeError), atomic_files(out, ("a.json", "b.png")) as paths:
        paths["a.json"].write_text("{}")
        raise RuntimeError("the plot failed")
    assert not out.exists()  # bnkit created it for this output, so it goes too
    with atomic_files(out, ("a.json", "b.png")) as paths:
        paths["a.json"].write_text("{}")
        paths["b.png"].write_bytes(b"png")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "a.json", "b.png"])


def test_check_out_dir_refuses_a_folder_holding_files_bnkit_did_not_write(tmp_path):
    (tmp_path / "compare.json").write_text("the user's")
    with pytest.raises(BnkitError, match="which bnkit did not write"):
        check_out_dir(tmp_path, ("compare.json", "compare.png"))
    (tmp_path / MARKER).write_text('{"kind": "files"}')
    with pytest.raises(BnkitError, match="from an earlier run; pass --overwrite"):
        check_out_dir(tmp_path, ("compare.json",))
    assert check_out_dir(tmp_path, ("compare.json",), overwrite=True) == tmp_path


def test_a_folder_output_replaces_only_bnkit_s_own_folder_when_asked(tmp_path):
    user = tmp_path / "exported"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(BnkitError):
            check_dir_output(user, kind="savedmodel", overwrite=overwrite)
    assert (user / "notes.txt").read_text() == "keep me"
    mine = tmp_path / "mine"
    with atomic_dir(mine, kind="savedmodel") as staged:
        (staged / "saved_model.pb").write_bytes(b"1")
    with pytest.raises(BnkitError, match="--overwrite"):
        check_dir_output(mine, kind="savedmodel")
    with atomic_dir(mine, kind="savedmodel", overwrite=True) as staged:
        (staged / "saved_model.pb").write_bytes(b"2")
    assert (mine / "saved_model.pb").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "mine"]


@pytest.fixture
def unwritable(tmp_path):
    """A folder that even root cannot write into: immutable where chattr works, else /sys."""
    folder = tmp_path / "locked"
    folder.mkdir()
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    yield folder if done else Path("/sys")
    if done:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_check_output_refuses_unwritable_long_looping_and_existing_paths(tmp_path, unwritable):
    with pytest.raises(BnkitError, match=r"cannot write here|is immutable"):
        check_output(unwritable / "m.keras", suffix=".keras")
    with pytest.raises(BnkitError, match="shorter name"):
        check_output(tmp_path / ("m" * 300 + ".keras"), suffix=".keras")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(BnkitError):
        check_output(loop / "m.keras", suffix=".keras")
    existing = tmp_path / "old.png"
    existing.write_text("not a png")
    with pytest.raises(BnkitError, match="--overwrite"):
        check_output(existing, suffix=".png")
    with pytest.raises(BnkitError, match=r"not a '\.png' file"):
        check_output(existing, suffix=".png", overwrite=True)
    assert existing.read_text() == "not a png"


def test_sigterm_during_a_save_leaves_no_temporary_file(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from bnkit.files import atomic_path, terminate_cleanly\n"
        "terminate_cleanly()\n"
        f"with atomic_path(Path({str(tmp_path)!r}) / 'model.keras') as tmp:\n"
        "    tmp.write_text('half written')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    sys.exit('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert list(tmp_path.iterdir()) == []
