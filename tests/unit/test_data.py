"""cage-train data: packing, validation split, deterministic per-rank sharding, exact resume,
and loading (local text / jsonl / parquet files, hub datasets from an offline HF cache) in
map and streaming modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cage_ds.train.config import ConfigError, DataConfig
from cage_ds.train.data import (
    PackedBlocks,
    ShuffledSamples,
    StreamedSamples,
    TrainBatches,
    build_data,
    is_validation,
    pack_stream,
)


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def random_docs(rng, n, lo=1, hi=40, vocab=50):
    return [list(rng.integers(0, vocab, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def test_pack_stream_cuts_the_concatenation(rng):
    docs = random_docs(rng, 30)
    flat = np.concatenate([np.asarray(d) for d in docs])
    for seq_len in (1, 7, 64):
        blocks = list(pack_stream(docs, seq_len))
        assert len(blocks) == len(flat) // seq_len
        if blocks:
            np.testing.assert_array_equal(np.stack(blocks).ravel(), flat[: len(blocks) * seq_len])


def test_packed_blocks_equal_stream_packing(rng):
    from datasets import Dataset

    docs = random_docs(rng, 57)
    ds = Dataset.from_dict({"ids": docs, "length": [len(d) for d in docs]})
    for seq_len in (3, 16, 101):
        packed = PackedBlocks(ds, seq_len)
        streamed = list(pack_stream(docs, seq_len))
        assert len(packed) == len(streamed)
        for k in rng.permutation(len(packed))[:20]:
            np.testing.assert_array_equal(packed[int(k)], streamed[int(k)])
    with pytest.raises(IndexError):
        packed[len(packed)]


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.25, 0.5])
def test_validation_split_is_spread_evenly(fraction):
    n = 1000
    held = np.flatnonzero(is_validation(np.arange(n), fraction))
    assert len(held) == int(n * fraction)
    gaps = np.diff(held)
    assert gaps.max() - gaps.min() <= 1


class ArraySamples:
    """Sample i = its index repeated (lets tests see which indices a rank got)."""

    def get(self, indices):
        return np.asarray([[i, i] for i in indices])


@pytest.mark.parametrize(("world", "micro", "accum"), [(1, 4, 1), (2, 2, 3), (3, 1, 2), (4, 2, 1)])
def test_ranks_are_disjoint_and_cover_each_step(world, micro, accum):
    gb = world * micro * accum
    ranks = [
        TrainBatches(ArraySamples(), global_batch=gb, micro_batch=micro, rank=r, world=world)
        for r in range(world)
    ]
    for step in range(4):
        seen = []
        for b in ranks:
            micro_batches = b.next_step()
            assert len(micro_batches) == accum and all(m.shape == (micro, 2) for m in micro_batches)
            seen += [int(x) for m in micro_batches for x in m[:, 0]]
        assert sorted(seen) == list(range(step * gb, (step + 1) * gb))


def test_shuffled_epochs_visit_every_block_once(rng):
    n_blocks = 23
    blocks = [np.full(4, k) for k in range(n_blocks)]

    class Blocks(list):
        pass

    samples = ShuffledSamples(Blocks(blocks), seed=int(rng.integers(1000)), shuffle=True)
    for epoch in range(3):
        got = samples.get(range(epoch * n_blocks, (epoch + 1) * n_blocks))[:, 0]
        assert sorted(got.tolist()) == list(range(n_blocks))
    e0 = samples.get(range(n_blocks))[:, 0]
    e1 = samples.get(range(n_blocks, 2 * n_blocks))[:, 0]
    assert not np.array_equal(e0, e1)  # a new order each epoch (23! orders: no tie in practice)
    same = ShuffledSamples(Blocks(blocks), seed=samples.seed, shuffle=True)
    np.testing.assert_array_equal(same.get(range(40)), samples.get(range(40)))


def _run(batches, steps):
    return [[m.clone() for m in batches.next_step()] for _ in range(steps)]


@pytest.mark.parametrize("mode", ["shuffled", "streamed"])
def test_resume_continues_the_stream_exactly(rng, mode):
    docs = random_docs(rng, 80)
    seq_len = 8

    def source():
        if mode == "streamed":
            return StreamedSamples(lambda: pack_stream(docs, seq_len))
        return ShuffledSamples(list(pack_stream(docs, seq_len)), seed=5, shuffle=True)

    world, micro, gb = 2, 3, 12
    for rank in range(world):
        full = TrainBatches(source(), global_batch=gb, micro_batch=micro, rank=rank, world=world)
        reference = _run(full, 9)  # > one epoch of ~ 100 blocks
        first = TrainBatches(source(), global_batch=gb, micro_batch=micro, rank=rank, world=world)
        _run(first, 4)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = TrainBatches(source(), global_batch=gb, micro_batch=micro, rank=rank, world=world)
        resumed.load_state_dict(state)
        for got, want in zip(_run(resumed, 5), reference[4:], strict=True):
            for g, w in zip(got, want, strict=True):
                assert np.array_equal(g.numpy(), w.numpy())
    with pytest.raises(ValueError, match="global batch 12"):
        TrainBatches(source(), global_batch=24, micro_batch=3, rank=0, world=2).load_state_dict(
            state
        )


def test_bad_sharding_arguments():
    with pytest.raises(ConfigError, match="not divisible"):
        TrainBatches(ArraySamples(), global_batch=10, micro_batch=3, rank=0, world=1)
    with pytest.raises(ValueError, match="rank 2 outside"):
        TrainBatches(ArraySamples(), global_batch=4, micro_batch=1, rank=2, world=2)


WORDS = (
    "thou art more lovely and more temperate rough winds do shake the darling buds of may "
    "and summer lease hath all too short a date"
).split()


def corpus(rng, n=400):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) for _ in range(n)]


def write_corpus(tmp_path, docs, fmt):
    if fmt == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text(
            "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
        )
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": docs}), path)
    else:
        path = tmp_path / "c.txt"
        path.write_text("\n\n".join(docs) + "\n")
    return path


def data_config(tmp_path, source, **kw):
    return DataConfig(
        source=str(source),
        seq_len=32,
        val_fraction=0.1,
        val_max_blocks=10_000,
        bpe_vocab_size=300,
        shuffle=False,
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )


def test_local_formats_and_streaming_agree(tmp_path, rng):
    docs = corpus(rng)
    results = {}
    for fmt in ("jsonl", "parquet", "txt"):
        sub = tmp_path / fmt
        sub.mkdir()
        path = write_corpus(sub, docs, fmt)
        for streaming in (False, True):
            cfg = data_config(tmp_path, path, streaming=streaming)
            data = build_data(cfg, seed=0)
            assert len(data.tokenizer) == 300
            train = data.train.get(range(20))
            results[fmt, streaming] = (data.val_blocks, train)
    ref_val, ref_train = results["jsonl", False]
    # the corpus through the same tokenizer, by hand: held-out every 10th document
    data = build_data(data_config(tmp_path, tmp_path / "jsonl" / "c.jsonl"), seed=0)
    eos = data.tokenizer.eos_token_id
    ids = [data.tokenizer(d)["input_ids"] + [eos] for d in docs]
    held = is_validation(np.arange(len(docs)), 0.1)
    want_train = list(pack_stream([x for x, h in zip(ids, held, strict=True) if not h], 32))
    want_val = list(pack_stream([x for x, h in zip(ids, held, strict=True) if h], 32))
    np.testing.assert_array_equal(ref_train, np.stack(want_train[:20]))
    np.testing.assert_array_equal(ref_val, np.stack(want_val))
    for key, (val, train) in results.items():
        np.testing.assert_array_equal(val, ref_val, err_msg=str(key))
        np.testing.assert_array_equal(train, ref_train, err_msg=str(key))


def test_val_batches_equal_count_per_rank(tmp_path, rng):
    path = write_corpus(tmp_path, corpus(rng), "jsonl")
    data = build_data(data_config(tmp_path, path), seed=0)
    n = len(data.val_blocks)
    for world in (1, 2, 3):
        per_rank = [data.val_batches(2, r, world) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1
        rows = np.concatenate([np.concatenate([b.numpy() for b in bs]) for bs in per_rank])
        assert len(rows) == (n // world) * world
        want = data.val_blocks[: len(rows)]
        assert sorted(r.tobytes() for r in rows) == sorted(b.tobytes() for b in want)
    with pytest.raises(ConfigError, match="validation blocks cannot be shared"):
        data.val_batches(2, 0, n + 1)


def test_missing_text_field_is_named(tmp_path, rng):
    path = write_corpus(tmp_path, corpus(rng, 20), "jsonl")
    with pytest.raises(ConfigError, match=r"data\.text_field='body' is not a column"):
        build_data(data_config(tmp_path, path, text_field="body"), seed=0)


def test_bpe_is_cached(tmp_path, rng):
    path = write_corpus(tmp_path, corpus(rng), "jsonl")
    cfg = data_config(tmp_path, path)
    build_data(cfg, seed=0)
    cached = list((tmp_path / "cache" / "tokenizers").rglob("tokenizer.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    build_data(cfg, seed=0)
    assert cached[0].stat().st_mtime_ns == mtime


def test_hf_source_loads_a_local_dataset_folder_offline(tmp_path, rng):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus(rng)
    (tmp_path / "ds" / "data").mkdir(parents=True)
    pq.write_table(
        pa.table({"text": docs}), tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"
    )
    via_hf = build_data(data_config(tmp_path, f"hf:{tmp_path / 'ds'}"), seed=0)
    path = write_corpus(tmp_path, docs, "jsonl")
    local = build_data(data_config(tmp_path, path), seed=0)
    np.testing.assert_array_equal(via_hf.val_blocks, local.val_blocks)
    np.testing.assert_array_equal(via_hf.train.get(range(10)), local.train.get(range(10)))


def test_hf_source_missing_from_cache_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.source='hf:nobody/no-such-dataset'"):
        build_data(data_config(tmp_path, "hf:nobody/no-such-dataset"), seed=0)


HUB_NAME = "cage-ds/tiny_corpus"
"""A hub-style dataset name (namespace/name) that only exists in the test's HF cache."""

