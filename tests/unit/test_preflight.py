"""Inputs that used to crash without naming the cause (or only after the workers started):
each is refused by ``cage-train --check`` (the preflight) or, where only reading the data can
tell, by the data loader, with one line naming the file or key and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cage_ds.train.cli import main
from cage_ds.train.config import ConfigError, load_config

TINY = ["model.vocab_size=1024", "data.bpe_vocab_size=1024", "data.seq_len=16",
        "train.global_batch_size=2", "train.micro_batch_size=1"]  # fmt: skip


def _lines(tmp: Path, n: int = 40) -> str:
    return "\n\n".join(f"Line {i} of a small play, with words enough to read." for i in range(n))


def _ds_json(tmp: Path, **extra) -> str:
    path = tmp / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **extra}))
    return f"deepspeed.config={path}"


def _pretrained(tmp: Path) -> str:
    model = tmp / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1024, "hidden_size": 64}))
    (model / "model.safetensors").write_bytes(b"\xff" * 64)
    return f"model.pretrained={model}"


def _two_rank_checkpoint(tmp: Path) -> str:
    tag = tmp / "out" / "r" / "checkpoints" / "step000000002"
    tag.mkdir(parents=True)
    (tag / "cage_manifest.json").write_text(json.dumps({"files": {}, "world_size": 2}))
    return "checkpoint.every=2"


def _tokenizer(tmp: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator([_lines(tmp)], trainer)
    tok.save(str(tmp / "tokenizer.json"))
    return f"data.tokenizer={tmp / 'tokenizer.json'}"


# (name, data file name, its bytes, extra overrides, where it is caught, words the error has)
CASES = [
    ("empty text", "a.txt", b"", [], "check", ["every file is empty", "a.txt"]),
    ("binary as text", "a.txt", b"\x89PNG\r\n\x1a\n\xff\xfe\x00", [], "check",
     ["a.txt is not UTF-8 text", "binary"]),
    ("broken jsonl", "a.jsonl", b'{"text": "fine"}\n{"text": "bro\n', [], "check",
     ["a.jsonl, line 2: not valid JSON"]),
    ("wrong text_field", "a.jsonl", b'{"body": "words"}\n', [], "check",
     ["data.text_field='text' is not a field of", "['body']"]),
    ("garbage safetensors", "a.txt", None, [_pretrained], "check",
     ["model.safetensors is not a valid safetensors file"]),
    ("train_batch_size in DeepSpeed JSON", "a.txt", None,
     [lambda t: _ds_json(t, train_batch_size=64)], "check",
     ["train_batch_size=64 conflicts", "remove it from the DeepSpeed JSON"]),
    ("optimizer in DeepSpeed JSON", "a.txt", None,
     [lambda t: _ds_json(t, optimizer={"type": "Adam"})], "check", ["remove the 'optimizer'"]),
    ("fp16 on CPU", "a.txt", None, [lambda t: _ds_json(t, fp16={"enabled": True})], "check",
     ["fp16.enabled=true needs a GPU"]),
    ("offload on CPU", "a.txt", None,
     [lambda t: _ds_json(t, zero_optimization={"stage": 3,
                                               "offload_param": {"device": "cpu"}})],
     "check", ["zero_optimization.offload_param is not supported on CPU"]),
    ("ZeRO++ qwZ on CPU", "a.txt", None,
     [lambda t: _ds_json(t, zero_optimization={"stage": 3, "zero_quantized_weights": True})],
     "check", ["ZeRO++ qwZ) is not supported on CPU"]),
    ("output dir blocked by a file", "a.txt", None,
     [lambda t: (t / "blocker").write_text("x") and f"train.output_dir={t / 'blocker' / 'o'}"],
     "check", ["blocker is a file", "choose another train.output_dir"]),
    ("read-only output dir", "a.txt", None,
     [lambda t: (t / "ro").mkdir(mode=0o500) or f"train.output_dir={t / 'ro' / 'o'}"],
     "check", ["ro is not writable"]),
    ("2-rank checkpoint on 1 rank", "a.txt", None, [_two_rank_checkpoint], "check",
     ["was written by 2 ranks, this run has 1", "checkpoint.resume=never"]),
    ("short data, local tokenizer", "a.txt", b"One short line only.", [_tokenizer], "data",
     ["leave no validation document", "data.val_fraction"]),
    ("validation shorter than a block", "a.txt", None,
     [_tokenizer, "data.val_fraction=0.025", "data.seq_len=64"], "data",
     ["validation documents hold less than one block", "data.seq_len"]),
    ("BPE vocab larger than the corpus", "a.txt", b"tiny corpus\n\nand more",
     ["data.val_fraction=0.5"], "data", ["data.bpe_vocab_size=1024: the corpus only supports"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "file", "content", "extra", "where", "words"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_one_line_naming_the_cause(
    tmp_path, capsys, monkeypatch, name, file, content, extra, where, words
):
    if name == "read-only output dir" and os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    data = tmp_path / file
    data.write_bytes(_lines(tmp_path).encode() if content is None else content)
    args = [f"data.source={data}", f"data.cache_dir={tmp_path / 'cache'}",
            f"train.output_dir={tmp_path / 'out'}", "train.run_name=r", *TINY]  # fmt: skip
    args += [e(tmp_path) if callable(e) else e for e in extra]
    if where == "check":
        assert main(["--check", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cage-train: config error: ") and "\n" not in err, err
        message = err
    else:
        assert main(["--check", *args]) == 0, capsys.readouterr().err
        from cage_ds.train.data import build_data

        with pytest.raises(ConfigError) as refused:
            build_data(load_config(None, args).data, seed=0)
        message = str(refused.value)
        assert "\n" not in message
    for word in words:
        assert word in message, message
