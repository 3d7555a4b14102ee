"""Budgeted per-layer pruning (hf-compress analyze's plan) vs the uniform setting at the same size (issue 15 part 3).

For SST-2 and emotion: all-MiniLM-L6-v2 fine-tuned here for `teacher_steps` steps (lr 1e-4) on `train` rows (the
first rows of a seed-0 permutation of the training split; cached in bench/.cache) is analysed with
`hf_compress.sensitivity.analyze_sensitivity` on `heldout` training rows the runs never train on (magnitude
pruning of one layer at a time, sparsities SPARSITIES); `plan_budget` picks per-layer sparsities whose non-zero
parameters equal the uniform setting's (BUDGET of the 36 block Linears kept). Then both are pruned during the
same short fine-tuning (PruningCallback, magnitude, cubic schedule reaching the target at 70% of `steps`) from
the same start, seed 42, batch 16, lr 5e-5, max length 64, and evaluated on the validation split.

Only the pruning axis is used (the cheapest to analyse; the machine is 2 shared cores).

    nice python bench/bench_sensitivity.py          # ~30-45 min on 2 shared CPU cores (more when other jobs run)
    python bench/bench_sensitivity.py --quick       # proves it runs; numbers meaningless
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (CACHE, MAX_LEN, SEED, accuracy, data_dir, minilm_path, parse_args, read_jsonl, sst2, table,  # noqa: E402
                    tokenizer, train, training_args, write)
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding  # noqa: E402

from hf_compress import PruningCallback, PruningConfig  # noqa: E402
from hf_compress.sensitivity import (BudgetConfig, SensitivityConfig, analyze_sensitivity, plan_budget,  # noqa: E402
                                     plan_fragment)

SPARSITIES = [0.5, 0.8, 0.95]
UNIFORM = 0.8  # every analysed layer at 80% sparsity
SHORT = dict(train=2000, steps=50, teacher_steps={"sst2": 100, "emotion": 80}, heldout=64, eval_rows=None)
QUICK_SIZES = dict(train=128, steps=6, teacher_steps={"sst2": 6, "emotion": 6}, heldout=16, eval_rows=64)
LR, BATCH = 5e-5, 16


def _encode(tok, rows, text):
    from datasets import Dataset

    ds = Dataset.from_list([{"text": r[text], "label": r["label"]} for r in rows])
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=MAX_LEN), batched=True, remove_columns=["text"])


def emotion(tok, n_train: int, heldout: int, eval_rows):
    folder = data_dir() / "emotion"
    rows = read_jsonl(folder / "train.jsonl")
    perm = np.random.RandomState(0).permutation(len(rows))
    train_rows = [rows[i] for i in sorted(perm[:n_train])]
    held = [rows[i] for i in sorted(perm[n_train:n_train + heldout])]
    val = read_jsonl(folder / "validation.jsonl", limit=eval_rows)
    return _encode(tok, train_rows, "text"), _encode(tok, held, "text"), _encode(tok, val, "text")


def sst2_heldout(tok, skip: int, heldout: int):
    """SST-2 train rows outside the first `skip` of the seed-0 permutation (the teacher's and the runs' rows)."""
    rows = read_jsonl(data_dir() / "sst2" / "train.jsonl")
    perm = np.random.RandomState(0).permutation(len(rows))
    return _encode(tok, [{"text": rows[i]["sentence"], "label": rows[i]["label"]} for i in sorted(perm[skip:skip + heldout])], "text")


def by_length(ds):
    """Rows sorted by length: batches of the held-out evaluation pad less (the loss does not depend on order)."""
    order = np.argsort([len(x) for x in ds["input_ids"]], kind="stable")
    return ds.select(order.tolist())


def main(argv=None):
    a = parse_args("Budgeted per-layer pruning from measured sensitivity vs uniform pruning at the same size "
                   "(MiniLM, SST-2 and emotion).", argv)
    sizes = dict(QUICK_SIZES if a.quick else SHORT)
    if a.steps:
        sizes["steps"] = a.steps
    tok = tokenizer()
    collate = DataCollatorWithPadding(tok)
    tmp = Path(tempfile.mkdtemp(prefix="bench_sensitivity_"))
    freq = max(1, sizes["steps"] // 30)
    results = {}
    for task in ("sst2", "emotion"):
        t_task = time.time()
        if task == "sst2":
            train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])  # the first `train` rows of the seed-0 permutation
            held = sst2_heldout(tok, sizes["train"], sizes["heldout"])
            num_labels = 2
        else:
            train_ds, held, val_ds = emotion(tok, sizes["train"], sizes["heldout"], sizes["eval_rows"])
            num_labels = 6
        start_steps = sizes["teacher_steps"][task]
        start_path = CACHE / f"{task}-start-{sizes['train']}-{start_steps}"
        if not (start_path / "model.safetensors").exists():
            print(f"[bench] fine-tuning MiniLM on {sizes['train']} {task} rows for {start_steps} steps", flush=True)
            torch.manual_seed(SEED)
            m = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)
            t, _ = train(m, train_ds, training_args(str(tmp / f"{task}-start"), steps=start_steps, lr=1e-4, batch=BATCH), tok)
            t.model.save_pretrained(start_path)
        base = AutoModelForSequenceClassification.from_pretrained(start_path)
        start_acc = accuracy(base, val_ds, tok)
        print(f"[bench] {task}: start model accuracy {start_acc:.4f}; analysing on {len(held)} held-out rows", flush=True)
        t0 = time.time()
        tab = analyze_sensitivity(base, dataset=by_length(held), collator=collate,
                                  settings=SensitivityConfig(sensitivity_axes=["pruning"], sparsities=SPARSITIES, eval_batch_size=64))
        analysis_min = (time.time() - t0) / 60
        plan = plan_budget(tab, BudgetConfig(budget_metric="parameters", budget_fraction=1 - UNIFORM))
        frag = plan_fragment(plan.choices, tab)["pruning"]
        print(f"[bench] {task}: analysis {analysis_min:.1f} min; plan {plan.cost:,.0f} <= {plan.budget:,.0f} non-zero "
              f"block weights, predicted loss increase {plan.predicted_damage:.4f}", flush=True)
        uniform_damage = sum(tab.delta(x["name"], "prune:0.8") or 0.0 for x in tab.layers) if "prune:0.8" in tab.settings else None

        def run(name, cfg):
            torch.manual_seed(SEED)
            model = AutoModelForSequenceClassification.from_pretrained(start_path)
            t1 = time.time()
            trainer, step_s = train(model, train_ds, training_args(str(tmp / f"{task}-{name}"), steps=sizes["steps"], lr=LR, batch=BATCH),
                                    tok, callbacks=[PruningCallback(cfg)])
            m = trainer.model.eval()
            ws = [m.get_submodule(x["name"]).weight for x in tab.layers]
            nnz = int(sum((w != 0).sum() for w in ws))
            row = {"task": task, "run": name, "accuracy": accuracy(m, val_ds, tok), "nonzero_block_weights": nnz,
                   "sparsity": 1 - nnz / sum(w.numel() for w in ws), "step_s": step_s, "minutes": (time.time() - t1) / 60}
            print(f"[bench] {task} {name}: accuracy {row['accuracy']:.4f}, sparsity {row['sparsity']:.4f}, {row['minutes']:.1f} min", flush=True)
            return row

        common_kw = dict(method="magnitude", schedule="cubic", frequency=freq)
        rows = [
            run(f"uniform {UNIFORM:.0%} per layer", PruningConfig(target_sparsity=UNIFORM, scope="local", **common_kw)),
            run("budgeted plan (per-layer)", PruningConfig(**frag, frequency=freq)),
        ]
        results[task] = {
            "start_accuracy": start_acc, "heldout_rows": len(held), "analysis_minutes": analysis_min,
            "baseline_heldout_loss": tab.baseline["loss"], "plan": plan.to_dict(), "fragment": frag,
            "predicted_damage_uniform": uniform_damage, "predicted_damage_plan": plan.predicted_damage,
            "sensitivity": tab.to_dict(), "rows": rows, "difference_points": 100 * (rows[1]["accuracy"] - rows[0]["accuracy"]),
            "minutes": (time.time() - t_task) / 60,
        }
        print(f"[bench] {task}: plan - uniform = {results[task]['difference_points']:+.2f} points", flush=True)
    all_rows = [r for t in results.values() for r in t["rows"]]
    print(table(all_rows, ["task", "run", "accuracy", "sparsity", "step_s", "minutes"]))
    write("sensitivity", {
        "quick": a.quick, "sizes": sizes, "lr": LR, "batch": BATCH, "max_length": MAX_LEN, "sparsities_analysed": SPARSITIES,
        "budget": f"parameters: non-zero weights of the 36 block Linears <= {1 - UNIFORM:g} x dense (= uniform {UNIFORM:.0%})",
        "axis": "pruning only (unstructured magnitude), the cheapest to analyse on 2 shared cores",
        "note": f"one seed, {sizes['steps']} steps of batch {BATCH} on {sizes['train']} rows; differences of a few tenths of a point are within noise",
        "results": results,
    }, a.out)


if __name__ == "__main__":
    main()
