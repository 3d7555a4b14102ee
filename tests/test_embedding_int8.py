"""QATConfig.embedding_bits=8: the input word embedding stored as int8 codes + one float32 scale per row.

Codes and scales against an independent per-row computation; forward gathers rows only; QAT (convert at train
end) and PTQ (quantize_model) both convert it; save_pretrained -> load_pretrained / Auto class give the same
logits bit for bit; plain transformers refuses the directory; the loader checks the record before allocating;
disk size of the table ~1/4 of float32; refusals (bits other than 8, tied embeddings) before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import hf_compress  # noqa: F401  (registers the Auto-class loading)
from hf_compress import QATCallback, QATConfig, load_pretrained, quantize_model
from hf_compress.quantization import Int8Embedding, convert
from hf_compress.storage import disk_size_by_part, read_header, weight_files
from helpers import TokenDataset, tiny_bert, tiny_gpt2, tiny_t5

CFG = dict(export="torch-int8", embedding_bits=8)


def _batch(n=6, seed=3):
    d = TokenDataset(n, 12, seed=seed)
    return {"input_ids": d.ids, "attention_mask": d.mask}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 by hand: S = max|row| / 127 (1 for an all-zero row), q = round(w · (1/S)) in [-127, 127]."""
    amax = w.float().abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w.float() * (1.0 / scale)[:, None]), -127, 127).to(torch.int8)
    return q, scale


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = tiny_bert(hidden=64, ffn=128)
    float_table = model.get_input_embeddings().weight.detach().clone()
    quantize_model(model, QATConfig(**CFG))
    d = tmp_path_factory.mktemp("emb") / "int8"
    model.save_pretrained(d)
    return model, float_table, d


def test_codes_and_scales_match_independent_per_row_computation(converted):
    model, w, _ = converted
    emb = model.get_input_embeddings()
    assert isinstance(emb, Int8Embedding) and emb is model.bert.embeddings.word_embeddings
    assert emb.weight.dtype == torch.int8 and tuple(emb.weight.shape) == tuple(w.shape)
    assert emb.weight_scale.dtype == torch.float32 and tuple(emb.weight_scale.shape) == (w.shape[0],)
    q, scale = _reference(w)
    assert torch.equal(emb.weight, q)
    assert torch.equal(emb.weight_scale, scale)
    assert int(emb.weight.abs().max()) == 127
    # the forward gathers codes and scales of the looked-up rows: the same numbers as the dequantised table
    ids = _batch()["input_ids"]
    table = q.float() * scale[:, None]
    assert torch.equal(emb(ids), F.embedding(ids, table))
    assert (emb(ids) - F.embedding(ids, w)).abs().max() <= scale.max() / 2 + 1e-7


def test_record_in_config_json(converted):
    model, w, d = converted
    q = json.loads((d / "config.json").read_text())["hf_compress"]["quantization"]
    e = q["embedding"]
    assert e["name"] == "bert.embeddings.word_embeddings" and e["stored"] == "int8" and e["bits"] == 8
    assert (e["num_embeddings"], e["embedding_dim"]) == tuple(w.shape)
    assert e["weight"]["per_channel"] and e["weight"]["symmetric"] and e["weight"]["bits"] == 8
    assert "bert.embeddings.word_embeddings" not in q["layers"]  # the Linear layers' table is unchanged


def test_reload_exact_load_pretrained_and_auto_class(converted, tmp_path):
    model, _, d = converted
    batch = _batch()
    ref = _logits(model, batch)
    for loaded in (load_pretrained(d), AutoModelForSequenceClassification.from_pretrained(d)):
        assert isinstance(loaded.get_input_embeddings(), Int8Embedding)
        assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
        assert torch.equal(_logits(loaded, batch), ref)
    # saved again from the Auto-loaded model: the same directory content
    again = tmp_path / "again"
    AutoModelForSequenceClassification.from_pretrained(d).save_pretrained(again)
    assert torch.equal(_logits(load_pretrained(again), batch), ref)


