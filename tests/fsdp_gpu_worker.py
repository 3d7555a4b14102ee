"""Worker for tests/test_gpu.py (2 CUDA GPUs, FSDP2 through the Trainer): KD + global magnitude pruning.

Writes OUT/rank<r>.json: whether the teacher and the student are sharded (DTensor parameters), the
pruner's global sparsity, and the sparsity of the full (gathered) student weights.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import TrainingArguments

from hf_compress import DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig
from helpers import TokenDataset, tiny_bert


def main(out: str) -> None:
    teacher, student = tiny_bert(layers=4, seed=0), tiny_bert(layers=2, seed=1)
    args = TrainingArguments(out, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[],
                             save_strategy="no", disable_tqdm=True, fsdp="full_shard",
                             fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
    prune = PruningCallback(PruningConfig(target_sparsity=0.5, frequency=2, pruning_end_step=4))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=TokenDataset(64),
                                  distillation_config=DistillationConfig(temperature=2.0, alpha=0.5), callbacks=[prune])
    trainer.train()
    weights = prune.pruner.gather([w.detach() for w in prune.pruner._local()])
    report = {
        "teacher_sharded": all(type(p).__name__ == "DTensor" for p in trainer.teachers[0].parameters()),
        "student_sharded": all(type(w).__name__ == "DTensor" for w in prune.pruner.weights),
        "pruner_sparsity": prune.pruner.sparsity(),
        "weight_sparsity": float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)),
    }
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
