"""CAGE QAT (W4A4) of a tiny Llama with the Hugging Face Trainer under DeepSpeed ZeRO.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 launch/examples/hf_trainer_cage.py
        [--stage 1|2|3] [--steps 40] [--out out/examples/hf_trainer_cage]

A plain Trainer script on a prepare_model'd model; the two lines marked "# CAGE" are the
whole change. Rank 0 prints the last training log (loss, quant/*, train/lambda) as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
from tiny import ByteBlocks, cpu_gloo_state, tiny_llama
from transformers import TrainingArguments

from cage_ds import QuantConfig, prepare_model
from cage_ds.integrations import CageTrainer  # CAGE (was: from transformers import Trainer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="out/examples/hf_trainer_cage")
    a = p.parse_args()
    cpu = not torch.cuda.is_available()
    if cpu:
        cpu_gloo_state()
    args = TrainingArguments(
        output_dir=a.out,
        max_steps=a.steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, a.steps // 10),
        logging_steps=max(1, a.steps // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        accelerator_config={"use_configured_state": cpu},
        deepspeed={
            "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": a.stage},
        },
    )
    model = prepare_model(tiny_llama(), QuantConfig.preset("w4a4"))
    trainer = CageTrainer(model=model, args=args, train_dataset=ByteBlocks())  # CAGE
    trainer.train()
    if trainer.is_world_process_zero():
        print(json.dumps([h for h in trainer.state.log_history if "loss" in h][-1]))
    if torch.distributed.is_initialized():  # gloo aborts a process exiting inside a group
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
