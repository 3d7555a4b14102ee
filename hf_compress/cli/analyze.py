"""`hf-compress analyze RECIPE.yaml`: per-layer sensitivity of the recipe's model and a budgeted per-layer plan.

The model analysed is the one `run` starts compressing: the recipe's teacher (fine-tuned first, or reused
from <output_dir>/teacher, exactly as `run` does) turned into the student (`student.layers`, `student.name`,
or a copy). The loss is measured on a held-out slice of the *training* split — rows the training subset
(`data.train_samples`, `data.seed`) does not use — never on the evaluation split of the report.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

EPILOG = """\
examples:
  hf-compress analyze configs/sst2_minilm.yaml data_dir=../shared/data
  hf-compress analyze configs/sst2_minilm.yaml --axes pruning --sparsities 0.5,0.7,0.9 --budget-fraction 0.4
  hf-compress analyze RECIPE.yaml --axes pruning,quantization,lowrank --budget-metric bytes --budget-fraction 0.3

Writes OUT/sensitivity.json (loss and metric per layer x setting, baseline), OUT/sensitivity.png (heat map)
and, with a budget, OUT/plan.json and OUT/plan.yaml (the recipe fragment: pruning.layer_sparsity,
quantization.layer_bits, lowrank.lowrank_ranks). OUT defaults to <output_dir>/sensitivity. docs/sensitivity.md"""

FILES = ("sensitivity.json", "sensitivity.png", "plan.json", "plan.yaml")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze", help="per-layer sensitivity and a budgeted per-layer plan",
        description="Measure, for every targeted layer of RECIPE's model, the loss change on a held-out slice of the training "
                    "data when only that layer is pruned / quantised / factorised; optionally choose per-layer settings "
                    "that meet a budget with the least predicted damage and write them as a recipe fragment.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe file (its model, teacher, student and data sections are used)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of recipe keys, as for `run`")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default <output_dir>/sensitivity)")
    p.add_argument("--samples", type=int, default=None, help="held-out rows (classification) or blocks (causal LM); default 256")
    p.add_argument("--axes", default=None, help="comma list of pruning,quantization,lowrank (default all)")
    p.add_argument("--sparsities", default=None, help="comma list, e.g. 0.3,0.5,0.7,0.9")
    p.add_argument("--bits", default=None, help="comma list, e.g. 8,4,3")
    p.add_argument("--rank-fractions", default=None, help="comma list of fractions of min(in, out), e.g. 0.5,0.25")
    p.add_argument("--targets", default=None, help="comma list of regexes of the layers to analyse (default: Linears in the blocks)")
    p.add_argument("--exclude", default=None, help="comma list of regexes of layers left out")
    p.add_argument("--budget-metric", default="parameters", help="parameters, bytes or latency (default parameters)")
    p.add_argument("--budget-fraction", type=float, default=None, help="budget as a fraction of the analysed layers' dense total")
    p.add_argument("--budget-value", type=float, default=None, help="budget as an absolute total (parameters, bytes or ms)")
    p.add_argument("--budget-axes", default=None, help="comma list: which analysed axes the plan may use (default all analysed)")
    p.add_argument("--no-plot", action="store_true", help="do not write sensitivity.png")
    return p


def _configs(args):
    from ..sensitivity import BudgetConfig, SensitivityConfig

    kw = {k: v for k, v in {
        "sensitivity_axes": args.axes, "sparsities": args.sparsities, "bits": args.bits, "rank_fractions": args.rank_fractions,
        "sensitivity_targets": args.targets.split(",") if args.targets else None,
        "sensitivity_exclude": args.exclude.split(",") if args.exclude else None, "samples": args.samples,
    }.items() if v is not None}
    settings = SensitivityConfig(**kw)
    budget = None
    if args.budget_fraction is not None or args.budget_value is not None:
        budget = BudgetConfig(budget_metric=args.budget_metric, budget_fraction=args.budget_fraction,
                              budget_value=args.budget_value, budget_axes=args.budget_axes)
    elif args.budget_axes is not None or args.budget_metric != "parameters":
        raise ValueError("--budget-metric / --budget-axes need a budget: add --budget-fraction F or --budget-value V.")
    return settings, budget


def heldout_slice(recipe, tokenizer, splits, samples: int, say=print):
    """(dataset, how many rows overlap the training subset): `samples` training rows the run does not train on."""
    from .data import _subset, check_rows, classification_dataset, lm_blocks, load_rows, split_names

    cfg, task = recipe.data, recipe.model.task
    train_rows, _, source = load_rows(cfg, recipe.data_dir)
    where = split_names(cfg, source)[0] if task != "causal-lm" else f"{source} ({cfg.train_split})"
    n = len(train_rows)
    used = cfg.train_samples if cfg.train_samples is not None and cfg.train_samples < n else None
    if task == "causal-lm":
        if len(train_rows) > 1 and used is not None:
            chosen = {id(r) for r in _subset(train_rows, used, cfg.seed)}
            rest = [r for r in train_rows if id(r) not in chosen]
            if rest:
                return lm_blocks(rest, tokenizer, cfg, where, samples), 0
        skip = cfg.train_samples or 0
        blocks = lm_blocks(train_rows, tokenizer, cfg, where, skip + samples if cfg.train_samples else None)
        if len(blocks) > skip and cfg.train_samples:
            return blocks.select(range(skip, len(blocks))), 0
        k = min(samples, len(blocks))
        return blocks.select(range(len(blocks) - k, len(blocks))), k
    perm = np.random.RandomState(cfg.seed).permutation(n)
    rest = perm[used:] if used is not None else perm[:0]
    overlap = 0
    if len(rest) == 0:  # every training row is trained on: the slice overlaps them (said, and recorded)
        rest, overlap = perm, min(samples, n)
    rows = [train_rows[i] for i in sorted(rest[:samples])]
    check_rows(rows, cfg, where, recipe.model.num_labels or splits.num_labels)
    if splits.label_names and not cfg.labels:
        cfg = replace(cfg, labels=splits.label_names)
    ds, _ = classification_dataset(rows, tokenizer, cfg, where)
    return ds, overlap


def run(args) -> int:
    from ..metrics import collator_for
    from ..sensitivity import analyze_sensitivity, fragment_yaml, plan_budget, plan_fragment
    from .pipeline import Run, _build_student, _load_teachers, prepare, training_args
    from .recipes import load_recipe

    settings, budget = _configs(args)  # bad flags fail before any model is loaded
    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path(recipe.out_dir) / "sensitivity"
    from .recipes import check_writable_dir

    check_writable_dir(out, "--out")
    targs = training_args(recipe)
    r = Run(recipe, targs)
    tokenizer, splits = prepare(recipe)
    with r.phase("held-out slice", f"{settings.samples} {'blocks' if recipe.model.task == 'causal-lm' else 'rows'} of the training split not trained on"):
        data, overlap = heldout_slice(recipe, tokenizer, splits, settings.samples)
        if overlap:
            r.say(f"WARNING all training rows are used for training (data.train_samples unset or >= the split): the "
                  f"slice's {overlap} rows overlap them; set data.train_samples below the split size for a true hold-out.")
    teachers = _load_teachers(r, tokenizer, splits)
    model, desc = _build_student(r, teachers[0], tokenizer, recipe.model.num_labels or splits.num_labels)
    model.to("cpu" if targs.use_cpu else targs.device)
    qat = recipe.quantization_config()
    with r.phase("sensitivity", f"{desc}; settings {settings.sensitivity_axes}"):
        table = analyze_sensitivity(model, dataset=data, task=recipe.model.task, collator=collator_for(recipe.model.task, tokenizer),
                                    settings=settings, qat_config=qat, say=r.say)
    table.config.update({"recipe": str(args.recipe), "overrides": list(args.overrides), "model": desc,
                         "heldout_rows": len(data), "heldout_overlap": overlap})
    if not r.main:
        return 0
    paths = [table.save(out / "sensitivity.json")]
    if not args.no_plot:
        paths.append(table.heatmap(out / "sensitivity.png", title=f"{recipe.name or Path(args.recipe).stem}: loss increase, one layer perturbed"))
    worst = sorted(((table.delta(x["name"], s) or 0.0, x["name"], s) for x in table.layers for s in table.settings), reverse=True)[:5]
    print(f"baseline loss {table.baseline['loss']:.4g} on {len(data)} held-out rows; most sensitive:")
    for d, x, s in worst:
        print(f"  {x:60s} {s:10s} +{d:.4g}")
    if budget is not None:
        plan = plan_budget(table, budget, model=model)
        fragment = plan_fragment(plan.choices, table)
        (out / "plan.json").write_text(json.dumps({"plan": plan.to_dict(), "fragment": fragment, "budget": budget.to_dict()}, indent=1))
        (out / "plan.yaml").write_text(fragment_yaml(fragment, plan))
        paths += [out / "plan.json", out / "plan.yaml"]
        print(f"plan: {plan.metric} {plan.cost:,.6g} <= budget {plan.budget:,.6g} (dense {plan.dense_cost:,.6g}); predicted loss "
              f"increase {plan.predicted_damage:.4g}")
        print(fragment_yaml(fragment), end="")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
