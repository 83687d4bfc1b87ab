"""Free DeepSpeed's CPU shared-memory all-reduce files when the job ends, not never.

deepspeed==0.19.8 (ops/csrc/cpu/comm/shm.cpp, ``shm_initialize``): when every rank is local
(env LOCAL_SIZE == world size, as the DeepSpeed launcher sets it), each rank creates
/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (69 MB),
maps every peer's file and never unlinks its own: every CPU job leaves world x 69 MB of
memory behind (tmpfs), and a day of jobs once filled 16 GB and made the machine thrash.

Invariant used here: once ``shm_initialize`` has returned on every rank, every rank has
mapped every file, and nothing opens them by name again. So after a barrier each rank may
unlink its own name; the mappings stay valid and the memory is freed when the last rank
exits, however it exits (kill -9 included).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def allreduce_buffer(rank: int) -> Path:
    """This job's shm all-reduce file for ``rank`` (the name shm.cpp builds)."""
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _uses_shm_allreduce() -> bool:
    """DeepSpeed's own condition: CPU accelerator, process group up, all ranks local."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or not dist.is_initialized():
        return False
    return os.environ.get("LOCAL_SIZE") == str(dist.get_world_size())


def unlink_allreduce_buffer() -> Path | None:
    """Collective: after a barrier, unlink this rank's shm all-reduce file (module
    docstring). Returns the path removed, None where DeepSpeed made none. Call it on every
    rank right after ``deepspeed.init_distributed``; calling it again is harmless."""
    if not _uses_shm_allreduce():
        return None
    dist.barrier()
    path = allreduce_buffer(dist.get_rank())
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path
