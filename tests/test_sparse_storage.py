"""Sparse weights stored compressed (issue 14, "Size on disk"): sparse-bitmask storage (hf_compress.storage)
is chosen after a pruning run when it is smaller, recorded in config.hf_compress["storage"]; reload through
load_pretrained and the Auto classes is bit-exact; sizes are measured on the files against a dense save;
stock transformers (a subprocess without the import) refuses the directory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import hf_compress  # noqa: F401  (registers the Auto-class loader)
from hf_compress import PruningConfig, QATConfig, load_pretrained, quantize_model
from hf_compress.integration import MODEL_TYPE
from hf_compress.modules import select_modules
from hf_compress.pruning import convert
from hf_compress.storage import (compress, decompress, disk_size_by_part, read_header, set_storage, stored_sparse,
                                 weight_files)
from helpers import TokenDataset, tiny_bert


def _inputs():
    d = TokenDataset(6, 12, seed=3)
    return {"input_ids": d.ids, "attention_mask": d.mask}


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(**_inputs()).logits


@torch.no_grad()
def _sparsify(model, amount=0.5, nm=None):
    """Zero the smallest weights of every block Linear (per tensor, or n of every m inputs), then convert."""
    for m in select_modules(model).values():
        w = m.weight
        if nm:
            n, g = nm
            groups = w.abs().reshape(w.shape[0], -1, g)
            idx = groups.argsort(-1)[..., :n]
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, idx, False)
            w.mul_(mask.reshape(w.shape))
        else:
            k = int(w.numel() * amount)
            thr = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= thr, 0.0)
    cfg = PruningConfig(granularity=f"{nm[0]}:{nm[1]}" if nm else "unstructured",
                        target_sparsity=0.5 if nm else amount)
    convert(model, cfg)
    return model


def _raw(model):
    """Every parameter and buffer as stored in memory (state_dict would give the compressed parts)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


