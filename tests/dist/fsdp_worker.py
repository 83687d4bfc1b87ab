"""One torchrun launch of the FSDP2 equality tests (run by tests/dist/test_fsdp_cage.py).

    torchrun --nproc_per_node N tests/dist/fsdp_worker.py OUT_DIR STEPS

For each CAGE variant (decoupled, coupled): the tiny Llama of zero_case.py (same seed),
prepare_model W4A4, cage_ds.fsdp.prepare, CageAdamW with zero_case's settings,
cage_ds.fsdp.attach; STEPS steps on this rank's share of the fixed global batch with
clipping zero_case.CLIP. Before every forward each gathered weight is compared with
Quantizer.values(full fp32 latent). Rank 0 writes OUT_DIR/<variant>.pt: per step the full
latents and Adam moments before it (trace), the final latents, the mean losses, the
gathered-weight comparisons.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import cage_ds.fsdp as cfsdp
from cage_ds.nn import cage_param_groups, quantized_modules
from cage_ds.optim import CageAdamW

sys.path.insert(0, os.path.dirname(__file__))
from zero_case import CLIP, GLOBAL_BATCH, make_batch, make_model_and_optimizer


def build(variant: str, method: str = "quest"):
    """The zero_case model, sharded by cage_ds.fsdp, and its attached CageAdamW."""
    model, single = make_model_and_optimizer(variant, method=method)
    cfsdp.prepare(model)
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


def compare_gathered(model, latents: dict, log: list) -> list:
    """Forward pre-hooks: gathered weight vs cast(Quantizer.values(latent)), exactly."""
    handles = []
    for name, layer in quantized_modules(model):

        def hook(mod, _args, name=name):
            w = mod.weight.detach()
            want = mod.weight_quantizer.values(latents[name + ".weight"]).to(w.dtype)
            log.append({"name": name, "numel": w.numel(), "mismatches": int((w != want).sum())})

        handles.append(layer.register_forward_pre_hook(hook))
    return handles


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
        cfsdp.clip_grad_norm_(opt, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def main() -> None:
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    for variant in ("decoupled", "coupled"):
        model, opt = build(variant)
        log: list = []
        trace: list = []
        losses = train(model, opt, 0, steps, log, trace)
        final = named_full(model, opt)[0]
        if dist.get_rank() == 0:
            out = {"trace": trace, "latents": final, "losses": losses, "gathered": log}
            torch.save(out, os.path.join(out_dir, f"{variant}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
