"""CAGE hooks on a DeepSpeed engine: sharded quantize-and-correct, quantize before all-gather.

The hooks touch private names of deepspeed==0.19.8 (the pinned version; the layouts and
call order below were read from its source and are re-checked by tests/dist):
  ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): per instance, ``_reassign_or_swap_out_partitioned_
    parameters(sid)`` (runs right after sub-group sid's client step) also writes
    cast_lp(q(W H)) into ``fp16_partitioned_groups_flat[sid]``, the buffer all ds_tensors
    view and the next forward all-gathers.
  ZeRO-1/2 (DeepSpeedZeroOptimizer) and BF16_Optimizer: the module-level
    ``all_gather_dp_groups`` of stage_1_and_2 / bf16_optimizer (called after the fp32 ->
    lp copy in step() and update_lp_params()) is wrapped; for a registered optimizer it
    first writes cast_lp(q(W H)) into this rank's lp partition, then gathers the quantized
    flat groups low-bit (cage_ds.zero.flat_gather) when on.
  Checkpoint loads: ``checkpoint_event_epilogue`` (every engine.load_checkpoint ends with
    it) rewrites the lp partitions from the loaded masters before the original runs.
  Gradient clipping: DeepSpeed's global norm is taken over the reduced dL/dq; the unsharded
    path clips (M ⊙ dL/dq) H, whose norm is ||M ⊙ dL/dq||. With clipping on, ZeRO-3's
    ``_get_norm_groups`` and ZeRO-1/2's ``scaled_global_norm`` first apply the STE mask to the
    partition gradients in place (M is idempotent, the client step applies it again).
    BF16_Optimizer takes the norm over full unpartitioned gradients: clipping is refused there.
16-bit saves: ``_zero3_consolidated_16bit_state_dict`` (ZeRO-3) and the layers' state dicts
  (ZeRO-1/2) hold the de-rotated Q(W) under ``*.weight``, see _hook_layers.
QuantLinear layers are switched to ``weight_prequantized``: the gathered weight is the
ROTATED q(W H) and the gradient DeepSpeed reduces is dL/dq; the client step turns it into
the latent gradient (M ⊙ dL/dq) H (inside ShardedQuantOps.fused_step's kernel for QuEST).
The hooks copy the step's cast_lp(q(W H)) (ShardedQuantOps.write_lp), or quantize afresh
when the master changed since (checkpoint loads).
Refused: ZeRO stage 0, fp16 loss scaling, ZeRO++ (qwZ, qgZ, hpZ), MiCS, any offload, and a
low-precision buffer that aliases the fp32 master (torch autocast without bf16/fp16 section).
"""

from __future__ import annotations

import json
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from cage_ds.nn import QuantLinear, quantized_modules
from cage_ds.optim.quant_ops import quant_spec_from_group
from cage_ds.quant.lowbit import WireFormat, allowed

from .cpu_shm import unlink_allreduce_buffer
from .flat_gather import FlatLowbitGather
from .gather import LowbitGather
from .optimizer import ShardedQuantOps, install_quant_ops
from .shardmap import PartitionMap, zero3_maps, zero12_maps

Partitions = list[tuple[torch.Tensor, ShardedQuantOps]]
"""(fp32 master partition, its ops) per quantized flat partition of this rank."""

_FLAT_WRITERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


class _Writer:
    """Holds the callable that quantizes one optimizer's lp partitions and its low-bit
    gather, None when off (weakref-able)."""

    def __init__(self, fn: Callable[[], None], lowbit: FlatLowbitGather | None):
        self.fn, self.lowbit = fn, lowbit


def _zero_section(config: Any) -> dict:
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        return {}
    return dict(config.get("zero_optimization") or {})


