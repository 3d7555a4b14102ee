"""Fine-tune a text classifier while its Linear layers become low-rank, then save and reload it smaller.

A plain `Trainer` script. The lines marked `# LOWRANK` are all that change: `LowRankCallback` trains the
model dense for `lowrank_start_step` steps while collecting input statistics, factorises every Linear of
the transformer blocks into two smaller Linears (ASVD: the SVD weighted by the inputs' mean magnitudes) at
a quarter of their full rank, and fine-tunes the factors for the rest of the run. The saved directory loads
with `AutoModelForSequenceClassification` after `import hf_compress` (stock transformers alone refuses it).

    python examples/lowrank_text_classification.py            # packaged MiniLM + SST-2 subset (minutes)
    python examples/lowrank_text_classification.py --tiny     # seconds: a tiny BERT, a few steps
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

import hf_compress  # noqa: F401  # LOWRANK: registers the loader with transformers
from hf_compress import LowRankCallback, LowRankConfig  # LOWRANK
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
    p.add_argument("--start-step", type=int, default=100, help="steps of dense fine-tuning (and statistics) first")
    p.add_argument("--rank-fraction", type=float, default=0.25)
    p.add_argument("--output-dir", default="outputs/lowrank")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: runs in seconds (for tests)")
    a = p.parse_args(argv)
    if a.tiny:
        a.train_rows, a.eval_rows, a.max_steps, a.start_step = 64, 32, 6, 2
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
    dense_params = sum(p.numel() for p in model.parameters())
    lowrank = LowRankCallback(LowRankConfig(lowrank_method="asvd", lowrank_rank_fraction=a.rank_fraction,  # LOWRANK
                                            lowrank_start_step=a.start_step))

    args = TrainingArguments(os.path.join(a.output_dir, "run"), max_steps=a.max_steps, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, learning_rate=1e-4, logging_steps=25, save_strategy="no",
                             report_to=[], seed=42, use_cpu=not torch.cuda.is_available())
    acc = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
    t = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=DataCollatorWithPadding(tok),
                compute_metrics=acc, callbacks=[lowrank])  # LOWRANK
    t.train()
    accuracy = t.evaluate()["eval_accuracy"]
    out = os.path.join(a.output_dir, "model")
    t.save_model(out)
    tok.save_pretrained(out)
    back = AutoModelForSequenceClassification.from_pretrained(out)  # after `import hf_compress`
    back_acc = Trainer(model=back, args=args, eval_dataset=val, data_collator=DataCollatorWithPadding(tok),
                       compute_metrics=acc).evaluate()["eval_accuracy"]
    params = sum(p.numel() for p in back.parameters())
    print(f"parameters {dense_params:,} -> {params:,}  accuracy {accuracy:.4f}  reloaded {back_acc:.4f}  "
          f"ranks {sorted(set(lowrank.summary()['ranks'].values()))}")
    return {"dense_params": dense_params, "params": params, "accuracy": accuracy, "reloaded_accuracy": back_acc}


if __name__ == "__main__":
    main()
