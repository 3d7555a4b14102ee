"""The compression report: counts, sizes, latency, metrics and the written files."""

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hf_compress import compression_report
from hf_compress.metrics import collator_for
from hf_compress.metrics import classification_metrics, evaluate_model, f1
from hf_compress.cli.report import render_report, write_report
from hf_compress.report import disk_size_mb, measure_latency, parameter_stats
from helpers import TokenDataset, tiny_bert, tiny_gpt2, tiny_llama


def _linear_weights(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def test_parameter_stats_match_an_independent_count():
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight[:, :10] = 0
    st = parameter_stats(model)
    assert st["params"] == sum(p.numel() for p in model.parameters())
    assert st["nonzero_params"] == sum(int((p != 0).sum()) for p in model.parameters())
    assert st["matmul_params"] == _linear_weights(model)
    assert st["matmul_params"] - st["matmul_nonzero"] == 10 * model.config.intermediate_size
    emb = model.bert.embeddings
    assert st["embedding_params"] == sum(e.weight.numel() for e in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings))


def test_tied_head_counted_once_but_is_a_matmul():
    model = tiny_gpt2()  # lm_head shares the token embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    st = parameter_stats(model)
    assert st["params"] == sum(p.numel() for p in model.parameters())  # named_parameters dedups ties
    conv = sum(m.weight.numel() for n, m in model.named_modules() if type(m).__name__ == "Conv1D")
    assert st["matmul_params"] == conv + model.lm_head.weight.numel()


@pytest.mark.parametrize("kind", ["int8", "nf4", "torch-ao", "hf-int8"])
def test_low_bit_weights_count_by_logical_size(kind):
    model = tiny_bert()
    dense = parameter_stats(model)
    q = copy.deepcopy(model)
    if kind in ("int8", "nf4"):
        from hf_compress.distillation.teacher import to_low_bit

        to_low_bit(q, kind)
    elif kind == "torch-ao":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(q, {nn.Linear}, torch.qint8)
    else:
        from hf_compress.quantization.config import QATConfig
        from hf_compress.quantization.ptq import quantize_model

        q = quantize_model(q, QATConfig(weight_bits=8, export="torch-int8"))
    st = parameter_stats(q)
    assert st["params"] == dense["params"]
    assert st["matmul_params"] == dense["matmul_params"]
    # quantisation rounds some small weights to zero, never creates non-zeros
    assert 0 < st["matmul_nonzero"] <= dense["matmul_nonzero"]


def test_disk_size_is_the_size_of_the_saved_files(tmp_path):
    small, big = tiny_bert(layers=1), tiny_bert(layers=4)
    s, b = disk_size_mb(small), disk_size_mb(big)
    big.save_pretrained(tmp_path)
    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir()) / 1e6
    assert b == pytest.approx(on_disk, rel=0.02)
    assert 0 < s < b


def test_disk_size_by_part_counts_the_bytes_of_each_part():
    """Embeddings vs transformer blocks vs the rest, against the parameters' own byte counts (float32: 4 bytes);
    int8 blocks are ~4x smaller, the embeddings unchanged; the report's blocks ratio says so."""
    from hf_compress.quantization.config import QATConfig
    from hf_compress.quantization.ptq import quantize_model
    from hf_compress.report import disk_sizes_mb

    model = tiny_bert(layers=2)
    sd = model.state_dict()
    want = {"embeddings": sum(v.numel() * 4 for k, v in sd.items() if ".embeddings." in k) / 1e6,
            "blocks": sum(v.numel() * 4 for k, v in sd.items() if ".encoder.layer." in k) / 1e6}
    want["other"] = sum(v.numel() * 4 for v in sd.values()) / 1e6 - want["embeddings"] - want["blocks"]
    got = disk_sizes_mb(model)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-9), k
    assert got["total"] > sum(want.values())
    q = quantize_model(copy.deepcopy(model), QATConfig(weight_bits=8, export="torch-int8"))
    gq = disk_sizes_mb(q)
    assert gq["embeddings"] == pytest.approx(got["embeddings"])
    assert 3.0 < got["blocks"] / gq["blocks"] < 4.0  # int8 codes + per-channel scales, biases and norms in float
    rows = compression_report({"fp32": model, "int8": q}, latency=False)
    assert rows[1]["disk_mb_by_part"]["blocks"] == pytest.approx(gq["blocks"])
    assert rows[1]["blocks_size_ratio"] == pytest.approx(got["blocks"] / gq["blocks"])


