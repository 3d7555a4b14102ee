"""Sensitivity analysis and a per-layer budget (docs/sensitivity.md): bare modules and tensors, no Trainer or command.

`analyze_sensitivity(model, eval_fn | dataset, settings=SensitivityConfig(...))` measures, for every targeted
layer, the loss with only that layer pruned / quantised / factorised (reusing each technique's numerics, each
perturbation undone exactly). `plan_budget(table, BudgetConfig(...))` picks per-layer settings that meet a
global budget with the least predicted damage; `plan_fragment` writes them as recipe sections.
"""

from .analysis import SensitivityTable, analyze_sensitivity, dataset_loss_fn, parse_setting, perturbed, rank_for, setting_name
from .budget import (DENSE, Plan, fragment_configs, fragment_yaml, measure_layer_latency, option_cost, plan_budget,
                     plan_fragment, uniform_choice)
from .config import AXES, METRICS, BudgetConfig, SensitivityConfig

__all__ = [
    "AXES", "DENSE", "METRICS", "BudgetConfig", "Plan", "SensitivityConfig", "SensitivityTable", "analyze_sensitivity",
    "dataset_loss_fn", "fragment_configs", "fragment_yaml", "measure_layer_latency", "option_cost", "parse_setting",
    "perturbed", "plan_budget", "plan_fragment", "rank_for", "setting_name", "uniform_choice",
]
