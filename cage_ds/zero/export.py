"""Export a ZeRO checkpoint's latent weights as quantized weights (codes + scales, safetensors).

The latent weights live only in the optimizer's fp32 partitions (the module weights DeepSpeed
saves under cage_ds.zero hold quantized values, Q(W) or q(W H), not W), so the export starts
from zero_to_fp32:

    latent W  = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    exported  = cage_ds.nn.export_quantized_state(model with W)   (codes, scales, bits)

``load_quantized`` reads the file into a model prepared with the same QuantConfig; the layers
come back in weight_prequantized mode and compute the same forward as the latent model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cage_ds.nn import export_quantized_state, load_quantized_state, set_weight_prequantized


def latent_state_dict(
    checkpoint_dir: str | Path, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """The fp32 latent weights of a DeepSpeed ZeRO checkpoint (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


@torch.no_grad()
def export_quantized_checkpoint(
    checkpoint_dir: str | Path, model: nn.Module, out_file: str | Path, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """Write the quantized export of the checkpoint's latents to ``out_file`` (safetensors).

    ``model``: a fresh prepare_model'ed model of the checkpoint's architecture and QuantConfig
    (on CPU); its weights are overwritten with the latents. Returns the exported tensors.
    """
    latents = latent_state_dict(checkpoint_dir, tag)
    set_weight_prequantized(model, False)
    missing, unexpected = model.load_state_dict(latents, strict=False)
    absent = [k for k in missing if k in dict(model.named_parameters())]
    if absent or unexpected:
        raise ValueError(
            f"export_quantized_checkpoint: checkpoint {checkpoint_dir} does not match the model "
            f"(missing parameters {absent[:4]}, unexpected {unexpected[:4]})"
        )
    state = {k: v.contiguous() for k, v in export_quantized_state(model).items()}
    save_file(state, str(out_file))
    return state


def load_quantized(model: nn.Module, file: str | Path) -> nn.Module:
    """Load a quantized export into a prepared model (weight_prequantized layers); returns it."""
    return load_quantized_state(model, load_file(str(file)))