def test_latency_keys_and_interleaving():
    models = {"a": tiny_bert(layers=1), "b": tiny_bert(layers=4)}
    lat = measure_latency(models, batch_sizes=(1, 4), seq_len=16, repeats=3, warmup=1)
    assert set(lat) == {"a", "b"}
    for row in lat.values():
        assert set(row) == {"b1", "b4"} and all(v > 0 and math.isfinite(v) for v in row.values())


def test_f1_and_compute_metrics_against_hand_counts():
    preds = np.array([1, 1, 0, 0, 1, 2])
    labels = np.array([1, 0, 0, 1, 1, 2])
    # binary view (classes 0/1 only)
    assert f1(preds[:5], labels[:5], 2) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # macro over 3 classes: class0 tp1 fp1 fn1 -> .5; class1 tp2 fp1 fn1 -> 2/3; class2 -> 1
    assert f1(preds, labels, 3) == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    from transformers import EvalPrediction

    logits = np.eye(3)[preds]
    out = classification_metrics(EvalPrediction(predictions=logits, label_ids=labels), num_labels=3)
    assert out["accuracy"] == pytest.approx(4 / 6)


def test_evaluate_model_matches_direct_computation():
    model = tiny_bert(num_labels=3).eval()
    ds = TokenDataset(40, num_labels=3)
    got = evaluate_model(model, ds, "sequence-classification", batch_size=16)
    with torch.no_grad():
        logits = model(input_ids=ds.ids, attention_mask=ds.mask).logits
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == ds.labels).float().mean().item())

    lm = tiny_llama().eval()
    cds = TokenDataset(8, causal=True)
    got = evaluate_model(lm, cds, "causal-lm", batch_size=8)  # one batch: the model's own mean loss
    with torch.no_grad():
        items = [cds[i] for i in range(8)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        loss = lm(**batch).loss.item()
    assert got["loss"] == pytest.approx(loss, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_compression_report_rows_ratios_and_files(tmp_path):
    teacher, student = tiny_bert(layers=4), tiny_bert(layers=1)
    ds = TokenDataset(32)
    rows = compression_report(
        {"teacher": teacher, "student": student}, dataset=ds, collator=collator_for("sequence-classification"),
        batch_sizes=[1, 4], repeats=2, warmup=1, seq_len=16, settings={"student": {"layers": [0]}},
    )
    t, s = rows
    assert [t["name"], s["name"]] == ["teacher", "student"]
    for r in rows:
        assert 0 <= r["metrics"]["accuracy"] <= 1 and 0 <= r["metrics"]["f1"] <= 1
        assert r["disk_mb"] > 0 and r["latency_ms"]["b1"] > 0
        assert r["flops_per_token"] == 2 * r["matmul_params"]
    assert s["params"] < t["params"]
    assert s["retention"] == pytest.approx(s["metrics"]["accuracy"] / t["metrics"]["accuracy"])
    assert s["size_ratio"] == pytest.approx(t["disk_mb"] / s["disk_mb"])
    assert s["speedup"]["b4"] == pytest.approx(t["latency_ms"]["b4"] / s["latency_ms"]["b4"])
    assert s["settings"] == {"layers": [0]}

    paths = write_report(tmp_path, rows, title="unit", meta={"command": "pytest"})
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["rows"][1]["name"] == "student" and payload["command"] == "pytest"
    md = (tmp_path / "report.md").read_text()
    assert "| teacher |" in md and "| student |" in md and '"layers": [0]' in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (tmp_path / "report.md").unlink()
    (tmp_path / "report.png").unlink()
    render_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == md  # re-rendered from report.json alone
    assert (tmp_path / "report.png").exists()


def test_single_model_eval_fn_and_causal_retention():
    lm = tiny_llama()
    rows = compression_report(lm, eval_fn=lambda m: {"perplexity": 10.0}, latency=False, disk_size=False)
    assert len(rows) == 1 and rows[0]["task"] == "causal-lm" and rows[0]["latency_ms"] == {}
    rows = compression_report(
        {"t": lm, "s": tiny_llama(layers=1)}, metrics={"t": {"perplexity": 10.0}, "s": {"perplexity": 12.5}},
        latency=False, disk_size=False,
    )
    assert rows[1]["retention"] == pytest.approx(10.0 / 12.5)  # lower perplexity is better


def test_bad_report_settings():
    with pytest.raises(ValueError, match="batch_sizes"):
        compression_report(tiny_bert(), batch_sizes=[0], latency=False)
    with pytest.raises(TypeError):
        compression_report(tiny_bert(), not_a_setting=1)
    with pytest.raises(FileNotFoundError, match="report.json"):
        render_report("/nonexistent/run")
