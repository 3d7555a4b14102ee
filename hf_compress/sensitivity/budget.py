"""From a sensitivity table to per-layer settings that meet a global budget, and the recipe fragment.

Each analysed layer gets one option: dense, or one of the analysed settings (pruned to s, quantised to b
bits, or factorised to a rank). The predicted damage of a plan is the sum of the per-layer loss increases
measured with only that layer perturbed (additive model). Minimising it under a budget on the summed cost
is a multiple-choice knapsack; it is solved exactly by dynamic programming over the cost, with costs
rounded *up* to 1/`resolution` of the dense total (so the plan always meets the budget; exact when the
costs are integers below `resolution`). Why not greedy or a Lagrangian sweep: both only reach the plans on
the lower convex hull of each layer's (cost, damage) curve, and measured sensitivity curves are often not
convex (e.g. 8-bit and 50% pruning cost about the same damage); the DP costs milliseconds here (tens of
layers x a few options x `resolution`).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..lowrank.factorize import factorise_layer
from .analysis import SensitivityTable, applicable, parse_setting, rank_for
from .config import AXES, BudgetConfig

DENSE = "dense"
UNITS = {"parameters": "parameters", "bytes": "bytes", "latency": "ms"}


def option_cost(layer: dict, option: str, metric: str, latency: dict | None = None, bytes_per_weight: int = 4) -> float:
    """Cost of one layer's weights under `option` ('dense' or a setting), by `metric`."""
    n, i, o = layer["in"] * layer["out"], layer["in"], layer["out"]
    if metric == "latency":
        if latency is None:
            raise ValueError("budget_metric='latency' needs measured layer latencies (plan_budget(..., model=model)).")
        axis = DENSE if option == DENSE else parse_setting(option)[0]
        return latency[layer["name"]][option if axis == "lowrank" else DENSE]
    if option == DENSE:
        return n if metric == "parameters" else n * bytes_per_weight
    axis, v = parse_setting(option)
    if axis == "pruning":
        kept = n - round(v * n)
        if metric == "parameters":
            return kept
        # sparse-bitmask storage (hf_compress.storage) when smaller: values + one bit per entry + the shape
        return min(n * bytes_per_weight, kept * bytes_per_weight + o * math.ceil(i / 8) + 16)
    if axis == "quantization":
        # b-bit codes packed + one float32 scale per output channel (torch-int8 stores 8-bit codes in int8 bytes)
        return n if metric == "parameters" else math.ceil(n * v / 8) + 4 * o
    r = rank_for(v, i, o)
    return r * (i + o) * (1 if metric == "parameters" else bytes_per_weight)


