"""The real packaged MiniLM on a small SST-2 subset: distillation makes a 3-layer student agree with its teacher."""

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

# Sized to run in about a minute on 2 quiet CPU cores. Measured (shared, busy CPU): teacher 73.7% accuracy;
# agreement with the teacher on 300 validation rows: no KD 0.74, KD 0.85.
TEACHER_STEPS, STUDENT_STEPS, BATCH, MAX_LEN, N_EVAL = 40, 40, 16, 48, 300


def _data(tok):
    from datasets import Dataset

    from helpers import data_dir, read_jsonl

    folder = data_dir() / "sst2"
    if not (folder / "train.jsonl").exists():
        pytest.skip(f"SST-2 data not found in {folder}")
    rows = read_jsonl(folder / "train.jsonl", limit=6000)
    pick = np.random.RandomState(0).permutation(len(rows))
    teacher_rows = [rows[i] for i in pick[: TEACHER_STEPS * BATCH]]
    student_rows = [rows[i] for i in pick[-STUDENT_STEPS * BATCH :]]
    val = read_jsonl(folder / "validation.jsonl", limit=N_EVAL)

    def enc(items):
        ds = Dataset.from_list([{"sentence": r["sentence"], "label": r["label"]} for r in items])
        return ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=MAX_LEN), batched=True, remove_columns=["sentence"])

    return enc(teacher_rows), enc(student_rows), enc(val)


@torch.no_grad()
def _predict(model, ds, collate):
    model.eval()
    preds = []
    cols = ["input_ids", "attention_mask", "token_type_ids"]
    for i in range(0, len(ds), 64):
        chunk = ds[i : i + 64]
        batch = collate([{c: chunk[c][j] for c in cols if c in chunk} for j in range(len(chunk["input_ids"]))])
        preds.append(model(**batch).logits.argmax(-1))
    return torch.cat(preds)


def test_distilled_student_agrees_with_teacher_more_than_undistilled(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_compress import DistillationConfig, DistillationTrainer, student_from_teacher
    from helpers import minilm_path

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    collate = DataCollatorWithPadding(tok)
    teacher_train, student_train, val = _data(tok)

    def args(name, steps, lr):
        return TrainingArguments(
            output_dir=str(tmp_path / name), use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=BATCH,
            learning_rate=lr, warmup_steps=0, logging_steps=20, save_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
        )

    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    Trainer(model=teacher, args=args("teacher", TEACHER_STEPS, 1e-4), train_dataset=teacher_train, data_collator=collate).train()
    t_pred = _predict(teacher, val, collate)
    t_acc = (t_pred == torch.tensor(val["label"])).float().mean().item()
    assert t_acc > 0.65, f"the briefly fine-tuned teacher should beat chance clearly, got {t_acc:.3f}"

    plain = student_from_teacher(teacher, layers=[0, 2, 4])
    distilled = student_from_teacher(teacher, layers=[0, 2, 4])
    Trainer(model=plain, args=args("plain", STUDENT_STEPS, 2e-4), train_dataset=student_train, data_collator=collate).train()
    kd = DistillationTrainer(
        model=distilled, teacher_model=teacher, args=args("kd", STUDENT_STEPS, 2e-4), train_dataset=student_train,
        data_collator=collate, distillation_config=DistillationConfig(temperature=1.0, alpha=1.0),
    )
    kd.train()
    assert any("soft_loss" in h for h in kd.state.log_history)

    agree_plain = (_predict(plain, val, collate) == t_pred).float().mean().item()
    agree_kd = (_predict(distilled, val, collate) == t_pred).float().mean().item()
    print(f"teacher acc {t_acc:.3f}; agreement with teacher: no KD {agree_plain:.3f}, KD {agree_kd:.3f}")
    assert agree_kd > agree_plain + 0.03
