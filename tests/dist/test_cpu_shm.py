"""DeepSpeed's CPU shm all-reduce leaves a 69 MB /dev/shm file per rank and job
(cage_ds.zero.cpu_shm): every cage_ds DeepSpeed job unlinks its own right after init."""

from __future__ import annotations

from pathlib import Path

import pytest
from testkit import run_ranks

WORKER = str(Path(__file__).with_name("cpu_shm_worker.py"))


@pytest.mark.slow
@pytest.mark.parametrize("init", ["deepspeed", "cage-train"])
@pytest.mark.parametrize("world", [2, 3])
def test_shm_allreduce_files_are_unlinked_after_init(init, world):
    # LOCAL_SIZE == world: all ranks local, the condition under which DeepSpeed (and its
    # launcher, which sets LOCAL_SIZE) uses the shm all-reduce
    out = run_ranks(world, WORKER, init, env={"LOCAL_SIZE": str(world)})
    assert [line.splitlines()[-1] for line in out] == [f"rank {r} ok" for r in range(world)]