CASES = {
    "unstructured-float": lambda: _sparsify(tiny_bert(hidden=64, ffn=128)),
    "unstructured-int8": lambda: quantize_model(_sparsify(tiny_bert(hidden=64, ffn=128)), QATConfig(export="torch-int8")),
    "2:4-float": lambda: _sparsify(tiny_bert(hidden=64, ffn=128), nm=(2, 4)),
    "2:4-int8": lambda: quantize_model(_sparsify(tiny_bert(hidden=64, ffn=128), nm=(2, 4)), QATConfig(export="torch-int8")),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, build in CASES.items():
        model = build()
        d = tmp_path_factory.mktemp(name.replace(":", "-"))
        model.save_pretrained(d / "sparse")
        set_storage(model, "dense")
        model.save_pretrained(d / "dense")
        set_storage(model, "auto")
        out[name] = (model, d)
    return out


def test_format_round_trip_is_bit_exact():
    t = torch.randn(5, 13)
    t[t.abs() < 0.7] = 0
    t[0, 0] = -0.0  # what a multiplied mask leaves: stored as a zero
    parts = compress(t)
    assert parts["bitmask"].shape == (5, 2) and parts["bitmask"].dtype == torch.uint8
    assert parts["compressed"].numel() == int((t != 0).sum())
    back = decompress(parts, "t", (5, 13))
    nz = t != 0
    assert torch.equal(back, t) and torch.equal(back[nz].view(torch.int32), t[nz].view(torch.int32))
    with pytest.raises(ValueError, match="marks"):
        decompress({**parts, "compressed": parts["compressed"][:-1]}, "t")
    with pytest.raises(ValueError, match="expects"):
        decompress(parts, "t", (13, 5))


@pytest.mark.parametrize("case", list(CASES))
def test_exact_reload(case, saved):
    model, d = saved[case]
    cfg = json.loads((d / "sparse" / "config.json").read_text())
    assert cfg["model_type"] == MODEL_TYPE
    listed = stored_sparse(model)
    assert cfg["hf_compress"]["storage"]["format"] == "sparse-bitmask" and len(listed) == 4 * 6
    header, _ = read_header(d / "sparse" / "model.safetensors")
    assert all(f"{n}.bitmask" in header and n not in header for n in listed)
    want = _raw(model)
    for got in (load_pretrained(d / "sparse"), AutoModelForSequenceClassification.from_pretrained(d / "sparse")):
        raw = _raw(got)
        assert raw.keys() == want.keys()
        assert all(torch.equal(raw[k], want[k]) and raw[k].dtype == want[k].dtype for k in want), case
        assert torch.equal(_logits(got), _logits(model))
        # re-saved after loading: still sparse, the same bytes of weights
        again = d / f"again-{type(got).__name__}-{id(got)}"
        got.save_pretrained(again)
        assert json.loads((again / "config.json").read_text())["hf_compress"]["storage"]["tensors"] == listed
        assert torch.equal(_logits(load_pretrained(again)), _logits(model))


def _weight_bytes(directory, names):
    header, _ = read_header(weight_files(directory)[0])
    size = {"F32": 4, "I8": 1, "U8": 1, "I64": 8}
    total = 0
    for n in names:
        for k in (n, f"{n}.compressed", f"{n}.bitmask", f"{n}.shape"):
            if k in header:
                total += math.prod(header[k][1]) * size[header[k][0]]
    return total


@pytest.mark.parametrize("case,bound", [("unstructured-int8", 0.5 + 1 / 8), ("2:4-int8", 0.5 + 1 / 8),
                                        ("unstructured-float", 0.5 + 1 / 32), ("2:4-float", 0.5 + 1 / 32)])
def test_size_against_dense_save(case, bound, saved):
    """Measured on the files: the sparse weights take about half the bytes of the dense ones plus 1 bit per
    weight (16 bytes of shape per tensor aside); the directory is smaller; embeddings unchanged."""
    model, d = saved[case]
    names = stored_sparse(model)
    sparse, dense = _weight_bytes(d / "sparse", names), _weight_bytes(d / "dense", names)
    assert sparse / dense <= bound + 16 * len(names) / dense + 1e-9, (sparse, dense)
    assert sparse / dense >= 0.5  # nothing lost: every non-zero is there
    parts_s, parts_d = disk_size_by_part(d / "sparse"), disk_size_by_part(d / "dense")
    assert parts_s["embeddings"] == parts_d["embeddings"] and parts_s["blocks"] < 0.7 * parts_d["blocks"]
    assert parts_s["total"] == sum(v for k, v in parts_s.items() if k != "total")
    assert parts_s["total"] < parts_d["total"] == (d / "dense" / "model.safetensors").stat().st_size
    # the dense save is the stock directory it always was
    assert json.loads((d / "dense" / "config.json").read_text())["model_type"] != MODEL_TYPE or "int8" in case


def test_dense_when_compression_would_not_be_smaller(tmp_path):
    """int8 with 10% zeros: a bitmask (1/8 byte a weight) costs more than it saves, so it stays dense; float32
    with 10% zeros saves 0.4 byte a weight for 1/8: stored sparse. A model without a pruning run never is."""
    model = quantize_model(_sparsify(tiny_bert(hidden=64, ffn=128), amount=0.1), QATConfig(export="torch-int8"))
    assert stored_sparse(model) == []
    float_model = _sparsify(tiny_bert(hidden=64, ffn=128), amount=0.1)
    assert len(stored_sparse(float_model)) == 24
    set_storage(float_model, "dense")  # opting out: a stock directory again
    assert stored_sparse(float_model) == [] and not any(k.endswith(".bitmask") for k in float_model.state_dict())
    float_model.save_pretrained(tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "bert"
    plain = quantize_model(tiny_bert(hidden=64, ffn=128), QATConfig(weight_bits=4))  # zeros on a 4-bit grid
    assert stored_sparse(plain) == []


def test_state_dict_round_trip_for_trainer_resume():
    """Trainer checkpoints and resume go through state_dict / load_state_dict: the hooks keep it exact."""
    model = _sparsify(tiny_bert(hidden=64, ffn=128))
    state = model.state_dict()
    assert any(k.endswith(".weight.bitmask") for k in state)
    fresh = tiny_bert(hidden=64, ffn=128, seed=7)
    _sparsify(fresh)  # same storage record -> same hooks
    fresh.load_state_dict(state)
    assert torch.equal(_logits(fresh), _logits(model))


PLAIN = r"""
import json, sys
from transformers import AutoModelForSequenceClassification
try:
    AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
    print("RESULT" + json.dumps({"loaded": True}))
except Exception as e:
    print("RESULT" + json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def test_stock_transformers_refuses_sparse_directory(saved):
    _, d = saved["unstructured-float"]
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(d / "sparse")], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    r = json.loads(line[0][len("RESULT"):])
    assert "error" in r and "import hf_compress" in r["error"] and "pip install hf_compress" in r["error"], r
