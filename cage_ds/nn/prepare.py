"""Model-level transforms: swap linear layers for QuantLinear, build CAGE param groups,
export / reload quantized weights.

``prepare_model`` swaps, in place, every nn.Linear whose module name ends with one of
``QuantConfig.targets`` (Llama: q/k/v/o/gate/up/down of each decoder layer); embeddings,
lm_head and norms stay full precision. Every layer is validated before anything changes.

Quantized export (``export_quantized_state``): a flat dict of tensors (safetensors-ready)
equal to the model's state dict except that each quantized weight ``<layer>.weight`` is
replaced by ``<layer>.weight.codes`` (uint8, b-bit packed), ``<layer>.weight.scales``
(fp32) and ``<layer>.weight.format`` (int64 [method (0 quest, 1 rtn), bits,
hadamard_block, group_size]: what the codes mean). ``load_quantized_state`` writes the
dequantized q(W H) back as the layer's weight in ``weight_prequantized`` mode, so the
reloaded model computes exactly the forward of the model that was exported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from cage_kernels import ops
from torch import nn

from cage_ds.quant import QuantConfig, QuantizedTensor, QuantSpec

from .quant_linear import QuantLinear

_CODES, _SCALES, _FORMAT = ".weight.codes", ".weight.scales", ".weight.format"
_METHODS = ("quest", "rtn")


def _format_of(spec: QuantSpec) -> list[int]:
    """The spec fields that give codes their meaning, as ints (the trust/clip mask does not)."""
    return [_METHODS.index(spec.method), spec.bits, spec.hadamard_block, spec.group_size]


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(qualified name, layer) for every QuantLinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig that ``prepare_model`` applied to ``model``, with targets = the
    qualified names of its QuantLinear layers, so preparing a fresh model of the same
    architecture with it swaps exactly the same layers; None for an unprepared model.

    Raises ValueError if the layers do not share one (weight, activation) spec pair."""
    layers = list(quantized_modules(model))
    if not layers:
        return None
    specs = {
        (_spec_of(layer.weight_quantizer), _spec_of(layer.act_quantizer)) for _, layer in layers
    }
    if len(specs) != 1:
        raise ValueError(
            f"quant_config_of: the QuantLinear layers use {len(specs)} different spec pairs "
            f"{sorted(map(str, specs))[:3]}; one QuantConfig cannot describe them"
        )
    weight, activation = specs.pop()
    return QuantConfig(weight=weight, activation=activation, targets=tuple(n for n, _ in layers))


