"""Exports from a DeepSpeed checkpoint: its latent weights into a model, then the formats of
cage_ds.nn.export (plain Hugging Face, packed codes + scales).

Under ZeRO-1/2/3 the latent weights live only in the optimizer's fp32 partitions (the module
weights DeepSpeed saves under cage_ds.zero hold quantized values, Q(W) or q(W H), not W), so
the export starts from zero_to_fp32; at stage 0 (no partitions, fake-quant layers) the fp32
module weights are the latents:

    latent W  = latent_state_dict(checkpoint_dir, tag)
    model     = load_latents(checkpoint_dir, fresh prepared model, tag)
    exported  = cage_ds.nn.export.save_plain_hf(model, ...) / save_packed(model, ...)

From a live engine (``export_engine``, collective) the same formats come from the latents
gathered with deepspeed.utils.safe_get_full_fp32_param, loaded into an unpartitioned copy of
the engine's model on rank 0.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cage_ds.nn import prepare_model, quant_config_of, set_weight_prequantized
from cage_ds.nn.export import save_packed, save_plain_hf
from cage_ds.quant import QuantConfig

FORMATS = {"hf": ("hf",), "packed": ("packed",), "both": ("hf", "packed")}
"""export_engine's ``format``: which of OUT/hf/ (plain HF) and OUT/packed.safetensors."""


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
    return _load_latent_dict(model, latents, f"load_latents: checkpoint {checkpoint_dir}")


def _load_latent_dict(model: nn.Module, latents: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Every parameter of ``model`` from ``latents`` (layers left in latent mode); ValueError
    naming ``where`` when a parameter is missing or a latent unexpected."""
    set_weight_prequantized(model, False)
    missing, unexpected = model.load_state_dict(latents, strict=False)
    absent = [k for k in missing if k in dict(model.named_parameters())]
    if absent or unexpected:
        raise ValueError(
            f"{where} does not match the model "
            f"(missing parameters {absent[:4]}, unexpected {unexpected[:4]})"
        )
    return model


def export_quantized_checkpoint(
    checkpoint_dir: str | Path, model: nn.Module, out_file: str | Path, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """The packed export (cage_ds.nn.export.save_packed) of the checkpoint's latents, loaded
    into ``model`` (see load_latents); returns the tensors written to ``out_file``."""
    return save_packed(load_latents(checkpoint_dir, model, tag), out_file)


def _engine_latents(engine: Any) -> dict[str, torch.Tensor]:
    """{name: full fp32 latent on CPU} of every parameter of ``engine.module`` (collective).

    Under a ZeRO optimizer or BF16_Optimizer the latents are the fp32 master partitions,
    gathered with deepspeed.utils.safe_get_full_fp32_param; without one (stage 0, fp32) the
    fake-quant layers train on the module's own weights, which are then the latents."""
    from deepspeed.utils import safe_get_full_fp32_param

    named = list(engine.module.named_parameters())
    mastered = engine.zero_optimization() or any(
        hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in named
    )
    latents = {}
    for name, p in named:
        full = safe_get_full_fp32_param(p) if mastered else p.detach()
        if full is None or full.dtype != torch.float32:
            what = "no fp32 master" if full is None else f"only a {full.dtype} module weight"
            raise ValueError(
                f"export_engine: parameter {name!r} has {what}, so its latent is not "
                "recoverable; train it under ZeRO-1/2/3 (or bf16) or in fp32 at stage 0, "
                "or export from a DeepSpeed checkpoint (cage_ds.zero.export.load_latents)"
            )
        latents[name] = full.detach().to("cpu", copy=True)
    return latents


def _prepared_config(module: nn.Module) -> QuantConfig:
    """The QuantConfig ``module`` (a Hugging Face model) was prepared with; else ValueError."""
    from transformers import PreTrainedModel

    quant = quant_config_of(module) if isinstance(module, PreTrainedModel) else None
    if quant is None:
        raise ValueError(
            f"export_engine: the engine's module ({type(module).__name__}) is not a Hugging "
            "Face model prepared with cage_ds.nn.prepare_model; pass the prepared "
            "PreTrainedModel to deepspeed.initialize / cage_ds.zero.initialize"
        )
    return quant


@torch.no_grad()
def _write(
    module: nn.Module, quant: QuantConfig, latents: dict[str, torch.Tensor], out: Path, format: str,
    dtype: torch.dtype | None,
) -> None:  # fmt: skip
    """Rank 0's part of export_engine: a whole fp32 copy of ``module`` (built outside any
    zero.Init) holding ``latents``, written in ``format`` under ``out``."""
    model = type(module)(copy.deepcopy(module.config)).float()
    prepare_model(model, quant)
    _load_latent_dict(model, latents, "export_engine: the engine's parameters").eval()
    out.mkdir(parents=True, exist_ok=True)
    if "hf" in FORMATS[format]:
        save_plain_hf(model, out / "hf", dtype=dtype)
    if "packed" in FORMATS[format]:
        save_packed(model, out / "packed.safetensors")


def export_engine(
    engine: Any, out: str | Path, format: str = "both", dtype: torch.dtype | None = None
) -> Path:
    """Export a live DeepSpeed engine's model under ``out``: OUT/hf/ (save_plain_hf, floating
    weights cast to ``dtype`` when given) and/or OUT/packed.safetensors (save_packed).

    Collective: every rank calls it (the latents are gathered from all partitions); rank 0
    alone builds the unpartitioned model, loads the latents (every parameter, else
    ValueError) and writes; its outcome is broadcast, so a failure there raises on every
    rank (none waits forever) and every rank returns ``out`` only once the files exist."""
    import deepspeed.comm as dist

    if format not in FORMATS:
        raise ValueError(f"export_engine: format {format!r} is not one of {sorted(FORMATS)}")
    out = Path(out)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    quant = _prepared_config(engine.module)  # every rank: a refusal must not strand the rest
    latents = _engine_latents(engine)
    error: list[str | None] = [None]
    if rank0:
        try:
            _write(engine.module, quant, latents, out, format, dtype)
        except Exception as err:  # the other ranks raise it too instead of waiting forever
            error[0] = f"{type(err).__name__}: {err}"
            if not dist.is_initialized():
                raise
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"export_engine: rank 0 failed writing {out}: {error[0]}")
    return out
