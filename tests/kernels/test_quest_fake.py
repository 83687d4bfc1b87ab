"""ops.quest_fake (activation fake-quantization with the QuEST STE) on Triton vs its twin.

Forward: values and mask equal the twin's grid functions at the IEEE step with tree
statistics of the rotated tokens (kernel_oracles), bit for bit. Backward: (M ⊙ g) H exactly.
The CPU twin path of the op equals cage_ds's Quantizer.fake bit for bit (same functions).
"""

from __future__ import annotations

import pytest
import torch
from cage_kernels import ops
from cage_kernels.hadamard import fwht_ref
from kernel_oracles import expected_quest

pytestmark = pytest.mark.interpret


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quest_fake_forward_backward(gen, dev, dtype, bits):
    x = torch.randn(3, 11, 384, generator=gen).to(dtype)
    grad = torch.randn(3, 11, 384, generator=gen).to(dtype)
    for rule in ("trust", "clip"):
        xd = x.to(dev).clone().requires_grad_()
        out = ops.quest_fake(xd, bits, 128, rule)
        out.backward(grad.to(dev))
        exp = expected_quest(fwht_ref(x, 128).view(-1, 384), bits, 128, None, rule, rotated=True)
        assert torch.equal(out.detach().cpu(), exp.values.view(x.shape))
        expected_grad = fwht_ref(grad * exp.mask.view(x.shape), 128)
        assert torch.equal(xd.grad.cpu(), expected_grad)


def test_quest_fake_twin_is_quantizer_fake(gen, monkeypatch):
    from cage_ds.quant import Quantizer, QuantSpec

    monkeypatch.delenv("CAGE_TRITON_INTERPRET", raising=False)
    x = torch.randn(5, 7, 256, generator=gen)
    grad = torch.randn(5, 7, 256, generator=gen)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ops.quest_fake(a, 3, 64, "trust").backward(grad)
    Quantizer(QuantSpec(bits=3, hadamard_block=64)).fake(b).backward(grad)
    assert torch.equal(a.grad, b.grad)
    fake = Quantizer(QuantSpec(bits=3, hadamard_block=64)).fake
    assert torch.equal(ops.quest_fake(x, 3, 64), fake(x))


def test_quest_act_pair(gen, dev):
    x = torch.randn(9, 256, generator=gen).to(torch.bfloat16)
    grad = torch.randn(9, 256, generator=gen).to(torch.bfloat16)
    values, mask = ops.quest_act(x.to(dev), 4, 64, "clip", stats_of_rotated=True)
    xd = x.to(dev).clone().requires_grad_()
    out = ops.quest_fake(xd, 4, 64, "clip")
    out.backward(grad.to(dev))
    assert torch.equal(values, out.detach())
    assert torch.equal(ops.quest_act_backward(grad.to(dev), mask, 64), xd.grad)
    # Default: statistics of x, as quest_quantize (what QuantLinear's activation path uses).
    values, mask = ops.quest_act(x.to(dev), 4, 64, "clip")
    exp = expected_quest(x, 4, 64, None, "clip")
    assert torch.equal(values.cpu(), exp.values)
    assert torch.equal(mask.cpu(), exp.mask)
