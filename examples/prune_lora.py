"""Prune a PEFT/LoRA fine-tune of a text classifier, then merge the adapters with the zeros kept.

A plain LoRA script: `get_peft_model(model, LoraConfig(...))` and a stock `Trainer`. The lines marked
`# PRUNE` are all that change: `PruningCallback` prunes the frozen base weights (magnitude: they get no
gradients), and `merge_lora` merges B·A into them keeping every pruned weight exactly zero.

    python examples/prune_lora.py            # packaged MiniLM + SST-2 subset (minutes)
    python examples/prune_lora.py --tiny     # seconds: a tiny BERT, a few steps
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

from hf_compress import PruningCallback, PruningConfig, merge_lora, select_modules  # PRUNE
from hf_compress.cli.data import read_rows
from hf_compress.cli.models import minilm_path

# the shared data sets: $HF_COMPRESS_DATA, else ../shared/data beside this checkout
DATA = Path(os.environ.get("HF_COMPRESS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA / "sst2"), help="folder with train.jsonl / validation.jsonl (sentence, label)")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--eval-rows", type=int, default=None, help="validation rows (default: all 872)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--output-dir", default="outputs/prune_lora")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: runs in seconds (for tests)")
    a = p.parse_args(argv)
    if a.tiny:
        a.train_rows, a.eval_rows, a.max_steps = 64, 32, 6
    return a


def main(argv=None):
    a = parse(argv)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = read_rows(os.path.join(a.data, "train.jsonl"))
    rows = [rows[i] for i in sorted(np.random.RandomState(0).permutation(len(rows))[: a.train_rows])]
    train, val = (Dataset.from_list([{"sentence": r["sentence"], "label": r["label"]} for r in x]).map(
        lambda b: tok(b["sentence"], truncation=True, max_length=64), batched=True)
        for x in (rows, read_rows(os.path.join(a.data, "validation.jsonl"))[:a.eval_rows]))
    if a.tiny:
        model = AutoModelForSequenceClassification.from_config(BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]))
    prune = PruningCallback(PruningConfig(target_sparsity=0.5, method="magnitude"))  # PRUNE: the frozen base weights

    def trainer(m, name):
        args = TrainingArguments(os.path.join(a.output_dir, name), max_steps=a.max_steps, per_device_train_batch_size=32,
                                 per_device_eval_batch_size=64, learning_rate=1e-3, logging_steps=25, save_strategy="no",
                                 report_to=[], seed=42, use_cpu=not torch.cuda.is_available())
        acc = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
        return Trainer(model=m, args=args, train_dataset=train, eval_dataset=val, data_collator=DataCollatorWithPadding(tok),
                       compute_metrics=acc, callbacks=[prune] if name == "lora" else [])  # PRUNE

    t = trainer(model, "lora")
    t.train()
    lora_acc = t.evaluate()["eval_accuracy"]
    merged = merge_lora(model, prune)  # PRUNE: was model.merge_and_unload()
    merged.save_pretrained(os.path.join(a.output_dir, "merged"))
    tok.save_pretrained(os.path.join(a.output_dir, "merged"))
    back = AutoModelForSequenceClassification.from_pretrained(os.path.join(a.output_dir, "merged"))
    weights = [m.weight for m in select_modules(back).values()]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    acc = trainer(merged, "eval").evaluate()["eval_accuracy"]
    back_acc = trainer(back, "eval").evaluate()["eval_accuracy"]
    print(f"sparsity of the merged model {sparsity:.4f}  accuracy: LoRA model {lora_acc:.4f}  merged {acc:.4f}  reloaded {back_acc:.4f}")
    return {"sparsity": sparsity, "lora_accuracy": lora_acc, "accuracy": acc, "reloaded_accuracy": back_acc}


if __name__ == "__main__":
    main()
