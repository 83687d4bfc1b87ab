"""Quantizer objects users configure, built on cage_kernels ops.

A Quantizer maps a tensor x [..., n] (n = a linear layer's input dim) to its quantized
form. QuEST works in the rotated domain y = x (I ⊗ H); RTN's rotation is the identity.
  values(x)     rotated dequantized values q(y)           (what the matmul consumes)
  dequantize(x) Q(x) = q(y) H^T in the original domain    (what CAGE's error uses)
  fake(x)       q(y) with the STE backward: dL/dx = (M ⊙ dL/dq) H^T (RTN: M = 1), and the
                count of masked entries
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from cage_kernels import ops

from .spec import QuantSpec


class QuantizedTensor(NamedTuple):
    """Integer form of a tensor [rows, n]: codes uint8 [rows, n] (pack with ``packed``),
    scales fp32 (QuEST: grid step [rows, 1]; RTN: [rows, n // group]), bits."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int

    def packed(self) -> torch.Tensor:
        """Codes packed into b-bit fields: uint8 [rows, n * bits / 8]."""
        return ops.pack(self.codes, self.bits)


class Quantization(NamedTuple):
    """One quantization of x [rows, n]: values q(x H) (x.dtype), the STE mask (bool; all
    True for RTN) and the CAGE error x - Q(x) (x.dtype), all [rows, n]."""

    values: torch.Tensor
    mask: torch.Tensor
    error: torch.Tensor


class _Rotate(torch.autograd.Function):
    """y = x (I ⊗ H); H symmetric orthonormal, so the backward is the same rotation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: int) -> torch.Tensor:
        ctx.block = block
        return ops.fwht(x, block)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ops.fwht(grad, ctx.block), None


class FakeQuant(NamedTuple):
    """fake()'s result: values q(x H) (x's shape and dtype; differentiable) and the number of
    entries the STE mask zeroes, a 0-d int64 tensor (no host sync)."""

    values: torch.Tensor
    masked: torch.Tensor


class _FakeQuant(torch.autograd.Function):
    """q = Quantizer.values(x) (rows along the last dim); dL/dx = (M ⊙ dL/dq) H for QuEST,
    dL/dx = dL/dq for RTN; second output: the count of masked (M = 0) entries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantizer: Quantizer):
        spec = quantizer.spec
        ctx.block = spec.hadamard_block if spec.method == "quest" else None
        if ctx.block is None:
            ctx.save_for_backward(None)
            return quantizer.values(x), x.new_zeros((), dtype=torch.int64)
        values, mask = ops.quest_act(x.reshape(-1, x.shape[-1]), spec.bits, ctx.block, spec.mask)
        ctx.save_for_backward(mask)
        return values.view(x.shape), mask.numel() - mask.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_count):
        (mask,) = ctx.saved_tensors
        if ctx.block is None:
            return grad, None
        flat = grad.reshape(-1, grad.shape[-1])
        return ops.quest_act_backward(flat, mask, ctx.block).view(grad.shape), None


class Quantizer:
    """A configured QuEST or RTN quantizer (see module docstring for the maps)."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec

    def __repr__(self) -> str:
        return f"Quantizer({self.spec})"

    @property
    def rotated(self) -> bool:
        return self.spec.rotated

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x -> x (I ⊗ H) (differentiable); identity for RTN."""
        return _Rotate.apply(x, self.spec.hadamard_block) if self.rotated else x

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """y -> y (I ⊗ H)^T = y (I ⊗ H) (differentiable); identity for RTN."""
        return self.rotate(y)

    def _quantize_rows(self, x: torch.Tensor, sumsq: torch.Tensor | None, rotated: bool):
        s = self.spec
        rows = x.reshape(-1, x.shape[-1])
        if s.method == "quest":
            if sumsq is not None:
                sumsq = sumsq.reshape(-1, 1)
            return ops.quest_quantize(rows, s.bits, s.hadamard_block, sumsq, s.mask, rotated)
        return ops.rtn_quantize(rows, s.bits, s.group_size)

    def values(self, x: torch.Tensor, sumsq: torch.Tensor | None = None) -> torch.Tensor:
        """Rotated dequantized values q(x H), same shape and dtype as x."""
        return self._quantize_rows(x, sumsq, rotated=False).values.reshape(x.shape)

    def dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x) = q(x H) H^T in the original domain, same shape and dtype as x."""
        v = self.values(x)
        return ops.fwht(v, self.spec.hadamard_block) if self.rotated else v

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """CAGE's e = x - Q(x)."""
        return x - self.dequantize(x)

    def evaluate(self, x: torch.Tensor) -> Quantization:
        """values(x), mask(x) and error(x) of x [rows, n] from one quantization."""
        out = self._quantize_rows(x, None, rotated=False)
        if self.spec.method != "quest":
            return Quantization(out.values, torch.ones_like(x, dtype=torch.bool), x - out.values)
        deq = ops.fwht(out.values, self.spec.hadamard_block)
        return Quantization(out.values, out.mask, x - deq)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """Integer codes and scales of x [rows, n] (rotated domain for QuEST)."""
        out = self._quantize_rows(x, None, rotated=False)
        scales = out.step if self.spec.method == "quest" else out.scale
        return QuantizedTensor(out.codes.reshape(x.shape), scales, self.spec.bits)

    def from_codes(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rotated dequantized values from codes and scales (inverse of ``quantize``)."""
        s = self.spec
        if s.method == "quest":
            half = (2**s.bits - 1) / 2.0
            return ((q.codes.float() - half) * q.scales).to(dtype)
        m = 2 ** (s.bits - 1) - 1
        k = q.codes.float() - m
        n = k.shape[-1]
        g = k.reshape(*k.shape[:-1], n // s.group_size, s.group_size) * q.scales.unsqueeze(-1)
        return g.reshape(k.shape).to(dtype)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """STE gradient mask in the rotated domain (all ones for RTN), bool, x's shape."""
        if self.spec.method != "quest":
            return torch.ones_like(x, dtype=torch.bool)
        return self._quantize_rows(x, None, rotated=False).mask.reshape(x.shape)

    def fake(self, x: torch.Tensor) -> FakeQuant:
        """q(x H) with the STE backward dL/dx = (M ⊙ dL/dq) H^T (rotated domain for QuEST);
        forward values equal ``values(x)`` bit for bit."""
        return FakeQuant(*_FakeQuant.apply(x, self))
