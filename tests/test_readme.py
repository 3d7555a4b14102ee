"""The README's snippets run (issue 14): "your own model and data" (Python and recipe) and "load and serve
the result". Offline here, so each snippet gets a few explicit substitutions — the Hub model id becomes the
packaged MiniLM, the Hub data set the shared SST-2 files (a small slice), and the run is capped at a few
steps — each asserted to apply, so an edited snippet cannot silently escape the test."""

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from helpers import data_dir

ROOT = Path(__file__).resolve().parents[1]


def snippet(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- readme-test: {re.escape(name)} -->\s*```\w+\n(.*?)```", text, re.S)
    assert m, f"README.md has no snippet marked `<!-- readme-test: {name} -->`"
    return m.group(1)


def substitute(code: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        assert old in code, f"the README snippet no longer contains {old!r}: update tests/test_readme.py"
        code = code.replace(old, new)
    return code


def _minilm() -> str:
    from hf_compress.cli.models import minilm_path

    return str(minilm_path())


def _sst2_slice(n_train=64, n_eval=32):
    from datasets import load_dataset

    sst2 = data_dir() / "sst2"
    data = load_dataset("json", data_files={"train": str(sst2 / "train.jsonl"), "validation": str(sst2 / "validation.jsonl")})
    return data.__class__({"train": data["train"].select(range(n_train)), "validation": data["validation"].select(range(n_eval))})


@pytest.mark.integration
def test_own_model_python_then_serve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = substitute(snippet("own-model"), [
        ('"sentence-transformers/all-MiniLM-L6-v2"', repr(_minilm())),
        ('load_dataset("glue", "sst2")', "_sst2_slice()"),
        ('TrainingArguments("out", ', 'TrainingArguments("out", max_steps=4, use_cpu=True, report_to=[], disable_tqdm=True, '),
    ])
    ns = {"_sst2_slice": _sst2_slice}
    exec(compile(code, "README.md:own-model", "exec"), ns)
    assert (tmp_path / "out" / "model" / "config.json").exists()
    assert any(type(m).__name__ == "Int8Linear" for m in ns["trainer"].model.modules())
    assert "import hf_compress" in (tmp_path / "out" / "model" / "README.md").read_text()

    printed = []
    serve = snippet("serve")
    ns = {"print": printed.append}
    exec(compile(serve, "README.md:serve", "exec"), ns)
    assert type(ns["model"]).__name__ == "BertForSequenceClassification"
    assert any(type(m).__name__ == "Int8Linear" for m in ns["model"].modules())
    (out,) = printed
    assert isinstance(out, list) and set(out[0]) == {"label", "score"}

    # the ONNX Runtime snippet on the same export: its logits agree with the PyTorch int8 model's
    ns = {}
    exec(compile(snippet("onnx"), "README.md:onnx", "exec"), ns)
    import torch
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained("out/model")(["a gripping, beautifully shot film"], return_tensors="pt")
    with torch.no_grad():
        want = ns["hf_compress"].load_pretrained("out/model")(**batch).logits.numpy()
    assert ns["logits"].shape == want.shape
    # dynamic int8 activations: a one-code rounding difference may move a tensor's scale (docs/onnx.md)
    assert abs(ns["logits"] - want).max() < 0.05 * (1 + abs(want).max())


@pytest.mark.integration
def test_own_model_recipe(tmp_path, monkeypatch):
    from hf_compress.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = substitute(snippet("own-recipe"), [
        ("name: sentence-transformers/all-MiniLM-L6-v2", "name: packaged:minilm"),
        ("hub: glue/sst2", f"local: sst2"),
    ])
    (tmp_path / "my_recipe.yaml").write_text(recipe)
    caps = [f"data_dir={data_dir()}", "teacher.train.max_steps=2", "training.max_steps=4", "data.train_samples=64",
            "data.eval_samples=32", "report.latency=false", "quantization.qat_start_step=1"]
    assert main(["run", "my_recipe.yaml", *caps, "--dry-run"]) == 0
    assert main(["run", "my_recipe.yaml", *caps]) == 0
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows][0] == "teacher" and "int8" in rows[-1]["name"]
