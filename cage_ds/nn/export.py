"""Exports users can serve, from a prepared Hugging Face causal LM holding latent weights W
(single process: every weight whole on one device).

Plain Hugging Face (``save_plain_hf``): a ``save_pretrained`` folder (config.json +
model.safetensors) that a stock ``AutoModelForCausalLM.from_pretrained`` loads with no missing
or unexpected keys. Each quantized linear holds Q(W) = q(W H) H^T (the de-rotated dequantized
weight), every other tensor (embeddings, norms, lm_head) its latent. Invariant: the loaded
model's logits equal the W-only view of the prepared model (weights quantized, activations
full precision, e.g. W4A16 for a W4A4 model) up to fp32 rounding of the rotation (the project
multiplies in the rotated domain, x H q(W H)^T; the plain model computes x Q(W)^T), and
bf16 rounding of the weights when saved with ``dtype=torch.bfloat16``. Plain transformers
cannot quantize activations: config.json records under ``"cage_ds"`` the QuantConfig the model
was trained with (activation spec included) and the weight format; transformers ignores it.

Packed (``save_packed`` / ``load_packed``): one safetensors file, ``export_quantized_state``'s
b-bit codes + scales, self-describing: its metadata holds the QuantConfig and the HF config.
Invariant: ``load_packed`` rebuilds the prepared model (layers in weight_prequantized mode)
whose forward equals the exported model's training-time forward (weights and activations
quantized) bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cage_ds.quant import QuantConfig

from .prepare import (
    export_quantized_state,
    load_quantized_state,
    prepare_model,
    quant_config_of,
    quantized_modules,
)

CONFIG_KEY = "cage_ds"
"""Key of the quantization record in a plain export's config.json."""
META_QUANT = "cage_ds.quant_config"
META_HF_CONFIG = "cage_ds.hf_config"
WEIGHT_FORMAT_PLAIN = "dequantized Q(W) = q(W H) H^T, original domain"


def _check_whole(model: nn.Module, where: str) -> None:
    partitioned = [n for n, p in model.named_parameters() if hasattr(p, "ds_numel")]
    if partitioned:
        raise ValueError(
            f"{where}: parameter {partitioned[0]!r} is ZeRO-3 partitioned; export from the "
            "DeepSpeed checkpoint instead (cage_ds.zero.export.load_latents, or "
            "python -m cage_ds.train.export RUN_DIR for a cage-train run)"
        )


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each quantized weight replaced by Q(W) (original domain)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, layer in quantized_modules(model):
        state[name + ".weight"] = layer.quantized_weight()
    return state


def quant_record(quant: QuantConfig | None) -> dict[str, Any]:
    """What a plain export's config.json says under ``CONFIG_KEY``."""
    return {
        "quant_config": None if quant is None else quant.to_dict(),
        "weight_format": WEIGHT_FORMAT_PLAIN,
        "forward": "weights quantized, activations full precision; training quantized the "
        "activations as quant_config.activation says (null: full precision)",
    }


@torch.no_grad()
def save_plain_hf(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the plain Hugging Face export of ``model`` (see module docstring) to ``out_dir``
    (and the tokenizer, when given); floating tensors cast to ``dtype`` when given.
    Returns ``out_dir``."""
    _check_whole(model, "save_plain_hf")
    out = Path(out_dir)
    state = plain_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(out, state_dict=state)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config[CONFIG_KEY] = quant_record(quant_config_of(model))
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def save_packed(model: nn.Module, out_file: str | Path) -> dict[str, torch.Tensor]:
    """Write ``export_quantized_state(model)`` to ``out_file`` (safetensors) with the
    QuantConfig and the HF config in its metadata; returns the tensors written."""
    _check_whole(model, "save_packed")
    quant = quant_config_of(model)
    state = {k: v.contiguous() for k, v in export_quantized_state(model).items()}
    metadata = {
        META_QUANT: json.dumps(None if quant is None else quant.to_dict()),
        META_HF_CONFIG: model.config.to_json_string(use_diff=False),
    }
    save_file(state, str(out_file), metadata=metadata)
    return state


def packed_metadata(file: str | Path) -> tuple[QuantConfig | None, dict[str, Any]]:
    """(QuantConfig, HF config dict) stored in a ``save_packed`` file."""
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if META_QUANT not in meta or META_HF_CONFIG not in meta:
        raise ValueError(
            f"{file} has no {META_QUANT!r} / {META_HF_CONFIG!r} metadata (not written by "
            "save_packed): prepare a model with its QuantConfig and call "
            "cage_ds.nn.load_quantized_state(model, safetensors.torch.load_file(file))"
        )
    quant = json.loads(meta[META_QUANT])
    return (None if quant is None else QuantConfig.from_dict(quant)), json.loads(
        meta[META_HF_CONFIG]
    )


def load_packed(file: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The model a ``save_packed`` file describes, in eval mode.

    ``model`` None: built with ``AutoModelForCausalLM.from_config`` (fp32, CPU) from the stored
    HF config and prepared with the stored QuantConfig. Else ``model`` (prepared with the same
    QuantConfig, else ValueError) receives the weights. Quantized layers come back in
    weight_prequantized mode (see ``load_quantized_state``)."""
    quant, hf_dict = packed_metadata(file)
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.for_model(**hf_dict)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        if quant is not None:
            prepare_model(model, quant)
    elif quant_config_of(model) != quant:
        raise ValueError(
            f"load_packed: {file} was exported with {quant}, the model is prepared with "
            f"{quant_config_of(model)}"
        )
    load_quantized_state(model, load_file(str(file)))
    return model.eval()
