"""Quantized layers and model transforms: QuantLinear, prepare_model, CAGE param groups,
quantized export / reload, telemetry. No distribution here."""

from .prepare import (
    cage_param_groups,
    export_quantized_state,
    load_quantized_state,
    prepare_model,
    quant_config_of,
    quantized_modules,
    set_weight_prequantized,
)
from .quant_linear import QuantLinear
from .telemetry import quant_stats

__all__ = [
    "QuantLinear",
    "cage_param_groups",
    "export_quantized_state",
    "load_quantized_state",
    "prepare_model",
    "quant_config_of",
    "quant_stats",
    "quantized_modules",
    "set_weight_prequantized",
]
