"""What a quantized number is: plain-data specs, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cage_kernels.grid import check_bits
from cage_kernels.hadamard import check_block

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer: a QuEST or RTN integer grid along a linear layer's input dim."""

    method: Literal["quest", "rtn"] = "quest"
    """quest: Hadamard + RMS clip + no-zero grid + trust/clip mask; rtn: absmax/group, STE."""
    bits: int = 4
    """Bits per element, 1..8 (rtn: 2..8)."""
    hadamard_block: int = 128
    """quest: power-of-two Hadamard block along the input dim (must divide in_features)."""
    mask: Literal["trust", "clip"] = "trust"
    """quest: STE gradient mask, QuEST trust |y - q(y)| <= D/2 or clip |y| <= c."""
    group_size: int = 128
    """rtn: elements per absmax group along the input dim (must divide in_features)."""

    def __post_init__(self) -> None:
        if self.method not in ("quest", "rtn"):
            raise ValueError(f"QuantSpec.method must be 'quest' or 'rtn', got {self.method!r}")
        check_bits(self.bits)
        if self.method == "rtn" and self.bits < 2:
            raise ValueError(f"QuantSpec.bits must be >= 2 for rtn, got {self.bits!r}")
        check_block(self.hadamard_block)
        if self.mask not in ("trust", "clip"):
            raise ValueError(f"QuantSpec.mask must be 'trust' or 'clip', got {self.mask!r}")
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise ValueError(
                f"QuantSpec.group_size must be a positive int, got {self.group_size!r}"
            )

    @property
    def rotated(self) -> bool:
        """Whether this quantizer works in the Hadamard-rotated domain."""
        return self.method == "quest"

    def check_row_len(self, row_len: int, where: str) -> None:
        """Raise naming ``where`` if this spec cannot quantize rows of ``row_len``."""
        unit = self.hadamard_block if self.method == "quest" else self.group_size
        name = "hadamard_block" if self.method == "quest" else "group_size"
        if row_len % unit:
            raise ValueError(f"{where}: {name}={unit} does not divide in_features={row_len}")


@dataclass(frozen=True)
class QuantConfig:
    """Which linear layers are quantized and how (weights W, input activations A).

    ``QuantConfig.preset("w4a4")`` gives QuEST W4A4; None for a side keeps it full precision.
    """

    weight: QuantSpec | None = field(default_factory=QuantSpec)
    activation: QuantSpec | None = field(default_factory=QuantSpec)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Module-name suffixes of the nn.Linear layers to swap (Llama decoder projections)."""

    def __post_init__(self) -> None:
        for side in ("weight", "activation"):
            value = getattr(self, side)
            if value is not None and not isinstance(value, QuantSpec):
                raise TypeError(
                    f"QuantConfig.{side} must be a QuantSpec or None, got "
                    f"{type(value).__name__} {value!r}; for a preset use "
                    "QuantConfig.preset('w4a4')"
                )
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise TypeError(
                f"QuantConfig.targets must be a tuple of module-name suffixes, got "
                f"{self.targets!r}; e.g. targets=('q_proj', 'v_proj')"
            )
        if not self.targets:
            raise ValueError("QuantConfig.targets is empty: name at least one linear layer")
        w, a = self.weight, self.activation
        if w is not None and a is not None and w.rotated and a.rotated:
            if w.hadamard_block != a.hadamard_block:
                raise ValueError(
                    "QuantConfig: weight and activation hadamard_block must match "
                    f"({w.hadamard_block} != {a.hadamard_block}): both operands share one rotation"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (``from_dict`` inverts it exactly)."""
        return {
            "weight": None if self.weight is None else asdict(self.weight),
            "activation": None if self.activation is None else asdict(self.activation),
            "targets": list(self.targets),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Inverse of ``to_dict``; the specs are validated as on construction."""

        def side(spec: dict[str, Any] | None) -> QuantSpec | None:
            return None if spec is None else QuantSpec(**spec)

        return cls(
            weight=side(data["weight"]),
            activation=side(data["activation"]),
            targets=tuple(data["targets"]),
        )

    @classmethod
    def preset(cls, name: str, method: Literal["quest", "rtn"] = "quest", **spec_kw) -> QuantConfig:
        """'w4a4', 'w3a3', 'w2a2', 'w4a16', 'w8a8', ... ('16' = full precision) or 'fp'."""
        import re

        if name == "fp":
            return cls(weight=None, activation=None)
        m = re.fullmatch(r"w(\d+)a(\d+)", name.lower())
        if not m:
            raise ValueError(
                f"unknown quantization preset {name!r}: use e.g. 'w4a4', 'w4a16', 'fp'"
            )

        def side(b: str) -> QuantSpec | None:
            return None if int(b) == 16 else QuantSpec(method=method, bits=int(b), **spec_kw)

        return cls(weight=side(m.group(1)), activation=side(m.group(2)))