CACHED_LOAD = """
import json, sys
import numpy as np
import datasets
from cage_ds.train.config import ConfigError, DataConfig
from cage_ds.train.data import build_data

assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE
kw = json.loads(sys.argv[1])
out = {}
for streaming in (False, True):
    data = build_data(DataConfig(**kw, streaming=streaming), seed=0)
    out[f"val_{streaming}"] = data.val_blocks
    out[f"train_{streaming}"] = data.train.get(range(10))
np.savez(sys.argv[2], **out)
errors = {}
for config in (None, "realnewslike"):
    try:
        build_data(DataConfig(**{**kw, "hf_config": config}), seed=0)
    except ConfigError as err:
        errors[str(config)] = str(err)
print(json.dumps(errors))
"""


def write_hub_cache(datasets_cache, name, config, jsonl, scratch):
    """Write the cache an online ``load_dataset(name, config)`` of a hub dataset of jsonl files
    leaves: the real json builder's Arrow files + dataset_info.json, in the folder a builder with
    that repo_id / dataset_name / config / commit hash caches to
    (<cache>/<namespace>___<name>/<config>/0.0.0/<commit>/)."""
    from datasets.packaged_modules.json.json import Json

    dataset_name = name.split("/")[-1]
    commit = "0123456789abcdef0123456789abcdef01234567"
    online = Json(
        cache_dir=str(datasets_cache),
        dataset_name=dataset_name,
        repo_id=name,
        config_name=config,
        hash=commit,
    )
    # the repo_id builder accepts hf://datasets/<name>@<commit> data files only: a twin without
    # repo_id reads the local jsonl and writes into the repo builder's cache folder
    writer = Json(
        cache_dir=str(scratch),
        dataset_name=dataset_name,
        config_name=config,
        data_files={"train": [str(jsonl)]},
    )
    writer.download_and_prepare(output_dir=online.cache_dir)
    return Path(online.cache_dir)


