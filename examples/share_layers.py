"""Distil a fine-tuned classifier into an ALBERT-style student whose consecutive blocks share one set of weights.

A plain distillation script (`examples/distill_text_classification.py`). The lines marked `# SHARE` are all that
change: the student is `shared_student_from_teacher(teacher, group_size=2)` — the teacher's class and block count,
each group of 2 consecutive blocks holding the *same* Parameter objects, initialised with the mean of the teacher's
blocks of that group — and `DistillationTrainer` trains it against the teacher (KD). The saved file stores each
shared tensor once (under the group's last block), so a 6-block MiniLM with groups of 2 stores 3 blocks; the
directory loads with `AutoModelForSequenceClassification` after `import hf_compress`, which shares the blocks again
(stock transformers alone refuses it). Compute per token is unchanged: sharing shrinks the parameters, not latency.

    python examples/share_layers.py            # packaged MiniLM fine-tuned here + SST-2 subset (minutes)
    python examples/share_layers.py --tiny     # seconds: a tiny 4-block BERT, a few steps
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from datasets import Dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

import hf_compress  # noqa: F401  # SHARE: registers the loader with transformers
from hf_compress import DistillationConfig, DistillationTrainer, shared_student_from_teacher  # SHARE
from hf_compress.cli.data import read_rows
from hf_compress.cli.models import minilm_path
from hf_compress.distillation.sharing import shared_groups
from hf_compress.metadata import get_metadata

# the shared data sets: $HF_COMPRESS_DATA, else ../shared/data beside this checkout
DATA = Path(os.environ.get("HF_COMPRESS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="fine-tuned classifier dir (default: fine-tune the packaged MiniLM first)")
    p.add_argument("--data", default=str(DATA / "sst2"), help="folder with train.jsonl / validation.jsonl (sentence, label)")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--eval-rows", type=int, default=None, help="validation rows (default: all 872)")
    p.add_argument("--teacher-steps", type=int, default=250)
    p.add_argument("--max-steps", type=int, default=250, help="student (KD) training steps")
    p.add_argument("--group-size", type=int, default=2, help="consecutive blocks sharing one set of weights")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--output-dir", default="outputs/share_layers")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes: runs in seconds (for tests)")
    a = p.parse_args(argv)
    if a.tiny:
        a.train_rows, a.eval_rows, a.teacher_steps, a.max_steps = 64, 32, 4, 4
    return a


def file_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def main(argv=None):
    a = parse(argv)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = read_rows(os.path.join(a.data, "train.jsonl"))
    rows = [rows[i] for i in sorted(np.random.RandomState(0).permutation(len(rows))[: a.train_rows])]
    train, val = (Dataset.from_list([{"sentence": r["sentence"], "label": r["label"]} for r in x]).map(
        lambda b: tok(b["sentence"], truncation=True, max_length=64), batched=True)
        for x in (rows, read_rows(os.path.join(a.data, "validation.jsonl"))[:a.eval_rows]))

    def args(name, steps):
        return TrainingArguments(os.path.join(a.output_dir, name), max_steps=steps, per_device_train_batch_size=32,
                                 per_device_eval_batch_size=64, learning_rate=1e-4, logging_steps=25, save_strategy="no",
                                 report_to=[], seed=42, use_cpu=not torch.cuda.is_available())

    acc = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
    common = dict(train_dataset=train, eval_dataset=val, data_collator=DataCollatorWithPadding(tok), compute_metrics=acc)
    teacher_dir = a.teacher
    if teacher_dir:
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    else:
        if a.tiny:
            teacher = AutoModelForSequenceClassification.from_config(BertConfig(
                vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64))
        else:
            teacher = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        Trainer(model=teacher, args=args("teacher-run", a.teacher_steps), **common).train()
        teacher_dir = os.path.join(a.output_dir, "teacher")
        teacher.save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)

    student = shared_student_from_teacher(teacher, group_size=a.group_size, init="mean")  # SHARE
    trainer = DistillationTrainer(  # SHARE: was Trainer(
        model=student, teacher_model=teacher,  # SHARE
        distillation_config=DistillationConfig(temperature=a.temperature, alpha=a.alpha),  # SHARE
        args=args("student-run", a.max_steps), **common)
    trainer.train()

    teacher_acc = Trainer(model=teacher, args=args("teacher-eval", 1), **common).evaluate()["eval_accuracy"]
    student_acc = trainer.evaluate()["eval_accuracy"]
    out = os.path.join(a.output_dir, "student")
    trainer.save_model(out)  # each shared tensor stored once, under its group's last block
    tok.save_pretrained(out)
    back = AutoModelForSequenceClassification.from_pretrained(out)  # after `import hf_compress`: blocks shared again
    back_acc = Trainer(model=back, args=args("student-eval", 1), **common).evaluate()["eval_accuracy"]
    groups = get_metadata(back)["sharing"]["groups"]
    unique = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (parameters() lists a shared tensor once)
    print(f"teacher accuracy {teacher_acc:.4f}  shared student {student_acc:.4f}  reloaded {back_acc:.4f}  "
          f"blocks {sum(map(len, groups))} in {len(groups)} groups {groups}  {len(shared_groups(back))} shared tensors  "
          f"parameters {unique(teacher):,} -> {unique(back):,}  "
          f"on disk {file_bytes(teacher_dir) / 2**20:.2f} MB -> {file_bytes(out) / 2**20:.2f} MB")
    return {"model": trainer.model, "teacher": teacher, "output": out, "teacher_output": teacher_dir, "groups": groups,
            "teacher_accuracy": teacher_acc, "student_accuracy": student_acc, "reloaded_accuracy": back_acc,
            "file_bytes": file_bytes(out), "teacher_file_bytes": file_bytes(teacher_dir)}


if __name__ == "__main__":
    main()
