"""Pick an implementation per device: CUDA -> Triton, CPU -> torch twin.

``CAGE_TRITON_INTERPRET=1`` (with ``TRITON_INTERPRET=1`` set before triton is imported)
routes CPU tensors through the Triton kernels too, which is how tests prove the kernels.
Callers never branch on device themselves.
"""

from __future__ import annotations

import os

import torch


def use_triton(x: torch.Tensor) -> bool:
    """True when ``x`` should be handled by the Triton kernels."""
    if x.is_cuda:
        return True
    return os.environ.get("CAGE_TRITON_INTERPRET") == "1"