def test_disk_size_of_the_table(converted, tmp_path):
    _, w, d = converted
    plain = tiny_bert(hidden=64, ffn=128)
    quantize_model(plain, QATConfig(export="torch-int8"))
    plain.save_pretrained(tmp_path / "plain")
    h, _ = read_header(weight_files(d)[0])
    name = "bert.embeddings.word_embeddings"
    assert h[f"{name}.weight"] == ("I8", tuple(w.shape)) and h[f"{name}.weight_scale"] == ("F32", (w.shape[0],))
    rows, dim = w.shape
    before, after = disk_size_by_part(tmp_path / "plain"), disk_size_by_part(d)
    # the whole difference is in "embeddings": rows·dim·4 bytes become rows·dim + rows·4
    assert before["embeddings"] - after["embeddings"] == rows * dim * 4 - (rows * dim + rows * 4)
    assert before["blocks"] == after["blocks"] and before["other"] == after["other"]
    table_after = rows * dim + rows * 4
    assert table_after / (rows * dim * 4) == pytest.approx(0.25 + 1 / dim)


def test_qat_callback_converts_at_train_end(tmp_path):
    model = tiny_bert(hidden=64, ffn=128)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=2,
                             per_device_train_batch_size=4, disable_tqdm=True, save_strategy="no")
    cb = QATCallback(QATConfig(**CFG))
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(8), callbacks=[cb])
    trainer.train()
    # float during training (weight-only PTQ of the table at convert): trained float values are what is quantised
    emb = model.get_input_embeddings()
    assert isinstance(emb, Int8Embedding)
    assert cb.result["embedding"]["stored"] == "int8"
    trainer.save_model(str(tmp_path / "out"))
    batch = _batch()
    assert torch.equal(_logits(AutoModelForSequenceClassification.from_pretrained(tmp_path / "out"), batch),
                       _logits(model, batch))
    # convert is idempotent: again on the converted model, nothing changes
    codes = emb.weight.clone()
    convert(model, QATConfig(**CFG), plan=cb.plan)
    assert model.get_input_embeddings() is emb and torch.equal(emb.weight, codes)


def test_export_none_keeps_float_values_on_the_grid():
    model = tiny_bert(hidden=64, ffn=128)
    w = model.get_input_embeddings().weight.detach().clone()
    quantize_model(model, QATConfig(embedding_bits=8))
    emb = model.get_input_embeddings()
    assert type(emb) is torch.nn.Embedding
    q, scale = _reference(w)
    assert torch.equal(emb.weight.detach(), q.float() * scale[:, None])
    assert model.config.hf_compress["quantization"]["embedding"]["stored"] == "float"


def test_export_none_again_keeps_a_baked_table_and_requantises_one_trained_since(tmp_path):
    """A second convert leaves the baked table exactly as it is (the per-row grid is a fixed point); a table
    that moved since (trained further, here reloaded and changed) goes back on its grid, as the Linears do."""
    model = tiny_bert(hidden=64, ffn=128)
    quantize_model(model, QATConfig(embedding_bits=8))
    baked = model.get_input_embeddings().weight.detach().clone()
    convert(model, QATConfig(embedding_bits=8))
    quantize_model(model, QATConfig(embedding_bits=8))
    assert torch.equal(model.get_input_embeddings().weight, baked)
    model.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path)
    with torch.no_grad():
        back.get_input_embeddings().weight.add_(0.01 * torch.randn_like(baked))
    moved = back.get_input_embeddings().weight.detach().clone()
    quantize_model(back, QATConfig(embedding_bits=8))
    q, scale = _reference(moved)
    assert torch.equal(back.get_input_embeddings().weight.detach(), q.float() * scale[:, None])


