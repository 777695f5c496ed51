"""`compare` on Ray: each (strategy, seed) run is a Ray task started from the packed
start model, on a local Ray instance or a cluster's address.

Runs are the same code as the sequential executor's (`compare._one_run`), from the same
start weights and seeds, so their numbers are the same (bit for bit when the thread
counts match: Ray gives each task one CPU and one thread). A run whose worker dies, or
that raises, comes back as that run failing; the others are kept.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bnkit.errors import BnkitError


def ray_module() -> Any:
    """`ray`, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BnkitError(
            "the ray executor needs Ray: pip install 'ray==2.60.0' (or leave --executor "
            "out to run sequentially)"
        ) from None
    return ray


CONNECT_SECONDS = 10.0
"""How long to try reaching a Ray cluster's address before saying it is unreachable (Ray
itself retries for ever)."""


def check_address(address: str | None) -> None:
    """Raises BnkitError, in one line, unless a Ray cluster's `address` (HOST:PORT or
    ray://HOST:PORT; None and `auto` are not checked) accepts a connection."""
    import socket

    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BnkitError(
            f"--address {address!r}: give the cluster's HOST:PORT, ray://HOST:10001, or auto"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise BnkitError(
            f"cannot reach Ray at {address} ({err.strerror or err or 'timed out'}); start the "
            "cluster (ray start --head) or check the address"
        ) from None


def _stdout_to_stderr(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` with what is printed on stdout sent to stderr while it runs."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return function(*args, **kwargs)

    return wrapper


@_stdout_to_stderr
def ray_runs(
    trainer: Any,
    model: Any,
    plans: Sequence[Any],
    seeds: Sequence[int],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: dict[str, Any],
    progress: Any,
    address: str | None,
    one_run: Callable[..., Any],
    failed: Callable[[str, int, str], Any],
) -> list[Any]:
    """Every (strategy, seed) run as a Ray task, each `one_run` (compare's, shipped to the
    workers by reference); the runs in the sequential order, a run whose task gave no
    result as `failed(strategy, seed, why)`.

    While it runs, what is printed on stdout goes to stderr: Ray's driver prints its
    workers' errors ("(raylet) A worker died ...") on stdout from a thread of its own, which
    would break `bnkit compare --json`'s output."""
    ray = ray_module()
    started = not ray.is_initialized()
    if started:
        check_address(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR",
                     runtime_env=_runtime_env(trainer) if address is None else None)  # fmt: skip
        except KeyboardInterrupt:  # Ctrl-C while Ray starts: stop what it started
            _shutdown(ray)
            raise
        except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError
            where = f"at {address}" if address else "locally"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise BnkitError(f"cannot start or reach Ray {where}: {first}") from None
    try:
        payload = ray.put(
            (type(trainer).__module__, trainer.worker_env(), trainer.packed(model), one_run)
        )
        train_ref, val_ref = ray.put(train), ray.put(val)
        task = ray.remote(num_cpus=1, max_retries=0)(_run_task)
        pending = {}
        order = []
        for seed in seeds:
            for strategy in plans:
                ref = task.remote(payload, strategy, seed, train_ref, val_ref, settings)
                pending[ref] = (strategy, seed)
                order.append((strategy.name, seed))
        if progress is not None:
            progress.run_started(f"{len(order)} runs on Ray", 0, 0, len(order))
        done = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            strategy, seed = pending.pop(ready[0])
            try:
                run = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                run = failed(strategy.name, seed, _why(ray, err))
            done[strategy.name, seed] = run
            if progress is not None:
                progress.run_finished(run)
        return [done[key] for key in order]
    finally:
        if started:
            _shutdown(ray)


SHUTDOWN_GRACE = 10.0
"""Seconds the processes a local Ray started get to end after `ray.shutdown()` before
they are killed."""


def _shutdown(ray: Any) -> None:
    """`ray.shutdown()`, then every process this one started for it (the local Ray's
    servers and its workers, `ray::_run_task`) waited for and killed if still there: a
    worker whose raylet went away can outlive the command by seconds, or for good when
    Ctrl-C came while Ray was starting."""
    import psutil

    started = psutil.Process().children(recursive=True)
    try:
        ray.shutdown()
    finally:
        _, alive = psutil.wait_procs(started, timeout=SHUTDOWN_GRACE)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=SHUTDOWN_GRACE)


def _why(ray: Any, err: BaseException) -> str:
    """One line on why a Ray task gave no run: its worker or node died, or its last
    error line (with the fix when the workers cannot import the model's code)."""
    died = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
    if isinstance(err, died):
        return "its worker died"
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    why = lines[-1] if lines else type(err).__name__
    if "ModuleNotFoundError" in why:
        why += (
            " (the Ray workers cannot import the model's code: start Ray with "
            "runtime_env={'py_modules': [...]} or {'working_dir': ...})"
        )
    return why


def _runtime_env(trainer: Any) -> dict[str, Any]:
    """For the workers of the Ray instance bnkit starts: what the framework needs (the
    Keras backend) and the driver's import path, so a model class defined in the
    user's modules loads there, as it does on a local machine."""
    env = dict(trainer.worker_env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return {"env_vars": env}


def _run_task(
    payload: tuple[str, dict[str, str], Any, Callable[..., Any]],
    strategy: Any,
    seed: int,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: dict[str, Any],
) -> Any:
    """One run in a Ray worker: the start model unpacked, then the run function."""
    module, env, packed, one_run = payload
    for name, value in env.items():  # before the framework is imported here
        os.environ.setdefault(name, value)
    from bnkit.backends import get_backend

    model = importlib.import_module(module).unpacked(packed)
    backend = get_backend(model)
    trainer = backend.trainer()
    start = trainer.save_state(model)
    # the object store hands out read-only arrays; training code may write to its inputs
    train = (np.array(train[0]), np.array(train[1]))
    val = (np.array(val[0]), np.array(val[1]))
    return one_run(backend, trainer, model, start, strategy, seed, train, val,
                   progress=None, run_index=(0, 1), features={}, **settings)  # fmt: skip
