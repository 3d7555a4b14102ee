"""QAT on the real packaged MiniLM with real SST-2 rows: train a few steps, export int8, reload."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_compress import QATCallback, QATConfig, load_pretrained, quantize_model  # noqa: E402
from helpers import data_dir, minilm_path, read_jsonl  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm():
    try:
        path = minilm_path()
    except ImportError as e:
        pytest.skip(str(e))
    rows_path = data_dir() / "sst2" / "train.jsonl"
    if not rows_path.exists():
        pytest.skip(f"SST-2 data not found at {rows_path}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    rows = read_jsonl(rows_path, limit=32)
    enc = tok([r["sentence"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": torch.tensor(r["label"])}
            for i, r in enumerate(rows)]
    return path, data


def _model(path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def test_minilm_qat_int8_export_reload(minilm, tmp_path):
    from transformers import Trainer, TrainingArguments

    path, data = minilm
    model = _model(path)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=8,
                             logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=2e-5)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[QATCallback(QATConfig(export="torch-int8"))])
    trainer.train()
    assert trainer.state.log_history[0]["qat/fake_quant_fraction"] == pytest.approx(36 / 38, abs=1e-6)
    assert type(model.bert.encoder.layer[0].intermediate.dense).__name__ == "Int8Linear"
    trainer.save_model(str(tmp_path / "final"))
    back = load_pretrained(tmp_path / "final")
    batch = {k: torch.stack([d[k] for d in data[:8]]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, model(**batch).logits)
    # int8 file vs the float model: 36 Linear layers of 22.7M parameters store 1 byte instead of 4
    float_dir = tmp_path / "float"
    _model(path).save_pretrained(float_dir)
    ratio = (float_dir / "model.safetensors").stat().st_size / (tmp_path / "final" / "model.safetensors").stat().st_size
    assert ratio > 1.5


def test_minilm_int8_kernels_match_dynamic_fake_quant_layer_by_layer(minilm):
    """Each Int8Linear (int8 CPU kernel) computes what the fake-quantised layer (observer='dynamic') computes
    on the same input. End to end the two drift further apart: one rounding flip in a wide activation
    range moves a value by a whole step, and the next layers carry it on."""
    path, data = minilm
    batch = {k: torch.stack([d[k] for d in data[:16]]) for k in ("input_ids", "attention_mask")}
    fake = quantize_model(_model(path), QATConfig(activation_bits=8, observer="dynamic")).eval()
    real = quantize_model(_model(path), QATConfig(export="torch-int8")).eval()
    seen = {}
    for name in fake.config.hf_compress["quantization"]["layers"]:
        fake.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, (a[0], o)))
    with torch.no_grad():
        fake(**batch)
        worst = max(((real.get_submodule(n)(x) - o).norm() / o.norm()).item() for n, (x, o) in seen.items())
    assert len(seen) == 36 and worst < 2e-3
