"""DistillationTrainer at the borders of training (issue 13): gradient accumulation over uneven micro-batches,
the user's teacher left as given, students that cannot train, multi-label heads.

Every gradient test compares the weights after one SGD step (lr 1, no clipping, no weight decay) with an
independent computation: the stock `transformers.Trainer`, or one full-batch loss written out here.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_compress import DistillationConfig, DistillationTrainer
from helpers import tiny_bert, tiny_llama

LR = 1.0


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, per_device_train_batch_size=1,
        gradient_accumulation_steps=3, optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1,
    )
    base.update(kw)
    return TrainingArguments(**base)


class _Rows(torch.utils.data.Dataset):
    """Causal-LM rows of one length whose counted (label ≠ −100) tokens differ a lot: 1, 6 and 3 after the shift."""

    def __init__(self, counted=(1, 6, 3), length=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for n in counted:
            ids = torch.randint(3, 128, (length,), generator=g)
            labels = torch.full((length,), -100)
            labels[length - n:] = ids[length - n:]  # a prompt, then n answer tokens (all after position 0)
            self.rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def batch(self):
        return {k: torch.stack([r[k] for r in self.rows]) for k in self.rows[0]}


def _step(trainer):
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _sgd_expected(model, loss):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss.backward()
    return {n: before[n] - LR * p.grad if p.grad is not None else before[n] for n, p in model.named_parameters()}


def _assert_close(got, want, atol=1e-5):
    bad = [n for n in want if not torch.allclose(got[n], want[n], atol=atol, rtol=1e-4)]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}: max |Δ| {max((got[n] - want[n]).abs().max().item() for n in bad):.3g}"


# ---- 1. gradient accumulation ---------------------------------------------------------------------


def test_ga_alpha_zero_causal_lm_equals_stock_trainer(tmp_path):
    student, teacher = tiny_llama(layers=1, seed=2), tiny_llama(layers=2, seed=1)
    data = _Rows()
    ours = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=_args(tmp_path / "a"),
                               train_dataset=data, distillation_config=DistillationConfig(alpha=0.0))
    stock = Trainer(model=copy.deepcopy(student), args=_args(tmp_path / "b"), train_dataset=data)
    assert stock.model_accepts_loss_kwargs  # the stock Trainer normalises by the accumulated token count
    want = _step(stock)
    # and the stock Trainer is right: one full-batch token mean
    ref = copy.deepcopy(student)
    _assert_close(want, _sgd_expected(ref, ref(**data.batch()).loss))
    _assert_close(_step(ours), want)
    # the logged loss is the step's token mean too
    ref_loss = copy.deepcopy(student)(**data.batch()).loss.item()
    assert ours.state.log_history[0]["loss"] == pytest.approx(ref_loss, rel=1e-4)
    assert ours.state.log_history[0]["hard_loss"] == pytest.approx(ref_loss, rel=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_ga_pure_kd_causal_lm_equals_full_batch_token_mean(tmp_path, kind):
    T = 2.0
    student, teacher = tiny_llama(layers=1, seed=2), tiny_llama(layers=2, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)  # a confident teacher: the KD term is far from zero
    data = _Rows()
    tr = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=_args(tmp_path), train_dataset=data,
                             distillation_config=DistillationConfig(alpha=1.0, temperature=T, kd_loss=kind, beta=0.3))
    got = _step(tr)

    ref, b = copy.deepcopy(student), data.batch()
    s = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    keep = b["labels"][:, 1:] != -100
    p, q = F.softmax(t[:, :-1][keep] / T, -1), F.softmax(s[:, :-1][keep] / T, -1)
    if kind == "forward_kl":
        div = (p * (p.log() - q.log())).sum(-1)
    else:
        m = 0.3 * p + 0.7 * q
        div = 0.3 * (p * (p.log() - m.log())).sum(-1) + 0.7 * (q * (q.log() - m.log())).sum(-1)
    _assert_close(got, _sgd_expected(ref, T**2 * div.mean()))


def test_ga_classification_uneven_last_micro_batch_equals_full_batch_mean(tmp_path):
    """8 rows, micro-batches of 3, 3 and 2: every row weighs 1/8 (the per-micro-batch mean gave the last two 1/6)."""
    T, alpha = 2.0, 0.5
    student, teacher = tiny_bert(layers=2, seed=2), tiny_bert(layers=4, seed=1)
    with torch.no_grad():
        teacher.classifier.weight.mul_(30.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (8, 10), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": ids[i, 0] % 2} for i in range(8)]
    tr = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=rows,
                             args=_args(tmp_path, per_device_train_batch_size=3),
                             distillation_config=DistillationConfig(alpha=alpha, temperature=T))
    got = _step(tr)

    ref = copy.deepcopy(student)
    b = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    out = ref(**b)
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    kl = F.kl_div(F.log_softmax(out.logits / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1)
    _assert_close(got, _sgd_expected(ref, (1 - alpha) * out.loss + alpha * T**2 * kl.mean()))


# ---- 2. the teacher as the user left it; a student that cannot train -------------------------------


def test_teacher_flags_and_mode_left_as_given(tmp_path):
    teacher, student = tiny_bert(layers=4, seed=1), tiny_bert(layers=2, seed=2)
    teacher.bert.embeddings.requires_grad_(False)  # the user's own choice, kept as is
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []
    teacher.register_forward_hook(lambda m, i, o: modes.append(m.training))
    tr = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=_cls_rows(16),
                             args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=1, per_device_train_batch_size=4))
    tr.train()
    assert modes and not any(modes)  # it ran in eval mode ...
    assert all(p.grad is None for p in teacher.parameters())  # ... without gradients ...
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # ... unchanged
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == flags  # flags as the user set them
    assert teacher.training  # and its mode back


def test_deepcopy_of_used_teacher_trains_as_student(tmp_path):
    """teacher=model, then student=copy.deepcopy(model): the copy must not come out frozen."""
    model = tiny_bert(layers=2, seed=1)
    DistillationTrainer(model=tiny_bert(layers=1, seed=2), teacher_model=model, train_dataset=_cls_rows(8),
                        args=_args(tmp_path / "a", gradient_accumulation_steps=1, per_device_train_batch_size=4)).train()
    student = copy.deepcopy(model)
    w = student.classifier.weight.detach().clone()
    DistillationTrainer(model=student, teacher_model=model, train_dataset=_cls_rows(8),
                        args=_args(tmp_path / "b", gradient_accumulation_steps=1, per_device_train_batch_size=4)).train()
    assert not torch.equal(w, student.classifier.weight)


def test_frozen_student_refused_before_training(tmp_path):
    student = tiny_bert(layers=1, seed=2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameter.*requires_grad_\(True\)"):
        DistillationTrainer(model=student, teacher_model=tiny_bert(layers=2, seed=1), train_dataset=_cls_rows(8),
                            args=_args(tmp_path))


def test_self_distillation_from_the_student_object_refused(tmp_path):
    """teacher_model=model (or a teacher sharing tensors with it): the targets would chase the student."""
    student = tiny_bert(layers=1, seed=2)
    with pytest.raises(ValueError, match=r"teacher_model\[0\] is the student itself.*copy.deepcopy"):
        DistillationTrainer(model=student, teacher_model=student, train_dataset=_cls_rows(8), args=_args(tmp_path))
    teacher = tiny_bert(layers=1, seed=1)
    teacher.bert.embeddings = student.bert.embeddings  # e.g. a teacher built around the student's embeddings
    with pytest.raises(ValueError, match=r"shares \d+ parameter tensor\(s\) with the student"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=_cls_rows(8), args=_args(tmp_path))
    # a copy is fine
    DistillationTrainer(model=student, teacher_model=copy.deepcopy(student), train_dataset=_cls_rows(8), args=_args(tmp_path))


# ---- 3. multi-label heads --------------------------------------------------------------------------


def test_multi_label_student_refused(tmp_path):
    student = tiny_bert(num_labels=3, layers=1, seed=2)
    student.config.problem_type = "multi_label_classification"
    with pytest.raises(ValueError, match=r"multi_label_classification.*softmax"):
        DistillationTrainer(model=student, teacher_model=tiny_bert(num_labels=3, seed=1), train_dataset=_cls_rows(8),
                            args=_args(tmp_path))


def test_multi_hot_float_labels_refused(tmp_path):
    """problem_type unset: BERT would infer multi-label from float label vectors at the first forward."""
    rows = [{**r, "labels": torch.tensor([1.0, 0.0, 1.0])} for r in _cls_rows(8)]
    with pytest.raises(ValueError, match=r"multi_label_classification"):
        DistillationTrainer(model=tiny_bert(num_labels=3, layers=1, seed=2), teacher_model=tiny_bert(num_labels=3, seed=1),
                            train_dataset=rows, args=_args(tmp_path))


def _cls_rows(n, length=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (n, length), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids[i, 0] % 2}
            for i in range(n)]


# ---- 5. the FSDP2 teacher sharder ------------------------------------------------------------------


def test_fsdp2_sharder_is_accelerates_own_with_the_signature_used():
    """The teacher is sharded by the function Accelerator.prepare shards the student with (GPU-only path:
    here only its presence and signature are checked)."""
    import inspect

    import accelerate.accelerator
    from hf_compress.distillation.teacher import fsdp2_sharder

    shard = fsdp2_sharder()
    assert shard is accelerate.accelerator.fsdp2_prepare_model
    assert list(inspect.signature(shard).parameters) == ["accelerator", "model"]


def test_fsdp2_sharder_with_another_signature_is_refused(monkeypatch):
    import accelerate.utils
    from hf_compress.distillation.teacher import fsdp2_sharder

    monkeypatch.setattr(accelerate.utils, "fsdp2_prepare_model", lambda model, plugin: model)
    with pytest.raises(ValueError, match=r"fsdp2_prepare_model no longer takes \(accelerator, model\).*pin accelerate"):
        fsdp2_sharder()
