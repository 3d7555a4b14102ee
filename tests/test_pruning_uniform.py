"""`PruningConfig(uniform=True)` (issue 14): heads / FFN neurons pruned to the same count in every layer, so
the export is a plain architecture whose stock config.json loads with transformers alone. BERT-family and
GPT-2 configs cannot express fewer heads (no head_dim field), so uniform heads are refused there; uniform
FFN neurons work for all three families, uniform (key/value) heads for Llama-style decoders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_compress import PruningCallback, PruningConfig, load_pretrained
from hf_compress.integration import MODEL_TYPE
from hf_compress.pruning import convert, prepare, structure
from helpers import TokenDataset, tiny_bert, tiny_gpt2, tiny_llama


def _batch(n=6, seed=3):
    d = TokenDataset(n, 12, seed=seed)
    return {"input_ids": d.ids, "attention_mask": d.mask}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _prune(model, *configs):
    """One-shot pruning to each config's target from the magnitudes, then convert (what the callback does)."""
    for c in configs:
        prepare(model, c).update(c.target_sparsity)
        convert(model, c)
    return model


def _uniform(granularity, s=0.5, **kw):
    return PruningConfig(granularity=granularity, target_sparsity=s, method="magnitude", uniform=True, **kw)


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("granularity, words", [
    ("unstructured", "changes no shapes"), ("2:4", "changes no shapes"), ("layers", "num_hidden_layers"),
])
def test_uniform_only_for_heads_and_neurons(granularity, words):
    with pytest.raises(ValueError, match="uniform=True applies to granularity 'heads' or 'neurons'") as e:
        PruningConfig(granularity=granularity, uniform=True)
    assert words in str(e.value)


def test_uniform_must_be_a_bool():
    with pytest.raises(ValueError, match="uniform='yes' must be True or False"):
        PruningConfig(granularity="heads", uniform="yes")


def test_uniform_field_is_exposed_with_help():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(PruningConfig).parse_args_into_dataclasses(
        ["--granularity", "neurons", "--uniform", "true"])
    assert cfg.uniform is True and cfg.to_dict()["uniform"] is True
    field = PruningConfig.__dataclass_fields__["uniform"]
    assert field.default is False and "stock" in field.metadata["help"]


@pytest.mark.parametrize("build, kind, words", [
    (tiny_bert, "heads", "no head_dim field"),
    (tiny_gpt2, "heads", "no head_dim field"),
])
def test_uniform_heads_refused_where_the_config_cannot_express_them(build, kind, words):
    with pytest.raises(ValueError, match=words) as e:
        prepare(build(), _uniform(kind))
    assert "uniform=False" in str(e.value)


def test_uniform_llama_heads_the_config_class_rejects_are_refused():
    """LlamaConfig checks hidden_size % num_attention_heads even with head_dim pinned: 3 of 4 key/value heads
    (x2 query heads = 6) cannot be written for hidden 32; the message lists the counts that can."""
    with pytest.raises(ValueError, match=r"6 is not .* accepts: \[1, 2, 4\] of 4"):
        prepare(tiny_llama(heads=8, kv_heads=4), _uniform("heads", s=0.25))
    prepare(tiny_llama(heads=8, kv_heads=4), _uniform("heads", s=0.5))  # 2 of 4: fine


def test_uniform_needs_every_layer_and_equal_counts():
    with pytest.raises(ValueError, match=r"leave layers \[0\] untouched"):
        prepare(tiny_bert(), _uniform("neurons", pruning_exclude=[r"layer\.0\."]))
    nonuniform = tiny_bert()
    _skew(nonuniform, "bert")  # one global ranking then strips the first layers first
    _prune(nonuniform, PruningConfig(granularity="neurons", target_sparsity=0.5))
    assert len(set(structure(nonuniform)["ffn"])) > 1
    with pytest.raises(ValueError, match="same number of FFN neurons"):
        prepare(nonuniform, _uniform("neurons"))


def test_uniform_heads_with_too_high_a_target_is_refused():
    with pytest.raises(ValueError, match="every layer keeps at least one"):
        prepare(tiny_llama(), _uniform("heads", s=0.9))


# ----------------------------------------------------------------------------- what is kept


def _skew(model, fam):
    """Scale layer i's weights by 4**i, so one global ranking would strip the first layers first."""
    blocks = {"bert": lambda m: m.bert.encoder.layer, "llama": lambda m: m.model.layers, "gpt2": lambda m: m.transformer.h}[fam](model)
    with torch.no_grad():
        for i, b in enumerate(blocks):
            for p in b.parameters():
                if p.dim() == 2:
                    p.mul_(4.0 ** i)
    return blocks


