"""Fine-tune a text classifier while its Linear layers share 2^b weight values (k-means clustering), then save it small.

A plain `Trainer` script. The lines marked `# CLUSTER` are all that change: `ClusteringCallback` trains the model
dense for `clustering_start_step` steps, then clusters each Linear of the transformer blocks into 2^b shared values
(one k-means codebook per layer: 16 values at 4 bits) and keeps training through the clustered forward, re-clustering
every `refresh_interval` steps; from `clustering_freeze_step` the assignments are fixed and only the centroids train.
At the end of training the weights hold exactly their clustered values and are saved as a codebook plus packed b-bit
indices. The saved directory loads with `AutoModelForSequenceClassification` after `import hf_compress` (stock
transformers alone refuses it). Clustering shrinks the file, not the in-memory float model or its CPU latency.

    python examples/cluster_weights.py            # packaged MiniLM + SST-2 subset (minutes)
    python examples/cluster_weights.py --tiny     # seconds: a tiny BERT, a few steps
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

import hf_compress  # noqa: F401  # CLUSTER: registers the loader with transformers
from hf_compress import ClusteringCallback, ClusteringConfig  # CLUSTER
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
    p.add_argument("--bits", type=int, default=4, help="index bits: 2^bits shared values per layer (4: 16 clusters)")
    p.add_argument("--start-step", type=int, default=100, help="steps of dense fine-tuning before k-means")
    p.add_argument("--freeze-step", type=int, default=200, help="from this step only the centroids train")
    p.add_argument("--refresh-interval", type=int, default=25, help="steps between re-clusterings before freezing")
    p.add_argument("--output-dir", default="outputs/cluster_weights")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: runs in seconds (for tests)")
    a = p.parse_args(argv)
    if a.tiny:
        a.train_rows, a.eval_rows, a.max_steps, a.start_step, a.freeze_step, a.refresh_interval = 64, 32, 6, 2, 4, 1
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
    if a.tiny:
        model = AutoModelForSequenceClassification.from_config(BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # what a plain save stores
    clustering = ClusteringCallback(ClusteringConfig(  # CLUSTER
        clustering_bits=a.bits, clustering_start_step=a.start_step, clustering_freeze_step=a.freeze_step,  # CLUSTER
        refresh_interval=a.refresh_interval))  # CLUSTER

    args = TrainingArguments(os.path.join(a.output_dir, "run"), max_steps=a.max_steps, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, learning_rate=1e-4, logging_steps=25, save_strategy="no",
                             report_to=[], seed=42, use_cpu=not torch.cuda.is_available())
    acc = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
    t = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=DataCollatorWithPadding(tok),
                compute_metrics=acc, callbacks=[clustering])  # CLUSTER
    t.train()  # at the end: weights set to their clustered values (hf_compress.clustering.convert)
    accuracy = t.evaluate()["eval_accuracy"]
    out = os.path.join(a.output_dir, "model")
    t.save_model(out)  # codebook + packed b-bit indices per clustered weight
    tok.save_pretrained(out)
    back = AutoModelForSequenceClassification.from_pretrained(out)  # after `import hf_compress`
    back_acc = Trainer(model=back, args=args, eval_dataset=val, data_collator=DataCollatorWithPadding(tok),
                       compute_metrics=acc).evaluate()["eval_accuracy"]
    layers = sorted(clustering.result["layers"])
    print(f"{len(layers)} layers clustered to {2 ** a.bits} values ({a.bits} bits)  accuracy {accuracy:.4f}  "
          f"reloaded {back_acc:.4f}  on disk {dense_bytes / 2**20:.2f} MB -> {file_bytes(out) / 2**20:.2f} MB")
    return {"model": t.model, "output": out, "bits": a.bits, "layers": layers, "accuracy": accuracy,
            "reloaded_accuracy": back_acc, "dense_bytes": dense_bytes, "file_bytes": file_bytes(out)}


if __name__ == "__main__":
    main()
