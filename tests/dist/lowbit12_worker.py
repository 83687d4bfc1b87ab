"""One launch of tests/dist/test_lowbit_gather12.py: ZeRO-1/2 packed gather vs stock.

    torchrun --nproc_per_node N tests/dist/lowbit12_worker.py OUT SEED STEPS

For each case (stage, method, bf16) of CASES: two engines from the same seed, both with the
default lowbit_gather (low-bit where served), one switched to the stock 16/32-bit gather
(``attachment(engine).lowbit.enabled = False``: the quantized groups keep their own call);
each trains STEPS steps with every all-gather's output bytes counted by kind
(cage_ds.zero.gather.current_kind). Rank 0 saves OUT: per case and mode, the full flat lp
buffers of the quantized groups after every step, the losses, the final latents, the bytes,
the wrapper type and whether the low-bit gather is on, and the quantized groups' layouts.
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
from deepspeed.comm import comm
from deepspeed.utils import safe_get_full_fp32_param

from cage_ds.zero import attachment, initialize
from cage_ds.zero.gather import current_kind

sys.path.insert(0, os.path.dirname(__file__))
from zero_case import GLOBAL_BATCH, ds_config, make_batch, make_model_and_optimizer, run_worker

# (stage, method, bf16): DeepSpeedZeroOptimizer bf16 and fp32 (clipping on), BF16_Optimizer
CASES = [(2, "quest", True), (1, "rtn", False), (1, "quest", True)]
COUNTS = {"quantized": 0, "other": 0}


def _count_gathers() -> None:
    """Add every all-gather's output bytes to COUNTS[current_kind()]."""
    backend = comm.cdb
    into, listed = backend.all_gather_into_tensor, backend.all_gather

    def all_gather_into_tensor(output_tensor, input_tensor, *args, **kwargs):
        COUNTS[current_kind()] += output_tensor.numel() * output_tensor.element_size()
        return into(output_tensor, input_tensor, *args, **kwargs)

    def all_gather(tensor_list, tensor, *args, **kwargs):
        COUNTS[current_kind()] += sum(t.numel() * t.element_size() for t in tensor_list)
        return listed(tensor_list, tensor, *args, **kwargs)

    backend.all_gather_into_tensor, backend.all_gather = all_gather_into_tensor, all_gather


def _layout(opt, i: int) -> tuple[list, list, list[int], int]:
    """(flat lp buffer, shapes, offsets, numel) of flat group i."""
    if hasattr(opt, "bf16_groups_flat"):
        flat = opt.bf16_groups_flat[i]
        shapes = [tuple(p.shape) for p in opt.bf16_groups[i]]
        offsets = [0]
        for p in opt.bf16_groups[i][:-1]:
            offsets.append(offsets[-1] + p.numel())
        return flat, shapes, offsets, flat.numel()
    flat = opt.bit16_groups_flat[i]
    shapes = [tuple(m.shape) for m in opt.round_robin_bit16_meta[i]]
    return flat, shapes, list(opt.round_robin_bit16_offsets[i]), flat.numel()


def _latents(engine) -> dict[str, torch.Tensor]:
    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def _run(case, lowbit: bool, seed: int, steps: int, rank: int, world: int) -> dict:
    stage, method, bf16 = case
    model, opt = make_model_and_optimizer("decoupled", seed=seed, method=method)
    engine, *_ = initialize(model=model, optimizer=opt, config=ds_config(stage, world, bf16))
    gather = attachment(engine).lowbit
    if gather is not None:
        gather.enabled = lowbit
    quantized = [i for i, g in enumerate(opt.param_groups) if g.get("quant") is not None]
    ds_opt = engine.optimizer
    COUNTS.update(quantized=0, other=0)
    flats, losses = [], []
    for k in range(steps):
        ids = make_batch(k)
        per = GLOBAL_BATCH // world
        loss = engine(input_ids=ids[rank * per : (rank + 1) * per],
                      labels=ids[rank * per : (rank + 1) * per]).loss  # fmt: skip
        engine.backward(loss)
        engine.step()
        flats.append([_layout(ds_opt, i)[0].detach().clone() for i in quantized])
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world)
    spec = opt.param_groups[quantized[0]]["quant"]
    out = {
        "flats": flats,
        "losses": losses,
        "latents": _latents(engine),
        "bytes": dict(COUNTS),
        "wrapper": type(ds_opt).__name__,
        "lowbit": type(gather).__name__,
        "gathers": getattr(gather, "gathers", 0),
        "layouts": [_layout(ds_opt, i)[1:] for i in quantized],
        "spec": spec,
    }
    engine.destroy()
    return out


def main() -> None:
    out, seed, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    _count_gathers()
    result = {
        case: {mode: _run(case, mode == "lowbit", seed, steps, rank, world)
               for mode in ("stock", "lowbit")}
        for case in CASES
    }  # fmt: skip
    if rank == 0:
        torch.save(result, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    run_worker(main)