def _scores(b, fam, kind):
    """Magnitude score of every unit of block `b`, computed here from the weights (independently of hf_compress)."""
    if fam == "bert":  # neurons: rows of intermediate.dense, columns of output.dense
        return b.intermediate.dense.weight.abs().sum(1) + b.output.dense.weight.abs().sum(0)
    if fam == "gpt2":  # Conv1D weights are (in, out): columns of c_fc, rows of c_proj
        return b.mlp.c_fc.weight.abs().sum(0) + b.mlp.c_proj.weight.abs().sum(1)
    a, mlp = b.self_attn, b.mlp
    if kind == "neurons":
        return mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1) + mlp.down_proj.weight.abs().sum(0)
    d, kv = a.head_dim, a.k_proj.out_features // a.head_dim
    q_rows = a.q_proj.weight.abs().sum(1).view(kv, -1).sum(1)  # the query heads grouped with each key/value head
    o_cols = a.o_proj.weight.abs().sum(0).view(kv, -1).sum(1)
    return q_rows + o_cols + a.k_proj.weight.abs().sum(1).view(kv, d).sum(1) + a.v_proj.weight.abs().sum(1).view(kv, d).sum(1)


def _kept_slice(b, fam, kind, keep):
    """The weights the kept units must have after removal, sliced from the original block."""
    idx = torch.tensor(keep)
    if fam == "bert":
        return b.intermediate.dense.weight[idx]
    if fam == "gpt2":
        return b.mlp.c_fc.weight[:, idx]
    if kind == "neurons":
        return b.mlp.up_proj.weight[idx]
    d = b.self_attn.head_dim
    return b.self_attn.k_proj.weight.view(-1, d, b.self_attn.k_proj.in_features)[idx].reshape(-1, b.self_attn.k_proj.in_features)


def _now_slice(b, fam, kind):
    if fam == "bert":
        return b.intermediate.dense.weight
    if fam == "gpt2":
        return b.mlp.c_fc.weight
    return b.mlp.up_proj.weight if kind == "neurons" else b.self_attn.k_proj.weight


@pytest.mark.parametrize("fam, kind, build", [
    ("bert", "neurons", lambda: tiny_bert(layers=3)),
    ("gpt2", "neurons", lambda: tiny_gpt2(layers=3)),
    ("llama", "neurons", lambda: tiny_llama(layers=3)),
    ("llama", "heads", lambda: tiny_llama(layers=3, heads=8, kv_heads=4)),
])
def test_same_count_per_layer_and_the_top_scoring_units_kept(fam, kind, build):
    s = 0.5
    # one global ranking on the same skewed weights would prune unevenly: the option is what makes it uniform
    glob = build()
    _skew(glob, fam)
    _prune(glob, PruningConfig(granularity=kind, target_sparsity=s, method="magnitude", scope="global"))
    assert len(set(structure(glob)["heads" if kind == "heads" else "ffn"])) > 1

    model = build()
    blocks = _skew(model, fam)
    want = []
    for b in blocks:
        sc = _scores(b, fam, kind)
        n = sc.numel()
        top = sorted(torch.topk(sc, n - round(s * n)).indices.tolist())
        want.append((top, _kept_slice(b, fam, kind, top).detach().clone()))
    _prune(model, _uniform(kind, s))
    counts = structure(model)["heads" if kind == "heads" else "ffn"]
    assert len(set(counts)) == 1 and counts[0] == len(want[0][0]), counts
    for b, (top, weights) in zip(blocks, want):
        assert torch.equal(_now_slice(b, fam, kind), weights)
    run = model.config.hf_compress["pruning"]["runs"][-1]
    assert run["uniform"] is True


# ----------------------------------------------------------------------------- stock transformers reloads it


PLAIN = textwrap.dedent("""
    import json, sys, torch
    sys.modules["hf_compress"] = None  # as if it were not installed: any import of it fails
    from transformers import AutoModelForSequenceClassification, AutoModelForCausalLM
    out = {}
    ids = torch.tensor(json.loads(sys.argv[2])); mask = torch.tensor(json.loads(sys.argv[3]))
    for name, path, auto in json.loads(sys.argv[1]):
        cls = {"seq": AutoModelForSequenceClassification, "causal": AutoModelForCausalLM}[auto]
        try:
            m = cls.from_pretrained(path).eval()
            with torch.no_grad():
                out[name] = {"logits": m(input_ids=ids, attention_mask=mask).logits.tolist(),
                             "class": type(m).__name__}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    print("RESULT" + json.dumps(out))
""")

