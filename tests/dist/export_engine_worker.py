"""One DeepSpeed launch of the live-engine export test (run by tests/dist/test_export_engine.py).

    torchrun --nproc_per_node N tests/dist/export_engine_worker.py OUT_DIR STEPS

For ZeRO-2 and ZeRO-3: the tiny Llama of zero_case (W4A4, fp32, CAGE decoupled) under
cage_ds.zero.initialize trains STEPS steps, then every rank calls
cage_ds.zero.export_engine(engine, OUT_DIR/export_<stage>_rank<rank>, "both") (a folder per
rank: only rank 0's may exist afterwards). After ZeRO-3, every rank exports once more to
OUT_DIR/blocked, a file, so rank 0 fails writing: each rank records the error it got (every
rank must raise, none may hang). Rank 0 writes OUT_DIR/result.pt: the engine's full fp32
latents per stage (safe_get_full_fp32_param), {stage: latents}, and OUT_DIR/errors<rank>.txt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import torch

from cage_ds.zero import export_engine, initialize

sys.path.insert(0, os.path.dirname(__file__))
from zero_case import ds_config, make_model_and_optimizer, run_worker
from zero_worker import _latents, _train


def main() -> None:
    out_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    result: dict = {}
    for stage in (2, 3):
        model, opt = make_model_and_optimizer("decoupled")
        engine, *_ = initialize(model=model, optimizer=opt, config=ds_config(stage, world))
        _train(engine, steps, rank, world, 0, [])
        latents = _latents(engine)
        export_engine(engine, out_dir / f"export_{stage}_rank{rank}", "both")
        result[stage] = latents
        if stage == 3:
            if rank == 0:
                (out_dir / "blocked").write_text("a file where the export folder should go")
            torch.distributed.barrier()
            try:
                export_engine(engine, out_dir / "blocked", "hf")
                (out_dir / f"errors{rank}.txt").write_text("no error")
            except RuntimeError as err:
                (out_dir / f"errors{rank}.txt").write_text(str(err))
        engine.destroy()
    if rank == 0:
        torch.save(result, out_dir / "result.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    run_worker(main)
