"""Checks a run must pass before any worker starts: each failure is one ConfigError line
naming the file or key and the fix. They read small things only: file headers, the first
records of each data file, the DeepSpeed JSON, the output folder, the checkpoint manifest.

``validate(cfg, world_size)``: the resolved config as a whole (batch divisibility, vocab
sizes, row lengths against the quantizer, paths, backend rules); cage-train and ``--check``
run it before the workers start, and every worker again on its own world size.
``preflight(cfg, world_size, on_cuda)``, run after it by cage-train and ``--check`` only:

- data: empty files, binary files read as text, JSON lines that do not parse, a missing
  ``data.text_field``, unreadable parquet;
- model.pretrained: config.json and every safetensors header readable;
- the DeepSpeed JSON: keys cage-train sets itself, fp16 / offload / ZeRO++ on a CPU machine;
- train.output_dir: creatable and writable;
- resume: the checkpoint's world size equals this run's under ZeRO (partitions are per rank;
  backend=fsdp2 checkpoints reshard to any world size, its runs skip the DeepSpeed checks).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, DeepSpeedSection
from .data import PARQUET_SUFFIXES, data_format, resolve_data_files
from .tokenizer import tokenizer_vocab_size

SAMPLE_BYTES = 1 << 20
"""Bytes of each data file the checks read (the head of a large file)."""
SAMPLE_RECORDS = 1000
"""JSON lines per file the checks parse."""
_CPU_UNSUPPORTED = (
    ("offload_optimizer", "zero_optimization.offload_optimizer"),
    ("offload_param", "zero_optimization.offload_param"),
    ("zero_quantized_weights", "zero_optimization.zero_quantized_weights (ZeRO++ qwZ)"),
    ("zero_quantized_gradients", "zero_optimization.zero_quantized_gradients (ZeRO++ qgZ)"),
    ("zero_hpz_partition_size", "zero_optimization.zero_hpz_partition_size (ZeRO++ hpZ)"),
)


def validate(cfg: Config, world_size: int) -> None:
    """Cross-section checks of a resolved config for ``world_size`` ranks; raise ConfigError.

    Cheap enough to run in the launcher before workers start (reads small files only).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(
            f"world size must be an int >= 1 (--world-size, $WORLD_SIZE or the launcher's rank "
            f"count), got {world_size!r}"
        )
    cfg.grad_accumulation(world_size)
    d, m = cfg.data, cfg.model
    if not d.source.startswith("hf:"):
        if not resolve_data_files(d.source):
            raise ConfigError(f"data.source={d.source!r}: no such file, folder or glob match")
        data_format(resolve_data_files(d.source))
    if m.pretrained is not None:
        if not (Path(m.pretrained) / "config.json").is_file():
            raise ConfigError(
                f"model.pretrained={m.pretrained!r}: no config.json in that directory"
            )
        hf = json.loads((Path(m.pretrained) / "config.json").read_text())
        model_vocab, hidden = hf.get("vocab_size"), hf.get("hidden_size")
        ffn, max_pos = hf.get("intermediate_size"), hf.get("max_position_embeddings")
    else:
        model_vocab, hidden, ffn, max_pos = (
            m.vocab_size,
            m.hidden_size,
            m.ffn_size,
            m.max_position_embeddings,
        )
    if max_pos is not None and d.seq_len > max_pos:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings={max_pos}"
        )
    tok_vocab = tokenizer_vocab_size(d)
    if model_vocab is not None and tok_vocab > model_vocab:
        raise ConfigError(
            f"tokenizer vocabulary {tok_vocab} (data.tokenizer={d.tokenizer!r}) is larger than the "
            f"model's vocab_size={model_vocab}: raise model.vocab_size or lower "
            "data.bpe_vocab_size"
        )
    if cfg.quant.enabled:
        qc = cfg.quant.to_quant_config()
        for spec, side in ((qc.weight, "weight"), (qc.activation, "activation")):
            if spec is None:
                continue
            for n, what in ((hidden, "hidden_size"), (ffn, "intermediate_size")):
                try:
                    spec.check_row_len(n, f"quant ({side}) on model.{what}")
                except ValueError as err:
                    raise ConfigError(str(err)) from None
    check_backend(cfg)
    ds_path = cfg.deepspeed.resolved_path(on_cuda=cuda_available())
    if not ds_path.is_file():
        raise ConfigError(f"deepspeed.config={str(ds_path)!r} does not exist")
    try:
        ds = json.loads(ds_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config={str(ds_path)!r} is not valid JSON: {err}") from None
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    weight = cfg.quant.to_quant_config().weight if cfg.quant.enabled else None
    deepspeed = cfg.backend == "deepspeed"
    if (
        deepspeed
        and stage > 0
        and weight is not None
        and weight.method == "rtn"
        and cfg.optim.uses_cage
    ):
        raise ConfigError(
            f"optim.cage_lambda={cfg.optim.cage_lambda} (cage_strength="
            f"{cfg.optim.cage_strength}) with quant.method='rtn' under ZeRO "
            f"stage {stage}: the sharded CAGE correction supports QuEST weights only; use "
            "quant.method=quest, optim.cage_lambda=0 (RTN-STE) or deepspeed.stage=0"
        )
    stray = sorted(set(cfg.optim.cage_targets or ()) - set(cfg.quant.targets))
    if stray:
        raise ConfigError(
            f"optim.cage_targets has {stray}, which quant.targets={list(cfg.quant.targets)} does "
            "not quantize: the correction applies to quantized layers only"
        )
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r}: no such checkpoint")


