"""The weight-sharing and sensitivity examples (examples/cluster_weights.py, share_layers.py, sensitivity_budget.py)
in --tiny mode, each checked against an independent computation: the safetensors header read by hand, the
budget recomputed from the model's own layer shapes, the zeros / distinct values counted on the weights."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import AutoModelForSequenceClassification

import hf_compress  # noqa: F401  (the Auto classes load compressed directories)
from helpers import data_dir

ROOT = Path(__file__).resolve().parents[1]


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, tmp_path):
    # the data folder explicitly: the examples' own default assumes ../shared beside the checkout
    return _example(name).main(["--tiny", "--output-dir", str(tmp_path), "--data", str(data_dir() / "sst2")])


def _header(path) -> tuple[dict, int]:
    """The safetensors header ({name: {"dtype", "shape", "data_offsets"}}) and the payload's byte count."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return head, Path(path).stat().st_size - 8 - n


def _block_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in n}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_cluster_weights_example(tmp_path):
    out = _run("cluster_weights", tmp_path)
    model, k = out["model"], 2 ** out["bits"]
    linears = _block_linears(model)
    assert len(linears) == 12 and out["layers"] == sorted(linears)  # every Linear of the 2 blocks, nothing else
    head, payload = _header(Path(out["output"]) / "model.safetensors")
    for name, m in linears.items():
        n = m.weight.numel()
        assert f"{name}.weight" not in head
        assert head[f"{name}.weight.codebook"]["dtype"] == "F32" and head[f"{name}.weight.codebook"]["shape"] == [1, k]
        idx = head[f"{name}.weight.indices"]
        assert idx["dtype"] == "U8" and idx["shape"] == [math.ceil(n * out["bits"] / 8)]
    # the payload: the dense float32 tensors, less each clustered weight, plus its codebook and packed indices
    saved = sum(4 * m.weight.numel() - 4 * k - math.ceil(m.weight.numel() * out["bits"] / 8) for m in linears.values())
    assert payload == out["dense_bytes"] - saved
    back = AutoModelForSequenceClassification.from_pretrained(out["output"])
    for name in linears:
        w = back.get_submodule(name).weight
        assert torch.unique(w).numel() <= k and torch.equal(w, model.get_submodule(name).weight)
    ids = torch.randint(1000, 20000, (4, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    assert out["reloaded_accuracy"] == out["accuracy"]


def test_share_layers_example(tmp_path):
    out = _run("share_layers", tmp_path)
    student, teacher, groups = out["model"], out["teacher"], out["groups"]
    assert groups == [[0, 1], [2, 3]]
    L = "bert.encoder.layer"
    head, payload = _header(Path(out["output"]) / "model.safetensors")
    t_head, t_payload = _header(Path(out["teacher_output"]) / "model.safetensors")
    assert sorted({k.split(".")[3] for k in head if k.startswith(L + ".")}) == ["1", "3"]  # each group once, its last block
    per_block = {k[len(f"{L}.1."):] for k in t_head if k.startswith(f"{L}.1.")}
    assert {k[len(f"{L}.3."):] for k in head if k.startswith(f"{L}.3.")} == per_block
    assert set(head) == {k for k in t_head if not k.startswith((f"{L}.0.", f"{L}.2."))}
    block_bytes = sum(p.numel() * p.element_size() for p in teacher.bert.encoder.layer[0].parameters())
    assert t_payload - payload == 2 * block_bytes  # two blocks fewer on disk, nothing else changed
    # in memory: the groups are one tensor each, trained away from the mean of the teacher's blocks
    sb, tb = student.bert.encoder.layer, teacher.bert.encoder.layer
    q0, q1 = sb[0].attention.self.query.weight, sb[1].attention.self.query.weight
    assert q0 is q1
    assert not torch.allclose(q0, (tb[0].attention.self.query.weight + tb[1].attention.self.query.weight) / 2)
    back = AutoModelForSequenceClassification.from_pretrained(out["output"])
    lb = back.bert.encoder.layer
    for g in groups:
        last = dict(lb[g[-1]].named_parameters())
        for i in g[:-1]:
            for n, p in lb[i].named_parameters():
                assert p.data_ptr() == last[n].data_ptr(), (i, n)
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in teacher.parameters()) - \
        2 * sum(p.numel() for p in tb[0].parameters())
    ids = torch.randint(1000, 20000, (4, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(back, ids), _logits(student, ids))
    assert out["reloaded_accuracy"] == out["student_accuracy"]


def test_sensitivity_budget_example(tmp_path):
    out = _run("sensitivity_budget", tmp_path)
    model = out["model"]
    assert not set(out["train_rows"]) & set(out["heldout_rows"])  # analysed on rows never trained on
    linears = _block_linears(model)
    assert [x["name"] for x in out["table"].layers] == list(linears)
    section = yaml.safe_load(Path(out["plan_path"]).read_text())["pruning"]
    planned = {}
    for pattern, s in section["layer_sparsity"].items():
        match = [n for n in linears if re.search(pattern, n)]  # as PruningConfig reads the patterns
        assert len(match) == 1, pattern
        planned[match[0]] = s
    # the budget from the model's own parameter counts
    sizes = {n: m.weight.numel() for n, m in linears.items()}
    budget = out["budget"] * sum(sizes.values())
    kept = {n: sizes[n] - round(planned.get(n, 0.0) * sizes[n]) for n in linears}
    assert sum(kept.values()) <= budget < sum(sizes.values())
    assert planned and all(s in (0.5, 0.8, 0.95) for s in planned.values())
    # the fine-tuning followed the plan: each layer holds exactly its planned number of non-zero weights
    for n, m in linears.items():
        assert int((m.weight != 0).sum()) == kept[n], n
    assert out["nonzero"] == sum(kept.values())
    back = AutoModelForSequenceClassification.from_pretrained(out["output"])
    for n in linears:
        assert torch.equal(back.get_submodule(n).weight, model.get_submodule(n).weight)
    assert out["reloaded_accuracy"] == out["accuracy"]