def check_config(config: Any) -> None:
    """Refuse DeepSpeed settings CAGE's hooks do not support, naming the setting."""
    z = _zero_section(config)
    stage = int(z.get("stage", 0))
    if stage not in (1, 2, 3):
        raise ValueError(
            f"cage_ds.zero supports ZeRO stages 1, 2 and 3, got zero_optimization.stage={stage}; "
            "without ZeRO use CageAdamW and the fake-quant QuantLinear directly"
        )
    if z.get("zero_quantized_weights"):
        raise ValueError(
            "cage_ds.zero: zero_optimization.zero_quantized_weights (ZeRO++ qwZ) would "
            "re-quantize the CAGE-quantized weights onto its own int8 grid; turn it off (the "
            "low-bit gather, lowbit_gather, already sends them losslessly as b-bit codes)"
        )
    for key, bad in (
        ("zero_quantized_gradients", lambda v: bool(v)),
        ("zero_hpz_partition_size", lambda v: int(v) > 1),
        ("mics_shard_size", lambda v: int(v) > 0),
    ):
        if key in z and bad(z[key]):
            raise ValueError(f"cage_ds.zero: zero_optimization.{key}={z[key]!r} is not supported")
    for key in ("offload_param", "offload_optimizer"):
        dev = (z.get(key) or {}).get("device", "none")
        dev = getattr(dev, "value", dev)  # the engine's parsed config holds an enum
        if str(dev).lower() not in ("none", "null"):
            raise ValueError(
                f"cage_ds.zero: zero_optimization.{key}.device={dev!r} is not supported "
                "(the hooks write the lp partitions in place; offload paths are not verified)"
            )
    if z.get("cpu_offload") or z.get("cpu_offload_param"):
        raise ValueError("cage_ds.zero: cpu_offload / cpu_offload_param are not supported")


def check_parsed_zero_config(zero_config: Any) -> None:
    """check_config on an engine's parsed DeepSpeedZeroConfig (covers configs given via args)."""
    zero = zero_config.model_dump()
    check_config({"zero_optimization": {k: v for k, v in zero.items() if v is not None}})


def _check_alias(lp: torch.Tensor, hp: torch.Tensor, where: str) -> None:
    if lp.data_ptr() == hp.data_ptr():
        raise RuntimeError(
            f"cage_ds.zero: {where}: the low-precision buffer IS the fp32 master (torch autocast "
            "without a bf16/fp16 section?); writing q(W H) there would destroy the latent "
            "weights. Add a bf16 section, or train in fp32 without autocast."
        )


def _quant_spec(group: dict, where: str):
    return quant_spec_from_group(group.get("quant"), where)


def _check_2d(shapes: list[tuple[int, ...]], where: str) -> None:
    bad = [s for s in shapes if len(s) != 2]
    if bad:
        raise ValueError(f"{where}: a quantized param group holds non-matrix parameters {bad}")


def _ops(
    maps: list[PartitionMap],
    rank: int,
    group: dict,
    lp: torch.Tensor,
    where: str,
    pg: Any,
    names: tuple[str, ...],
) -> ShardedQuantOps | None:
    spec = _quant_spec(group, where)
    if spec is None:
        return None
    return ShardedQuantOps(maps, rank, spec, lp.dtype, pg, where, names)


def _names(params: list, names: dict[int, str], where: str) -> tuple[str, ...]:
    """The module's names of a flat group's parameters, in flat order."""
    missing = [tuple(p.shape) for p in params if id(p) not in names]
    if missing:
        raise RuntimeError(f"{where}: parameters of shapes {missing[:4]} are not in the module")
    return tuple(names[id(p)] for p in params)


