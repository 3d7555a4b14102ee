"""Compressed models leave the library (issue 14): after `import hf_compress` the Auto classes and
`pipeline` return the same model as `load_pretrained`; plain transformers (a subprocess that never imports
hf_compress) refuses every directory whose structure or weight format it cannot rebuild, naming hf_compress;
models stock transformers rebuilds exactly stay stock directories."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertTokenizer,
    Trainer,
    TrainingArguments,
    pipeline,
)

import hf_compress
from hf_compress import PruningCallback, PruningConfig, QATConfig, load_pretrained, quantize_model
from hf_compress.integration import MODEL_TYPE
from hf_compress.pruning import Pruner, remove_pruned, structure
from hf_compress.quantization import get_backend
from helpers import VOCAB, TokenDataset, tiny_bert, tiny_gpt2, tiny_llama


def _inputs(n=6, seed=3):
    d = TokenDataset(n, 12, seed=seed)
    return {"input_ids": d.ids, "attention_mask": d.mask}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _nonuniform(model, *kinds, amount=0.5):
    for kind in kinds:
        Pruner(model, granularity=kind, scope="global").update(amount)
    remove_pruned(model)
    return model


def _bnb(export):
    reason = get_backend(export).unavailable()
    if reason:
        pytest.skip(reason)


# name -> (builder of the compressed live model, Auto class, stock transformers must refuse it)
CASES = {
    "int8": (lambda: quantize_model(tiny_bert(hidden=64, ffn=128), QATConfig(export="torch-int8")),
             AutoModelForSequenceClassification, True),
    # GPT-2's _init_weights reaches attn.c_proj.weight through the block while the layer is parked for loading
    "gpt2-int8": (lambda: quantize_model(tiny_gpt2(), QATConfig(export="torch-int8")), AutoModelForCausalLM, True),
    "int4-in-int8": (lambda: quantize_model(tiny_bert(hidden=64, ffn=128), QATConfig(export="torch-int8", weight_bits=4)),
                     AutoModelForSequenceClassification, True),
    "bnb-int8": (lambda: (_bnb("bnb-int8"), quantize_model(tiny_bert(hidden=64, ffn=128), QATConfig(export="bnb-int8")))[1],
                 AutoModelForSequenceClassification, True),
    "bnb-nf4": (lambda: (_bnb("bnb-nf4"), quantize_model(
        tiny_bert(hidden=64, ffn=128), QATConfig(export="bnb-nf4", weight_bits=4, weight_format="nf4", group_size=64)))[1],
        AutoModelForSequenceClassification, True),
    "bert-heads-neurons": (lambda: _nonuniform(tiny_bert(layers=4), "heads", "neurons"),
                           AutoModelForSequenceClassification, True),
    "llama-heads-neurons": (lambda: _nonuniform(tiny_llama(layers=3, heads=4, kv_heads=2), "heads", "neurons"),
                            AutoModelForCausalLM, True),
    "gpt2-neurons": (lambda: _nonuniform(tiny_gpt2(layers=3), "neurons", amount=0.4), AutoModelForCausalLM, True),
    "bert-heads-uniform": (lambda: (lambda m: (Pruner(m, granularity="heads").update(0.5), remove_pruned(m), m)[2])(tiny_bert()),
                           AutoModelForSequenceClassification, True),  # BERT's config cannot shrink heads
    "bert-heads+int8": (lambda: quantize_model(_nonuniform(tiny_bert(layers=3, hidden=64, ffn=128), "heads", "neurons"),
                                               QATConfig(export="torch-int8")),
                        AutoModelForSequenceClassification, True),
    # stock transformers rebuilds these exactly: they stay plain directories
    "bert-layers": (lambda: _nonuniform(tiny_bert(layers=4), "layers"), AutoModelForSequenceClassification, False),
    "llama-heads-uniform": (lambda: (lambda m: (Pruner(m, granularity="heads").update(0.5), remove_pruned(m), m)[2])(
        tiny_llama(layers=2, heads=4, kv_heads=2)), AutoModelForCausalLM, False),
    "int8-on-grid-float": (lambda: quantize_model(tiny_bert(), QATConfig(weight_bits=8)),  # fake-quantised floats
                           AutoModelForSequenceClassification, False),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{case: (live model, directory)} built once; cases whose backend cannot run here are left out."""
    out = {}
    for name, (build, _, _) in CASES.items():
        try:
            model = build()
        except pytest.skip.Exception:
            continue
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (model, d)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_auto_class_returns_load_pretrained_model(case, exported):
    if case not in exported:
        pytest.skip(f"{case}: backend unavailable here")
    model, d = exported[case]
    auto, refuse = CASES[case][1], CASES[case][2]
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["model_type"] == MODEL_TYPE) is refuse, cfg["model_type"]
    batch = _inputs()
    ref = load_pretrained(d)
    got = auto.from_pretrained(d)
    assert type(got) is type(ref)
    # the same modules (low-bit layers, pruned shapes) and the same logits, bit for bit
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]
    assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert torch.equal(_logits(got, batch), _logits(ref, batch))
    torch.testing.assert_close(_logits(got, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)
    if "pruning" in cfg["hf_compress"] and "heads" in cfg["hf_compress"]["pruning"]:
        assert structure(got) == structure(model)
    # re-saving the loaded model writes a directory that loads the same again
    again_dir = d.parent / f"{d.name}-again"
    got.save_pretrained(again_dir)
    assert json.loads((again_dir / "config.json").read_text())["model_type"] == cfg["model_type"]
    assert torch.equal(_logits(auto.from_pretrained(again_dir), batch), _logits(ref, batch))


def test_base_model_auto_class_loads_head_checkpoint(exported):
    model, d = exported["bert-heads+int8"]
    base = AutoModel.from_pretrained(d)
    ref = load_pretrained(d)
    batch = _inputs()
    with torch.no_grad():
        assert torch.equal(base(**batch).last_hidden_state, ref.bert(**batch).last_hidden_state)


def _tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))