def check_backend(cfg: Config) -> None:
    """backend=fsdp2 shards parameters, gradients and optimizer states like ZeRO-3 and reads
    nothing from the deepspeed section, which must therefore stay at its defaults
    (config=auto, stage=3): a DeepSpeed JSON or another stage would silently not apply, so it
    is refused. cage_ds.fsdp shards quantized weights: a run without them is refused."""
    if cfg.backend != "fsdp2":
        return
    default = DeepSpeedSection()
    for key in ("config", "stage"):
        value = getattr(cfg.deepspeed, key)
        if value != getattr(default, key):
            raise ConfigError(
                f"deepspeed.{key}={value!r} does not apply to backend=fsdp2 (FSDP2 always shards "
                f"like ZeRO-3 and reads no DeepSpeed JSON): remove it or use backend=deepspeed"
            )
    if not cfg.quant.enabled or cfg.quant.to_quant_config().weight is None:
        raise ConfigError(
            f"backend=fsdp2 needs quantized weights, got quant.preset={cfg.quant.preset!r}: use "
            "a wXaY preset with X < 16, or backend=deepspeed for this run"
        )


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def preflight(cfg: Config, world_size: int, on_cuda: bool) -> None:
    """Every check below for ``cfg`` on ``world_size`` ranks; ConfigError on the first failure."""
    if not cfg.data.source.startswith("hf:"):
        check_data_files(resolve_data_files(cfg.data.source), cfg.data.text_field)
    if cfg.model.pretrained is not None:
        check_pretrained(Path(cfg.model.pretrained))
    check_output_dir(cfg.run_dir)
    if cfg.backend == "deepspeed":
        ds = deepspeed_json(cfg, world_size, on_cuda)
        check_resume_world(cfg, world_size, int(ds.get("zero_optimization", {}).get("stage", 0)))


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(SAMPLE_BYTES)


def check_data_files(files: Sequence[Path], text_field: str) -> None:
    """The data files hold text: not all empty; text files decode as UTF-8 without NUL bytes;
    JSON lines parse and carry ``text_field``; parquet files have that column."""
    fmt = data_format(files)
    if all(not _head(f).strip() for f in files):
        names = ", ".join(str(f) for f in files[:3])
        raise ConfigError(f"data.source: every file is empty ({names}): point it at text")
    for f in files:
        if fmt == "text":
            _check_text(f)
        elif fmt == "json":
            _check_json(f, text_field)
        elif f.suffix in PARQUET_SUFFIXES:
            _check_parquet(f, text_field)


def _check_text(path: Path) -> None:
    head = _head(path)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"data.source file {path} is not UTF-8 text (byte {err.start}): a binary file? "
            "remove it or point data.source at text files"
        ) from None
    if b"\0" in head:
        raise ConfigError(
            f"data.source file {path} holds NUL bytes: a binary file? remove it or point "
            "data.source at text files"
        )


