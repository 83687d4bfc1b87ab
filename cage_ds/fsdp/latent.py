"""LatentWeight: the fp32 latent of a quantized weight, which FSDP2 gathers as q(W H).

A wrapper tensor subclass around the latent rows W [rows, in] of one QuantLinear weight.
FSDP2 (``fully_shard``) shards it on dim 0 like any parameter (whole rows per rank; the
last ranks may hold fewer rows, or none), the optimizer steps it in place, and checkpoints
save it. Before every all-gather FSDP2 calls ``fsdp_pre_all_gather`` on the local shard,
which hands the gather Quantizer.values(W_shard) = q(W H) of the shard's rows (cast to the
mixed-precision param dtype), zero-padded to FSDP2's padded shard size. Each row's
quantization depends on that row only, so the gathered weight equals
cast(Quantizer.values(W)) of the unsharded latent element for element. The forward's
QuantLinear runs in ``weight_prequantized`` mode, and the gradient FSDP2 reduce-scatters
into the shard is dL/dq (the optimizer's ops apply the STE).

Every aten op on a LatentWeight runs on the wrapped tensor; the ops FSDP2 uses to shard,
pad and view a parameter (``_KEEP``) return LatentWeights again, all others plain tensors
(so optimizer states built with ``zeros_like`` are plain).
"""

from __future__ import annotations

from typing import Any

import torch
from cage_kernels import ops as kernel_ops
from torch.utils._pytree import tree_map, tree_map_only

from cage_ds.quant import Quantizer

aten = torch.ops.aten
_KEEP = {
    aten.alias.default,
    aten.as_strided.default,
    aten.detach.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_zeros.default,
    aten.slice.Tensor,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.view.default,
    aten._unsafe_view.default,
}


class LatentWeight(torch.Tensor):
    """fp32 latent rows ``data`` [rows, in] whose FSDP2 all-gather input is q(W H) (module
    docstring); ``quantizer`` is the layer's weight quantizer."""

    data_: torch.Tensor
    quantizer: Quantizer

    @staticmethod
    def __new__(cls, data: torch.Tensor, quantizer: Quantizer) -> LatentWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=data.device,
            requires_grad=data.requires_grad,
        )

    def __init__(self, data: torch.Tensor, quantizer: Quantizer):
        self.data_ = data
        self.quantizer = quantizer

    def __repr__(self) -> str:
        return f"LatentWeight({self.data_!r}, {self.quantizer.spec})"

    def __tensor_flatten__(self) -> tuple[list[str], Quantizer]:
        return ["data_"], self.quantizer

    @staticmethod
    def __tensor_unflatten__(inner: dict, quantizer: Quantizer, outer_size, outer_stride):
        return LatentWeight(inner["data_"], quantizer)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        quantizers = [a.quantizer for a in args if isinstance(a, LatentWeight)]
        if not quantizers and kwargs:
            quantizers = [a.quantizer for a in kwargs.values() if isinstance(a, LatentWeight)]

        def unwrap(t: Any) -> Any:
            return t.data_ if isinstance(t, LatentWeight) else t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func not in _KEEP:
            return out
        return tree_map_only(torch.Tensor, lambda t: LatentWeight(t, quantizers[0]), out)

    def fsdp_pre_all_gather(
        self, mesh, outer_size: torch.Size, outer_stride, module, mp_policy
    ) -> tuple[tuple[torch.Tensor], None]:
        """(q(W H) of this shard's rows in the param dtype, zero-padded to ceil(rows / N)
        rows,), no metadata."""
        dtype = mp_policy.param_dtype or self.dtype
        padded_rows = -(-outer_size[0] // mesh.size())
        out = self.data_.new_zeros((padded_rows, *outer_size[1:]), dtype=dtype)
        if self.data_.numel():
            out[: self.shape[0]].copy_(self.quantizer.values(self.data_))
        return (out,), None

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: None,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ):
        """The gathered q(W H) as the unsharded weight (FSDP2 views it to [out, in])."""
        (gathered,) = all_gather_outputs
        if out is not None:  # FSDP2 re-gathered into the buffer ``out`` already views
            return None
        return gathered, (gathered,)


def local_rows(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor of a shard: a DTensor's local part, a LatentWeight's wrapped rows."""
    if isinstance(t, torch.distributed.tensor.DTensor):
        t = t.to_local()
    return t.data_ if isinstance(t, LatentWeight) else t


def full_value(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter or state (a collective: every rank calls it)."""
    if not isinstance(p, torch.distributed.tensor.DTensor):
        return p.detach().clone()
    plain = torch.distributed.tensor.DTensor.from_local(
        local_rows(p), p.device_mesh, p.placements, run_check=False, shape=p.shape,
        stride=p.stride(),
    )  # fmt: skip
    return plain.full_tensor().clone()  # one rank: full_tensor may alias the shard


def latent_grad(quantizer: Quantizer, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The STE gradient of latent rows W_r [rows, in] from dL/dq of their q(W H):
    (M(W_r) ⊙ dL/dq) H for QuEST (QuantLinear's fake-quant backward op), dL/dq for RTN."""
    if not quantizer.rotated or rows.numel() == 0:
        return grad
    mask = quantizer.mask(rows)
    return kernel_ops.quest_act_backward(grad, mask, quantizer.spec.hadamard_block)


_LATENT = "_cage_latent_grad"


def is_latent_grad(g: torch.Tensor) -> bool:
    """Whether to_latent_grads_ already turned this gradient into dL/dW."""
    return getattr(g, _LATENT, False)


@torch.no_grad()
def to_latent_grads_(params) -> None:
    """Replace each LatentWeight parameter's sharded gradient dL/dq by the latent gradient
    dL/dW = latent_grad(...) in place, and mark it (a second call leaves it). Call after
    the step's last backward: a later backward would add dL/dq to a converted gradient."""
    for p in params:
        g = p.grad
        shard = p.to_local() if isinstance(p, torch.distributed.tensor.DTensor) else p
        if g is None or not isinstance(shard, LatentWeight) or is_latent_grad(g):
            continue
        local = local_rows(g)
        local.copy_(latent_grad(shard.quantizer, shard.data_, local))
        setattr(g, _LATENT, True)