PLAIN = textwrap.dedent("""
    import sys
    from transformers import AutoModelForSequenceClassification
    try:
        AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
        print("RESULT loaded")
    except Exception as e:
        print("RESULT error " + f"{type(e).__name__}: {e}".replace(chr(10), " "))
    assert "hf_compress" not in sys.modules
""")


def test_plain_transformers_refuses(converted):
    _, _, d = converted
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(d)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    assert line[0].startswith("RESULT error"), line[0]
    assert "import hf_compress" in line[0] and "pip install hf_compress" in line[0], line[0]


def test_loader_checks_the_record_before_allocating(converted, tmp_path):
    _, _, d = converted
    import shutil

    for key, value, pattern in [("num_embeddings", 999, r"num_embeddings, embedding_dim\) = \(999"),
                                ("name", "bert.pooler.dense", r"not the nn.Embedding"),
                                ("bits", 4, r"bits=4")]:
        bad = tmp_path / f"bad-{key}"
        shutil.copytree(d, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["hf_compress"]["quantization"]["embedding"][key] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=pattern):
            load_pretrained(bad)
        with pytest.raises(ValueError, match=pattern):
            AutoModelForSequenceClassification.from_pretrained(bad)
    # a float table where the record says int8: refused from the headers
    bad = tmp_path / "bad-float-table"
    plain = tiny_bert(hidden=64, ffn=128)
    quantize_model(plain, QATConfig(export="torch-int8"))
    plain.save_pretrained(bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hf_compress"]["quantization"]["embedding"] = json.loads((d / "config.json").read_text())["hf_compress"]["quantization"]["embedding"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight_scale|int8 embedding"):
        load_pretrained(bad)


def test_bad_bits_refused():
    for bits in (4, 16, True, "8"):
        with pytest.raises(ValueError, match=r"QATConfig.embedding_bits=.*use None .* or 8"):
            QATConfig(export="torch-int8", embedding_bits=bits)


def test_tied_embeddings_refused_before_anything_changes(tmp_path):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"QATConfig.embedding_bits=8: .*tied to the output head.*Leave embedding_bits unset"):
        quantize_model(model, QATConfig(**CFG))
    assert not getattr(model.config, "hf_compress", None) or "quantization" not in model.config.hf_compress
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    # QAT: refused when the Trainer is built, before training
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=2,
                             per_device_train_batch_size=4, disable_tqdm=True, save_strategy="no")
    with pytest.raises(ValueError, match=r"embedding_bits=8: .*tied"):
        Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(8, causal=True),
                callbacks=[QATCallback(QATConfig(**CFG))])


