"""compare on Ray: every (strategy, seed) run a task on a local Ray instance, numbers
identical to the sequential executor's (one thread each), runs reported as they finish,
a run whose worker dies reported as failing with the others kept; on a PyTorch module
and a Keras model (torch backend); and `bnkit compare --executor ray`."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
import torch
from test_compare import _numbers
from torch_nets import net

import bnkit

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray whose workers import what the tests do (torch_nets), as a user's
    runtime_env would give them."""
    import sys

    path = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": path})  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Ray gives each task one thread: the sequential run gets the same, so that every
    reduction adds in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def splits(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, size=(48, *shape)).astype("float32")
    axis = 1 if shape[0] == 3 else -1
    y = (x.mean(axis=tuple(i for i in range(1, 4) if i != (axis % 4))) > 0.5).astype(int)
    y = y[:, 0] + (y[:, 1] if y.ndim > 1 else 0)
    return (x[:32], y[:32]), (x[32:], y[32:])


class Finished:
    def __init__(self):
        self.runs = []
        self.started = []

    def run_started(self, label, steps, index, total):
        self.started.append((label, total))

    def step(self):
        pass

    def run_finished(self, run):
        self.runs.append((run.strategy, run.seed))


def test_ray_runs_equal_the_sequential_runs_on_a_torch_module(local_ray, one_thread):
    data = splits((3, 6, 6))
    kwargs = {"epochs": 2, "seeds": 2, "batch_size": 8}
    strategies = ["frozen", "train", "adapt", "tent"]
    model = net()
    sequential = bnkit.compare(model, *data, strategies, **kwargs)
    seen = Finished()
    on_ray = bnkit.compare(model, *data, strategies, executor="ray", progress=seen, **kwargs)
    assert _numbers(on_ray) == _numbers(sequential)
    assert {r.status for r in on_ray.runs} == {"ok"} and len(on_ray.runs) == 8
    assert seen.started == [("8 runs on Ray", 8)] and sorted(seen.runs) == sorted(
        (r.strategy, r.seed) for r in on_ray.runs
    )


def test_ray_runs_equal_the_sequential_runs_on_a_keras_model(local_ray, one_thread):
    import keras
    from conftest import INPUT, build_transfer

    if keras.backend.backend() != "torch":
        pytest.skip("the Ray workers run the torch pass's Keras backend")
    data = splits(INPUT)
    model, _ = build_transfer()
    kwargs = {"epochs": 1, "seeds": 2, "batch_size": 8}
    sequential = bnkit.compare(model, *data, ["frozen", "train"], **kwargs)
    on_ray = bnkit.compare(model, *data, ["frozen", "train"], executor="ray", **kwargs)
    assert _numbers(on_ray) == _numbers(sequential)


def test_a_run_whose_worker_dies_fails_and_the_others_are_kept(local_ray, tmp_path):
    marker = tmp_path / "died"

    def deadly_loss(outputs, labels):  # kills the first worker process that trains
        try:  # created atomically: two workers that start together cannot both die
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return torch.nn.functional.cross_entropy(outputs, labels)
        os._exit(1)

    data = splits((3, 6, 6))
    result = bnkit.compare(net(), *data, ["frozen", "train"], epochs=1, seeds=2, batch_size=8,
                           loss=deadly_loss, executor="ray")  # fmt: skip
    failed = [r for r in result.runs if r.status == "failed"]
    assert len(failed) == 1 and failed[0].error == "its worker died"
    assert sum(r.status == "ok" for r in result.runs) == 3
    summary = {s.strategy: s for s in result.summaries}[failed[0].strategy]
    assert summary.failed == 1 and summary.runs == 1 and np.isfinite(summary.val_accuracy_mean)
    assert any("failed (its worker died): left out of the summary" in n for n in result.notes)
    assert json.loads(result.to_json())["runs"][result.runs.index(failed[0])]["status"] == "failed"


