"""Tokenizers for cage-train: a local tokenizer path, or a byte-level BPE trained once and cached.

The BPE (``data.tokenizer: bpe``) is trained with the `tokenizers` library on the training
documents (never the validation ones), saved atomically under the cache dir keyed by the
data identity and vocabulary size, and wrapped in a PreTrainedTokenizerFast whose only
special token is EOS, appended after every document when packing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .config import ConfigError, DataConfig

EOS = "<|endoftext|>"


def _is_local_tokenizer(path: Path) -> bool:
    return path.is_file() or (
        path.is_dir()
        and any(
            (path / n).is_file()
            for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        )
    )


def tokenizer_vocab_size(cfg: DataConfig) -> int:
    """Vocabulary size the configured tokenizer has (bpe: exactly data.bpe_vocab_size)."""
    if cfg.tokenizer == "bpe":
        return cfg.bpe_vocab_size
    return len(load_local_tokenizer(cfg.tokenizer))


def load_local_tokenizer(path_text: str):
    """A tokenizer from a local directory (HF layout) or a tokenizer.json file; never downloads."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path_text).expanduser()
    if not _is_local_tokenizer(path):
        raise ConfigError(f"data.tokenizer={path_text!r}: no tokenizer file or directory there")
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def bpe_cache_path(cfg: DataConfig, identity: str) -> Path:
    """Where the BPE for this data identity and vocabulary lives."""
    key = json.dumps([identity, cfg.bpe_vocab_size, cfg.bpe_max_chars, EOS])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (
        cfg.resolved_cache_dir
        / "tokenizers"
        / f"bpe{cfg.bpe_vocab_size}-{digest}"
        / "tokenizer.json"
    )


def train_bpe(texts: Iterable[str], vocab_size: int, max_chars: int, out: Path) -> None:
    """Train a byte-level BPE (EOS special) on up to ``max_chars`` of ``texts``; save atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def capped():
        seen = 0
        for t in texts:
            if seen >= max_chars:
                return
            seen += len(t)
            yield t

    tok.train_from_iterator(capped(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ConfigError(
            f"data.bpe_vocab_size={vocab_size}: the corpus only supports {tok.get_vocab_size()} "
            "BPE tokens; lower data.bpe_vocab_size"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, out)


def load_tokenizer(cfg: DataConfig, identity: str, train_texts: Callable[[], Iterable[str]]):
    """The configured tokenizer; a missing cached BPE is trained on ``train_texts()``."""
    from transformers import PreTrainedTokenizerFast

    if cfg.tokenizer != "bpe":
        tok = load_local_tokenizer(cfg.tokenizer)
    else:
        path = bpe_cache_path(cfg, identity)
        if not path.is_file():
            train_bpe(train_texts(), cfg.bpe_vocab_size, cfg.bpe_max_chars, path)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS)
    if tok.eos_token_id is None:
        raise ConfigError(
            f"data.tokenizer={cfg.tokenizer!r} has no EOS token to separate documents"
        )
    return tok
