"""adapt and shift inside a torch.distributed job: two processes (gloo, spawned here),
each with its own shard, give what one process gives over the union of the shards, on
a plain module, a DDP-wrapped one and one with SyncBatchNorm (DDP with SyncBatchNorm
needs GPUs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch.multiprocessing as mp
from distributed_worker import run
from torch_nets import net

import bnkit

pytestmark = pytest.mark.slow


def job(tmp_path, kind: str, shards: list[tuple[int, int]], x: np.ndarray) -> list[dict]:
    np.save(tmp_path / "x.npy", x)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(run, args=(2, init, str(tmp_path), kind, shards), nprocs=2, join=True)
    out = []
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as f:
            out.append({k: f[k] for k in f.files})
    return out


@pytest.mark.parametrize("kind", ["plain", "ddp", "sync"])
def test_two_ranks_equal_one_process_over_the_union(tmp_path, kind):
    x = np.random.default_rng(0).normal(0.5, 2.0, (80, 3, 6, 6)).astype("float32")
    ranks = job(tmp_path, kind, [(0, 48), (48, 80)], x)  # uneven shards: 3 and 2 batches
    alone = net()
    report = bnkit.adapt(alone, x, batch_size=16)  # the same batches, in one process
    shift = bnkit.shift(net(), x, batch_size=16)
    expected = {}
    for name, layer in alone.named_modules():
        if hasattr(layer, "running_mean") and layer.running_mean is not None:
            expected[f"{name}.mean"] = layer.running_mean.numpy()
            expected[f"{name}.var"] = layer.running_var.numpy()
    assert len(expected) == 4
    for got in ranks:  # every rank holds the combined statistics
        assert int(got["samples"]) == report.samples == 80 and int(got["batches"]) == 5
        assert int(got["shift_samples"]) == 80
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(got["kl"], [la.kl_mean for la in shift.layers], rtol=1e-5)
        assert float(got["score"]) == pytest.approx(shift.score, rel=1e-5)
    # one shard alone gives other statistics: the combination is what made them equal
    half = net()
    bnkit.adapt(half, x[:48], batch_size=16)
    assert not np.allclose(half.stem[1].running_mean.numpy(), expected["stem.1.mean"])


def test_torchrun_adapt_and_shift_combine_shards_and_rank_0_writes(tmp_path):
    import json
    import subprocess
    import sys

    import torch
    from test_cli_torch import FACTORY

    (tmp_path / "models.py").write_text(FACTORY)
    spec = f"{tmp_path / 'models.py'}:build"
    x = np.random.default_rng(0).normal(2.0, 3.0, (80, 3, 6, 6)).astype("float32")
    np.savez(tmp_path / "target.npz", x=x)
    out = tmp_path / "adapted.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "bnkit.cli"]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*torchrun, "adapt", spec, str(tmp_path / "target.npz"), "-o",
                           str(out), "--batch-size", "16"], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote") == 1  # rank 0 alone writes and reports
    assert "on 80 samples (5 batches)" in done.stdout
    shifted = subprocess.run([*torchrun, "shift", spec, str(tmp_path / "target.npz"),
                              "--batch-size", "16", "--json"], capture_output=True, text=True,
                             env=env, timeout=300)  # fmt: skip
    assert shifted.returncode == 0, shifted.stderr[-2000:]
    doc = json.loads(shifted.stdout)  # one JSON document: rank 0's
    # one process over all the batches gives the same statistics and the same measure
    sys.path.insert(0, str(tmp_path))
    try:
        import models

        alone = models.build()
    finally:
        sys.path.remove(str(tmp_path))
    single = bnkit.shift(alone, x, batch_size=16)
    assert doc["samples"] == 80 and doc["score"] == pytest.approx(single.score, rel=1e-5)
    bnkit.adapt(alone, x, batch_size=16)
    state = torch.load(out, weights_only=True)
    for name in ("stem.1", "block.1"):
        layer = alone.get_submodule(name)
        np.testing.assert_allclose(state[f"{name}.running_mean"], layer.running_mean, rtol=1e-5)
        np.testing.assert_allclose(state[f"{name}.running_var"], layer.running_var, rtol=1e-5)
