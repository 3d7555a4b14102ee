"""One training run for the SIGKILL loop (tests/test_kill_loop.py): stock Trainer, pruning + QAT callbacks,
a checkpoint every step with save_total_limit=1. It resumes from the newest checkpoint the Trainer finished
(trainer_state.json written), prints "step N" as it goes, and writes the final weights to OUT/final.safetensors."""

import os
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_compress import PruningCallback, PruningConfig, QATCallback, QATConfig
from helpers import TokenDataset, tiny_bert

torch.set_num_threads(1)


class Beat(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        print(f"step {state.global_step}", flush=True)
        time.sleep(0.02)


def newest_finished(out: str) -> str | None:
    done = [d for d in os.listdir(out) if d.startswith("checkpoint-") and os.path.exists(os.path.join(out, d, "trainer_state.json"))]
    return os.path.join(out, max(done, key=lambda d: int(d.split("-")[1]))) if done else None


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    resume = newest_finished(out)
    args = TrainingArguments(
        output_dir=out, use_cpu=True, report_to=[], max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
        save_strategy="steps", save_steps=1, save_total_limit=1, logging_steps=100, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(
        model=tiny_bert(layers=2, seed=2), args=args, train_dataset=TokenDataset(n=200, seed=3),
        callbacks=[
            PruningCallback(PruningConfig(target_sparsity=0.5, method="movement", pruning_start_step=1, pruning_end_step=8, frequency=1)),
            QATCallback(QATConfig(weight_bits=8, activation_bits=8, observer="moving_average", qat_start_step=2)),
            Beat(),
        ],
    )
    print(f"resume {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    tensors = dict(trainer.model.named_parameters()) | dict(trainer.model.named_buffers())
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(out, "final.safetensors"))
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
