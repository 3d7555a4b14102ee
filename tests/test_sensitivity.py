"""Sensitivity analysis and the per-layer budget (issue 15 part 3; docs/sensitivity.md).

- the model is bit-identical after the analysis (every perturbation undone exactly);
- one layer's sensitivity equals an independent computation (the layer perturbed by hand with plain torch);
- the planner meets the budget and is optimal (brute force over every combination), also where greedy is not;
- an unreachable budget names the budget and the smallest achievable value;
- the written fragment loads into PruningConfig / QATConfig / LowRankConfig and does what it says;
- `hf-compress analyze` end to end on a tiny recipe, then `hf-compress run` with the plan's pruning section.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
import yaml

from helpers import TokenDataset, tiny_bert
from hf_compress.sensitivity.analysis import applicable, parse_setting
from hf_compress.sensitivity import (DENSE, BudgetConfig, SensitivityConfig, SensitivityTable, analyze_sensitivity,
                                     fragment_configs, option_cost, plan_budget, plan_fragment)

LAYER = "bert.encoder.layer.1.intermediate.dense"


def _data(n=24):
    ds = TokenDataset(n=n, length=10, pad=False)
    return ds.ids, ds.labels


def _loss_fn(ids, y):
    @torch.no_grad()
    def ev(model):
        model.eval()
        return torch.nn.functional.cross_entropy(model(input_ids=ids).logits.float(), y).item()
    return ev


@pytest.fixture(scope="module")
def trained():
    """A tiny BERT trained a few steps, so perturbations change its loss."""
    torch.manual_seed(0)
    model = tiny_bert(layers=2)
    ids, y = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_model_bit_identical_after_the_analysis(trained):
    ids, y = _data()
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    modules = dict(trained.named_modules())
    table = analyze_sensitivity(trained, _loss_fn(ids, y), settings=SensitivityConfig())
    after = trained.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m is modules[n] for n, m in trained.named_modules())  # factorised layers were swapped back
    assert len(table.layers) == 12 and len(table.settings) == 10
    assert table.baseline["loss"] == pytest.approx(_loss_fn(ids, y)(trained))


def test_layer_sensitivity_equals_an_independent_computation(trained):
    ids, y = _data()
    ev = _loss_fn(ids, y)
    cfg = SensitivityConfig(sparsities=[0.6], bits=[4], rank_fractions=[0.25], sensitivity_targets=[LAYER])
    table = analyze_sensitivity(trained, ev, settings=cfg)
    lin = trained.get_submodule(LAYER)
    w0 = lin.weight.detach().clone()
    base = ev(trained)

    def by_hand(w):
        with torch.no_grad():
            lin.weight.copy_(w)
        try:
            return ev(trained)
        finally:
            with torch.no_grad():
                lin.weight.copy_(w0)

    # pruning: the round(0.6 n) smallest |w| zeroed
    k = round(0.6 * w0.numel())
    pruned = w0.flatten().clone()
    pruned[w0.abs().flatten().argsort(stable=True)[:k]] = 0
    assert table.delta(LAYER, "prune:0.6") == pytest.approx(by_hand(pruned.view_as(w0)) - base, abs=1e-6)
    # int4, symmetric per output channel: codes in [-7, 7], scale max|w| / 7
    scale = w0.abs().amax(1, keepdim=True) / 7
    q = torch.clamp(torch.round(w0 * (1 / scale)), -7, 7) * scale
    assert table.delta(LAYER, "bits:4") == pytest.approx(by_hand(q) - base, abs=1e-6)
    # rank 0.25 * min(64, 32) = 8: truncated SVD in float64
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    low = (u[:, :8] * s[:8]) @ vh[:8]
    assert table.delta(LAYER, "rank:0.25") == pytest.approx(by_hand(low.float()) - base, abs=1e-5)
    assert table.delta(LAYER, "prune:0.6") != 0 and table.delta(LAYER, "rank:0.25") != 0  # the checks above are not vacuous


def test_dataset_evaluation_and_json_round_trip(trained, tmp_path):
    ds = TokenDataset(n=20, length=8)
    table = analyze_sensitivity(trained, dataset=ds, settings=SensitivityConfig(sensitivity_axes=["pruning"], sparsities=[0.5],
                                                                                 sensitivity_targets=["layer.0.attention"]))
    assert table.metric_name == "accuracy" and 0 <= table.baseline["accuracy"] <= 1
    # the dataset loss is the mean cross-entropy over the rows
    with torch.no_grad():
        logits = trained(input_ids=ds.ids, attention_mask=ds.mask).logits
    assert table.baseline["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, ds.labels).item(), rel=1e-5)
    back = SensitivityTable.load(table.save(tmp_path / "s.json"))
    assert back.loss == table.loss and back.settings == table.settings
    assert table.heatmap(tmp_path / "s.png").stat().st_size > 1000


def _synthetic(n_layers=4, seed=0, settings=("prune:0.3", "prune:0.6", "prune:0.9", "bits:4", "rank:0.25")):
    rnd = random.Random(seed)
    layers = [{"name": f"l{i}", "in": rnd.choice([8, 12, 16]), "out": rnd.choice([8, 16]), "bias": True} for i in range(n_layers)]
    loss = {x["name"]: {s: 1.0 + rnd.uniform(-0.02, 0.5) for s in settings} for x in layers}
    return SensitivityTable({"loss": 1.0}, layers, list(settings), loss)


def _brute(table, budget, axes, metric="parameters"):
    opts = []
    for x in table.layers:
        o = [DENSE] + [s for s in table.settings if parse_setting(s)[0] in axes and applicable(x, s)]
        opts.append([(option_cost(x, s, metric), 0.0 if s == DENSE else table.delta(x["name"], s)) for s in o])
    best = min((sum(d for _, d in combo), sum(c for c, _ in combo)) for combo in itertools.product(*opts)
               if sum(c for c, _ in combo) <= budget)
    return best[0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_planner_is_optimal_against_brute_force(seed, fraction):
    table = _synthetic(seed=seed)
    dense = sum(x["in"] * x["out"] for x in table.layers)
    plan = plan_budget(table, BudgetConfig(budget_fraction=fraction))
    assert plan.cost <= fraction * dense and plan.dense_cost == dense
    assert plan.predicted_damage == pytest.approx(_brute(table, fraction * dense, ["pruning", "quantization", "lowrank"]), abs=1e-12)
    only_pruning = plan_budget(table, BudgetConfig(budget_fraction=fraction, budget_axes=["pruning"]))
    assert all(s == DENSE or s.startswith("prune:") for s in only_pruning.choices.values())
    assert only_pruning.predicted_damage == pytest.approx(_brute(table, fraction * dense, ["pruning"]), abs=1e-12)


def test_planner_beats_greedy_on_a_non_convex_case():
    """Two layers of 100 weights; budget 100. Greedy by damage per weight saved takes l0 at 0.9 first (cheapest
    damage rate) and must then prune l1 to 0.9 too; the optimum is l0 at 0.5 and l1 at 0.5."""
    layers = [{"name": "l0", "in": 10, "out": 10, "bias": False}, {"name": "l1", "in": 10, "out": 10, "bias": False}]
    loss = {"l0": {"prune:0.5": 1.10, "prune:0.9": 1.12}, "l1": {"prune:0.5": 1.10, "prune:0.9": 2.0}}
    plan = plan_budget(SensitivityTable({"loss": 1.0}, layers, ["prune:0.5", "prune:0.9"], loss), BudgetConfig(budget_value=100))
    assert plan.choices == {"l0": "prune:0.5", "l1": "prune:0.5"} and plan.predicted_damage == pytest.approx(0.2)


def test_bytes_budget_and_costs():
    table = _synthetic(seed=1)
    plan = plan_budget(table, BudgetConfig(budget_metric="bytes", budget_fraction=0.4))
    assert plan.cost <= 0.4 * plan.dense_cost
    assert plan.predicted_damage == pytest.approx(_brute(table, 0.4 * plan.dense_cost, ["pruning", "quantization", "lowrank"], "bytes"), abs=1e-9)
    x = {"name": "a", "in": 64, "out": 32, "bias": True}
    assert option_cost(x, DENSE, "bytes") == 64 * 32 * 4
    assert option_cost(x, "bits:4", "bytes") == 64 * 32 // 2 + 4 * 32
    assert option_cost(x, "prune:0.75", "parameters") == 512
    assert option_cost(x, "prune:0.75", "bytes") == 512 * 4 + 32 * 8 + 16  # sparse-bitmask: values + bits + shape
    assert option_cost(x, "rank:0.25", "parameters") == 8 * 96


def test_latency_budget_measures_the_layers(trained):
    ids, y = _data()
    table = analyze_sensitivity(trained, _loss_fn(ids, y), settings=SensitivityConfig(sensitivity_axes=["lowrank"], rank_fractions=[0.125]))
    plan = plan_budget(table, BudgetConfig(budget_metric="latency", budget_fraction=1.0, latency_tokens=64), model=trained)
    assert plan.metric == "latency" and plan.cost <= plan.budget
    with pytest.raises(ValueError, match="pass model= to plan_budget"):
        plan_budget(table, BudgetConfig(budget_metric="latency", budget_fraction=0.9))


def test_unreachable_budget_names_budget_and_smallest_value():
    table = _synthetic(seed=2, settings=("prune:0.5",))
    dense = sum(x["in"] * x["out"] for x in table.layers)
    smallest = sum(x["in"] * x["out"] - round(0.5 * x["in"] * x["out"]) for x in table.layers)
    with pytest.raises(ValueError) as e:
        plan_budget(table, BudgetConfig(budget_fraction=0.3))
    msg = str(e.value)
    assert f"budget {0.3 * dense:,.0f} parameters" in msg and f"reach {smallest:,} parameters" in msg and "cannot be met" in msg


def test_fragment_loads_into_the_configs_and_does_what_it_says(trained):
    from hf_compress.lowrank import convert as lowrank_convert
    from hf_compress.pruning import prepare
    from hf_compress.quantization.plan import build_plan

    ids, y = _data()
    table = analyze_sensitivity(trained, _loss_fn(ids, y), settings=SensitivityConfig(sparsities=[0.5, 0.9], bits=[4], rank_fractions=[0.25]))
    choices = {x["name"]: DENSE for x in table.layers}
    names = [x["name"] for x in table.layers]
    choices.update({names[0]: "prune:0.5", names[1]: "prune:0.9", names[2]: "bits:4", names[5]: "rank:0.25"})
    fragment = yaml.safe_load(yaml.safe_dump(plan_fragment(choices, table)))  # through YAML, as a recipe holds it
    cfgs = fragment_configs(fragment)
    assert set(cfgs) == {"pruning", "quantization", "lowrank"}
    model = tiny_bert(layers=2)
    model.load_state_dict(trained.state_dict())
    pruner = prepare(model, cfgs["pruning"])
    assert pruner.names == names[:2]
    pruner.update(cfgs["pruning"].target_sparsity)  # the end of the schedule
    assert pruner.sparsity(per_module=True) == {names[0]: 0.5, names[1]: pytest.approx(0.9, abs=1e-3)}
    pruner.update(cfgs["pruning"].target_sparsity / 2)  # half way: every layer at half its own target
    assert pruner.sparsity(per_module=True) == {names[0]: 0.25, names[1]: pytest.approx(0.45, abs=1e-3)}
    plan = build_plan(model, cfgs["quantization"])
    assert {k: p.weight.bits for k, p in plan.items()} == {names[2]: 4}
    entry = lowrank_convert(model, cfgs["lowrank"])
    assert {k: v["rank"] for k, v in entry["layers"].items()} == {names[5]: 8}


@pytest.mark.parametrize("kwargs, pattern", [
    ({"sparsities": [1.0]}, r"sparsities=\[1.0\]: give a non-empty list, each a number in \(0, 1\)"),
    ({"bits": [1]}, r"bits=\[1\]: give a non-empty list, each an integer from 2 to 8"),
    ({"sensitivity_axes": ["pruning", "distill"]}, r"sensitivity_axes=.*use a non-empty list from"),
    ({"samples": 0}, r"samples=0: use an integer >= 1"),
])
def test_sensitivity_config_validates(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SensitivityConfig(**kwargs)


def test_parser_help_strings():
    import dataclasses

    for cls in (SensitivityConfig, BudgetConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


# ----------------------------------------------------------------------------- the command


WORDS = "good great fine nice bad awful poor dull movie plot actor scene".split()


@pytest.fixture
def tiny_recipe(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    rnd = random.Random(0)
    for split, n in (("train", 160), ("validation", 32)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                ws = rnd.choices(WORDS, k=5)
                pos = sum(w in WORDS[:4] for w in ws) > sum(w in WORDS[4:8] for w in ws)
                f.write(json.dumps({"sentence": " ".join(ws) + f" {split}{i}", "label": int(pos)}) + "\n")
    recipe = dict(output_dir=str(tmp_path / "run"), data_dir=str(tmp_path), model={"name": "tiny:bert", "config": {"layers": 2}},
                  teacher={"train": {"max_steps": 6, "learning_rate": 1e-3}},
                  data={"local": "toy", "text_column": "sentence", "max_length": 24, "train_samples": 100},
                  training={"max_steps": 4, "per_device_train_batch_size": 16, "disable_tqdm": True},
                  report={"batch_sizes": [1], "repeats": 1, "warmup": 1, "seq_len": 8})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, recipe


def test_cli_analyze_end_to_end_then_run_with_the_plan(tiny_recipe, tmp_path, capsys):
    from hf_compress.cli import main

    path, recipe = tiny_recipe
    assert main(["analyze", str(path), "--samples", "32", "--axes", "pruning,quantization", "--sparsities", "0.5,0.9",
                 "--bits", "4", "--budget-fraction", "0.5", "--budget-axes", "pruning"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "run" / "sensitivity"
    assert {p.name for p in folder.iterdir()} == {"sensitivity.json", "sensitivity.png", "plan.json", "plan.yaml"}
    table = json.loads((folder / "sensitivity.json").read_text())
    assert table["settings"] == ["prune:0.5", "prune:0.9", "bits:4"] and len(table["layers"]) == 12
    assert table["config"]["heldout_rows"] == 32 and table["config"]["heldout_overlap"] == 0
    plan = json.loads((folder / "plan.json").read_text())["plan"]
    assert plan["cost"] <= plan["budget"] == 0.5 * plan["dense_cost"]
    fragment = yaml.safe_load((folder / "plan.yaml").read_text())
    assert set(fragment) == {"pruning"} and fragment_configs(fragment)["pruning"].layer_sparsity
    assert "plan: parameters" in out and "wrote" in out
    # the plan's section in the recipe: `hf-compress run` trains with it (the recipe accepts layer_sparsity)
    recipe["pruning"] = {**fragment["pruning"], "frequency": 1}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    from hf_compress import load_pretrained

    model = load_pretrained(tmp_path / "run" / "model")
    for pattern, s in fragment["pruning"]["layer_sparsity"].items():
        name = pattern.strip("^$").replace("\\", "")
        w = model.get_submodule(name).weight
        assert float((w == 0).float().mean()) == pytest.approx(s, abs=2e-3), name


def test_cli_analyze_heldout_rows_are_not_training_rows(tiny_recipe):
    from hf_compress.cli.analyze import heldout_slice
    from hf_compress.cli.pipeline import prepare
    from hf_compress.cli.recipes import load_recipe

    path, _ = tiny_recipe
    recipe = load_recipe(path)
    tok, splits = prepare(recipe)
    held, overlap = heldout_slice(recipe, tok, splits, 40)
    train = {tuple(x) for x in splits.train["input_ids"]}
    assert overlap == 0 and len(held) == 40 and not train & {tuple(x) for x in held["input_ids"]}


def test_cli_analyze_bad_flags_exit_2(tiny_recipe, capsys):
    from hf_compress.cli import main

    path, _ = tiny_recipe
    assert main(["analyze", str(path), "--budget-fraction", "1.5"]) == 2
    assert "BudgetConfig.budget_fraction=1.5: use a number in (0, 1]" in capsys.readouterr().err
    assert main(["analyze", str(path), "--budget-metric", "bytes"]) == 2
    assert "need a budget" in capsys.readouterr().err
