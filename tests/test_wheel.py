"""The package as users get it: the sdist and the wheel built from the tracked files, the
wheel installed without dependencies into a fresh virtual environment that sees this
environment's packages, and bnkit run from outside the source tree (a module or data file
missing from the wheel fails here, not on a user's machine)."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import keras
import pytest

import bnkit

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(keras.backend.backend() != "torch", reason="once, in the torch pass"),
]


def _run(*args: str, cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist and wheel, built from a copy of the tracked files."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to know the tracked files")
    src = tmp_path_factory.mktemp("src")
    for name in _run("git", "ls-files", cwd=ROOT).splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src), cwd=src)
    return out


def test_the_sdist_and_the_wheel_hold_what_users_need(dist):
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    assert wheel.name == f"bnkit-{bnkit.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bnkit").rglob("*.py")}
    assert package <= names and "bnkit/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"bnkit-{bnkit.__version__}.dist-info/METADATA")
    for field in (b"License-Expression: Apache-2.0", b"Keywords:", b"Classifier:",
                  b"Requires-Python: >=3.10", b"Provides-Extra: vision"):  # fmt: skip
        assert field in metadata, field
    with tarfile.open(sdist) as tar:
        inside = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"LICENSE", "README.md", "pyproject.toml", "bnkit/py.typed"} <= inside


def test_the_wheel_installed_alone_runs_outside_the_source_tree(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    env = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(env), cwd=tmp_path)
    (purelib,) = env.glob("lib/python*/site-packages")
    # this environment's packages (keras, torch, ...) without its editable bnkit
    (purelib / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install",
         "--no-deps", "--no-index", "-q", str(wheel), cwd=tmp_path)  # fmt: skip
    bnkit_cmd = str(env / "bin" / "bnkit")
    assert "Usage: bnkit [OPTIONS] COMMAND" in _run(bnkit_cmd, "--help", cwd=tmp_path)
    assert bnkit.__version__ in _run(bnkit_cmd, "--version", cwd=tmp_path)
    code = (
        "import bnkit, torch\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))\n"
        "r = bnkit.adapt(m, torch.randn(8, 3, 6, 6).numpy())\n"
        "print(bnkit.__file__, r.samples)\n"
    )
    where, samples = _run(str(env / "bin" / "python"), "-c", code, cwd=tmp_path).split()
    assert Path(where).is_relative_to(env) and samples == "8"