def test_onnx_export_is_exact_or_refused(converted, tmp_path):
    """export_onnx traces Int8Embedding as Gather(int8) · Gather(scale):
    either refused naming embedding_bits, or exported with the int8 table and verified against PyTorch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from hf_compress.onnx import export_onnx

    _, _, d = converted
    try:
        export_onnx(d, tmp_path / "onnx")
    except ValueError as e:
        assert "embedding_bits" in str(e)
        return
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    tables = [t for t in graph.initializer if t.name.endswith("word_embeddings.weight")]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.INT8
    report = json.loads((tmp_path / "onnx" / "onnx_export.json").read_text())
    ref = report["verification"]
    assert ref["max_abs_diff"] <= 1e-4 * (1 + ref["max_abs_reference"])


def test_onnx_writes_a_float_stored_table_as_int8_codes(tmp_path):
    """export=None keeps the table as float values on its per-row grid (e.g. beside int4 weight-only layers);
    export_onnx writes those values as the int8 codes and scales, and ONNX Runtime computes the model's logits.
    A table moved off the grid since is written as its floats, with a warning."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from hf_compress.onnx import export_onnx, ort_session

    model = tiny_bert(hidden=64, ffn=128)
    quantize_model(model, QATConfig(weight_bits=4, group_size=32, embedding_bits=8))
    assert model.config.hf_compress["quantization"]["embedding"]["stored"] == "float"
    d = tmp_path / "int4-emb8"
    model.save_pretrained(d)
    info = export_onnx(d, tmp_path / "onnx", int4="matmulnbits")
    assert info["layers"]["int8_embedding"] == 1 and info["layers"]["int4_matmulnbits"] > 0
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    tables = {t.name: t for t in graph.initializer if "word_embeddings" in t.name}
    codes = [t for t in tables.values() if t.data_type == onnx.TensorProto.INT8]
    assert len(codes) == 1 and list(codes[0].dims) == list(model.get_input_embeddings().weight.shape), tables.keys()
    q, scale = _reference(model.get_input_embeddings().weight.detach())
    assert torch.equal(torch.from_numpy(onnx.numpy_helper.to_array(codes[0]).copy()), q)
    # ONNX Runtime against the reloaded PyTorch model, on a batch of its own
    back = load_pretrained(d).eval()
    batch = _batch(5, seed=11)
    sess = ort_session(tmp_path / "onnx")
    feed = {i.name: batch[i.name].numpy() if i.name in batch else torch.zeros_like(batch["input_ids"]).numpy()
            for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(None, feed)[0])
    ref = _logits(back, batch)
    assert (got - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
    # float export of the same model (no int8 record): the table file is ~4x larger
    plain = tiny_bert(hidden=64, ffn=128)
    quantize_model(plain, QATConfig(weight_bits=4, group_size=32))
    export_onnx(plain, tmp_path / "onnx-float-table", int4="matmulnbits")
    n = model.get_input_embeddings().weight.numel()
    def table_bytes(folder):
        g = onnx.load(str(folder / "model.onnx")).graph
        return sum(len(t.raw_data) for t in g.initializer if "word_embeddings" in t.name)
    assert table_bytes(tmp_path / "onnx") <= n + 4 * model.config.vocab_size
    assert table_bytes(tmp_path / "onnx-float-table") == 4 * n
    # off the grid (trained since): the floats it holds, with a warning naming the fix; int8 codes would not be the model's
    with torch.no_grad():
        back.get_input_embeddings().weight.add_(1e-3)
    with pytest.warns(UserWarning, match=r"no longer on its per-row int8 grid.*quantize_model with embedding_bits=8"):
        info = export_onnx(back, tmp_path / "moved")
    assert info["layers"]["int8_embedding"] == 0 and table_bytes(tmp_path / "moved") == 4 * n
    assert info["verification"]["max_abs_diff"] <= 1e-4 * (1 + info["verification"]["max_abs_reference"])


def test_a_table_shared_under_several_names_is_refused_with_a_backend_and_baked_everywhere_without(tmp_path):
    """T5 uses one table as `shared`, `encoder.embed_tokens` and `decoder.embed_tokens` (tied weights): an
    Int8Embedding in one place would leave the others computing in float (it did, silently, with the record
    saying int8). With a backend it is refused before anything changes; with export=None every name sees the
    grid values, and the reload is exact."""
    model = tiny_t5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"embedding_bits=8 with an export backend: .*several names.*"
                                         r"encoder.embed_tokens.*Use export=None"):
        quantize_model(model, QATConfig(**CFG))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=1, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"several names"):  # QAT: when the Trainer is built
        Trainer(model=tiny_t5(), args=args, train_dataset=TokenDataset(4), callbacks=[QATCallback(QATConfig(**CFG))])
    model = tiny_t5()
    w = model.get_input_embeddings().weight.detach().clone()
    quantize_model(model, QATConfig(embedding_bits=8))
    q, scale = _reference(w)
    for table in (model.transformer.shared, model.transformer.encoder.embed_tokens, model.transformer.decoder.embed_tokens):
        assert torch.equal(table.weight.detach(), q.float() * scale[:, None])
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = 1  # T5 classification reads the last eos
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.save_pretrained(tmp_path / "t5")
    assert torch.equal(_logits(load_pretrained(tmp_path / "t5"), batch), _logits(model, batch))


