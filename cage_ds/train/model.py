"""Model construction for cage-train: a Llama from a preset or a local HF checkpoint, prepared
for quantization-aware training with cage_ds.nn.prepare_model.

From scratch under ZeRO-3 a live ``HfDeepSpeedConfig`` makes ``from_config`` build inside
``deepspeed.zero.Init`` with the HF weight init (init std = model.init_std); the caller keeps
the returned handle alive for the whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ModelConfig

EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def llama_config(m: ModelConfig, eos_token_id: int | None = None):
    """The transformers LlamaConfig of a preset (RoPE, RMSNorm, SwiGLU, no bias)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.kv_heads,
        head_dim=m.hidden_size // m.num_heads,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings,
        initializer_range=m.init_std,
        rms_norm_eps=m.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{'total', 'non_embedding'}: unique parameters, the second without embed_tokens/lm_head."""
    total = non_emb = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        if not any(part in EMBEDDING_NAMES for part in name.split(".")):
            non_emb += n
    return {"total": total, "non_embedding": non_emb}


def preset_parameter_counts(m: ModelConfig) -> dict[str, int]:
    """Parameter counts of a preset, built on the meta device (nothing allocated).

    The model class is constructed directly, not through ``from_config``: under a live ZeRO-3
    ``HfDeepSpeedConfig`` (a running cage-train) ``from_config`` would partition and
    initialize it, which fails on the meta device."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if m.pretrained is not None:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(m.pretrained, local_files_only=True)
    else:
        hf = llama_config(m)
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf)](hf)
    return parameter_counts(model)


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_model(cfg: Config, ds_config: dict[str, Any], eos_token_id: int | None):
    """(model, keep_alive): the Llama (fp32 latent weights), prepared when cfg.quant is enabled.

    keep_alive is the HfDeepSpeedConfig under ZeRO-3 (hold it for the run), else None.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    if cfg.model.pretrained is not None:
        path = Path(cfg.model.pretrained)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_config(
            llama_config(cfg.model, eos_token_id), dtype=torch.float32
        )
    if cfg.quant.enabled:
        from cage_ds.nn import prepare_model

        prepare_model(model, cfg.quant.to_quant_config())
    return model, keep_alive
