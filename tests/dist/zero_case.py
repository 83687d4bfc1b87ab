"""The tiny Llama case shared by the ZeRO worker and the single-process oracle.

Shapes make ZeRO partitions cut rows and 128-element Hadamard blocks with 3 ranks: hidden
256 (2 blocks), 2 heads of 128, intermediate 640 (5 blocks), one layer. ZeRO-3 cuts each
parameter at numel/3 (every piece starts and ends inside a row and a block); the ZeRO-1/2
quantized group has 5888 blocks (not divisible by 3), so its flat partitions are cut inside
rows and blocks too. With 2 or 4 ranks all cuts fall on row boundaries (every numel here is
a multiple of 256 * 128): the 2-rank runs check the aligned case (test_zero_cage.py leaves
out 4, the same case at twice the processes; the low-bit gather tests run 4 ranks);
tests/dist/test_shardmap.py covers arbitrary cuts for 1..5 ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cage_ds.nn import cage_param_groups, quantized_modules
from cage_ds.optim import CageAdamW
from cage_ds.quant import QuantConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workers run as scripts
from testkit import tiny_llama

GLOBAL_BATCH = 12  # divisible by every world size tested (1..4)
SEQ = 16
VOCAB = 96
LR = 1e-3
LAMBDA = 10.0
CLIP = 1.0  # the paper's; the step-0 gradient norm here is ~2.7, so clipping is active


def make_model_and_optimizer(variant: str, seed: int = 1234, method: str = "quest"):
    """Fresh fp32 tiny Llama, W4A4-prepared, and its CageAdamW (lambda active from step 1)."""
    quant = QuantConfig.preset("w4a4", method=method)
    model = tiny_llama(seed, quant, vocab_size=VOCAB, intermediate_size=640, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=128,
                       max_position_embeddings=SEQ)  # fmt: skip
    groups = cage_param_groups(model, weight_decay=0.1)
    opt = CageAdamW(
        groups,
        lr=LR,
        cage_lambda=LAMBDA,
        cage_silence=0.0,
        cage_schedule="constant",
        cage_variant=variant,
    )
    return model, opt


def make_batch(step: int) -> torch.Tensor:
    """The global batch of step ``step`` (same on every rank and in the oracle)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)


def ds_config(stage: int, world: int, bf16: bool = False) -> dict:
    """DeepSpeed config, fp32 with gradient clipping CLIP, or bf16 without clipping (stage 1 +
    bf16 + fp32 grad accumulation selects BF16_Optimizer, which refuses clipping)."""
    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0 if bf16 else CLIP,
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
        if stage == 1:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def oracle_step(
    variant: str, k: int, latents: dict, exp_avg: dict, exp_avg_sq: dict, method: str = "quest"
) -> dict:
    """Single process, unsharded: one prepare_model + CageAdamW step (0-based step k) on the
    full global batch of step k, from the given latents and Adam moments (None at k = 0)."""
    model, opt = make_model_and_optimizer(variant, method=method)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(latents[n])
    if k > 0:
        for n, p in named.items():
            opt.state[p] = {
                "step": torch.tensor(float(k)),
                "exp_avg": exp_avg[n].clone(),
                "exp_avg_sq": exp_avg_sq[n].clone(),
            }
    ids = make_batch(k)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return {n: p.detach().clone() for n, p in named.items()}


def compare_gathered(module, latents: dict[str, torch.Tensor], log: list) -> list:
    """Forward pre-hooks on ``module``'s QuantLinear layers: the weight each forward sees
    (gathered by ZeRO-3 / FSDP2) vs cast(Quantizer.values(latent)) of the full tensor,
    element for element; appends one record per layer and forward to ``log``."""
    handles = []
    for name, layer in quantized_modules(module):

        def hook(mod, _args, name=name):
            w = mod.weight.detach()
            want = mod.weight_quantizer.values(latents[name + ".weight"]).to(w.dtype)
            log.append({"name": name, "numel": w.numel(), "mismatches": int((w != want).sum())})

        handles.append(layer.register_forward_pre_hook(hook))
    return handles


def forward_with_checks(engine, latents: dict[str, torch.Tensor], ids: torch.Tensor) -> list:
    """One no-grad forward of ``ids`` through ``engine`` under compare_gathered's hooks;
    returns their log (one record per quantized layer)."""
    log: list = []
    handles = compare_gathered(engine.module, latents, log)
    with torch.no_grad():
        engine(input_ids=ids, labels=ids)
    for h in handles:
        h.remove()
    return log


def save_gathered(result: dict, path: str) -> None:
    """Collective: rank 0 saves every rank's ``result`` (a list by rank) to ``path``."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, result)
    if torch.distributed.get_rank() == 0:
        torch.save(gathered, path)
    torch.distributed.barrier()


def run_worker(main) -> None:
    """Run a worker's main, then leave the process group on every exit path.

    A rank that exits with gloo's worker threads still alive aborts at interpreter
    finalization ("terminate called without an active exception", pytorch#190489).
    """
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