@torch.inference_mode()
def measure_layer_latency(model: nn.Module, table: SensitivityTable, tokens: int = 512, repeats: int = 7) -> dict:
    """{layer: {"dense": ms, "rank:f": ms}}: median CPU time of one forward of [tokens, in] through the layer and
    through its factorised form (interleaved, so a busy machine slows all alike)."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for layer in table.layers:
        m = model.get_submodule(layer["name"])
        dev = next(m.parameters()).device
        x = torch.randn(tokens, layer["in"], generator=g).to(dev, next(m.parameters()).dtype)
        mods = {DENSE: m}
        for s in table.settings:
            if parse_setting(s)[0] == "lowrank" and applicable(layer, s):
                mods[s] = factorise_layer(m, rank_for(parse_setting(s)[1], layer["in"], layer["out"]))
        times = {k: [] for k in mods}
        for k, mod in mods.items():
            mod(x)
        for _ in range(repeats):
            for k, mod in mods.items():
                t = time.perf_counter()
                mod(x)
                times[k].append(time.perf_counter() - t)
        out[layer["name"]] = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return out


@dataclass
class Plan:
    choices: dict[str, str]  # layer -> "dense" or a setting
    metric: str
    budget: float
    cost: float
    dense_cost: float
    min_cost: float
    predicted_damage: float
    baseline_loss: float
    method: str = "multiple-choice knapsack, dynamic programming over rounded-up costs"
    costs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("metric", "budget", "cost", "dense_cost", "min_cost", "predicted_damage",
                                              "baseline_loss", "method", "choices", "costs")}


def _options(table: SensitivityTable, axes: list[str]) -> dict[str, list[str]]:
    out = {}
    for layer in table.layers:
        opts = [DENSE]
        for s in table.settings:
            if parse_setting(s)[0] in axes and applicable(layer, s) and table.delta(layer["name"], s) is not None:
                opts.append(s)
        out[layer["name"]] = opts
    return out


def plan_budget(table: SensitivityTable, budget: BudgetConfig, model: nn.Module | None = None, latency: dict | None = None) -> Plan:
    """Per-layer settings with the least predicted damage (sum of measured loss increases) whose total cost
    (`budget.budget_metric`, over the analysed layers) is within the budget. ValueError naming the budget and
    the smallest achievable value when even the most aggressive settings do not fit."""
    analysed = [a for a in AXES if any(parse_setting(s)[0] == a for s in table.settings)]
    axes = budget.budget_axes or analysed
    missing = [a for a in axes if a not in analysed]
    if missing:
        raise ValueError(f"BudgetConfig.budget_axes={budget.budget_axes}: {missing} were not analysed (the table has "
                         f"{analysed}); analyse them too or drop them from budget_axes.")
    metric = budget.budget_metric
    if metric == "latency" and latency is None:
        if model is None:
            raise ValueError("BudgetConfig.budget_metric='latency' measures the layers: pass model= to plan_budget.")
        latency = measure_layer_latency(model, table, budget.latency_tokens)
    options = _options(table, axes)
    cost = {x: {o: float(option_cost(table.layer(x), o, metric, latency)) for o in opts} for x, opts in options.items()}
    damage = {x: {o: (0.0 if o == DENSE else float(table.delta(x, o))) for o in opts} for x, opts in options.items()}
    dense_total = sum(c[DENSE] for c in cost.values())
    min_total = sum(min(c.values()) for c in cost.values())
    cap = budget.budget_value if budget.budget_value is not None else budget.budget_fraction * dense_total
    unit = UNITS[metric]
    if min_total > cap * (1 + 1e-12):
        raise ValueError(
            f"budget {_fmt(cap)} {unit} ({metric}{', ' + f'{budget.budget_fraction:g} of the dense {_fmt(dense_total)}' if budget.budget_fraction else ''}) "
            f"cannot be met: the most aggressive analysed settings ({', '.join(axes)}) reach {_fmt(min_total)} {unit} at the "
            f"smallest ({min_total / dense_total:.3g} of dense). Raise the budget to at least {_fmt(min_total)}, or analyse "
            "more aggressive settings (higher sparsities, fewer bits, smaller rank fractions)."
        )
    names = list(options)
    step = 1.0
    integral = all(float(c).is_integer() for cs in cost.values() for c in cs.values())
    if not (integral and cap <= budget.resolution):
        step = dense_total / budget.resolution
    C = int(math.floor(cap / step + 1e-9))
    icost = {x: {o: int(math.ceil(c / step - 1e-9)) for o, c in cs.items()} for x, cs in cost.items()}
    if sum(min(c.values()) for c in icost.values()) > C:  # rounding made it look infeasible: cheapest per layer
        choice = {x: min(cost[x], key=lambda o: (cost[x][o], damage[x][o])) for x in names}
    else:
        dp = np.zeros(C + 1)
        back = []
        for x in names:
            new = np.full(C + 1, np.inf)
            arg = np.zeros(C + 1, dtype=np.int16)
            for k, o in enumerate(options[x]):
                c, d = icost[x][o], damage[x][o]
                if c > C:
                    continue
                cand = np.full(C + 1, np.inf)
                cand[c:] = dp[: C + 1 - c] + d
                better = cand < new - 1e-15
                new[better], arg[better] = cand[better], k
            back.append(arg)
            dp = new
        choice, j = {}, C
        for x, arg in zip(reversed(names), reversed(back)):
            o = options[x][int(arg[j])]
            choice[x] = o
            j -= icost[x][o]
        choice = {x: choice[x] for x in names}
    total = sum(cost[x][choice[x]] for x in names)
    return Plan(choice, metric, float(cap), float(total), float(dense_total), float(min_total),
                float(sum(damage[x][choice[x]] for x in names)), table.baseline["loss"],
                costs={x: cost[x][choice[x]] for x in names})


def uniform_choice(table: SensitivityTable, setting: str) -> dict[str, str]:
    """Every analysed layer at `setting` (where applicable): the baseline a plan is compared with."""
    return {x["name"]: setting if applicable(x, setting) else DENSE for x in table.layers}


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"


def _exact(name: str) -> str:
    return "^" + re.escape(name) + "$"


def plan_fragment(choices: dict[str, str], table: SensitivityTable) -> dict[str, dict]:
    """The plan as recipe sections the existing configs accept: `pruning` (PruningConfig: unstructured magnitude
    with `layer_sparsity`), `quantization` (QATConfig: `layer_bits`), `lowrank` (LowRankConfig: `lowrank_ranks`);
    each targets exactly the layers it changes (anchored regexes), so the others stay dense."""
    by_axis: dict[str, dict[str, float]] = {}
    for x, o in choices.items():
        if o != DENSE:
            axis, v = parse_setting(o)
            by_axis.setdefault(axis, {})[x] = v
    out: dict[str, dict] = {}
    if "pruning" in by_axis:
        per = by_axis["pruning"]
        sizes = {x: table.layer(x)["in"] * table.layer(x)["out"] for x in per}
        overall = sum(round(per[x] * sizes[x]) for x in per) / sum(sizes.values())
        out["pruning"] = {
            "granularity": "unstructured", "method": "magnitude", "target_sparsity": round(overall, 6),
            "layer_sparsity": {_exact(x): per[x] for x in per}, "pruning_targets": [_exact(x) for x in per],
        }
    if "quantization" in by_axis:
        per = by_axis["quantization"]
        common = Counter(per.values()).most_common(1)[0][0]
        out["quantization"] = {"weight_bits": int(common), "layer_bits": {_exact(x): int(b) for x, b in per.items()},
                               "qat_targets": [_exact(x) for x in per]}
    if "lowrank" in by_axis:
        per = by_axis["lowrank"]
        ranks = {x: rank_for(f, table.layer(x)["in"], table.layer(x)["out"]) for x, f in per.items()}
        out["lowrank"] = {"lowrank_ranks": {_exact(x): r for x, r in ranks.items()}, "lowrank_targets": [_exact(x) for x in per]}
    return out


def fragment_configs(fragment: dict[str, dict]) -> dict[str, Any]:
    """The configs a fragment builds: {"pruning": PruningConfig, "quantization": QATConfig, "lowrank": LowRankConfig}."""
    from ..lowrank.config import LowRankConfig
    from ..pruning.config import PruningConfig
    from ..quantization.config import QATConfig

    classes = {"pruning": PruningConfig, "quantization": QATConfig, "lowrank": LowRankConfig}
    unknown = [k for k in fragment if k not in classes]
    if unknown:
        raise ValueError(f"fragment sections {unknown}: expected some of {list(classes)}.")
    return {k: classes[k](**v) for k, v in fragment.items()}


def fragment_yaml(fragment: dict[str, dict], plan: Plan | None = None) -> str:
    import yaml

    head = "# hf-compress analyze: per-layer plan (docs/sensitivity.md)\n"
    if plan is not None:
        head += (f"# budget {plan.metric} <= {_fmt(plan.budget)} (dense {_fmt(plan.dense_cost)}): plan {_fmt(plan.cost)}, "
                 f"predicted loss increase {plan.predicted_damage:.4g} over {plan.baseline_loss:.4g}\n")
    if "lowrank" in fragment:
        head += "# lowrank: LowRankConfig fields (LowRankCallback(LowRankConfig(**fragment['lowrank'])))\n"
    return head + yaml.safe_dump(fragment, sort_keys=False, width=200)