@pytest.mark.parametrize("case", ["int8", "bert-heads+int8", "bnb-nf4"])
def test_pipeline_matches_load_pretrained(case, exported, tmp_path):
    if case not in exported:
        pytest.skip(f"{case}: backend unavailable here")
    _, d = exported[case]
    _tokenizer(tmp_path).save_pretrained(d)
    texts = ["w1 w5 w9 w20", "w3 w3 w70 w2 w11 w40"]
    pipe = pipeline("text-classification", model=str(d), top_k=None)
    ref = load_pretrained(d)
    assert [type(m) for m in pipe.model.modules()] == [type(m) for m in ref.modules()]
    # one text at a time, as the pipeline runs them (int8 kernels quantise each batch's activations)
    probs = [_logits(ref, dict(pipe.tokenizer(t, return_tensors="pt")))[0].softmax(-1) for t in texts]
    out = pipe(texts)
    for row, p in zip(out, probs):
        got = {r["label"]: r["score"] for r in row}
        want = {ref.config.id2label[i]: p[i].item() for i in range(len(p))}
        assert got.keys() == want.keys()
        for k in got:
            assert got[k] == pytest.approx(want[k], abs=1e-6)


PLAIN = textwrap.dedent("""
    import json, sys, torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoModelForCausalLM, pipeline
    out = {}
    for name, path, auto in json.loads(sys.argv[1]):
        cls = {"seq": AutoModelForSequenceClassification, "causal": AutoModelForCausalLM}[auto]
        try:
            m = cls.from_pretrained(path).eval()
            ids = torch.tensor(json.loads(sys.argv[2])); mask = torch.tensor(json.loads(sys.argv[3]))
            with torch.no_grad():
                out[name] = {"logits": m(input_ids=ids, attention_mask=mask).logits.tolist()}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        # the concrete class named in config.json does not check model_type (a warning only)
        arch = json.load(open(path + "/config.json"))["architectures"][0]
        try:
            getattr(transformers, arch).from_pretrained(path)
            out[name]["concrete"] = "loaded"
        except Exception as e:
            out[name]["concrete"] = f"{type(e).__name__}: {e}"
    if len(sys.argv) > 4:
        try:
            pipeline("text-classification", model=sys.argv[4])
            out["pipeline"] = {"loaded": True}
        except Exception as e:
            out["pipeline"] = {"error": f"{type(e).__name__}: {e}"}
    assert "hf_compress" not in sys.modules
    print("RESULT" + json.dumps(out))
""")


