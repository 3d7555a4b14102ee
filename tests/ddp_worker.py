"""One rank of the 2-process CPU run in test_distributed.py (launched with torch.distributed.run).

DistillationTrainer + PruningCallback (movement: gradient-based scores) + QATCallback (weights and
activations) on tiny models. Each rank dumps what the test compares: masks and observer state after
every mask update, its final weights, and which rank wrote checkpoint state.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainingArguments

from hf_compress import (DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig, QATCallback,
                         QATConfig)
from hf_compress import checkpointing
from helpers import TokenDataset, tiny_bert

out = sys.argv[1]
rank = int(os.environ["RANK"])


class Dump(TrainerCallback):
    """After each step: this rank's masks and observer ranges (every rank must hold the same)."""

    def __init__(self, pruning, qat):
        self.pruning, self.qat, self.tensors = pruning, qat, {}

    def on_step_end(self, args, state, control, **kw):
        step = state.global_step
        for k, v in self.pruning.pruner.state_dict().items():
            if k.startswith("mask."):
                self.tensors[f"{step}.{k}"] = v.to(torch.uint8).clone()
        for k, v in self.qat.state_tensors().items():
            self.tensors[f"{step}.qat.{k}"] = v.float().clone()


writes = []  # every state file set written on this rank (staged or straight into the checkpoint)
_write = checkpointing.write_state


def spy(*a, **kw):
    folder = _write(*a, **kw)
    writes.append(folder is not None)
    return folder


checkpointing.write_state = spy  # looked up at call time by every writer in hf_compress.checkpointing

teacher = tiny_bert(layers=4, hidden=48, heads=4, ffn=96, seed=1)
student = tiny_bert(layers=2, hidden=32, heads=4, ffn=64, seed=2)
pruning = PruningCallback(PruningConfig(target_sparsity=0.5, method="movement", pruning_start_step=1, pruning_end_step=6, frequency=1))
qat = QATCallback(QATConfig(weight_bits=8, activation_bits=8))
dump = Dump(pruning, qat)
# different data per rank comes from the distributed sampler; same seed everywhere
args = TrainingArguments(
    output_dir=os.path.join(out, "run"), use_cpu=True, report_to=[], max_steps=8, per_device_train_batch_size=4,
    learning_rate=1e-3, save_strategy="steps", save_steps=4, logging_steps=2, disable_tqdm=True, seed=0,
    ddp_backend="gloo",
)
trainer = DistillationTrainer(
    model=student, teacher_model=teacher, args=args,
    distillation_config=DistillationConfig(temperature=2.0, alpha=0.5, hidden_loss_weight=1.0),
    train_dataset=TokenDataset(n=64, seed=3), callbacks=[pruning, qat, dump],
)
assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 ranks"
trainer.train()
trainer.save_model(os.path.join(out, "final"))
save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, os.path.join(out, f"weights{rank}.safetensors"))
save_file(dump.tensors, os.path.join(out, f"state{rank}.safetensors"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"writes": writes, "world": dist.get_world_size()}, f)
dist.destroy_process_group()  # as every torch program should
sys.stdout.flush(); os._exit(0)  # the DDP wrapper still holds the group: gloo's teardown at interpreter exit can abort (torch#190489)
