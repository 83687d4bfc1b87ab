"""One torchrun launch of the FSDP2 equality tests (run by tests/dist/test_fsdp_cage.py).

    torchrun --nproc_per_node N tests/dist/fsdp_worker.py OUT_DIR STEPS [save|load CKPT]

For each CAGE variant (decoupled, coupled): the tiny Llama of zero_case.py (same seed),
prepare_model W4A4, cage_ds.fsdp.prepare, CageAdamW with zero_case's settings,
cage_ds.fsdp.attach; STEPS steps on this rank's share of the fixed global batch with
clipping zero_case.CLIP. Before every forward each gathered weight is compared with
Quantizer.values(full fp32 latent). Rank 0 writes OUT_DIR/<variant>.pt: per step the full
latents and Adam moments before it (trace), the final latents, the mean losses, the
gathered-weight comparisons.
``save CKPT`` instead (decoupled): train 1 step, cage_ds.fsdp.save to CKPT, write the full
state there (OUT_DIR/saved.pt), then the uninterrupted run to STEPS (OUT_DIR/straight.pt)
and a fresh model that loads CKPT and continues to STEPS (OUT_DIR/resumed.pt).
``load CKPT``: a fresh model loads CKPT and continues to STEPS (OUT_DIR/resumed.pt, with the
full state right after the load and the trace of the continued steps).
``lowbit`` instead: for each LOWBIT_CASES entry, STEPS decoupled steps (clipping) twice, with
the weights gathered in values and low-bit (prepare's lowbit_gather False / True); rank 0
writes OUT_DIR/lowbit.pt: per case and run the weights every forward saw, the losses, the
final latents, the compare_gathered log, every rank's bytes handed to the all-gathers by the
quantized weights (sent_bytes) and by all parameters (count_all_gathers).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

import cage_ds.fsdp as cfsdp
from cage_ds.nn import cage_param_groups, quantized_modules
from cage_ds.optim import CageAdamW

sys.path.insert(0, os.path.dirname(__file__))
from zero_case import (
    CLIP,
    GLOBAL_BATCH,
    compare_gathered,
    make_batch,
    make_model_and_optimizer,
    run_worker,
)

LOWBIT_CASES = {"quest": ("quest", torch.float32), "rtn": ("rtn", torch.float32),
                "quest_bf16": ("quest", torch.bfloat16)}  # fmt: skip
"""case: (weight quantizer method, FSDP2 param dtype)."""


def build(variant: str, method: str = "quest", **prepare_kw):
    """The zero_case model, sharded by cage_ds.fsdp (prepare_kw), and its attached CageAdamW."""
    model, single = make_model_and_optimizer(variant, method=method)
    cfsdp.prepare(model, **prepare_kw)
    settings = {k: v for k, v in single.defaults.items() if k != "quant"}
    opt = CageAdamW(cage_param_groups(model, weight_decay=0.1), **settings)
    return model, cfsdp.attach(opt)


def named_full(model, opt) -> tuple[dict, dict | None, dict | None]:
    """Full latents and (when stepped) Adam moments by parameter name (collective)."""
    named = list(model.named_parameters())
    latents = {n: cfsdp.full_value(p) for n, p in named}
    if not opt.state:
        return latents, None, None
    m = {n: cfsdp.full_value(opt.state[p]["exp_avg"]) for n, p in named}
    v = {n: cfsdp.full_value(opt.state[p]["exp_avg_sq"]) for n, p in named}
    return latents, m, v


def train(model, opt, first: int, steps: int, log: list, trace: list | None) -> list[float]:
    """Steps first .. first + steps - 1; returns the global mean losses."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per = GLOBAL_BATCH // world
    losses = []
    for k in range(first, first + steps):
        full = named_full(model, opt)
        if trace is not None:
            trace.append(full)
        handles = compare_gathered(model, full[0], log)
        ids = make_batch(k)[rank * per : (rank + 1) * per]
        loss = model(input_ids=ids, labels=ids).loss
        for h in handles:
            h.remove()
        loss.backward()
        cfsdp.clip_grad_norm_(model, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def _save(out_dir: str, steps: int, ckpt: str) -> None:
    model, opt = build("decoupled")
    train(model, opt, 0, 1, [], None)
    saved = named_full(model, opt)
    cfsdp.save(ckpt, model, opt)
    train(model, opt, 1, steps - 1, [], None)
    straight = named_full(model, opt)[0]
    _load(out_dir, steps, ckpt)
    if dist.get_rank() == 0:
        torch.save(saved, os.path.join(out_dir, "saved.pt"))
        torch.save(straight, os.path.join(out_dir, "straight.pt"))


def _load(out_dir: str, steps: int, ckpt: str) -> None:
    model, opt = build("decoupled")
    cfsdp.load(ckpt, model, opt)
    loaded = named_full(model, opt)
    step = {int(s["step"]) for s in opt.state.values()}
    log: list = []
    trace: list = []
    train(model, opt, 1, steps - 1, log, trace)
    out = {"loaded": loaded, "step": step, "trace": trace, "gathered": log}
    out["latents"] = named_full(model, opt)[0]
    if dist.get_rank() == 0:
        torch.save(out, os.path.join(out_dir, "resumed.pt"))


def _lowbit(out_dir: str, steps: int) -> None:
    result = {}
    for case, (method, dtype) in LOWBIT_CASES.items():
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for lowbit in (False, True):
            model, opt = build("decoupled", method, mp_policy=policy, lowbit_gather=lowbit)
            counter = cfsdp.count_all_gathers(model)
            seen: list = []
            hooks = [
                layer.register_forward_pre_hook(
                    lambda mod, _a, name=name, seen=seen: seen.append(
                        (name, mod.weight.detach().clone())
                    )
                )
                for name, layer in quantized_modules(model)
            ]
            log: list = []
            losses = train(model, opt, 0, steps, log, None)
            for h in hooks:
                h.remove()
            sent = [None] * dist.get_world_size()
            dist.all_gather_object(sent, (cfsdp.sent_bytes(model), counter.nbytes))
            result[case, lowbit] = {
                "weights": seen, "losses": losses, "gathered": log, "bytes": sent,
                "latents": named_full(model, opt)[0],
                "lowbit": [n for n, p in cfsdp.gather_plans(model).items() if p.wire],
            }  # fmt: skip
    if dist.get_rank() == 0:
        torch.save(result, os.path.join(out_dir, "lowbit.pt"))


def main() -> None:
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    if len(sys.argv) > 3:
        modes = {"save": _save, "load": _load, "lowbit": _lowbit}
        modes[sys.argv[3]](out_dir, steps, *sys.argv[4:])
    for variant in ("decoupled", "coupled") if len(sys.argv) == 3 else ():
        model, opt = build(variant)
        log: list = []
        trace: list = []
        losses = train(model, opt, 0, steps, log, trace)
        final = named_full(model, opt)[0]
        if dist.get_rank() == 0:
            out = {"trace": trace, "latents": final, "losses": losses, "gathered": log}
            torch.save(out, os.path.join(out_dir, f"{variant}.pt"))
    dist.barrier()


if __name__ == "__main__":
    run_worker(main)
