"""The shipped recipes as benchmark rows: KD + pruning + int8 combined (SST-2), a second task (emotion,
6 classes, structured pruning) and causal-LM distillation (tiny-shakespeare, perplexity retention).

Each recipe runs end to end through `hf_compress.cli.pipeline.run_recipe` — exactly what `hf-compress run`
does — with its output under bench/.cache/recipes/<name>; the rows come from its report (the teacher of
that run is the baseline: retention, size ratio and speed-ups are measured against it in one process).

    python bench/bench_recipes.py            # the three recipes as shipped (~25 min on 2 CPU cores)
    python bench/bench_recipes.py --quick    # tiny overrides: proves it runs; numbers meaningless
    python bench/bench_recipes.py --only sst2_minilm
    python bench/bench_recipes.py --set emotion_structured.training.max_steps=250 emotion_structured.teacher.train.max_steps=250
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, data_dir, goal, table, write  # noqa: E402

from hf_compress.cli.pipeline import run_recipe  # noqa: E402
from hf_compress.cli.recipes import load_recipe  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = ["sst2_minilm", "emotion_structured", "tinyshakespeare_causal"]
QUICK = ["training.max_steps=6", "teacher.train.max_steps=6", "data.train_samples=128", "data.eval_samples=32",
         "report.repeats=2", "report.warmup=1"]


def block_mb(folder: Path) -> float | None:
    """MB of the transformer blocks' tensors in `folder`'s safetensors files (the encoder without its
    embeddings and task head: what compression shrinks)."""
    import re

    from safetensors import safe_open

    from hf_compress.modules import BLOCK_PATTERN

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if re.search(BLOCK_PATTERN, key):
                    t = st.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total / 1e6


def rows_of(name: str, report_rows: list[dict], minutes: float, folders: list[Path]) -> list[dict]:
    out = []
    for r, folder in zip(report_rows, folders):
        m = r["metrics"]
        metric = "perplexity" if "perplexity" in m else "accuracy"
        out.append({
            "recipe": name, "model": r["name"], metric: m.get(metric), "retention": r.get("retention"),
            "params_M": r["params"] / 1e6, "nonzero_M": r["nonzero_params"] / 1e6,
            "matmul_sparsity": r.get("matmul_sparsity"), "disk_MB": r.get("disk_mb"),
            "smaller_x": r.get("size_ratio"), "blocks_MB": block_mb(folder), "speedup_b1": r.get("speedup", {}).get("b1"),
            "speedup_b32": r.get("speedup", {}).get("b32"), "minutes": minutes,
        })
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs, numbers meaningless")
    p.add_argument("--only", nargs="*", default=None, help=f"recipes to run (of {RECIPES})")
    p.add_argument("--out", default=None, help="JSON file to write (default bench/results/recipes.json)")
    p.add_argument("--set", nargs="*", default=[], metavar="RECIPE.KEY=VALUE",
                   help="override one recipe's key, e.g. emotion_structured.training.max_steps=250")
    a = p.parse_args(argv)
    extra = {}
    for item in a.set:
        name, _, override = item.partition(".")
        if name not in RECIPES or "=" not in override:
            p.error(f"--set {item!r}: use RECIPE.KEY=VALUE with RECIPE one of {RECIPES}")
        extra.setdefault(name, []).append(override)
    rows, runs = [], {}
    for name in a.only or RECIPES:
        out = CACHE / "recipes" / (name + ("-quick" if a.quick else ""))
        overrides = [f"data_dir={data_dir()}", f"output_dir={out}", "training.disable_tqdm=true"] + (QUICK if a.quick else []) + extra.get(name, [])
        recipe = load_recipe(CONFIGS / f"{name}.yaml", overrides)
        print(f"[bench] recipe {name}: {recipe.name}", flush=True)
        t = time.time()
        result = run_recipe(recipe, command=f"bench/bench_recipes.py ({name})")
        minutes = (time.time() - t) / 60
        folders = [Path(recipe.out_dir) / "teacher", Path(recipe.export_dir)]  # the teacher's row, then the student's
        rows += rows_of(name, result["rows"], minutes, folders)
        if rows[-1]["blocks_MB"] and rows[-2]["blocks_MB"]:
            rows[-1]["blocks_smaller_x"] = rows[-2]["blocks_MB"] / rows[-1]["blocks_MB"]
        runs[name] = {"recipe": f"configs/{name}.yaml", "overrides": overrides, "title": recipe.name, "minutes": minutes}

    def final(name):
        return next((r for r in reversed(rows) if r["recipe"] == name), None)

    goals = {}
    sst2 = final("sst2_minilm")
    if sst2:  # KD + structured-or-unstructured + int8, the combined row
        goals["combined (KD + 50% pruning + int8) retention >= 0.97"] = goal((sst2["retention"] or 0) >= 0.97)
        goals["combined encoder (transformer blocks) >= 10x smaller on disk"] = goal((sst2.get("blocks_smaller_x") or 0) >= 10)
        goals["combined >= 4x faster (batch 1 and 32)"] = goal(min(sst2["speedup_b1"] or 0, sst2["speedup_b32"] or 0) >= 4)
    emo = final("emotion_structured")
    if emo:
        goals["emotion 50% heads + 50% neurons retention >= 0.97"] = goal((emo["retention"] or 0) >= 0.97)
        goals["emotion 50% heads + 50% neurons >= 1.7x faster (batch 1 and 32)"] = goal(
            min(emo["speedup_b1"] or 0, emo["speedup_b32"] or 0) >= 1.7)
    print(table(rows, ["recipe", "model", "accuracy", "perplexity", "retention", "params_M", "nonzero_M", "disk_MB", "blocks_MB",
                       "speedup_b1", "speedup_b32"]))
    for k, v in goals.items():
        print(f"  goal {k}: {v}")
    write("recipes", {"quick": a.quick, "runs": runs, "rows": rows, "goals": goals}, a.out)


if __name__ == "__main__":
    main()
