"""Pick an implementation per device: CUDA -> Triton, CPU -> torch twin.

``CAGE_TRITON_INTERPRET=1`` (with ``TRITON_INTERPRET=1`` set before triton is imported)
routes CPU tensors through the Triton kernels too, which is how tests prove the kernels.
Callers never branch on device themselves. Dtypes the kernels do not take (e.g. the float64
oracles) always use the torch twin.
"""

from __future__ import annotations

import os

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(x: torch.Tensor) -> bool:
    """True when ``x`` should be handled by the Triton kernels."""
    if x.is_cuda:
        return True
    if os.environ.get("CAGE_TRITON_INTERPRET") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "CAGE_TRITON_INTERPRET=1 routes CPU tensors to Triton, which needs TRITON_INTERPRET=1 "
            "set before triton is first imported"
        )
    return True


def use_triton_float(x: torch.Tensor) -> bool:
    """use_triton for a floating tensor whose dtype the kernels take (fp32 / bf16 / fp16)."""
    return x.dtype in KERNEL_DTYPES and use_triton(x)
