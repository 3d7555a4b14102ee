"""Measure how much each layer of a fine-tuned classifier minds being pruned, plan per-layer sparsities under a
parameter budget, then prune while fine-tuning with that plan.

A plain `Trainer` script. The lines marked `# SENSITIVITY` are all that change:

1. `analyze_sensitivity` evaluates the model on a held-out slice of the training split (rows the runs never train
   on) with only one Linear layer at a time magnitude-pruned to each of `--sparsities`;
2. `plan_budget` gives each layer its own sparsity (or leaves it dense) so that the non-zero weights of the analysed
   layers fit `--budget` (a fraction of their dense count) with the least predicted loss increase;
3. `plan_fragment` writes the plan as the `pruning:` section of a recipe (`plan.yaml`, pasteable into an
   `hf-compress run` recipe), and the fine-tuning reads it back into `PruningCallback(PruningConfig(**section))`.

The saved directory loads with `AutoModelForSequenceClassification` after `import hf_compress`.

    python examples/sensitivity_budget.py            # packaged MiniLM + SST-2 subset (minutes)
    python examples/sensitivity_budget.py --tiny     # seconds: a tiny BERT, a few steps
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import yaml
from datasets import Dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

import hf_compress  # noqa: F401  # registers the loader with transformers
from hf_compress import (BudgetConfig, PruningCallback, PruningConfig, SensitivityConfig, analyze_sensitivity,  # SENSITIVITY
                         plan_budget)  # SENSITIVITY
from hf_compress.cli.data import read_rows
from hf_compress.cli.models import minilm_path
from hf_compress.sensitivity import fragment_yaml, plan_fragment  # SENSITIVITY

# the shared data sets: $HF_COMPRESS_DATA, else ../shared/data beside this checkout
DATA = Path(os.environ.get("HF_COMPRESS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA / "sst2"), help="folder with train.jsonl / validation.jsonl (sentence, label)")
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--heldout-rows", type=int, default=64, help="training-split rows outside the training subset: the analysis")
    p.add_argument("--eval-rows", type=int, default=None, help="validation rows (default: all 872)")
    p.add_argument("--start-steps", type=int, default=100, help="dense fine-tuning before the analysis")
    p.add_argument("--max-steps", type=int, default=100, help="fine-tuning steps while pruning with the plan")
    p.add_argument("--sparsities", default="0.5,0.8,0.95", help="per-layer sparsities analysed (comma list)")
    p.add_argument("--budget", type=float, default=0.2, help="non-zero weights kept, as a fraction of the analysed layers'")
    p.add_argument("--output-dir", default="outputs/sensitivity_budget")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: runs in seconds (for tests)")
    a = p.parse_args(argv)
    if a.tiny:
        a.train_rows, a.heldout_rows, a.eval_rows, a.start_steps, a.max_steps = 64, 32, 32, 4, 6
    a.sparsities = [float(s) for s in a.sparsities.split(",")]
    return a


def main(argv=None):
    a = parse(argv)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = read_rows(os.path.join(a.data, "train.jsonl"))
    perm = np.random.RandomState(0).permutation(len(rows))
    train_idx, held_idx = sorted(perm[: a.train_rows]), sorted(perm[a.train_rows: a.train_rows + a.heldout_rows])
    train, held, val = (Dataset.from_list([{"sentence": r["sentence"], "label": r["label"]} for r in x]).map(
        lambda b: tok(b["sentence"], truncation=True, max_length=64), batched=True)
        for x in ([rows[i] for i in train_idx], [rows[i] for i in held_idx],
                  read_rows(os.path.join(a.data, "validation.jsonl"))[:a.eval_rows]))
    if a.tiny:
        model = AutoModelForSequenceClassification.from_config(BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)

    def args(name, steps):
        return TrainingArguments(os.path.join(a.output_dir, name), max_steps=steps, per_device_train_batch_size=32,
                                 per_device_eval_batch_size=64, learning_rate=1e-4, logging_steps=25, save_strategy="no",
                                 report_to=[], seed=42, use_cpu=not torch.cuda.is_available())

    acc = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
    common = dict(train_dataset=train, eval_dataset=val, data_collator=DataCollatorWithPadding(tok), compute_metrics=acc)
    start = Trainer(model=model, args=args("start", a.start_steps), **common)
    start.train()  # the model to compress: fine-tuned dense
    start_acc = start.evaluate()["eval_accuracy"]

    held = held.remove_columns(["sentence"])  # token ids and labels only; the collator pads them
    table = analyze_sensitivity(model, dataset=held, collator=DataCollatorWithPadding(tok),  # SENSITIVITY
                                settings=SensitivityConfig(sensitivity_axes=["pruning"], sparsities=a.sparsities))  # SENSITIVITY
    plan = plan_budget(table, BudgetConfig(budget_metric="parameters", budget_fraction=a.budget))  # SENSITIVITY
    os.makedirs(a.output_dir, exist_ok=True)
    table.save(os.path.join(a.output_dir, "sensitivity.json"))
    plan_path = os.path.join(a.output_dir, "plan.yaml")
    Path(plan_path).write_text(fragment_yaml(plan_fragment(plan.choices, table), plan))  # SENSITIVITY: the recipe fragment
    section = yaml.safe_load(Path(plan_path).read_text())["pruning"]  # SENSITIVITY: as a recipe would hold it
    frequency = max(1, a.max_steps // 20)
    pruning = PruningCallback(PruningConfig(**section, frequency=frequency))  # SENSITIVITY

    t = Trainer(model=model, args=args("prune", a.max_steps), callbacks=[pruning], **common)  # SENSITIVITY
    t.train()
    accuracy = t.evaluate()["eval_accuracy"]
    out = os.path.join(a.output_dir, "model")
    t.save_model(out)
    tok.save_pretrained(out)
    back = AutoModelForSequenceClassification.from_pretrained(out)  # after `import hf_compress`
    back_acc = Trainer(model=back, args=args("eval", 1), **common).evaluate()["eval_accuracy"]
    weights = [t.model.get_submodule(x["name"]).weight for x in table.layers]
    nonzero, dense = int(sum((w != 0).sum() for w in weights)), sum(w.numel() for w in weights)
    print("per-layer plan (sparsity):")
    for x in table.layers:
        print(f"  {x['name']:<48} {plan.choices[x['name']]:>9}  predicted loss increase "
              f"{0.0 if plan.choices[x['name']] == 'dense' else table.delta(x['name'], plan.choices[x['name']]):+.4f}")
    print(f"non-zero weights of the analysed layers {dense:,} -> {nonzero:,} (budget {plan.budget:,.0f}, plan {plan.cost:,.0f})  "
          f"accuracy dense {start_acc:.4f} -> pruned {accuracy:.4f}  reloaded {back_acc:.4f}  plan: {plan_path}")
    return {"model": t.model, "output": out, "plan_path": plan_path, "plan": plan, "table": table, "budget": a.budget,
            "train_rows": train_idx, "heldout_rows": held_idx, "start_accuracy": start_acc, "accuracy": accuracy,
            "reloaded_accuracy": back_acc, "nonzero": nonzero}


if __name__ == "__main__":
    main()