def test_int8_table_runs_in_16_bits_like_the_layers(converted):
    """model.half() and from_pretrained(dtype=float16) of a torch-int8 model with the int8 table: the embedding
    returns the model's dtype (it returned float32, and the fp16 LayerNorm raised), close to the float32 logits;
    float32 stays bit for bit."""
    model, _, d = converted
    batch = _batch()
    ref = _logits(load_pretrained(d), batch)
    assert torch.equal(ref, _logits(model, batch))
    for half in (AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float16),
                 torch.nn.Module.half(load_pretrained(d))):
        got = _logits(half, batch)
        assert got.dtype == torch.float16 and half.get_input_embeddings().weight_scale.dtype == torch.float16
        torch.testing.assert_close(got.float(), ref, rtol=0, atol=2e-2)
    # saved in 16 bits (F16 scales in the file: the loader accepted only F32), reloaded the same
    d16 = d.parent / f"{d.name}-fp16"
    half.save_pretrained(d16)
    assert torch.equal(_logits(AutoModelForSequenceClassification.from_pretrained(d16, dtype=torch.float16), batch), got)


def test_quantising_a_converted_model_again_says_so(converted):
    """quantize_model on a torch-int8 model (e.g. to add embedding_bits) used to say qat_targets matched no Linear
    and suggest the pooler and the head."""
    _, _, d = converted
    with pytest.raises(ValueError, match=r"already converted \(export='torch-int8'\).*Start from the float model"):
        quantize_model(load_pretrained(d), QATConfig(export="torch-int8", embedding_bits=8))


def test_resize_after_a_float_stored_conversion_saves_and_reloads(tmp_path):
    """export=None keeps the table as floats on its grid; resize_token_embeddings afterwards (a user adding
    tokens) must still save and reload (it used to be refused: the record kept the old row count). The old rows
    stay on the grid, quantize_model again puts the new ones on it and records the new shape. An int8-stored
    table cannot be resized at all (transformers refuses: it is not an nn.Embedding)."""
    model = tiny_bert(hidden=64, ffn=128)
    quantize_model(model, QATConfig(embedding_bits=8))
    n = model.config.vocab_size
    baked = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(n + 8)
    model.save_pretrained(tmp_path / "a")
    batch = _batch()
    batch["input_ids"][:, 1] = n + 3  # a new token
    for back in (load_pretrained(tmp_path / "a"), AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")):
        assert back.get_input_embeddings().weight.shape[0] == n + 8
        torch.testing.assert_close(_logits(back, batch), _logits(model, batch), rtol=0, atol=0)
        assert torch.equal(back.get_input_embeddings().weight[:n], baked)
    # what stays checked for a float table: its width, and a row count that is a positive int
    import shutil

    for key, value, pattern in [("embedding_dim", 32, r"\(128, 32\) but the architecture has \(136, 64\)"),
                                ("num_embeddings", -1, r"\(-1, 64\)"), ("num_embeddings", None, r"\(None, 64\)")]:
        bad = tmp_path / f"bad-{key}-{value}"
        shutil.copytree(tmp_path / "a", bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["hf_compress"]["quantization"]["embedding"][key] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=pattern):
            load_pretrained(bad)
    quantize_model(model, QATConfig(embedding_bits=8))
    assert model.config.hf_compress["quantization"]["embedding"]["num_embeddings"] == n + 8
    q, scale = _reference(model.get_input_embeddings().weight.detach())
    assert torch.equal(model.get_input_embeddings().weight.detach(), q.float() * scale[:, None])
    assert torch.equal(model.get_input_embeddings().weight[:n], baked)
    real = tiny_bert(hidden=64, ffn=128)
    quantize_model(real, QATConfig(export="torch-int8", embedding_bits=8))
    with pytest.raises(TypeError, match="not an instance of"):
        real.resize_token_embeddings(n + 8)
