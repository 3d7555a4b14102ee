"""Swap-in distillation for a causal language model (tiny Shakespeare, byte-level).

A small Llama-style decoder (built from a config: no pretrained decoder ships offline) is trained
briefly as the teacher with a plain `Trainer`; a student with half its blocks (copied from the teacher)
is then distilled with `DistillationTrainer` — per token, over the positions that carry a label, after
the causal shift. Lines marked `# KD` are what changes from a plain causal-LM script.

    python examples/distill_causal_lm.py                  # a few minutes on 2 CPUs
    python examples/distill_causal_lm.py --tiny           # seconds (for tests)
    python examples/distill_causal_lm.py --kd-loss jsd    # forward_kl (default), reverse_kl, jsd
    python examples/distill_causal_lm.py --cache-k 16     # run the teacher once, train from its cached top-16 logits
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

from hf_compress import DistillationConfig, DistillationTrainer, cache_teacher_logits, student_from_teacher  # KD

# the shared data sets: $HF_COMPRESS_DATA, else ../shared/data beside this checkout
DATA = Path(os.environ.get("HF_COMPRESS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")



def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA / "tinyshakespeare"), help="folder with train.txt / validation.txt")
    p.add_argument("--block", type=int, default=64, help="tokens (bytes) per training sequence")
    p.add_argument("--layers", type=int, default=4, help="teacher blocks; the student keeps every other one")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--max-steps", type=int, default=300, help="student training steps")
    p.add_argument("--train-chars", type=int, default=200_000)
    p.add_argument("--eval-chars", type=int, default=20_000)
    p.add_argument("--kd-loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--cache-k", type=int, default=0, help="> 0: cache the teacher's top-k logits and train from them")
    p.add_argument("--output-dir", default="outputs/distill_causal_lm")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: runs in seconds (for tests)")
    a = p.parse_args(argv)
    if a.tiny:
        a.block, a.layers, a.hidden, a.teacher_steps, a.max_steps = 32, 2, 32, 4, 4
        a.train_chars, a.eval_chars = 4_000, 1_000
    return a


def byte_blocks(path: str, chars: int, block: int) -> Dataset:
    """Bytes of the text cut into fixed blocks; labels = input ids (the model shifts them)."""
    data = open(path, "rb").read()[:chars]
    ids = [list(data[i : i + block]) for i in range(0, len(data) - block + 1, block)]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * block] * len(ids), "labels": ids})


def main(argv=None):
    a = parse(argv)
    train_ds = byte_blocks(os.path.join(a.data, "train.txt"), a.train_chars, a.block)
    val_ds = byte_blocks(os.path.join(a.data, "validation.txt"), a.eval_chars, a.block)

    def args(name, steps):
        return TrainingArguments(
            output_dir=os.path.join(a.output_dir, name), max_steps=steps, per_device_train_batch_size=16,
            per_device_eval_batch_size=32, learning_rate=2e-3, warmup_steps=0, logging_steps=50,
            save_strategy="no", report_to=[], seed=42, use_cpu=not torch.cuda.is_available(),
        )

    torch.manual_seed(42)
    config = LlamaConfig(
        vocab_size=256, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=4, max_position_embeddings=a.block, tie_word_embeddings=False,
    )
    teacher = LlamaForCausalLM(config)
    common = dict(eval_dataset=val_ds, data_collator=default_data_collator)
    Trainer(model=teacher, args=args("teacher", a.teacher_steps), train_dataset=train_ds, **common).train()

    student = student_from_teacher(teacher, layers=list(range(0, a.layers, 2)))  # KD
    kd_train = train_ds
    if a.cache_k > 0:  # KD: run the teacher once; training then never runs it
        kd_train = cache_teacher_logits(teacher, train_ds, k=a.cache_k, batch_size=32)
    trainer = DistillationTrainer(  # KD: was Trainer(
        model=student,
        teacher_model=None if a.cache_k > 0 else teacher,  # KD
        distillation_config=DistillationConfig(temperature=a.temperature, alpha=a.alpha, kd_loss=a.kd_loss),  # KD
        args=args("student", a.max_steps),
        train_dataset=kd_train,
        **common,
    )
    trainer.train()

    t_loss = Trainer(model=teacher, args=args("teacher-eval", 1), **common).evaluate()["eval_loss"]
    s_loss = trainer.evaluate()["eval_loss"]  # the student's own loss (the teacher does not run in evaluation)
    trainer.save_model(os.path.join(a.output_dir, "student"))
    t_ppl, s_ppl = math.exp(t_loss), math.exp(s_loss)
    print(f"validation perplexity: teacher {t_ppl:.3f} ({a.layers} layers), student {s_ppl:.3f} "
          f"({student.config.num_hidden_layers} layers); retention {t_ppl / s_ppl:.3f}")
    return {"teacher_ppl": t_ppl, "student_ppl": s_ppl}


if __name__ == "__main__":
    main()
