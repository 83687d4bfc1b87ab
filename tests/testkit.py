"""Plain helpers shared by tests in every folder (importable as ``testkit``: pytest puts
tests/ on sys.path for the root conftest.py)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama(seed: int = 0, quant=None, **shape):
    """The tests' tiny Llama, fp32 and untied: d 256, 2 layers of 4 heads, SwiGLU 512, vocab
    512, 64 positions unless ``shape`` overrides a LlamaConfig key. Seeded with ``seed``;
    ``quant`` (a preset name such as "w4a4" or a QuantConfig) prepares it with prepare_model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cage_ds import QuantConfig, prepare_model

    kw = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=512, vocab_size=512, max_position_embeddings=64,
              tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**kw, **shape})).float()
    if quant is None:
        return model
    return prepare_model(model, QuantConfig.preset(quant) if isinstance(quant, str) else quant)


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""torch.distributed's rendezvous variables."""


def child_env() -> dict[str, str]:
    """os.environ for a subprocess that starts its own job: without the rendezvous variables
    that a test which started a process group in this process (DeepSpeed sets them) leaves
    behind, which would point the child at a port this process still holds."""
    import os

    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}