def _spec_of(quantizer) -> QuantSpec | None:
    return None if quantizer is None else quantizer.spec


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def prepare_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap the targeted nn.Linear layers (exact type, not subclasses) for QuantLinear in
    place; return the model.

    Raises TypeError if ``config`` is not a QuantConfig (e.g. a preset name), ValueError
    (nothing changed) if the model is already prepared, no layer matches
    ``config.targets``, or a layer's in_features does not fit a spec (naming the layer).
    """
    if not isinstance(config, QuantConfig):
        hint = f"QuantConfig.preset({config!r})" if isinstance(config, str) else "QuantConfig(...)"
        raise TypeError(
            f"prepare_model: config must be a QuantConfig, got {type(config).__name__} "
            f"{config!r}; use prepare_model(model, {hint})"
        )
    prepared = [name for name, _ in quantized_modules(model)]
    if prepared:
        raise ValueError(
            f"prepare_model: the model is already prepared ({len(prepared)} QuantLinear, "
            f"e.g. {prepared[0]!r}); prepare a fresh model once"
        )
    matches = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and _matches(name, config.targets)
    ]
    if not matches:
        found = [name for name, _ in model.named_modules() if name][:8]
        raise ValueError(
            f"prepare_model: no nn.Linear named with a suffix in targets={config.targets}; "
            f"modules found include {found}"
        )
    for name, linear in matches:
        for spec in (config.weight, config.activation):
            if spec is not None:
                spec.check_row_len(linear.in_features, name)
    for name, linear in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear.from_linear(linear, config, name=name))
    return model


def set_weight_prequantized(model: nn.Module, flag: bool) -> int:
    """Set ``weight_prequantized`` on every QuantLinear that has a weight quantizer;
    return how many layers were set (layers without one have no quantized weight)."""
    count = 0
    for _, layer in quantized_modules(model):
        if layer.weight_quantizer is not None:
            layer.weight_prequantized = bool(flag)
            count += 1
    return count


def cage_param_groups(
    model: nn.Module,
    weight_decay: float = 0.1,
    correct: tuple[str, ...] | None = None,
    **cage_kw,
) -> list[dict]:
    """Param groups for CageAdamW, each with "param_names" (``cage_kw`` goes in every group).

    - one group per weight spec of the quantized linear weights: weight_decay, "quant" =
      dataclasses.asdict(spec);
    - other linear weights (lm_head, unquantized linears): weight_decay, "quant" None;
    - everything else (embeddings, norms, biases): weight_decay 0, "quant" None.
    ``correct``: module-name suffixes of the quantized layers that get the CAGE correction
    (None: all); the other quantized weights get their own groups with cage_lambda 0 (QuEST).
    Only trainable parameters; one shared by several modules lands with its first owner.
    """
    quant: dict[tuple, dict] = {}
    decay: dict = {"params": [], "param_names": [], "weight_decay": weight_decay, "quant": None}
    no_decay: dict = {"params": [], "param_names": [], "weight_decay": 0.0, "quant": None}
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_weight = pname == "weight" and isinstance(module, nn.Linear)
            wq = module.weight_quantizer if isinstance(module, QuantLinear) else None
            if is_weight and wq is not None:
                spec = dataclasses.asdict(wq.spec)
                corrected = correct is None or _matches(mname, correct)
                group = quant.setdefault(
                    (corrected, *sorted(spec.items())),
                    {"params": [], "param_names": [], "weight_decay": weight_decay, "quant": spec},
                )
            else:
                group = decay if is_weight else no_decay
            group["params"].append(p)
            group["param_names"].append(f"{mname}.{pname}" if mname else pname)
    if correct is not None and not any(corrected for corrected, *_ in quant):
        raise ValueError(
            f"cage_param_groups: no quantized layer matches correct={correct}; "
            f"quantized layers include {[n for n, _ in quantized_modules(model)][:4]}"
        )
    off = {"cage_lambda": 0.0}
    groups = [{**g, **cage_kw, **({} if key[0] else off)} for key, g in quant.items()]
    return [g for g in [*groups, {**decay, **cage_kw}, {**no_decay, **cage_kw}] if g["params"]]


def _exportable(name: str, layer: QuantLinear) -> bool:
    if layer.weight_quantizer is None:
        return False
    if layer.weight_prequantized:
        raise ValueError(
            f"export_quantized_state: {name} holds prequantized weights; export from the "
            "latent weights (weight_prequantized=False)"
        )
    return True


@torch.no_grad()
def export_quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict (detached copies) with each quantized weight replaced by
    packed codes, scales and format (see module docstring)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, layer in quantized_modules(model):
        if not _exportable(name, layer):
            continue
        qt = layer.weight_quantizer.quantize(layer.weight.detach())
        del state[name + ".weight"]
        state[name + _CODES] = qt.packed().contiguous()
        state[name + _SCALES] = qt.scales.float().contiguous()
        state[name + _FORMAT] = torch.tensor(_format_of(layer.weight_quantizer.spec))
    return state


@torch.no_grad()
def load_quantized_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load an ``export_quantized_state`` dict into a model prepared with the same config.

    Quantized layers get weight = q(W H) from codes and scales and weight_prequantized=True;
    the other entries load with ``load_state_dict`` (strict). Returns the model.
    """
    rest = dict(state)
    layers = []
    for name, layer in quantized_modules(model):
        if layer.weight_quantizer is None:
            continue
        keys = [name + k for k in (_CODES, _SCALES, _FORMAT)]
        missing = [k for k in keys if k not in rest]
        if missing:
            raise KeyError(f"load_quantized_state: {name} is quantized but {missing} missing")
        codes, scales, fmt = (rest.pop(k) for k in keys)
        spec = layer.weight_quantizer.spec
        if fmt.tolist() != _format_of(spec):
            raise ValueError(
                f"load_quantized_state: {name} was exported as [method, bits, hadamard_block, "
                f"group_size]={fmt.tolist()}, the model's weight spec is {_format_of(spec)} "
                f"({spec}); prepare the model with the exported config"
            )
        unpacked = ops.unpack(codes, spec.bits)
        if tuple(unpacked.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"load_quantized_state: {name} codes unpack to {tuple(unpacked.shape)}, "
                f"weight is {tuple(layer.weight.shape)}"
            )
        dev = layer.weight.device
        qt = QuantizedTensor(unpacked.to(dev), scales.to(dev), spec.bits)
        rest[name + ".weight"] = layer.weight_quantizer.from_codes(qt, layer.weight.dtype)
        layers.append(layer)
    model.load_state_dict(rest, strict=True)
    for layer in layers:
        layer.weight_prequantized = True
    return model