# ---------------- ZeRO-3 ----------------
def _attach_zero3(
    opt: Any, client: torch.optim.Optimizer, names: dict[int, str], lowbit: bool | None
) -> tuple[Partitions, LowbitGather | None]:
    if any(f is None for f in opt.fp16_partitioned_groups_flat):
        raise RuntimeError(
            "cage_ds.zero: ZeRO-3 without lp flat buffers (NVMe param offload?) is not supported"
        )
    pg = opt.dp_process_group
    world, rank = tdist.get_world_size(pg), tdist.get_rank(pg)
    partitions, by_sid = [], {}
    for sid, params in enumerate(opt.fp16_groups):
        gid = opt.sub_group_to_group_id[sid]
        where = f"ZeRO-3 sub-group {sid} (param group {gid})"
        hp, lp = opt.fp32_partitioned_groups_flat[sid], opt.fp16_partitioned_groups_flat[sid]
        _check_alias(lp, hp, where)
        if _quant_spec(client.param_groups[gid], where) is None:
            continue
        shapes = [tuple(p.ds_shape) for p in params]
        _check_2d(shapes, where)
        maps = zero3_maps(shapes, world)
        slot = 0
        for p in params:
            pos = opt.grad_position[opt.get_param_id(p)]
            if p.ds_tensor.ds_numel != -(-p.ds_numel // world) or pos[1] != slot:
                raise RuntimeError(
                    f"{where}: DeepSpeed's partition layout differs from the shard map"
                )
            slot += p.ds_tensor.ds_numel
        if maps[rank].numel != hp.numel():
            raise RuntimeError(
                f"{where}: flat partition has {hp.numel()} elements, map {maps[rank].numel}"
            )
        ops = _ops(
            maps, rank, client.param_groups[gid], lp, where, pg, _names(params, names, where)
        )
        by_sid[sid] = ops
        partitions.append((hp, ops))
    gather = _lowbit_gather(opt, by_sid, world, lowbit)
    original = opt._reassign_or_swap_out_partitioned_parameters

    def write(self, sid):
        by_sid[sid].write_lp(self.fp32_partitioned_groups_flat[sid],
                             self.fp16_partitioned_groups_flat[sid])  # fmt: skip
        if gather is not None:
            gather.refresh(sid)

    def reassign(self, sub_group_id):
        original(sub_group_id)
        if sub_group_id in by_sid:
            write(self, sub_group_id)

    def write_all(self):
        self._partition_all_parameters()
        for sid, ops in by_sid.items():
            ops.invalidate()
            write(self, sid)

    opt._reassign_or_swap_out_partitioned_parameters = types.MethodType(reassign, opt)
    if opt.clip_grad > 0:
        original_norms = opt._get_norm_groups

        def _get_norm_groups(self):  # clip on ||M ⊙ dL/dq|| = ||(M ⊙ dL/dq) H||
            for sid, ops in by_sid.items():
                hp = self.fp32_partitioned_groups_flat[sid]
                ops.mask_grads_(hp, self.averaged_gradients[sid])
            return original_norms()

        opt._get_norm_groups = types.MethodType(_get_norm_groups, opt)
    _wrap_epilogue(opt, lambda: write_all(opt))
    write_all(opt)
    if opt.persistent_parameters:
        opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
    return partitions, gather


def _lowbit_on(groups: dict[Any, ShardedQuantOps], world: int, lowbit: bool | None) -> bool:
    """Whether to gather these quantized groups low-bit: on by default where every group's
    format allows it (cage_ds.quant.lowbit.allowed) and world > 1; True raises where not."""
    bad = [
        f"group {key}: {ops.quantizer.spec.bits}-bit on {ops.lp_dtype}"
        for key, ops in groups.items()
        if not allowed(ops.quantizer.spec.bits, ops.lp_dtype)
    ]
    if lowbit and bad:
        raise ValueError(f"cage_ds.zero: lowbit_gather=True cannot serve {bad[0]}; pass None")
    return lowbit is not False and not bad and world > 1 and bool(groups)


def _lowbit_gather(
    opt: Any, by_sid: dict[int, ShardedQuantOps], world: int, lowbit: bool | None
) -> LowbitGather | None:
    """The low-bit gather of ZeRO-3's quantized weights (_lowbit_on), None when off."""
    return LowbitGather(opt, by_sid, enabled=True) if _lowbit_on(by_sid, world, lowbit) else None


# ---------------- ZeRO-1/2 and BF16_Optimizer ----------------
def _flat_layout(
    opt: Any, i: int, bf16: bool
) -> tuple[list, list, list[int], int, torch.Tensor, list]:
    """(params, shapes, offsets, flat numel, fp32 partition, lp partitions) of flat group i."""
    if bf16:
        params = opt.bf16_groups[i]
        shapes = [tuple(p.shape) for p in params]
        offsets = [0]
        for p in params[:-1]:
            offsets.append(offsets[-1] + p.numel())
        return (
            params,
            shapes,
            offsets,
            opt.bf16_groups_flat[i].numel(),
            opt.fp32_groups_flat_partition[i],
            opt.bf16_partitioned_groups[i],
        )
    shapes = [tuple(m.shape) for m in opt.round_robin_bit16_meta[i]]
    return (
        opt.round_robin_bit16_groups[i],
        shapes,
        list(opt.round_robin_bit16_offsets[i]),
        opt.bit16_groups_flat[i].numel(),
        opt.single_partition_of_fp32_groups[i],
        opt.parallel_partitioned_bit16_groups[i],
    )


def _attach_flat(
    opt: Any, client: torch.optim.Optimizer, bf16: bool, names: dict[int, str],
    lowbit: bool | None,
) -> tuple[Partitions, FlatLowbitGather | None]:  # fmt: skip
    if not bf16 and getattr(opt, "cpu_offload", False):
        raise RuntimeError("cage_ds.zero: ZeRO-1/2 cpu_offload is not supported")
    partitions, writers, group_of, served = [], [], {}, {}
    n_groups = len(opt.bf16_groups if bf16 else opt.bit16_groups)
    for i in range(n_groups):
        pg = opt.real_dp_process_group[i]
        world, rank = tdist.get_world_size(pg), tdist.get_rank(pg)
        where = f"{'BF16_Optimizer' if bf16 else 'ZeRO-1/2'} param group {i}"
        params, shapes, offsets, numel, hp, lps = _flat_layout(opt, i, bf16)
        _check_alias(lps[rank], hp, where)
        if _quant_spec(client.param_groups[i], where) is None:
            continue
        _check_2d(shapes, where)
        maps = zero12_maps(shapes, offsets, numel, world)
        if maps[rank].numel != hp.numel():
            raise RuntimeError(
                f"{where}: flat partition has {hp.numel()} elements, map {maps[rank].numel}"
            )
        if not bf16:
            first = min(maps[rank].pieces, key=lambda q: q.flat_start, default=None)
            if first is not None and first.elem_start != opt.first_offset[i]:
                raise RuntimeError(f"{where}: DeepSpeed's first_offset differs from the shard map")
        ops = _ops(
            maps, rank, client.param_groups[i], lps[rank], where, pg, _names(params, names, where)
        )
        partitions.append((hp, ops))
        group_of[id(hp)] = i
        writers.append((ops, hp, lps[rank]))
        fmt = WireFormat.flat(ops.quantizer.spec, shapes, offsets, numel, world)
        served[i] = (ops, fmt, hp, pg)

    def write_all():
        for ops, hp, lp in writers:
            ops.write_lp(hp, lp)

    lp_groups = opt.bf16_partitioned_groups if bf16 else opt.parallel_partitioned_bit16_groups
    worlds = {fmt.world for _, fmt, _, _ in served.values()}
    on = _lowbit_on({i: v[0] for i, v in served.items()}, min(worlds, default=1), lowbit)
    gather = FlatLowbitGather(served) if on else None
    writer = _Writer(write_all, gather)
    opt._cage_lp_writer = writer  # keeps the weak registry entry alive with the optimizer
    _FLAT_WRITERS[id(lp_groups)] = writer
    _install_gather_patch()

    def invalidate_all():
        for ops, _, _ in writers:
            ops.invalidate()

    def reload():  # fp32 masters were rewritten: plain copy, then quantized write + gather
        invalidate_all()
        opt.update_lp_params()

    if opt.clip_grad > 0:
        if bf16:
            raise ValueError(
                "cage_ds.zero: gradient_clipping with BF16_Optimizer is not supported (its norm "
                "covers the full unmasked gradient dL/dq); use ZeRO-1/2/3 without it or no clipping"
            )
        original_norm = opt.scaled_global_norm

        def scaled_global_norm(self, norm_type=2):  # clip on ||M ⊙ dL/dq||
            for ops, hp, _ in writers:
                i = group_of[id(hp)]
                ops.mask_grads_(hp, list(self.averaged_gradients[i]))
            return original_norm(norm_type)

        opt.scaled_global_norm = types.MethodType(scaled_global_norm, opt)
    _wrap_epilogue(opt, reload)
    opt.update_lp_params()
    return partitions, gather


def _install_gather_patch() -> None:
    """Wrap all_gather_dp_groups in stage_1_and_2 and bf16_optimizer once (idempotent)."""
    from deepspeed.runtime import bf16_optimizer, utils
    from deepspeed.runtime.zero import stage_1_and_2

    original = utils.all_gather_dp_groups
    if getattr(stage_1_and_2.all_gather_dp_groups, "_cage", False):
        return

    # deepspeed==0.19.8 calls it with these keywords; the stock gather of a subset of the
    # groups is the same call on the groups' entries of the three per-group lists
    def all_gather_dp_groups(groups_flat, partitioned_param_groups, dp_process_group,
                             start_alignment_factor, allgather_bucket_size):  # fmt: skip
        def stock(ids: list[int]) -> None:
            original([groups_flat[i] for i in ids], [partitioned_param_groups[i] for i in ids],
                     [dp_process_group[i] for i in ids], start_alignment_factor,
                     allgather_bucket_size)  # fmt: skip

        writer = _FLAT_WRITERS.get(id(partitioned_param_groups))
        if writer is not None:
            writer.fn()
        if writer is None or writer.lowbit is None:
            return stock(list(range(len(groups_flat))))
        return writer.lowbit.run(groups_flat, stock)

    all_gather_dp_groups._cage = True
    stage_1_and_2.all_gather_dp_groups = all_gather_dp_groups
    bf16_optimizer.all_gather_dp_groups = all_gather_dp_groups


def _wrap_epilogue(opt: Any, rewrite: Callable[[], None]) -> None:
    original = getattr(opt, "checkpoint_event_epilogue", None)

    def checkpoint_event_epilogue(self):
        rewrite()
        if original is not None:
            original()

    opt.checkpoint_event_epilogue = types.MethodType(checkpoint_event_epilogue, opt)


# ---------------- layers and 16-bit saves ----------------
def _derotated(layer: QuantLinear, w: torch.Tensor) -> torch.Tensor:
    """Q(W) = q(W H) H^T (original domain, w's dtype) from the gathered rotated q(W H)."""
    return layer.weight_quantizer.unrotate(w.float()).to(w.dtype)


def _state_dict_post_hook(layer: QuantLinear, state: dict, prefix: str, _meta: Any) -> None:
    """A hooked layer's state dict holds Q(W) under ``weight`` (ZeRO-3's partitioned, empty
    weight is left as it is: its 16-bit save is the consolidated dict, see _hook_layers)."""
    key = prefix + "weight"
    w = state.get(key)
    if w is not None and tuple(w.shape) == (layer.out_features, layer.in_features):
        state[key] = _derotated(layer, w.detach())


def _hook_layers(engine: Any, registry: dict[int, ShardedQuantOps]) -> None:
    """Switch the engine module's weight-quantized QuantLinear layers to weight_prequantized
    (the hooks write q(W H) into their gathered weights) and make state dicts and 16-bit
    saves hold the de-rotated Q(W) under the original ``*.weight`` keys (the W4A16 view a
    plain Hugging Face model loads), never the rotated q(W H).

    Raises ValueError if there is no such layer, or if a layer's weight is not in a
    quantized param group the hooks serve (it would be gathered unquantized).
    """
    layers = {n: m for n, m in quantized_modules(engine.module) if m.weight_quantizer is not None}
    if not layers:
        raise ValueError("cage_ds.zero: the model has no QuantLinear with a weight quantizer")
    served = {n for ops in registry.values() for n in ops.param_names}
    loose = sorted(n for n in layers if n + ".weight" not in served)
    if loose:
        raise ValueError(
            f"cage_ds.zero: the weights of {loose[:4]} are quantized by their layers but sit in "
            "param groups without 'quant'; build the optimizer from cage_param_groups(model)"
        )
    for layer in layers.values():
        layer.weight_prequantized = True
        layer.zero_hooked = True
        layer.register_state_dict_post_hook(_state_dict_post_hook)
    original = engine._zero3_consolidated_16bit_state_dict

    # pinned to deepspeed==0.19.8: save_16bit_model (and accelerate's get_state_dict) take
    # ZeRO-3's gathered weights from _zero3_consolidated_16bit_state_dict, not state_dict()
    def consolidated(*args: Any, **kwargs: Any) -> dict | None:
        state = original(*args, **kwargs)
        if state is not None:  # rank 0
            for name, layer in layers.items():
                key = name + ".weight"
                if key in state:
                    state[key] = _derotated(layer, state[key])
        return state

    engine._zero3_consolidated_16bit_state_dict = consolidated


# ---------------- public ----------------
@dataclass(frozen=True)
class ZeroAttachment:
    """What ``attach`` leaves on the engine's ZeRO wrapper (``engine.optimizer.cage_zero``)."""

    partitions: Partitions
    """(fp32 master partition, its ShardedQuantOps) of every quantized flat partition of this
    rank (cage_ds.zero.quant_stats reads them)."""
    lowbit: LowbitGather | FlatLowbitGather | None
    """The low-bit gather of the quantized weights (ZeRO-3 / ZeRO-1/2), None when off."""

    @property
    def ops(self) -> dict[int, ShardedQuantOps]:
        """{id(flat partition): its ops}: what the client optimizer's quant_ops serves."""
        return {id(hp): ops for hp, ops in self.partitions}


def attachment(engine: Any) -> ZeroAttachment | None:
    """The engine's CAGE attachment, None if ``attach`` has not run on it."""
    return getattr(getattr(engine, "optimizer", None), "cage_zero", None)


def attach(
    engine: Any, client_optimizer: torch.optim.Optimizer, lowbit_gather: bool | None = None
) -> ZeroAttachment:
    """Attach the CAGE hooks to an initialized engine; returns the attachment.

    lowbit_gather: gather the quantized weights as packed codes + scales (ZeRO-3:
    cage_ds.zero.gather; ZeRO-1/2: cage_ds.zero.flat_gather; ``attachment(engine).lowbit``);
    None = wherever the format allows it, True = required (ValueError where it cannot be
    served), False = stock 16-bit.

    Leaves a consistent state by itself: the engine module's weight-quantized QuantLinear
    layers are switched to weight_prequantized (and their saves de-rotated, _hook_layers),
    so ``deepspeed.initialize`` + ``attach`` equals ``cage_ds.zero.initialize``.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    check_parsed_zero_config(engine._config.zero_config)
    if attachment(engine) is not None:
        raise RuntimeError("cage_ds.zero: hooks are already attached to this engine")
    if engine.fp16_enabled():
        raise ValueError("cage_ds.zero: fp16 (loss scaling) is not supported; use bf16 or fp32")
    unlink_allreduce_buffer()  # HF Trainer / accelerate ran deepspeed.init_distributed
    names = {id(p): n for n, p in engine.module.named_parameters()}
    gather = None
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        partitions, gather = _attach_zero3(opt, client_optimizer, names, lowbit_gather)
    elif isinstance(opt, DeepSpeedZeroOptimizer):
        partitions, gather = _attach_flat(opt, client_optimizer, False, names, lowbit_gather)
    elif isinstance(opt, BF16_Optimizer):
        partitions, gather = _attach_flat(opt, client_optimizer, True, names, lowbit_gather)
    else:
        raise TypeError(
            f"cage_ds.zero: unsupported DeepSpeed optimizer wrapper {type(opt).__name__}"
        )
    state = ZeroAttachment(partitions, gather)
    install_quant_ops(client_optimizer, state.ops)
    _hook_layers(engine, state.ops)
    if isinstance(gather, LowbitGather):
        gather.install(engine.module)
    opt.cage_zero = state
    return state


def initialize(**kwargs: Any):
    """deepspeed.initialize(**kwargs) with CAGE attached; same return tuple.

    ``lowbit_gather=`` (not passed to DeepSpeed): see ``attach``.

    Needs ``optimizer=`` a CageAdamW instance (with cage_param_groups) and ``model=`` a
    prepare_model'ed model; ``attach`` sets its QuantLinear layers to weight_prequantized.
    """
    import deepspeed

    client = kwargs.get("optimizer")
    if not isinstance(client, torch.optim.Optimizer) or not callable(
        getattr(client, "quant_ops", None)
    ):
        raise TypeError(
            "cage_ds.zero.initialize needs optimizer=<CageAdamW instance> (a client optimizer "
            f"with the quant_ops hook), got {type(client).__name__}"
        )
    lowbit_gather = kwargs.pop("lowbit_gather", None)
    config = kwargs.get("config", kwargs.get("config_params"))
    if config is not None:  # refuse before building anything; attach() re-checks the engine's
        check_config(config)
    out = deepspeed.initialize(**kwargs)
    attach(out[0], client, lowbit_gather)
    return out
