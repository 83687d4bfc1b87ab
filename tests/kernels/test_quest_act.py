"""ops.quest_act / quest_act_backward (fake-quantization with the QuEST STE) vs the twin.

Forward: values and mask equal the grid functions at the IEEE step with tree statistics of x
(kernel_oracles), bit for bit. Backward: (M ⊙ g) H exactly. Quantizer.fake runs this pair.
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
def test_quest_act_forward_backward(gen, dev, dtype, bits):
    x = torch.randn(33, 384, generator=gen).to(dtype)
    grad = torch.randn(33, 384, generator=gen).to(dtype)
    for rule in ("trust", "clip"):
        values, mask = ops.quest_act(x.to(dev), bits, 128, rule)
        exp = expected_quest(x, bits, 128, None, rule)
        assert torch.equal(values.cpu(), exp.values)
        assert torch.equal(mask.cpu(), exp.mask)
        back = ops.quest_act_backward(grad.to(dev), mask, 128)
        assert torch.equal(back.cpu(), fwht_ref(grad * exp.mask, 128))


def test_quantizer_fake_runs_the_act_pair(gen, dev):
    from cage_ds.quant import Quantizer, QuantSpec

    x = torch.randn(5, 7, 256, generator=gen).to(dev).requires_grad_()
    grad = torch.randn(5, 7, 256, generator=gen).to(dev)
    values, masked = Quantizer(QuantSpec(bits=3, hadamard_block=64, mask="clip")).fake(x)
    values.backward(grad)
    v, m = ops.quest_act(x.detach().reshape(-1, 256), 3, 64, "clip")
    assert torch.equal(values.detach(), v.view(x.shape))
    assert int(masked) == int((~m).sum())
    assert torch.equal(x.grad, ops.quest_act_backward(grad.reshape(-1, 256), m, 64).view(x.shape))