DYING = """
import os

from models import Net


class Dying(Net):
    \"\"\"The first process that trains it dies (the marker file is created atomically).\"\"\"

    def forward(self, x):
        if self.training:
            try:
                os.close(os.open(os.environ["BNKIT_DIE_MARK"], os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return super().forward(x)


def build():
    import torch

    torch.manual_seed(0)
    return Dying()
"""


def test_compare_command_with_the_ray_executor_keeps_stdout_json(tmp_path):
    """`bnkit compare --executor ray --json` as a user runs it: its own local Ray, one
    run whose worker dies, and stdout still one JSON document (Ray's driver prints the
    raylet's "A worker died" on stdout unless bnkit sends it to stderr)."""
    import subprocess
    import sys

    from test_cli_torch import FACTORY

    (tmp_path / "models.py").write_text(FACTORY)
    (tmp_path / "dying.py").write_text(DYING)
    (x, y), _ = splits((3, 6, 6))
    data = str(tmp_path / "d.npz")
    np.savez(data, x=x, y=y)
    env = {**os.environ, "BNKIT_DIE_MARK": str(tmp_path / "died")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env.pop("KERAS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bnkit.cli", "compare", f"{tmp_path / 'dying.py'}:build", data,
         "--val", data, "--strategies", "frozen,train", "--epochs", "1", "--seeds", "1",
         "--batch-size", "8", "--executor", "ray", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert {r["strategy"] for r in doc["runs"]} == {"frozen", "train"}
    assert sorted(r["status"] for r in doc["runs"]) == ["failed", "ok"]
    assert any(r["error"] == "its worker died" for r in doc["runs"])
    assert "seed 0: val accuracy" in proc.stderr


def test_address_without_the_ray_executor_is_refused(capsys, tmp_path):
    from test_cli import run
    from test_cli_torch import FACTORY

    (tmp_path / "models.py").write_text(FACTORY)
    (x, y), _ = splits((3, 6, 6))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code, _, err = run(capsys, "compare", f"{tmp_path / 'models.py'}:build",
                       str(tmp_path / "d.npz"), "--val", str(tmp_path / "d.npz"), "--address",
                       "auto")  # fmt: skip
    assert code == 2 and "--address names a Ray cluster: give it with --executor ray" in err


def _ours(mark: str) -> list:
    """Every process whose environment carries `mark` (the command and all it started)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("BNKIT_TEST_MARK") == mark:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _command(p: Any) -> str:
    """`p`'s command line, or '' once it has exited (Ray starts short-lived helpers, which
    may end between being listed and being read)."""
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.parametrize("when", ["ray-starting", "running"] * 2)
def test_ctrl_c_leaves_no_ray_process_behind(tmp_path, when):
    """Ctrl-C while the local Ray starts or while its tasks run: exit 130, and no process
    the command started (Ray's servers, its `ray::_run_task` workers) is left."""
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from test_cli import foreground
    from test_cli_torch import FACTORY

    (tmp_path / "models.py").write_text(FACTORY)
    (x, y), _ = splits((3, 6, 6))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    mark = uuid.uuid4().hex
    env = {**os.environ, "BNKIT_TEST_MARK": mark, "PYTHONFAULTHANDLER": "1"}
    env.pop("KERAS_BACKEND", None)
    data = str(tmp_path / "d.npz")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnkit.cli", "compare", f"{tmp_path / 'models.py'}:build", data,
         "--val", data, "--strategies", "frozen,train", "--epochs", "50", "--seeds", "3",
         "--executor", "ray", "-o", str(tmp_path / "out")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=foreground,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Ray is starting once its first server runs
        started = [p for p in _ours(mark) if p.pid != proc.pid]
        workers = [p for p in started if "ray::" in _command(p)]
        if (when == "ray-starting" and started) or (when == "running" and workers):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    left = [p for p in _ours(mark) if p.is_running()]
    assert not left, [_command(p)[:80] for p in left]
    assert not (tmp_path / "out").exists()