STOCK = {  # name -> (builder of the pruned model, Auto class, stock model_type)
    "bert neurons": (lambda: _prune(tiny_bert(), _uniform("neurons", 0.5)), "seq", "bert"),
    "bert neurons + layers": (lambda: _prune(tiny_bert(), _uniform("neurons", 0.25),
                                             PruningConfig(granularity="layers", target_sparsity=0.25)), "seq", "bert"),
    "llama heads + neurons": (lambda: _prune(tiny_llama(layers=3, heads=8, kv_heads=4), _uniform("heads", 0.5),
                                             _uniform("neurons", 0.75)), "causal", "llama"),
    "gpt2 neurons": (lambda: _prune(tiny_gpt2(), _uniform("neurons", 0.5)), "causal", "gpt2"),
}


def test_stock_transformers_loads_uniform_exports_without_hf_compress(tmp_path):
    batch = _batch()
    jobs, live = [], {}
    for name, (build, auto, model_type) in STOCK.items():
        model = build()
        d = tmp_path / name.replace(" ", "_").replace("+", "")
        model.save_pretrained(d)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == model_type and "quantization_config" not in cfg, (name, cfg["model_type"])
        live[name] = (d, _logits(model, batch))
        jobs.append((name, str(d), auto))
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, json.dumps(jobs), json.dumps(batch["input_ids"].tolist()),
         json.dumps(batch["attention_mask"].tolist())],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    result = json.loads(line[0][len("RESULT"):])
    for name, (d, logits) in live.items():
        r = result[name]
        assert "logits" in r, (name, r)
        got = torch.tensor(r["logits"])
        assert torch.equal(got, _logits(load_pretrained(d), batch)), name
        torch.testing.assert_close(got, logits)


# ----------------------------------------------------------------------------- through the Trainer


def _args(tmp_path, steps=6):
    return TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=steps,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True,
                             learning_rate=1e-3, seed=0)


def test_uniform_through_pruning_callback(tmp_path):
    """Taylor scores, a gradual schedule: every mask update keeps the layers equal; the saved model is a
    stock Llama directory the Auto class loads like load_pretrained; the same run non-uniform is not."""
    def run(uniform, out):
        cbs = [PruningCallback(PruningConfig(granularity=g, target_sparsity=0.5, method="taylor", uniform=uniform,
                                             pruning_end_step=4, frequency=1))
               for g in ("heads", "neurons")]
        trainer = Trainer(model=tiny_llama(layers=3, heads=8, kv_heads=4), args=_args(tmp_path / out),
                          train_dataset=TokenDataset(32, causal=True), callbacks=cbs)
        seen = []

        class Watch(TrainerCallback):  # the kept units per layer after each step
            def on_step_end(self, args, state, control, **kw):
                seen.append([[int(u.sum()) for u in c.pruner.units] for c in cbs])

        trainer.add_callback(Watch())
        trainer.train()
        trainer.save_model(str(tmp_path / out / "model"))
        return trainer.model, tmp_path / out / "model", seen

    model, d, seen = run(True, "uniform")
    for step in seen:
        for per_layer in step:
            assert len(set(per_layer)) == 1, seen
    assert structure(model) == {"heads": [2, 2, 2], "ffn": [32, 32, 32]}
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2 and cfg["intermediate_size"] == 32
    assert [r["uniform"] for r in cfg["hf_compress"]["pruning"]["runs"]] == [True, True]
    batch = _batch()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(d), batch), _logits(load_pretrained(d), batch))

    _, d2, _ = run(False, "global")
    if len(set(structure(load_pretrained(d2))["heads"])) > 1 or len(set(structure(load_pretrained(d2))["ffn"])) > 1:
        assert json.loads((d2 / "config.json").read_text())["model_type"] == MODEL_TYPE


def test_uniform_bert_heads_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match="no head_dim field"):
        Trainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=TokenDataset(16),
                callbacks=[PruningCallback(PruningConfig(granularity="heads", uniform=True))])


def test_uniform_bert_neurons_through_the_trainer(tmp_path):
    cb = PruningCallback(PruningConfig(granularity="neurons", target_sparsity=0.5, uniform=True, pruning_end_step=3,
                                       frequency=1))
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, 4), train_dataset=TokenDataset(32), callbacks=[cb])
    trainer.train()
    trainer.save_model(str(tmp_path / "model"))
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["intermediate_size"] == 32
    assert structure(trainer.model)["ffn"] == [32] * 4
    batch = _batch()
    assert torch.equal(_logits(AutoModelForSequenceClassification.from_pretrained(tmp_path / "model"), batch),
                       _logits(load_pretrained(tmp_path / "model"), batch))
