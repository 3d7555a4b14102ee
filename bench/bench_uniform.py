"""Uniform vs non-uniform structured pruning at the same parameter count: MiniLM-L6 on SST-2 (issue 14).

`PruningConfig(uniform=True)` removes the same number of FFN neurons from every layer, so the result is a
plain BertForSequenceClassification whose stock config.json loads with transformers alone; the default
(`scope="global"`) ranks the units of all layers together, so layers end up with different widths and
the export needs hf_compress to load. Both remove exactly the same number of units, hence the same
parameter count. What does the stock-loadable shape cost in accuracy?

BERT's config cannot express fewer heads (no head_dim field), so uniform heads are refused on MiniLM; the
last row compares uniform 75% neurons against non-uniform 50% heads + 50% neurons, which leaves the same
parameter count (a head of MiniLM holds 49,248 parameters, a neuron 769; within 0.01%).

Short budget (every run identical): all-MiniLM-L6-v2 (the packaged copy, not fine-tuned on SST-2) fine-tuned
for `steps` steps on a fixed `train`-row subset of SST-2 train while PruningCallback prunes it (Taylor
scores, cubic schedule reaching the target at 70% of the steps), batch 16, lr 1e-4, max length 64, seed 42;
accuracy on the full SST-2 validation split (872 rows).

    nice python bench/bench_uniform.py              # 2,000 rows, 150 steps, 5 runs (~25 min on 2 shared CPU cores)
    nice python bench/bench_uniform.py --dense      # + the unpruned control run

Each finished run is cached in bench/.cache/uniform/ (keyed on its settings): a killed run continues where
it stopped when started again.
    python bench/bench_uniform.py --quick           # proves it runs; numbers meaningless
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CACHE, SEED, accuracy, minilm_path, parse_args, sst2, table, tokenizer, train, training_args, write  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from hf_compress import PruningCallback, PruningConfig  # noqa: E402
from hf_compress.integration import reasons  # noqa: E402
from hf_compress.pruning import structure  # noqa: E402

SHORT = dict(train=2000, steps=150, eval_rows=None)
LR, BATCH = 1e-4, 16


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    dense = "--dense" in (sys.argv[1:] if argv is None else argv)
    argv = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--dense"]
    a = parse_args("Uniform vs non-uniform structured pruning at the same parameter count (MiniLM-L6, SST-2); "
                   "--dense adds the unpruned control run.", argv)
    a.dense = dense
    sizes = dict(a.sizes) if a.quick else dict(SHORT)  # a.sizes is the quick protocol, or --steps applied
    if a.steps:
        sizes["steps"] = a.steps
    steps = sizes["steps"]
    freq = max(1, steps // 25)
    tok = tokenizer()
    train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])
    tmp = Path(tempfile.mkdtemp(prefix="bench_uniform_"))
    print(f"[bench] {len(train_ds)} train rows, {len(val_ds)} validation rows, {steps} steps per run, "
          f"mask updates every {freq}", flush=True)

    def run(name, prune: dict, uniform: bool):
        key = f"{name}-{sizes['train']}-{steps}-{LR}-{BATCH}-{SEED}".replace(" ", "_").replace("%", "pct").replace("+", "and")
        cached = CACHE / ("uniform-quick" if a.quick else "uniform") / f"{key}.json"
        if cached.exists():
            row = json.loads(cached.read_text())
            print(f"[bench] {name}: cached ({cached})", flush=True)
            return row
        torch.manual_seed(SEED)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        cbs = [PruningCallback(PruningConfig(granularity=g, target_sparsity=s, method="taylor", uniform=uniform,
                                             frequency=freq)) for g, s in prune.items()]
        t0 = time.time()
        trainer, step_s = train(model, train_ds, training_args(str(tmp / name.replace(" ", "_")), steps=steps, lr=LR, batch=BATCH),
                                tok, callbacks=cbs)
        model = trainer.model.eval()
        acc = accuracy(model, val_ds, tok)
        s = structure(model)
        why = reasons(model.config, model)
        row = {
            "run": name, "uniform": uniform, "pruned": {g: s_ for g, s_ in prune.items()}, "accuracy": acc,
            "params_M": n_params(model) / 1e6, "heads_per_layer": s["heads"], "ffn_per_layer": s["ffn"],
            "stock_loadable": not why, "needs_hf_compress_because": why or None, "step_s": step_s,
            "minutes": (time.time() - t0) / 60,
        }
        print(f"[bench] {name}: accuracy {acc:.4f}, {row['params_M']:.3f}M params, ffn {s['ffn']}, heads {s['heads']}, "
              f"stock loadable {row['stock_loadable']}, {row['minutes']:.1f} min", flush=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(row))
        return row

    plan = [("dense (no pruning)", {}, False)] if a.dense else []
    for s in (0.5, 0.75):
        plan += [(f"neurons {s:.0%} uniform", {"neurons": s}, True), (f"neurons {s:.0%} non-uniform", {"neurons": s}, False)]
    plan.append(("heads 50% + neurons 50% non-uniform", {"heads": 0.5, "neurons": 0.5}, False))
    meta = {
        "quick": a.quick, "sizes": sizes, "lr": LR, "batch": BATCH, "max_length": 64,
        "init": "all-MiniLM-L6-v2 (packaged), not fine-tuned on SST-2; every run the same seed",
        "schedule": {"kind": "cubic", "method": "taylor", "pruning_end_step": "70% of steps", "frequency": freq},
        "note": f"short budget: one seed, {steps} steps of batch {BATCH} on {sizes['train']} rows; differences under "
                "~1 point are within seed noise",
    }
    rows = []
    for spec in plan:  # each finished run is written at once: a slow shared machine may not see the last one
        rows.append(run(*spec))
        if len(rows) < len(plan):
            write("uniform", {**meta, "complete": False, "rows": rows}, a.out)

    by = {r["run"]: r for r in rows}
    pairs = {
        "neurons 50%": ("neurons 50% uniform", "neurons 50% non-uniform"),
        "neurons 75%": ("neurons 75% uniform", "neurons 75% non-uniform"),
        "uniform neurons 75% vs non-uniform heads 50% + neurons 50%": ("neurons 75% uniform", "heads 50% + neurons 50% non-uniform"),
    }
    comparison = {
        k: {"uniform_accuracy": by[u]["accuracy"], "non_uniform_accuracy": by[n]["accuracy"],
            "difference_points": 100 * (by[u]["accuracy"] - by[n]["accuracy"]),
            "params_M": [by[u]["params_M"], by[n]["params_M"]]}
        for k, (u, n) in pairs.items()
    }
    print(table(rows, ["run", "accuracy", "params_M", "stock_loadable", "step_s", "minutes"]))
    for k, v in comparison.items():
        print(f"  {k}: uniform {v['uniform_accuracy']:.4f} vs non-uniform {v['non_uniform_accuracy']:.4f} "
              f"({v['difference_points']:+.2f} points; params {v['params_M'][0]:.4f}M vs {v['params_M'][1]:.4f}M)")
    write("uniform", {**meta, "complete": True, "rows": rows, "comparison": comparison}, a.out)


if __name__ == "__main__":
    main()
