"""QuantLinear: an nn.Linear whose weights and/or input activations are fake-quantized.

Forward, with A / W the activation / weight quantizers (None = full precision):

    y = A(x) W(W)^T + b

where a QuEST side yields rotated values q(x H) and an RTN or None side stays in the
original domain. X W^T = (X H)(W H)^T, so when the two operands are in different domains
one of them is rotated (H is symmetric orthonormal: the same op rotates and un-rotates).
Both choices are exact; the layer converts the smaller operand: the activation when it has
no more rows than the weight (rows <= out_features), else the weight. Gradients:
dL/dx = (M_a ⊙ dL/dq_a) H for a QuEST activation, dL/dW = (M_w ⊙ dL/dq_w) H for a QuEST
weight (trust or clip mask M), plain STE for RTN.

Both sides use Quantizer.fake, whose values equal Quantizer.values (row scale from the
unrotated row), so the fake forward, ``weight_prequantized`` mode, ``Quantizer.quantize``
codes and CAGE's error ``W - Quantizer.dequantize(W)`` all see bit-identical q(W H).

``weight_prequantized``: ``weight`` already holds Quantizer.values(W) (rotated domain for
QuEST), e.g. written by the ZeRO adapter before the all-gather; forward uses it as is and
autograd's dL/dweight is dL/dq (no weight STE). Activations are still quantized.

``zero_hooked``: set by cage_ds.zero.attach together with ``weight_prequantized``: engine
hooks write Quantizer.values(W) into this weight before every gather. ``state_check`` (class
level, installed by cage_ds.zero) validates the layer's mode against how its weight is
managed; every forward calls it (a few attribute reads), so a mode set after the first
forward, or an engine built around an already used model, is still checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cage_ds.quant import QuantConfig, Quantizer


def _rotation_of(weight_q: Quantizer | None, act_q: Quantizer | None) -> Quantizer | None:
    """The QuEST quantizer whose Hadamard block both operands share (None if no side rotates)."""
    rotated = [q for q in (weight_q, act_q) if q is not None and q.rotated]
    if len(rotated) == 2 and rotated[0].spec.hadamard_block != rotated[1].spec.hadamard_block:
        raise ValueError(
            "QuantLinear: weight and activation hadamard_block must match "
            f"({rotated[0].spec.hadamard_block} != {rotated[1].spec.hadamard_block})"
        )
    return rotated[0] if rotated else None


class QuantLinear(nn.Linear):
    """nn.Linear with fake-quantized weight / input activations (see module docstring).

    Parameters keep nn.Linear's names (``weight`` [out, in], ``bias`` [out]) so Hugging Face
    state dicts load unchanged.
    """

    state_check: ClassVar[Callable[[QuantLinear], None] | None] = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        weight_quantizer: Quantizer | None = None,
        act_quantizer: Quantizer | None = None,
        name: str = "QuantLinear",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        for q in (weight_quantizer, act_quantizer):
            if q is not None:
                q.spec.check_row_len(in_features, name)
        self._rotation = _rotation_of(weight_quantizer, act_quantizer)
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.weight_prequantized = False
        self.zero_hooked = False
        self._masked: dict[str, tuple[torch.Tensor, int]] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig, name: str = "") -> QuantLinear:
        """A QuantLinear sharing ``linear``'s Parameter objects (no copy; meta-device safe)."""
        where = name or f"Linear({linear.in_features}, {linear.out_features})"
        with torch.device("meta"):
            layer = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                dtype=linear.weight.dtype,
                weight_quantizer=None if config.weight is None else Quantizer(config.weight),
                act_quantizer=None if config.activation is None else Quantizer(config.activation),
                name=where,
            )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def _weight_operand(self) -> tuple[torch.Tensor, bool]:
        """(weight operand, whether it is in the rotated domain)."""
        wq = self.weight_quantizer
        if self.weight_prequantized:
            if wq is None:
                raise RuntimeError(
                    "QuantLinear.weight_prequantized is set on a layer without a weight "
                    "quantizer: there is no quantized weight to consume"
                )
            return self.weight, wq.rotated
        if wq is None:
            return self.weight, False
        values, masked = wq.fake(self.weight)
        self._record("weight", masked, self.weight.numel())
        return values, wq.rotated

    def _act_operand(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        aq = self.act_quantizer
        if aq is None:
            return x, False
        values, masked = aq.fake(x)
        self._record("act", masked, x.numel())
        return values, aq.rotated

    def _record(self, side: str, masked: torch.Tensor, numel: int) -> None:
        """Keep the masked-entry count of a forward whose backward may follow (no sync)."""
        if torch.is_grad_enabled():
            self._masked[side] = (masked, numel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if QuantLinear.state_check is not None:
            QuantLinear.state_check(self)
        if torch.is_grad_enabled():
            self._masked = {}
        w, w_rot = self._weight_operand()
        a, a_rot = self._act_operand(x)
        if w_rot != a_rot:
            rows = x.numel() // self.in_features
            if rows <= self.out_features:
                a = self._rotation.rotate(a)
            else:
                w = self._rotation.rotate(w)
        return F.linear(a, w, self.bias)

    def masked_counts(self) -> dict[str, tuple[torch.Tensor, int]]:
        """{"weight" | "act": (masked entries as a 0-d tensor, total entries)} of the last
        forward run with grad enabled, i.e. the masks its backward applies (RTN: 0 masked)."""
        return dict(self._masked)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """Q(W) = q(W H) H^T in the original domain (W itself without a weight quantizer)."""
        wq = self.weight_quantizer
        if wq is None:
            return self.weight.detach().clone()
        if self.weight_prequantized:
            return wq.unrotate(self.weight.detach()).clone()
        return wq.dequantize(self.weight.detach())

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding Q(W) (original domain) and a copy of the bias.

        Activation quantization has no nn.Linear equivalent: the export keeps weights only.
        """
        w = self.weight
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, w.device, w.dtype
        )
        linear.weight.copy_(self.quantized_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        sides = (("weight", self.weight_quantizer), ("act", self.act_quantizer))
        text = ", ".join(f"{k}={_describe(q)}" for k, q in sides)
        pre = ", weight_prequantized=True" if self.weight_prequantized else ""
        return f"{super().extra_repr()}, {text}{pre}"


def _describe(q: Quantizer | None) -> str:
    """Short spec text for repr: e.g. quest4(block=128, trust), rtn4(group=128), fp."""
    if q is None:
        return "fp"
    s = q.spec
    if s.method == "quest":
        return f"quest{s.bits}(block={s.hadamard_block}, {s.mask})"
    return f"rtn{s.bits}(group={s.group_size})"
