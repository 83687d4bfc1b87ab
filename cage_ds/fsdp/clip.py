"""Global gradient-norm clipping of an FSDP2 CAGE model, as the unsharded model clips.

The unsharded model clips the latent gradients dL/dW = (M ⊙ dL/dq) H; FSDP2 holds dL/dq,
so the quantized gradients are first converted in place (latent.to_latent_grads_; the
step then takes them as they are). Norms, in model.parameters() order as
torch.nn.utils.clip_grad_norm_ takes them:
  per tensor  ||g|| = || (||g_r||)_r ||   over the ranks' local rows (all-gathered)
  total       || (||g_i||)_i ||           (torch.nn.utils.get_total_norm)
  every g *= min(max_norm / (total + 1e-6), 1)   (torch.nn.utils.clip_grads_with_norm_)
With one rank this is clip_grad_norm_ of the unsharded model bit for bit (per-tensor
vector norms; torch's CPU path, no foreach).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.tensor import DTensor

from .latent import local_rows, to_latent_grads_


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``model`` (a cage_ds.fsdp.prepare'd model) to global norm
    ``max_norm``; returns the total norm before clipping (module docstring)."""
    params = [p for p in model.parameters() if p.grad is not None]
    unsharded = [tuple(p.shape) for p in params if not isinstance(p, DTensor)]
    if unsharded:
        raise ValueError(
            f"cage_ds.fsdp.clip_grad_norm_: parameters of shapes {unsharded[:4]} are not "
            "sharded by fully_shard; shard the root module too (cage_ds.fsdp.prepare does)"
        )
    if not params:
        return torch.zeros(())
    to_latent_grads_(params)
    grads = [local_rows(p.grad) for p in params]
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    mesh = params[0].device_mesh
    if mesh.size() > 1:
        parts = [torch.empty_like(norms) for _ in range(mesh.size())]
        tdist.all_gather(parts, norms, group=mesh.get_group())
        norms = torch.linalg.vector_norm(torch.stack(parts), dim=0)
    total = torch.nn.utils.get_total_norm(list(norms.unbind()))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total
