"""CAGE on torch FSDP2 (``fully_shard``): dim-0 row shards, quantize before the all-gather.

    model = cage_ds.fsdp.prepare(prepare_model(llama, QuantConfig.preset("w4a4")))
    opt = cage_ds.fsdp.attach(CageAdamW(cage_param_groups(model), ...))
    loss.backward(); cage_ds.fsdp.clip_grad_norm_(model, 1.0); opt.step()

Same layer as cage_ds.zero; touches only torch's public FSDP2 / DTensor / DCP APIs.
"""

from .checkpoint import load, load_latents, save
from .clip import clip_grad_norm_
from .latent import GatherPlan, LatentWeight, full_value, local_rows, to_latent_grads_
from .lowbit import count_all_gathers, gather_plans, sent_bytes, set_lowbit_gather
from .optimizer import RowShardQuantOps, attach
from .prepare import default_mesh, prepare
from .stats import quant_stats

__all__ = [
    "GatherPlan",
    "LatentWeight",
    "RowShardQuantOps",
    "attach",
    "clip_grad_norm_",
    "count_all_gathers",
    "default_mesh",
    "full_value",
    "gather_plans",
    "load",
    "load_latents",
    "local_rows",
    "prepare",
    "quant_stats",
    "save",
    "sent_bytes",
    "set_lowbit_gather",
    "to_latent_grads_",
]
