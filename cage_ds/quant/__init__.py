"""Quantizers and their specs: what a quantized number is, with no distribution; and
(lowbit) the packed form in which sharding adapters gather quantized rows."""

from .quantizer import Quantization, QuantizedTensor, Quantizer
from .spec import DEFAULT_TARGETS, QuantConfig, QuantSpec

__all__ = [
    "DEFAULT_TARGETS",
    "QuantConfig",
    "QuantSpec",
    "Quantization",
    "QuantizedTensor",
    "Quantizer",
]
