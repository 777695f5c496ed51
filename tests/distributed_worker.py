"""One rank of the 2-process `torch.distributed` jobs of test_distributed (gloo, CPU):
each rank adapts and measures its own shard; each writes what it got."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import bnkit


def model(kind: str) -> nn.Module:
    """The same weights on every rank, as `net()` builds them, wrapped as `kind` says."""
    from torch_nets import net

    m = net()
    if kind in ("sync", "sync+ddp"):
        m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
    if kind in ("ddp", "sync+ddp"):
        m = nn.parallel.DistributedDataParallel(m)
    return m


def bn_stats(m: nn.Module) -> dict[str, np.ndarray]:
    out = {}
    for name, layer in m.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            name = name.removeprefix("module.")
            out[f"{name}.mean"] = layer.running_mean.numpy().copy()
            out[f"{name}.var"] = layer.running_var.numpy().copy()
    return out


def run(rank: int, world: int, init: str, out: str, kind: str, shards: list[tuple[int, int]]):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x = np.load(Path(out) / "x.npy")
        start, stop = shards[rank]
        adapted = model(kind)
        report = bnkit.adapt(adapted, x[start:stop], batch_size=16)
        shift = bnkit.shift(model(kind), x[start:stop], batch_size=16)
        kl = np.array([layer.kl_mean for layer in shift.layers])
        np.savez(Path(out) / f"rank{rank}.npz", samples=report.samples, batches=report.batches,
                 shift_samples=shift.samples, kl=kl, score=shift.score,
                 **bn_stats(adapted))  # fmt: skip
    finally:
        dist.destroy_process_group()