def test_hf_source_loads_a_hub_dataset_from_the_offline_cache(tmp_path, rng):
    docs = corpus(rng)
    (tmp_path / "en").mkdir()
    (tmp_path / "other").mkdir()
    path = write_corpus(tmp_path / "en", docs, "jsonl")
    other = write_corpus(tmp_path / "other", corpus(rng, 20), "jsonl")
    hf_home = tmp_path / "hf"
    cached = {
        config: write_hub_cache(hf_home / "datasets", HUB_NAME, config, jsonl, tmp_path / "scratch")
        for config, jsonl in (("en", path), ("other", other))
    }
    assert cached["en"].relative_to(hf_home / "datasets").parts[:3] == (
        "cage-ds___tiny_corpus",
        "en",
        "0.0.0",
    )
    assert (cached["en"] / "tiny_corpus-train.arrow").is_file()

    cfg = data_config(tmp_path, f"hf:{HUB_NAME}", hf_config="en")
    fields = ("source", "hf_config", "seq_len", "val_fraction", "val_max_blocks")
    kw = {k: getattr(cfg, k) for k in (*fields, "bpe_vocab_size", "shuffle", "cache_dir")}
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", CACHED_LOAD, json.dumps(kw), str(tmp_path / "out.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Using the latest cached version of the dataset" in proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "multiple 'cage-ds/tiny_corpus' configurations" in errors["None"]
    assert "Available configs in the cache" in errors["realnewslike"]

    local = build_data(data_config(tmp_path, path), seed=0)
    got = np.load(tmp_path / "out.npz")
    for streaming in (False, True):
        np.testing.assert_array_equal(got[f"val_{streaming}"], local.val_blocks)
        np.testing.assert_array_equal(got[f"train_{streaming}"], local.train.get(range(10)))