def test_plain_transformers_refuses_or_loads_right(exported, tmp_path):
    """A subprocess with transformers only: refused directories fail naming hf_compress; stock ones load
    the same logits as load_pretrained."""
    batch = _inputs()
    jobs = [(n, str(d), "seq" if CASES[n][1] is AutoModelForSequenceClassification else "causal")
            for n, (_, d) in exported.items()]
    _tokenizer(tmp_path).save_pretrained(exported["int8"][1])
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, json.dumps(jobs), json.dumps(batch["input_ids"].tolist()),
         json.dumps(batch["attention_mask"].tolist()), str(exported["int8"][1])],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    result = json.loads(line[0][len("RESULT"):])
    for name, (_, d) in exported.items():
        r = result[name]
        if CASES[name][2]:
            assert "error" in r, f"{name} loaded silently without hf_compress"
            assert "import hf_compress" in r["error"] and "pip install hf_compress" in r["error"], r["error"]
            assert "import hf_compress" in r["concrete"] and "pip install hf_compress" in r["concrete"], (name, r["concrete"])
        else:
            assert "logits" in r, r
            assert torch.equal(torch.tensor(r["logits"]), _logits(load_pretrained(d), batch)), name
    assert "import hf_compress" in result["pipeline"]["error"]


def test_unstructured_sparsity_is_stored_sparse_or_as_a_stock_directory(tmp_path):
    """By default the zeros are stored sparse (smaller; needs hf_compress to load, so stock transformers refuses);
    set_storage(model, "dense") keeps a stock directory that plain transformers loads."""
    from hf_compress.storage import set_storage

    model = tiny_bert()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=4,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True)
    cb = PruningCallback(PruningConfig(granularity="unstructured", target_sparsity=0.5, pruning_end_step=2, frequency=1))
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(32), callbacks=[cb])
    trainer.train()
    trainer.save_model(str(tmp_path / "sparse"))
    cfg = json.loads((tmp_path / "sparse" / "config.json").read_text())
    assert cfg["model_type"] == MODEL_TYPE and cfg["hf_compress"]["storage"]["format"] == "sparse-bitmask"
    sparse = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sparse")
    set_storage(trainer.model, "dense")
    trainer.save_model(str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and "quantization_config" not in cfg
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > (tmp_path / "sparse" / "model.safetensors").stat().st_size
    assert "stock transformers loads" in (tmp_path / "out" / "README.md").read_text().lower()
    got = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert type(got.config).__name__ == "BertConfig"
    batch = _inputs()
    assert torch.equal(_logits(got, batch), _logits(load_pretrained(tmp_path / "out"), batch))
    assert torch.equal(_logits(got, batch), _logits(sparse, batch))


def test_trainer_save_model_checkpoints_and_resume(tmp_path):
    """A compressed (non-uniform, int8-free) model fine-tuned further: trainer.save_model and every Trainer
    checkpoint are refusing directories the Auto class loads like load_pretrained; resume still works (the
    Trainer loads checkpoint weights into the live model, no Auto class)."""
    def compressed():
        return _nonuniform(tiny_bert(layers=3), "heads", "neurons")

    def args(steps, out):
        return TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=steps, save_steps=2,
                                 save_strategy="steps", per_device_train_batch_size=8, disable_tqdm=True,
                                 learning_rate=1e-3, seed=0)

    model = compressed()
    trainer = Trainer(model=model, args=args(4, tmp_path / "run"), train_dataset=TokenDataset(32))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    batch = _inputs()
    for d in (tmp_path / "final", tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"):
        assert json.loads((d / "config.json").read_text())["model_type"] == MODEL_TYPE, d
        assert "import hf_compress" in (d / "README.md").read_text()
        assert torch.equal(_logits(AutoModelForSequenceClassification.from_pretrained(d), batch),
                           _logits(load_pretrained(d), batch)), d
    torch.testing.assert_close(_logits(load_pretrained(tmp_path / "final"), batch), _logits(model, batch))
    # resume from checkpoint-2 into a fresh compressed model: the same weights as the uninterrupted run
    resumed = Trainer(model=compressed(), args=args(4, tmp_path / "run2"), train_dataset=TokenDataset(32))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    torch.testing.assert_close(_logits(resumed.model, batch), _logits(model, batch))


def test_model_card_says_how_to_load_and_what_was_compressed(exported):
    _, d = exported["bert-heads+int8"]
    card = (d / "README.md").read_text()
    assert "import hf_compress" in card and "AutoModelForSequenceClassification.from_pretrained" in card
    assert "torch-int8" in card and "Heads per layer" in card
    report = {"rows": [{"name": "compressed", "metrics": {"accuracy": 0.91}, "retention": 0.98, "params": 100000,
                        "disk_mb": 0.25, "latency_ms": {"b1": 1.5}}]}  # the shape of compression_report rows
    (d / "report.json").write_text(json.dumps(report))
    load_pretrained(d).save_pretrained(d)  # hf_compress's own card is rewritten, with the report's numbers
    card = (d / "README.md").read_text()
    assert "| model | accuracy | retention | parameters | disk MB | latency b1 (ms) |" in card
    assert "| compressed | 0.9100 | 98.0% | 100,000 | 0.25 | 1.50 |" in card
    (d / "README.md").write_text("my own card")
    load_pretrained(d).save_pretrained(d)  # a card the user wrote is kept
    assert (d / "README.md").read_text() == "my own card"


def test_registration_happens_on_import():
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert MODEL_TYPE in CONFIG_MAPPING and "hf_compress" in AUTO_QUANTIZER_MAPPING
    assert hf_compress.write_model_card is not None and AutoConfig is not None


def test_deepcopy_and_pickle_of_a_compressed_model_keep_the_attention_implementation():
    """A copy of a recorded model (copy.deepcopy, pickle: student_from_teacher, a teacher copy) keeps every config
    attribute, the private _attn_implementation included; before, it came back None."""
    import copy
    import pickle

    from hf_compress.quantization.config import QATConfig
    from hf_compress.quantization.ptq import quantize_model

    model = quantize_model(tiny_bert(layers=2), QATConfig(weight_bits=8, export="torch-int8"))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.config) is type(model.config)
        assert clone.config._attn_implementation == model.config._attn_implementation is not None
        assert clone.config.to_dict() == model.config.to_dict()
        batch = _inputs()
        assert torch.equal(_logits(clone, batch), _logits(model, batch))