def _check_json(path: Path, text_field: str) -> None:
    """The head of a JSON-lines file (or a whole small .json document) parses, and its first
    record has ``text_field``."""
    head = _head(path)
    text = head.decode(errors="replace")
    if path.suffix == ".json" and len(head) < SAMPLE_BYTES:
        try:
            whole = json.loads(text)
        except ValueError:
            pass  # JSON lines in a .json file: checked line by line below
        else:
            first = whole[0] if isinstance(whole, list) and whole else whole
            _check_record(path, 1, first, text_field)
            return
    lines = text.splitlines()
    if len(head) == SAMPLE_BYTES:
        lines = lines[:-1]  # may be cut at the sample's end
    first = True
    for number, line in enumerate(lines[:SAMPLE_RECORDS], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ConfigError(
                f"data.source file {path}, line {number}: not valid JSON ({err.msg}); fix or "
                "remove that line"
            ) from None
        if first:
            _check_record(path, number, record, text_field)
            first = False


def _check_record(path: Path, number: int, record: Any, text_field: str) -> None:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ConfigError(
            f"data.text_field={text_field!r} is not a field of {path} (record at line {number} "
            f"has {keys}): set data.text_field to the field holding the text"
        )


def _check_parquet(path: Path, text_field: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"data.source file {path} is not readable parquet ({err})") from None
    if text_field not in names:
        raise ConfigError(
            f"data.text_field={text_field!r} is not a column of {path} (columns: {names}): "
            "set data.text_field to the column holding the text"
        )


def check_pretrained(path: Path) -> None:
    """model.pretrained's config.json parses and every safetensors file has a valid header."""
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        config = path / "config.json"
        raise ConfigError(f"model.pretrained: {config} is unreadable ({err})") from None
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # safetensors raises its own error type per cause
            raise ConfigError(
                f"model.pretrained: {file} is not a valid safetensors file ({err}); re-download "
                "or re-export the checkpoint"
            ) from None


def deepspeed_json(cfg: Config, world_size: int, on_cuda: bool) -> dict[str, Any]:
    """cfg.deepspeed's JSON, checked: no key cage-train derives itself with another value, no
    optimizer/scheduler section, and on a machine without CUDA no fp16, offload or ZeRO++."""
    path = cfg.deepspeed.resolved_path(on_cuda)
    ds = json.loads(path.read_text())
    derived = derived_deepspeed_keys(cfg, world_size)
    for key, value in derived.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ConfigError(
                f"{path}: {key}={ds[key]!r} conflicts with the value {value!r} derived from "
                "train/optim; remove it from the DeepSpeed JSON"
            )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{path}: remove the '{key}' section (cage-train builds CageAdamW "
                "and the warmup-cosine schedule itself)"
            )
    if not on_cuda:
        if ds.get("fp16", {}).get("enabled") is True:
            raise ConfigError(
                f"{path}: fp16.enabled=true needs a GPU; on CPU use a *_cpu.json (fp32) "
                "or deepspeed.config=auto"
            )
        zero = ds.get("zero_optimization", {})
        for key, name in _CPU_UNSUPPORTED:
            value = zero.get(key)
            device = value.get("device", "none") if isinstance(value, dict) else None
            if (
                (device not in (None, "none"))
                or value is True
                or (isinstance(value, int) and not isinstance(value, bool) and value > 1)
            ):
                raise ConfigError(
                    f"{path}: {name} is not supported on CPU (DeepSpeed's CPU accelerator); "
                    "remove it or run on GPUs"
                )
    return ds


def derived_deepspeed_keys(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed keys cage-train fills from train/optim."""
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
    }


def check_output_dir(run_dir: Path) -> None:
    """``run_dir`` exists as a writable folder or can be created: no file in its path, the
    nearest existing folder writable."""
    probe = run_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(
            f"train.output_dir: {probe} is a file, so {run_dir} cannot be created; "
            "choose another train.output_dir or move the file"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"train.output_dir: {probe} is not writable, so {run_dir} cannot be written; "
            "choose another train.output_dir or fix its permissions"
        )


def check_resume_world(cfg: Config, world_size: int, stage: int) -> None:
    """Under ZeRO (``stage`` > 0) a checkpoint resumes only on the world size that wrote it."""
    from .checkpoint import CheckpointManager
    from .resume_guard import checkpoint_root

    root = checkpoint_root(cfg)
    if root is None or cfg.checkpoint.resume == "never" or stage == 0:
        return
    manager = CheckpointManager(root)
    candidates = manager.candidates()
    if not candidates:
        return
    saved = manager.read_manifest(candidates[0]).get("world_size")
    if saved is not None and saved != world_size:
        raise ConfigError(
            f"checkpoint {root / candidates[0]} was written by {saved} ranks, this run has "
            f"{world_size}: ZeRO stage {stage} partitions are per rank; relaunch with {saved} "
            "ranks (e.g. NPROC) or start over with checkpoint.resume=never"
        )
