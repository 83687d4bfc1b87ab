"""One rank of test_cpu_shm: DeepSpeed's CPU shm all-reduce files are unlinked right after
init, and the shm all-reduce still works afterwards. argv[1]: ``deepspeed`` (stock
deepspeed.init_distributed, then cage_ds.zero.cpu_shm) or ``cage-train`` (its init)."""

import sys

import deepspeed
import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist

from cage_ds.train.loop import init_distributed
from cage_ds.zero.cpu_shm import allreduce_buffer, unlink_allreduce_buffer

if sys.argv[1] == "deepspeed":
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    own = allreduce_buffer(rank)
    assert own.exists(), f"DeepSpeed made no shm all-reduce file {own}"
    assert unlink_allreduce_buffer() == own
    assert unlink_allreduce_buffer() is None  # a second call: nothing left, no error
else:
    rank, world = init_distributed()
dist.barrier()
left = [p.name for p in map(allreduce_buffer, range(world)) if p.exists()]
assert not left, f"shm all-reduce files left: {left}"
x = torch.arange(8, dtype=torch.float32) * (rank + 1)
ds_comm.inference_all_reduce(x)  # DeepSpeed's shm path, through the unlinked files
expected = torch.arange(8, dtype=torch.float32) * sum(range(1, world + 1))
assert torch.equal(x, expected), (x, expected)
print(f"rank {rank} ok")
