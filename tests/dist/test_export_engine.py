"""Export from a live 2-rank DeepSpeed engine (cage_ds.zero.export_engine, ZeRO-2 and ZeRO-3,
gloo, CPU) after 2 CAGE steps, against single-process models holding the engine's latents.

Plain HF: stock LlamaForCausalLM.from_pretrained of OUT/hf gives the logits of the
single-process W-only view (W4A16) within W4A16_TOL (fp32 rounding of the rotation, see
tests/dist/test_zero_guards.py). Packed: load_packed(OUT/packed.safetensors) gives the
training-time W4A4 forward of a single-process prepared model holding the latents bit for
bit. Only rank 0 writes. Single-process refusals: an unprepared module, a missing latent;
and the stage-0 path (module weights are the latents) equals save_plain_hf of the model.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_zero_cage import _launch
from test_zero_guards import W4A16_TOL, _w4a16_reference, latent_model
from zero_case import make_batch, make_model_and_optimizer

from cage_ds.nn.export import load_packed
from cage_ds.zero import export_engine

WORLD, STEPS = 2, 2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_engine")
    _launch(WORLD, str(out), script="export_engine_worker.py", args=(str(STEPS),))
    return out, torch.load(out / "result.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_live_export_reloads_as_w4a16_and_packed_w4a4(result, stage):
    out, latents = result[0], result[1][stage]
    init = dict(make_model_and_optimizer("decoupled")[0].named_parameters())
    assert all(not torch.equal(latents[n], p) for n, p in init.items()), "training moved nothing"
    assert not (out / f"export_{stage}_rank1").exists(), "rank 1 wrote an export"
    folder = out / f"export_{stage}_rank0"
    ids = make_batch(7)
    with torch.no_grad():
        plain, info = LlamaForCausalLM.from_pretrained(folder / "hf", output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        got, want = plain(input_ids=ids).logits, _w4a16_reference(latents)(input_ids=ids).logits
        assert (got - want).abs().max() <= W4A16_TOL, f"ZeRO-{stage}: plain HF != W4A16 view"
        packed = load_packed(folder / "packed.safetensors")(input_ids=ids).logits
        assert torch.equal(packed, latent_model(latents)(input_ids=ids).logits)


@pytest.mark.slow
def test_a_failure_on_rank_0_raises_on_every_rank(result):
    out = result[0]
    for rank in range(WORLD):
        text = (out / f"errors{rank}.txt").read_text()
        assert text.startswith("export_engine: rank 0 failed writing"), (rank, text)
        assert "FileExistsError" in text, (rank, text)


def _engine(module, zero: bool) -> SimpleNamespace:
    return SimpleNamespace(module=module, zero_optimization=lambda: zero)


def test_stage0_engine_exports_its_module_weights(tmp_path):
    from safetensors.torch import load_file

    from cage_ds.nn.export import save_plain_hf

    model, _ = make_model_and_optimizer("decoupled")
    export_engine(_engine(model, False), tmp_path / "live", "hf")
    save_plain_hf(model, tmp_path / "direct")
    got = load_file(str(tmp_path / "live" / "hf" / "model.safetensors"))
    want = load_file(str(tmp_path / "direct" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_export_engine_refusals(tmp_path):
    model, _ = make_model_and_optimizer("decoupled")
    plain = LlamaForCausalLM(model.config)
    with pytest.raises(ValueError, match="not a Hugging Face model prepared with"):
        export_engine(_engine(plain, False), tmp_path)
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight' has no fp32 master"):
        export_engine(_engine(model, True), tmp_path)
    with pytest.raises(ValueError, match="format 'onnx'"):
        export_engine(_engine(model, False), tmp_path, "onnx")
    assert not any(tmp_path.iterdir()), "a refused export wrote files"
