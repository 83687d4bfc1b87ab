"""cage_ds.fsdp refuses misuse with one-line errors naming the fix (single process)."""

from __future__ import annotations

import pytest
import torch
from testkit import tiny_llama
from torch import nn

import cage_ds.fsdp as cfsdp
from cage_ds.nn import cage_param_groups
from cage_ds.optim import CageAdamW


def _llama(prepared: bool) -> nn.Module:
    return tiny_llama(0, "w4a4" if prepared else None, vocab_size=32, hidden_size=128,
                      intermediate_size=256, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=128)  # fmt: skip


def test_prepare_needs_a_prepared_model():
    with pytest.raises(ValueError, match=r"call cage_ds\.prepare_model"):
        cfsdp.prepare(_llama(prepared=False))


def test_prepare_needs_torch_distributed(monkeypatch):
    # an earlier in-process test may have left a process group up: hide it
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cfsdp.prepare(_llama(prepared=True))


def test_attach_needs_sharded_weights():
    opt = CageAdamW(cage_param_groups(_llama(prepared=True)), total_steps=2)
    with pytest.raises(ValueError, match=r"call cage_ds.fsdp.prepare\(model\) before"):
        cfsdp.attach(opt)
    with pytest.raises(TypeError, match="expected a CageAdamW"):
        cfsdp.attach(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
