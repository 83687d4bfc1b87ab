"""Exports from a DeepSpeed checkpoint: its latent weights into a model, then the formats of
cage_ds.nn.export (plain Hugging Face, packed codes + scales).

Under ZeRO-1/2/3 the latent weights live only in the optimizer's fp32 partitions (the module
weights DeepSpeed saves under cage_ds.zero hold quantized values, Q(W) or q(W H), not W), so
the export starts from zero_to_fp32; at stage 0 (no partitions, fake-quant layers) the fp32
module weights are the latents:

    latent W  = latent_state_dict(checkpoint_dir, tag)
    model     = load_latents(checkpoint_dir, fresh prepared model, tag)
    exported  = cage_ds.nn.export.save_plain_hf(model, ...) / save_packed(model, ...)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cage_ds.nn import set_weight_prequantized
from cage_ds.nn.export import save_packed


def _tag_of(checkpoint_dir: Path, tag: str | None) -> str:
    if tag is not None:
        return tag
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise ValueError(f"{checkpoint_dir} has no 'latest' file: pass the checkpoint's tag")
    return latest.read_text().strip()


def _stage0_latents(folder: Path) -> dict[str, torch.Tensor]:
    """The module weights of a stage-0 checkpoint: there no optimizer partitions exist and
    the fake-quant layers train on the module's own weights, so those are the latents (fp32
    only: a 16-bit module copy is not the fp32 latent)."""
    path = folder / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ValueError(
            f"{folder} holds neither ZeRO optimizer partitions nor {path.name}: "
            "not a DeepSpeed checkpoint"
        )
    # DeepSpeed pickles its own objects (config, shapes) next to the weights: a full load
    module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    low = sorted(
        {str(t.dtype) for t in module.values() if t.is_floating_point()} - {"torch.float32"}
    )
    if low:
        raise ValueError(
            f"{path}: a stage-0 checkpoint with {low} module weights and no fp32 master "
            "partitions; its latents are not recoverable exactly (train in fp32 at stage 0, "
            "or use ZeRO-1/2/3)"
        )
    return dict(module)


def latent_state_dict(
    checkpoint_dir: str | Path, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """The fp32 latent weights of a DeepSpeed checkpoint: zero_to_fp32 when it holds ZeRO
    (or BF16_Optimizer) partitions, else the module weights of a stage-0 fp32 checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    tag = _tag_of(checkpoint_dir, tag)
    if any((checkpoint_dir / tag).glob("*zero_pp_rank_*_optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    return _stage0_latents(checkpoint_dir / tag)


@torch.no_grad()
def load_latents(checkpoint_dir: str | Path, model: nn.Module, tag: str | None = None) -> nn.Module:
    """Write the checkpoint's latents into ``model`` and return it.

    ``checkpoint_dir``: the folder DeepSpeed saved into (holding one folder per tag);
    ``tag``: None reads ``checkpoint_dir/latest``.

    ``model``: a fresh model of the checkpoint's architecture, prepared with its QuantConfig
    (on CPU, not partitioned); its quantized layers are left in latent mode
    (weight_prequantized=False). ValueError when a parameter is missing or unexpected."""
    latents = latent_state_dict(checkpoint_dir, tag)
    set_weight_prequantized(model, False)
    missing, unexpected = model.load_state_dict(latents, strict=False)
    absent = [k for k in missing if k in dict(model.named_parameters())]
    if absent or unexpected:
        raise ValueError(
            f"load_latents: checkpoint {checkpoint_dir} does not match the model "
            f"(missing parameters {absent[:4]}, unexpected {unexpected[:4]})"
        )
    return model


def export_quantized_checkpoint(
    checkpoint_dir: str | Path, model: nn.Module, out_file: str | Path, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """The packed export (cage_ds.nn.export.save_packed) of the checkpoint's latents, loaded
    into ``model`` (see load_latents); returns the tensors written to ``out_file``."""
    return save_packed(load_latents(checkpoint_dir, model, tag), out_file)
