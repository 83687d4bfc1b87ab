"""cage_ds: CAGE quantization-aware training on the QuEST quantizer, ZeRO-sharded.

from cage_ds import QuantConfig, prepare_model, cage_param_groups, CageAdamW
model = prepare_model(model, QuantConfig.preset("w4a4"))
opt = CageAdamW(cage_param_groups(model, weight_decay=0.1), lr=1e-3, total_steps=T)
# multi-rank: engine, *_ = cage_ds.zero.initialize(model=model, optimizer=opt, config=ds)
"""

from .nn import QuantLinear, cage_param_groups, prepare_model, quant_stats
from .optim import CageAdamW, CageCoupled
from .quant import QuantConfig, Quantizer, QuantSpec
from .zero import guard as _zero_guard  # noqa: F401  (refuses QuantLinear modes wrong under ZeRO)

__all__ = [
    "CageAdamW",
    "CageCoupled",
    "QuantConfig",
    "QuantLinear",
    "QuantSpec",
    "Quantizer",
    "cage_param_groups",
    "prepare_model",
    "quant_stats",
]
