"""Examples that cannot rot: every script in examples/ runs as a user runs it (a new
process, from another folder), and every Python block of the documentation is either
included from an example or run here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from conftest import USER_THREADS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.py"))
PAGES = sorted((ROOT / "docs").rglob("*.md"))
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')
OUTPUTS = {"compare_strategies.py": "compare.png", "adapt_new_data.py": "shift.png",
           "tta_stream.py": "tta.png", "start_torch.py": "r18.pt2"}  # fmt: skip

BACKEND = keras.backend.backend()


def uses_keras(text: str) -> bool:
    """Code that imports Keras runs on each Keras backend, in that backend's pass."""
    return re.search(r"^import keras\b|^from keras\b", text, re.M) is not None


def each_keras_backend(text: str) -> None:
    """Skips code that uses no Keras outside the torch pass."""
    if BACKEND != "torch" and not uses_keras(text):
        pytest.skip("uses no Keras: once, in the torch pass")


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_runs_as_written(script, tmp_path):
    """On the pass's Keras backend: examples that use Keras run in every pass."""
    each_keras_backend(script.read_text())
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "BNKIT_EXAMPLE_OUT": str(tmp_path)}
    env.pop("OMP_NUM_THREADS", None)  # as the user's shell had it, not as an import left it
    if USER_THREADS is not None:
        env["OMP_NUM_THREADS"] = USER_THREADS
    command = [sys.executable, str(script)]
    if script.name == "distributed_adapt.py":
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        command = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    printed = [_shape(line) for line in proc.stdout.splitlines()]
    shown = _what_it_prints(script) if BACKEND == "torch" else []  # as the pages show it
    for page, block in shown:
        missing = [line for line in block if not any(_pattern(line).fullmatch(p) for p in printed)]
        assert not missing, (
            f"{page}: the block the page says {script.name} prints has {missing}; it printed:\n"
            + proc.stdout[-2000:]
        )
    made = OUTPUTS.get(script.name)
    if script.name == "distributed_adapt.py":
        made = "adapted.pt"
    if made is not None:
        assert (tmp_path / made).stat().st_size > 0


PRINTS = re.compile(
    r'--8<-- "(examples/[^"]+)"\n```\n\nWhat it prints[^\n]*\n\n```\n(.*?)```', re.S
)
"""An included example, then the block its page says it prints."""
NUMBER = re.compile(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?")


def _what_it_prints(script: Path) -> list[tuple[str, list[str]]]:
    """(page, lines) for each page that includes `script` and shows what it prints."""
    found = []
    for page in PAGES:
        for name, block in PRINTS.findall(page.read_text()):
            if ROOT / name == script:
                lines = [line for line in block.splitlines() if line.strip()]
                found.append((str(page.relative_to(ROOT)), lines))
    return found


def _shape(line: str) -> str:
    """A printed line with every number as N: what a page shows must have the shape of
    a line the script prints (numbers move with the machine and the backend)."""
    return NUMBER.sub("N", line.strip())


def _pattern(shown: str) -> re.Pattern[str]:
    """A line a page shows, as the lines it stands for: numbers as N, '...' for what the
    page leaves out."""
    return re.compile(".*".join(re.escape(part) for part in _shape(shown).split("...")))


def test_every_python_block_in_the_docs_is_an_included_example():
    for page in PAGES:
        for block in BLOCK.findall(page.read_text()):
            lines = [line for line in block.strip().splitlines() if line.strip()]
            assert lines and all(INCLUDE.match(line) for line in lines), (
                f"{page.relative_to(ROOT)}: a Python block that is not included from "
                f"examples/ (so not run by the tests): {block[:80]!r}"
            )
            for line in lines:
                path = ROOT / INCLUDE.match(line).group(1)
                assert path.is_file() and path in EXAMPLES, (page, path)


def test_every_example_appears_in_the_docs():
    included = {
        m for page in PAGES for m in re.findall(r'--8<-- "(examples/[^"]+)"', page.read_text())
    }
    missing = [
        str(p.relative_to(ROOT)) for p in EXAMPLES if str(p.relative_to(ROOT)) not in included
    ]
    assert not missing, f"examples no page shows: {missing}"


@pytest.mark.parametrize("index", range(len(BLOCK.findall((ROOT / "README.md").read_text()))))
def test_every_python_block_of_the_readme_runs(index, tmp_path):
    block = BLOCK.findall((ROOT / "README.md").read_text())[index]
    each_keras_backend(block)
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    proc = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, block + proc.stderr[-3000:]
