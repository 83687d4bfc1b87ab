"""CAGE-correct at every entry and exit, on real 2-rank DeepSpeed engines (gloo, CPU).

One launch (tests/dist/zero_guard_worker.py) covers:
  entry: deepspeed.initialize + cage_ds.zero.attach by hand trains exactly like
    cage_ds.zero.initialize (same per-step losses, bit for bit: the same ops run), and its
    gathered weights are Quantizer.values(latent) element for element (ZeRO-2 and ZeRO-3);
  guards: each refused situation fails with its message, the allowed RTN-STE path trains;
  exit: save_16bit_model of the attached engine loads into a plain transformers
    LlamaForCausalLM that evaluates like the project's own W4A16 view of the same latents.

W4A16 tolerance: the saved quantized weights must equal Q(latent) = Quantizer.dequantize of
the fp32 latent exactly (the gathered q(W H) equals Quantizer.values(latent) bit for bit and
both de-rotate it with the same butterfly). The project's W4A16 forward multiplies in the
rotated domain, (x H) q(W H)^T, the plain model x Q(W)^T: equal in exact arithmetic, in fp32
a few ulps of the O(1) logits apart, so logits and loss are compared at rtol = atol = 1e-4
(measured differences are ~1e-6). Rotated weights saved under the original names move the
logits by O(1) and fail both checks.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_zero_cage import _check_gathered, _launch
from zero_case import make_batch, make_model_and_optimizer

from cage_ds.nn import quantized_modules

WORLD, STEPS = 2, 2
W4A16_TOL = 1e-4
REFUSED = {
    "quest_plain_2": "QuEST-quantized weights under DeepSpeed ZeRO-1/2 without the CAGE hooks",
    "quest_plain_3": "QuEST-quantized weights under DeepSpeed ZeRO-3 without the CAGE hooks",
    "flat_partition_2": "DeepSpeed handed CageAdamW a flat ZeRO partition",
    "attached_fake_quant_2": "would quantize it a second time",
    "prequantized_plain_2": "the gathered weight is the latent W",
    "rtn_prequantized_plain_2": "the gathered weight is the latent W",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("guards")
    _launch(WORLD, str(out), script="zero_guard_worker.py", args=(str(STEPS),))
    return out, torch.load(out / "result.pt", weights_only=False)


def latent_model(latents: dict[str, torch.Tensor]):
    """The single-process prepared W4A4 model holding ``latents`` (the oracle), eval mode."""
    model, _ = make_model_and_optimizer("decoupled")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(latents[n])
    return model.eval()


def _w4a16_reference(latents: dict[str, torch.Tensor]):
    """The project's model holding the latents, activations full precision (weights Q(W))."""
    model = latent_model(latents)
    for _, layer in quantized_modules(model):
        layer.act_quantizer = None
    return model


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_attach_by_hand_equals_initialize(result, stage):
    _, res = result
    hand, init = res["losses"][f"hand_{stage}"], res["losses"][f"init_{stage}"]
    assert len(hand) == STEPS and hand == init, f"ZeRO-{stage}: attach {hand} vs initialize {init}"
    _check_gathered(res["gathered"][f"hand_{stage}"], f"ZeRO-{stage} attach by hand")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_save_16bit_model_loads_as_w4a16(result, stage):
    out, res = result
    latents = res["latents"][stage]
    ref = _w4a16_reference(latents)
    plain = LlamaForCausalLM.from_pretrained(out / f"save_{stage}", torch_dtype=torch.float32)
    saved = dict(plain.named_parameters())
    layers = dict(quantized_modules(ref))
    assert layers, "no quantized layers in the reference"
    for name, p in saved.items():
        layer = layers.get(name.removesuffix(".weight"))
        want = latents[name] if layer is None else layer.quantized_weight()
        assert torch.equal(p.detach(), want), f"ZeRO-{stage}: saved {name} != Q(latent)"
    ids = make_batch(7)
    with torch.no_grad():
        got, want = plain(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    tol = {"rtol": W4A16_TOL, "atol": W4A16_TOL}
    torch.testing.assert_close(got.logits, want.logits, **tol)
    torch.testing.assert_close(got.loss, want.loss, **tol)


@pytest.mark.slow
def test_refusals_and_the_rtn_path(result):
    _, res = result
    rtn = res["losses"]["rtn_plain_2"]
    assert len(rtn) == STEPS and all(torch.isfinite(torch.tensor(rtn))), rtn
    for case, match in REFUSED.items():
        message = res["errors"][case]
        assert message is not None, f"{case}: nothing was refused"
        assert match in message, f"{case}: {message}"
    for case in ("quest_plain_2", "quest_plain_3", "flat_partition_2", "prequantized_plain_2"):
        assert "cage_ds.zero.initialize" in res["errors"][case], case
