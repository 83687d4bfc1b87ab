"""One DeepSpeed launch of the ZeRO equality tests (run by tests/dist/test_zero_cage.py).

    deepspeed --num_accelerators N tests/dist/zero_worker.py OUT_DIR STEPS CKPT_AT

For every ZeRO stage (1, 2, 3) and CAGE variant (decoupled, coupled), sequentially in this
process: build the tiny Llama (fixed seed), prepare_model W4A4, CageAdamW, and
cage_ds.zero.initialize; train STEPS steps on this rank's share of the fixed global batch.
Before every forward the gathered quantized weights are compared with
Quantizer.values(full fp32 latent) (deepspeed.utils.safe_get_full_fp32_param). Rank 0
writes OUT_DIR/<stage>_<variant>.pt with the final latents, losses, those comparisons and
cage_ds.zero.quant_stats(engine) after the last step (result["quant_stats"]).
With CAGE_ZERO_EXTRA=1 it also runs a bf16 smoke (BF16_Optimizer, ZeRO-3) and RTN weight
quantizers (ZeRO-2, ZeRO-3). For every stage (decoupled) it also saves a checkpoint after
CKPT_AT steps, reloads it into a fresh engine and continues (result["resumed"]).
CAGE_ZERO_CASES="3:coupled,..." runs only those cases (the determinism re-launch).
"""

from __future__ import annotations

import os
import sys
import time

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from cage_ds.zero import attachment, initialize, quant_stats

sys.path.insert(0, os.path.dirname(__file__))
from zero_case import (
    GLOBAL_BATCH,
    compare_gathered,
    ds_config,
    make_batch,
    make_model_and_optimizer,
    run_worker,
)


def _latents(engine) -> dict[str, torch.Tensor]:
    return {
        n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()
    }


def _moments(engine) -> tuple[dict, dict]:
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19.8 links optimizer states after the first group's first step only,
        # before the client optimizer created the other groups' states: link again.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    named = list(engine.module.named_parameters())
    m = {n: safe_get_full_optimizer_state(p, "exp_avg") for n, p in named}
    v = {n: safe_get_full_optimizer_state(p, "exp_avg_sq") for n, p in named}
    return m, v


def _train(
    engine, steps: int, rank: int, world: int, first: int, log: list, trace=None
) -> list[float]:
    """Train ``steps`` steps from step ``first``; ``trace`` collects (W_k, m_k, v_k) per step."""
    losses = []
    for k in range(first, first + steps):
        latents = _latents(engine)
        if trace is not None:
            trace.append((latents, *_moments(engine)) if k > 0 else (latents, None, None))
        handles = compare_gathered(engine.module, latents, log)
        ids = make_batch(k)
        per = GLOBAL_BATCH // world
        mine = ids[rank * per : (rank + 1) * per]
        loss = engine(input_ids=mine, labels=mine).loss
        for h in handles:
            h.remove()
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def _engine(stage: int, variant: str, world: int, bf16: bool = False, method: str = "quest"):
    model, opt = make_model_and_optimizer(variant, method=method)
    engine, *_ = initialize(model=model, optimizer=opt, config=ds_config(stage, world, bf16))
    return engine, opt


def _rtn_cases(steps: int, rank: int, world: int, out_dir: str) -> None:
    """RTN weights (absmax groups, no rotation) on ZeRO-2 and ZeRO-3: OUT_DIR/rtn_<stage>.pt."""
    for stage in (2, 3):
        engine, _ = _engine(stage, "decoupled", world, method="rtn")
        log: list = []
        trace: list = []
        _train(engine, steps, rank, world, 0, log, trace)
        out = {"latents": _latents(engine), "trace": trace, "gathered": log}
        engine.destroy()
        if rank == 0:
            torch.save(out, os.path.join(out_dir, f"rtn_{stage}.pt"))


def _bf16_cases(steps: int, rank: int, world: int, out_dir: str) -> None:
    """bf16 smoke (no fp32 oracle): BF16_Optimizer (stage 1) and ZeRO-3 write and gather
    cast_bf16(q(W H)) and train; OUT_DIR/bf16_<stage>.pt holds the gathered checks."""
    for stage in (1, 3):
        engine, _opt = _engine(stage, "decoupled", world, bf16=True)
        log: list = []
        before = _latents(engine)
        losses = _train(engine, steps, rank, world, 0, log)
        after = _latents(engine)
        out = {
            "latents": after,
            "quant_stats": quant_stats(engine),
            "wrapper": type(engine.optimizer).__name__,
            "gathered": log,
            "losses": losses,
            "moved": {n: bool((after[n] != before[n]).any()) for n in after},
            "exchanges": sum(o.exchanges for o in attachment(engine).ops.values()),
        }
        engine.destroy()
        if rank == 0:
            torch.save(out, os.path.join(out_dir, f"bf16_{stage}.pt"))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, steps, ckpt_at = args[0], int(args[1]), int(args[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    only = os.environ.get("CAGE_ZERO_CASES")  # e.g. "3:decoupled" to run a subset
    for stage in (1, 2, 3):
        for variant in ("decoupled", "coupled"):
            if only and f"{stage}:{variant}" not in only.split(","):
                continue
            t0 = time.time()
            log: list = []
            trace: list = []
            engine, _opt = _engine(stage, variant, world)
            losses = _train(engine, steps, rank, world, 0, log, trace)
            final = _latents(engine)
            telemetry = quant_stats(engine)  # collective: every rank, same point
            ops = list(attachment(engine).ops.values())
            stats = {
                "exchanges": sum(o.exchanges for o in ops),
                "bytes_received": sum(o.bytes_received for o in ops),
                "elements_quantized": sum(o.elements_quantized for o in ops),
            }
            result = {
                "latents": final,
                "trace": trace,
                "losses": losses,
                "gathered": log,
                "stats": stats,
                "quant_stats": telemetry,
                "world": world,
            }
            if variant == "decoupled":
                result["resumed"] = _resume(stage, variant, world, rank, steps, ckpt_at, out_dir)
            engine.destroy()
            if rank == 0 and os.environ.get("CAGE_ZERO_TIMING"):
                print(f"case {stage}:{variant} {time.time() - t0:.1f}s", file=sys.stderr)
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{stage}_{variant}.pt"))
    if os.environ.get("CAGE_ZERO_EXTRA") == "1":
        _bf16_cases(steps, rank, world, out_dir)
        _rtn_cases(steps, rank, world, out_dir)
    torch.distributed.barrier()


def _resume(stage, variant, world, rank, steps, ckpt_at, out_dir) -> dict:
    """Train ckpt_at steps, save, reload into a fresh engine, train the rest."""
    ckpt = os.path.join(out_dir, f"ckpt_{stage}")
    engine, _ = _engine(stage, variant, world)
    _train(engine, ckpt_at, rank, world, 0, [])
    at_ckpt = _latents(engine)
    engine.save_checkpoint(ckpt, tag="t")
    engine.destroy()
    engine, _ = _engine(stage, variant, world)
    engine.load_checkpoint(ckpt, tag="t")
    log: list = []
    losses = _train(engine, steps - ckpt_at, rank, world, ckpt_at, log)
    out = {"latents": _latents(engine), "at_ckpt": at_ckpt, "losses": losses, "gathered": log}
    engine.destroy()
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        out["zero_to_fp32"] = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="t")
    return out


if __name__ == "__main__":
    run_worker(main)