def test_the_trainer_accepts_float_compressed_models_loaded_through_the_auto_class(exported, tmp_path):
    """transformers' Trainer refuses a quantizer-loaded model unless the quantizer says it can train: a float
    compressed model (pruned shapes) evaluates and fine-tunes like any model; int8 codes stay refused."""
    from transformers import Trainer

    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], max_steps=1,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True)
    model = AutoModelForSequenceClassification.from_pretrained(exported["bert-heads-neurons"][1])
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(16), eval_dataset=TokenDataset(16))
    assert "eval_loss" in trainer.evaluate()
    before = model.classifier.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.classifier.weight)
    int8 = AutoModelForSequenceClassification.from_pretrained(exported["int8"][1])
    with pytest.raises(ValueError, match="quantized"):
        Trainer(model=int8, args=args, train_dataset=TokenDataset(16))


def test_concrete_class_after_the_import_is_told_what_to_do_and_loads_with_autoconfig(exported):
    """The concrete class re-reads config.json with the stock config class, which refuses the saved field even
    after `import hf_compress` (no public hook reaches it): it says to use the Auto classes, and with
    config=AutoConfig.from_pretrained(dir) it loads the same model as load_pretrained."""
    import transformers
    from transformers import AutoConfig

    _, d = exported["bert-heads+int8"]
    cls = getattr(transformers, json.loads((d / "config.json").read_text())["architectures"][0])
    with pytest.raises(Exception, match=r"AutoModelFor\.\.\.from_pretrained.*config=AutoConfig\.from_pretrained"):
        cls.from_pretrained(d)
    model = cls.from_pretrained(d, config=AutoConfig.from_pretrained(d))
    batch = _inputs()
    assert torch.equal(_logits(model, batch), _logits(load_pretrained(d), batch))
