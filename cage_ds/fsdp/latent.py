"""LatentWeight: the fp32 latent of a quantized weight, which FSDP2 gathers as q(W H).

A wrapper tensor subclass around the latent rows W [rows, in] of one QuantLinear weight.
FSDP2 (``fully_shard``) shards it on dim 0 like any parameter (whole rows per rank; the
last ranks may hold fewer rows, or none), the optimizer steps it in place, and checkpoints
save it. Before every all-gather FSDP2 calls ``fsdp_pre_all_gather`` on the local shard,
which hands the gather the shard's q(W H) as its GatherPlan says:
- values: Quantizer.values(W_shard) cast to the param dtype, zero-padded to FSDP2's
  padded shard of ceil(rows / N) rows;
- low-bit: the shard's packed codes and row / group scales (cage_ds.quant.lowbit, slots
  of ceil(rows / N) rows), decoded after the gather into cast((k - z) s) = the same values.
Each row's quantization depends on that row only, so the gathered weight equals
cast(Quantizer.values(W)) of the unsharded latent element for element either way. The
forward's QuantLinear runs in ``weight_prequantized`` mode, and the gradient FSDP2
reduce-scatters into the shard is dL/dq (the optimizer's ops apply the STE).

Every aten op on a LatentWeight runs on the wrapped tensor; the ops FSDP2 uses to shard,
pad and view a parameter (``_KEEP``) return LatentWeights again (sharing the plan), all
others plain tensors (so optimizer states built with ``zeros_like`` are plain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from cage_kernels import ops as kernel_ops
from torch.utils._pytree import tree_map, tree_map_only

from cage_ds.quant import Quantizer
from cage_ds.quant.lowbit import WireFormat, allowed, decode, encode

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


@dataclass(eq=False)
class GatherPlan:
    """How FSDP2 gathers one weight of unsharded ``shape`` [rows, in] over ``world`` ranks:
    in ``param_dtype`` values, or as ``wire`` payloads when set (module docstring).
    ``sent``: bytes this rank handed to the all-gathers so far."""

    quantizer: Quantizer
    shape: torch.Size
    param_dtype: torch.dtype
    world: int
    wire: WireFormat | None = None
    sent: int = 0

    @property
    def padded_rows(self) -> int:
        return -(-self.shape[0] // self.world)

    def use_lowbit(self, lowbit: bool | None, where: str) -> None:
        """Gather low-bit if ``lowbit`` (raise where the format cannot serve it), in values
        if False; None: low-bit where the format allows it and world > 1."""
        if self.sent:
            raise RuntimeError(
                f"cage_ds.fsdp: {where} was gathered already; FSDP2 sizes its gather buffers "
                "at the first gather, so choose lowbit_gather before the first forward"
            )
        ok = allowed(self.quantizer.spec.bits, self.param_dtype)
        if lowbit and not ok:
            raise ValueError(
                f"cage_ds.fsdp: lowbit_gather=True cannot serve {where} ({self.quantizer.spec.bits}"
                f"-bit into {self.param_dtype}; bf16 / fp32 only); pass lowbit_gather=None"
            )
        on = ok and (self.world > 1 if lowbit is None else lowbit)
        rows, width = self.shape
        spec, slot = self.quantizer.spec, self.padded_rows * width
        self.wire = WireFormat.of(spec, rows * width, width, self.world, slot) if on else None

    def inputs(self, rows: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's all-gather input from its latent rows (values or payload)."""
        if self.wire is None:
            out = rows.new_zeros((self.padded_rows, self.shape[1]), dtype=self.param_dtype)
            if rows.numel():
                out[: rows.shape[0]].copy_(self.quantizer.values(rows))
        elif rows.numel():
            q = self.quantizer.quantize(rows)
            out = encode(self.wire, rank, q.codes.reshape(-1), q.scales.reshape(-1))
        else:  # a rank holding no row sends zeros of the same size
            none = rows.new_zeros(0, dtype=torch.uint8)
            out = encode(self.wire, rank, none, rows.new_zeros(0))
        self.sent += out.numel() * out.element_size()
        return out


class LatentWeight(torch.Tensor):
    """fp32 latent rows ``data`` [rows, in] whose FSDP2 all-gather input is q(W H) (module
    docstring), gathered as ``plan`` says."""

    data_: torch.Tensor
    plan: GatherPlan

    @staticmethod
    def __new__(cls, data: torch.Tensor, plan: GatherPlan) -> LatentWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=data.device,
            requires_grad=data.requires_grad,
        )

    def __init__(self, data: torch.Tensor, plan: GatherPlan):
        self.data_ = data
        self.plan = plan

    @property
    def quantizer(self) -> Quantizer:
        """The layer's weight quantizer."""
        return self.plan.quantizer

    def __repr__(self) -> str:
        return f"LatentWeight({self.data_!r}, {self.quantizer.spec})"

    def __tensor_flatten__(self) -> tuple[list[str], GatherPlan]:
        return ["data_"], self.plan

    @staticmethod
    def __tensor_unflatten__(inner: dict, plan: GatherPlan, outer_size, outer_stride):
        return LatentWeight(inner["data_"], plan)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        plans = [a.plan for a in args if isinstance(a, LatentWeight)]
        if not plans and kwargs:
            plans = [a.plan for a in kwargs.values() if isinstance(a, LatentWeight)]

        def unwrap(t: Any) -> Any:
            return t.data_ if isinstance(t, LatentWeight) else t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func not in _KEEP:
            return out
        return tree_map_only(torch.Tensor, lambda t: LatentWeight(t, plans[0]), out)

    # The one-argument form of the hook: FSDP2 (torch 2.13, _fsdp_param.all_gather_inputs)
    # requires of the five-argument form that a rank holding fewer rows than the padded
    # shard return inputs of the padded [rows, in] size, which a packed payload is not; it
    # accepts any 1-D inputs from this form, and inputs of several dtypes in one group (its
    # all-gather then runs on their uint8 views). The plan holds what the other arguments
    # would give: the unsharded shape and the param dtype.
    def fsdp_pre_all_gather(self, mesh) -> tuple[tuple[torch.Tensor], WireFormat | None]:
        """(the plan's all-gather input from this shard,), metadata: the wire format or None."""
        return (self.plan.inputs(self.data_, mesh.get_local_rank()),), self.plan.wire

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: WireFormat | None,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ):
        """The unsharded weight q(W H) (FSDP2 views it to [out, in]) and the tensors FSDP2
        frees and re-allocates around gathers; with ``out`` (a re-gather) fill it instead."""
        (gathered,) = all_gather_outputs
        if metadata is None:  # values: the gathered buffer is the weight (``out`` views it)
            return None if out is not None else (gathered, (gathered,))
        full = decode(metadata, gathered.view(metadata.world, -1), param_dtype)
        if out is None:
            full = full.view(self.plan.shape)
            return full, (full,)
        # Through .data: no version bump, as FSDP2 refills its own gather outputs; autograd
        # may hold ``out`` from the forward, and it receives the same values again.
        out.data.view(-1).copy_(full)
        return None


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
