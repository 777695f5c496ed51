"""Re-estimate BN statistics inside a torch.distributed job: each rank passes its shard,
the per-layer moments are combined across ranks, and every rank ends with the statistics
of the whole data, as one process over all of it would compute them.

    torchrun --standalone --nproc-per-node 2 examples/distributed_adapt.py  # 15 s

The command line does the same: torchrun --standalone --nproc-per-node 2 -m bnkit.cli
adapt torchvision:resnet18 --weights ckpt.pt target.npz -o adapted.pt
"""

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bnkit
from bnkit.data import digits

dist.init_process_group("gloo")  # NCCL on GPUs
rank = dist.get_rank()
torch.manual_seed(0)  # the same start weights on every rank
model = DistributedDataParallel(
    torchvision.models.resnet18(weights=None, num_classes=10)
)

images = torch.as_tensor(digits("target", size=32).train[0].transpose(0, 3, 1, 2))
sampler = DistributedSampler(TensorDataset(images), shuffle=False)  # this rank's shard
report = bnkit.adapt(
    model, DataLoader(TensorDataset(images), batch_size=64, sampler=sampler)
)
print(
    f"rank {rank}: {report.samples} samples combined over {dist.get_world_size()} ranks"
)

mean = model.module.bn1.running_mean.clone()
gathered = [torch.empty_like(mean) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, mean)
assert all(
    torch.equal(g, mean) for g in gathered
)  # every rank holds the same statistics
if rank == 0:  # one rank writes
    out = Path(os.environ.get("BNKIT_EXAMPLE_OUT", tempfile.mkdtemp())) / "adapted.pt"
    torch.save(model.module.state_dict(), out)
    print(f"rank 0 wrote {out}")
# every rank waits for the others before leaving: a rank that destroys the group while
# another still works can abort in gloo's threads when a DDP wrapper still holds it
dist.barrier()
dist.destroy_process_group()
