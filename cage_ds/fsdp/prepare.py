"""prepare: FSDP2 (``fully_shard``) over a prepare_model'd Llama, quantize before gather.

Each QuantLinear with a weight quantizer gets its weight wrapped as a LatentWeight (the fp32
latent; the all-gather input is q(W H) of the local rows) and switched to
``weight_prequantized``; then ``fully_shard`` runs on every decoder layer and on the root.
Mixed precision: the given MixedPrecisionPolicy (e.g. bf16 params, fp32 reduce on GPU);
default fp32 throughout (CPU). ``lowbit_gather``: the quantized weights travel as packed
codes + scales (latent.GatherPlan), on by default at world > 1 where the format allows it.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from cage_ds.nn import quantized_modules

from .latent import GatherPlan, LatentWeight


def default_mesh() -> DeviceMesh:
    """A 1-D mesh over all ranks on this process's device type (cuda if available)."""
    if not tdist.is_initialized():
        raise RuntimeError(
            "cage_ds.fsdp: torch.distributed is not initialized; launch with torchrun and call "
            "torch.distributed.init_process_group() (gloo on CPU, nccl on GPU) first"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (tdist.get_world_size(),))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face Llama (``model.model.layers``), in order."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"cage_ds.fsdp.prepare: expected a Llama-style model with model.model.layers, got "
            f"{type(model).__name__}; pass layers=[...] to shard other architectures"
        )
    return list(layers)


def prepare(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    layers: list[nn.Module] | None = None,
    reshard_after_forward: bool = True,
    lowbit_gather: bool | None = None,
) -> nn.Module:
    """Shard a prepare_model'd model with FSDP2, quantizing weights before the gather.

    lowbit_gather: gather the quantized weights as packed b-bit codes + fp32 scales
    (bit-identical weights, ~b/16 of the bf16 bytes); None = where the format allows it
    (b <= 8 into bf16 / fp32 params) at world > 1, True = everywhere or raise, False = never.
    Build the optimizer on the returned model's parameters afterwards and pass it to
    ``cage_ds.fsdp.attach``. Returns ``model`` (sharded in place)."""
    prepared = [(n, m) for n, m in quantized_modules(model) if m.weight_quantizer is not None]
    if not prepared:
        raise ValueError(
            "cage_ds.fsdp.prepare: the model has no QuantLinear with a weight quantizer; "
            "call cage_ds.prepare_model(model, QuantConfig.preset(...)) first"
        )
    mesh = mesh or default_mesh()
    mp_policy = mp_policy or MixedPrecisionPolicy()
    param_dtype = mp_policy.param_dtype or torch.float32
    for name, layer in prepared:
        w = layer.weight
        if isinstance(w, LatentWeight) or type(w.data).__name__ == "DTensor":
            raise ValueError(f"cage_ds.fsdp.prepare: {name} is already sharded; prepare once")
        if w.dtype != torch.float32:
            raise ValueError(
                f"cage_ds.fsdp.prepare: {name}.weight is {w.dtype}; the latent weights must be "
                "float32 (bf16 compute goes through mp_policy=MixedPrecisionPolicy(param_dtype="
                "torch.bfloat16))"
            )
        plan = GatherPlan(layer.weight_quantizer, w.shape, param_dtype, mesh.shape[-1])
        plan.use_lowbit(lowbit_gather, f"{name}.weight")
        layer.weight = nn.Parameter(LatentWeight(w.detach(), plan), requires_grad=w.requires_grad)
        layer.weight_prequantized = True
    kw = {"mesh": mesh, "mp_policy": mp_policy}
    for layer in decoder_layers(model) if layers is None else layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, **kw)
    return model


def reshard(model: nn.Module) -> None:
    """Free every gathered weight so the parameters are the sharded latents again: FSDP2
    keeps the root's parameters gathered after a forward without backward (evaluation)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
