"""DistillationTrainer on tiny models: the loss against the formula, teachers, projections, cache, logs, resume."""

import os

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_compress import DistillationConfig, DistillationTrainer, cache_teacher_logits
from hf_compress.distillation.cache import COLUMNS
from helpers import TokenDataset, tiny_bert, tiny_gpt2, tiny_llama


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=3, per_device_train_batch_size=8,
        logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _sharp(model, scale=30.0):
    """Random tiny models predict near-uniformly; scale the head so the KD term is far from zero."""
    head = model.get_output_embeddings() if model.get_output_embeddings() is not None else model.classifier
    with torch.no_grad():
        head.weight.mul_(scale)
    return model


def _batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def _kl(s, t, T):
    """Independent spelling: KL(softmax(t/T) ‖ softmax(s/T)) summed over classes, per row."""
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1)


def _hf_dataset(n=32, length=10, causal=False, seed=0, num_labels=2):
    ds = TokenDataset(n, length, num_labels=num_labels, causal=causal, seed=seed)
    rows = []
    for i in range(n):
        item = ds[i]
        keep = int(item["attention_mask"].sum())  # unpadded rows, as a tokenizer would give them
        row = {"input_ids": item["input_ids"][:keep].tolist(), "attention_mask": [1] * keep}
        row["labels"] = item["labels"][:keep].tolist() if causal else int(item["labels"])
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def _pad_collator(features):
    from hf_compress.distillation.cache import _pad_collate

    batch = _pad_collate(0)([{k: v for k, v in f.items() if k != "labels"} for f in features])
    labels = [torch.as_tensor(f["labels"]) for f in features]
    if labels[0].dim() == 0:
        batch["labels"] = torch.stack(labels)
    else:
        width = batch["input_ids"].shape[1]
        batch["labels"] = torch.stack([F.pad(l, (0, width - len(l)), value=-100) for l in labels])
    return batch


# ---- the loss equals the formula -----------------------------------------------------------------


@pytest.mark.parametrize("alpha,T", [(0.5, 2.0), (0.3, 4.0), (1.0, 1.0)])
def test_classification_loss_matches_formula(tmp_path, alpha, T):
    teacher, student = _sharp(tiny_bert(layers=4, seed=1)), _sharp(tiny_bert(layers=2, seed=2), 5.0)
    tr = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=TokenDataset(32),
        distillation_config=DistillationConfig(temperature=T, alpha=alpha),
    )
    batch = _batch(tr)
    student.train()
    loss = tr.compute_loss(student, batch)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = (1 - alpha) * F.cross_entropy(s, batch["labels"]) + alpha * T**2 * _kl(s, t, T).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    # without labels: the T²·KL term alone
    nolab = {k: v for k, v in batch.items() if k != "labels"}
    assert tr.compute_loss(student, nolab).item() == pytest.approx((T**2 * _kl(s, t, T).mean()).item(), rel=1e-4)


def test_alpha_zero_is_plain_fine_tuning(tmp_path):
    teacher, student = tiny_bert(layers=4, seed=1), tiny_bert(layers=2, seed=2)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    tr = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=TokenDataset(32),
        distillation_config=DistillationConfig(alpha=0.0),
    )
    plain = Trainer(model=student, args=_args(tmp_path), train_dataset=TokenDataset(32))
    batch = _batch(tr)
    student.train()
    assert tr.compute_loss(student, batch).item() == pytest.approx(plain.compute_loss(student, batch).item(), rel=1e-6)
    assert not calls  # alpha=0 with labels never needs the teacher


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_causal_lm_loss_matches_formula_with_padding_and_ignored_labels(tmp_path, make, kind):
    teacher, student = _sharp(make(layers=2, seed=1), 10.0), make(layers=1, seed=2)
    T, alpha, beta = 2.0, 0.4, 0.3
    tr = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=TokenDataset(32, causal=True),
        distillation_config=DistillationConfig(temperature=T, alpha=alpha, kd_loss=kind, beta=beta),
    )
    batch = _batch(tr)
    batch["labels"][:, 2] = -100  # a prompt-like position that must not count
    assert (batch["attention_mask"] == 0).any()  # padding present
    student.train()
    loss = tr.compute_loss(student, batch)
    with torch.no_grad():
        out = student(**batch)
        s = out.logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # independent: flatten the positions that count after the shift, then average
    keep = batch["labels"][:, 1:] != -100
    s_k, t_k = s[:, :-1][keep] / T, t[:, :-1][keep] / T
    p, q = F.softmax(t_k, -1), F.softmax(s_k, -1)
    if kind == "forward_kl":
        div = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        div = (q * (q.log() - p.log())).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        div = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    want = (1 - alpha) * out.loss + alpha * T**2 * div.mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


# ---- teachers --------------------------------------------------------------------------------


def test_teacher_frozen_unchanged_and_not_saved(tmp_path):
    teacher, student = tiny_bert(layers=4, seed=1), tiny_bert(layers=2, seed=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()
    tr = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4),
        train_dataset=TokenDataset(32),
    )
    s_before = student.classifier.weight.detach().clone()
    tr.train()
    assert teacher.training  # the mode the user left it in (it ran in eval mode, see test_distillation_borders)
    assert all(p.requires_grad and p.grad is None for p in teacher.parameters())  # flags untouched, no gradients
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(s_before, student.classifier.weight)  # the student did train
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "checkpoint-4", "model.safetensors"))
    assert set(saved) == set(student.state_dict())  # the checkpoint holds the student only
    assert not any(teacher is m for m in tr.model.modules())


def test_several_teachers_average_probabilities(tmp_path):
    t1, t2, student = _sharp(tiny_bert(layers=2, seed=1)), _sharp(tiny_bert(layers=3, seed=3)), tiny_bert(layers=2, seed=2)
    T = 2.0
    tr = DistillationTrainer(
        model=student, teacher_model=[t1, t2], args=_args(tmp_path), train_dataset=TokenDataset(32),
        distillation_config=DistillationConfig(temperature=T, alpha=1.0, teacher_weights=[1.0, 3.0]),
    )
    batch = _batch(tr)
    student.train()
    loss = tr.compute_loss(student, batch)
    with torch.no_grad():
        x = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        s, l1, l2 = student(**x).logits, t1(**x).logits, t2(**x).logits
    p = 0.25 * F.softmax(l1 / T, -1) + 0.75 * F.softmax(l2 / T, -1)
    want = T**2 * F.kl_div(F.log_softmax(s / T, -1), p, reduction="batchmean")
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    tr.train()  # and it trains


# ---- intermediate matching and projections -----------------------------------------------------------


def test_projections_are_trained_in_optimizer_and_not_exported(tmp_path):
    teacher, student = tiny_bert(layers=4, hidden=32, seed=1), tiny_bert(layers=2, hidden=16, ffn=32, seed=2)
    tr = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path, max_steps=4), train_dataset=TokenDataset(32),
        distillation_config=DistillationConfig(hidden_loss_weight=1.0, attention_loss_weight=1.0),
    )
    assert tr.layer_map == {0: 1, 1: 3}
    assert set(tr.projections) == {"0", "1"} and tr.projections["0"].weight.shape == (32, 16)
    before = {k: v.clone() for k, v in tr.projections.state_dict().items()}
    tr.train()
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in tr.projections.parameters())
    assert all(not torch.equal(before[k], v) for k, v in tr.projections.state_dict().items())
    assert all(p.grad is None for p in tr.projections.parameters())  # cleared after each step
    tr.save_model(str(tmp_path / "export"))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(exported) == set(student.state_dict())
    assert not any("projection" in k for k in exported)


def test_hidden_and_attention_parts_match_formula(tmp_path):
    teacher, student = _sharp(tiny_bert(layers=4, seed=1)), tiny_bert(layers=2, seed=2)
    cfg = DistillationConfig(alpha=0.5, hidden_loss_weight=2.0, attention_loss_weight=3.0, layer_map={0: 0, 1: 2})
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=TokenDataset(32), distillation_config=cfg)
    assert not tr.projections  # equal widths: no projection
    batch = _batch(tr)
    student.train()
    loss = tr.compute_loss(student, batch)
    x = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        so, to = student(**x), teacher(**x)
    keep = batch["attention_mask"].bool()
    hidden = sum(((so.hidden_states[s + 1] - to.hidden_states[t + 1]) ** 2).mean(-1)[keep].mean() for s, t in {0: 0, 1: 2}.items()) / 2
    attn = sum(((so.attentions[s] - to.attentions[t]) ** 2).sum(-1).permute(0, 2, 1)[keep].mean() for s, t in {0: 0, 1: 2}.items()) / 2
    T = 2.0
    want = 0.5 * F.cross_entropy(so.logits, batch["labels"]) + 0.5 * T**2 * _kl(so.logits, to.logits, T).mean() + 2.0 * hidden + 3.0 * attn
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_log_has_each_loss_part(tmp_path):
    teacher, student = tiny_bert(layers=4, seed=1), tiny_bert(layers=2, hidden=16, seed=2)
    cfg = DistillationConfig(alpha=0.3, hidden_loss_weight=0.5, attention_loss_weight=2.0)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=TokenDataset(32), distillation_config=cfg)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        for part in ("hard_loss", "soft_loss", "hidden_loss", "attention_loss"):
            assert part in h and h[part] >= 0
        total = 0.7 * h["hard_loss"] + 0.3 * h["soft_loss"] + 0.5 * h["hidden_loss"] + 2.0 * h["attention_loss"]
        assert h["loss"] == pytest.approx(total, rel=1e-4)


# ---- checkpoints and resume ----------------------------------------------------------------------


class _StopAt(TrainerCallback):
    """Simulates a run killed right after the checkpoint at `step`."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _resume_trainer(tmp_path, cfg, callbacks=None):
    teacher, student = tiny_bert(layers=4, hidden=32, seed=1), tiny_bert(layers=2, hidden=16, ffn=32, seed=2)
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=TokenDataset(48), distillation_config=cfg,
        callbacks=callbacks,
    )


def test_projections_saved_in_checkpoints_and_restored_exactly(tmp_path):
    cfg = DistillationConfig(hidden_loss_weight=1.0)
    full = _resume_trainer(tmp_path / "a", cfg)
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-2" / "hf_compress"
    assert (ckpt / "distillation.safetensors").exists() and (ckpt / "distillation.json").exists()

    # killed after the checkpoint at step 2, then resumed: the same end state, bit for bit
    part = _resume_trainer(tmp_path / "b", cfg, callbacks=[_StopAt(2)])
    part.train()
    assert part.state.global_step == 2
    resumed = _resume_trainer(tmp_path / "b", cfg)
    with torch.no_grad():
        resumed.projections["0"].weight.zero_()  # must be overwritten from the checkpoint
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for k, v in full.projections.state_dict().items():
        assert torch.equal(v, resumed.projections.state_dict()[k]), k
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k

    # resuming with another distillation config is refused
    other = _resume_trainer(tmp_path / "b", DistillationConfig(hidden_loss_weight=1.0, temperature=3.0))
    with pytest.raises(ValueError, match="different distillation config"):
        other.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))


# ---- cached teacher logits -------------------------------------------------------------------------


def test_cached_logits_equal_online_loss_classification(tmp_path):
    teacher, student = _sharp(tiny_bert(layers=4, seed=1)), tiny_bert(layers=2, seed=2)
    data = _hf_dataset(32).add_column("sentence", ["text"] * 32)  # an unused string column, as after tokenising
    cached = cache_teacher_logits(teacher, data, k=5, batch_size=8)  # k clipped to 2 classes: exact
    assert len(cached[0]["teacher_topk_values"]) == 2
    cfg = DistillationConfig(temperature=2.0, alpha=0.5)
    args = _args(tmp_path, max_steps=2)
    online = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, data_collator=_pad_collator, distillation_config=cfg)
    offline = DistillationTrainer(model=student, args=args, train_dataset=cached, data_collator=_pad_collator, distillation_config=cfg)
    assert args.remove_unused_columns  # the user's arguments are left as they were
    b_on, b_off = _batch(online), _batch(offline)
    assert set(COLUMNS) <= set(b_off) and "sentence" not in b_off
    assert torch.equal(b_on["input_ids"], b_off["input_ids"])
    student.train()
    assert offline.compute_loss(student, b_off).item() == pytest.approx(online.compute_loss(student, b_on).item(), rel=1e-4)
    offline.train()
    metrics = offline.evaluate(cached)  # evaluation ignores the cache columns
    assert metrics["eval_loss"] > 0


def test_cached_logits_causal_lm_exact_with_full_vocab_and_teacher_never_runs(tmp_path):
    teacher, student = _sharp(tiny_llama(layers=2, seed=1), 10.0), tiny_llama(layers=1, seed=2)
    data = _hf_dataset(24, causal=True)
    cfg = DistillationConfig(temperature=2.0, alpha=0.5)
    args = _args(tmp_path, max_steps=2)
    full = cache_teacher_logits(teacher, data, k=128, batch_size=8)
    online = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, data_collator=_pad_collator, distillation_config=cfg)
    b_on = _batch(online)
    student.train()
    want = online.compute_loss(student, b_on).item()
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    offline = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=full, data_collator=_pad_collator, distillation_config=cfg)
    b_off = _batch(offline)
    assert b_off["teacher_topk_values"].shape[:2] == b_off["input_ids"].shape
    assert offline.compute_loss(student, b_off).item() == pytest.approx(want, rel=1e-4)
    # truncated to the top 32 of 128 tokens: close when the teacher leaves little mass outside its top 32
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6.0)
    want = online.compute_loss(student, b_on).item()
    top = cache_teacher_logits(teacher, data, k=32, batch_size=8)
    truncated = DistillationTrainer(model=student, args=args, train_dataset=top, data_collator=_pad_collator, distillation_config=cfg)
    got = truncated.compute_loss(student, _batch(truncated)).item()
    assert got != pytest.approx(want, rel=1e-6) and got == pytest.approx(want, rel=0.02)
    calls.clear()
    offline.train()
    assert not calls


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(beta=2.0), "beta"),
        (dict(kd_loss="kl"), "kd_loss"),
        (dict(hidden_loss="l1"), "hidden_loss"),
        (dict(hidden_loss_weight=-1.0), "hidden_loss_weight"),
        (dict(attention_loss_weight=float("nan")), "attention_loss_weight"),
        (dict(layer_map="{0: 1"), "layer_map"),
        (dict(layer_map={"a": 1}), "layer_map"),
        (dict(layer_map={0: -1}), "layer_map"),
        (dict(teacher_weights=[0.0, 0.0]), "teacher_weights"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(**kwargs)


def test_config_parses_json_layer_map_and_round_trips():
    cfg = DistillationConfig(layer_map='{"0": 1, "1": 3}')
    assert cfg.layer_map == {0: 1, 1: 3}
    assert cfg.to_dict()["layer_map"] == {"0": 1, "1": 3}
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(["--alpha", "0.7", "--layer_map", '{"0": 2}'])
    assert parsed.alpha == 0.7 and parsed.layer_map == {0: 2}


def _resized(model, vocab):
    model.resize_token_embeddings(vocab)
    return model


def _make(tmp_path, student, teacher, **cfg):
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=TokenDataset(16),
        distillation_config=DistillationConfig(**cfg),
    )


@pytest.mark.parametrize(
    "student,teacher,cfg,match",
    [
        (lambda: tiny_bert(), lambda: None, {}, "teacher_model is None"),
        (lambda: tiny_bert(num_labels=2), lambda: tiny_bert(num_labels=3), {}, "num_labels"),
        (lambda: tiny_llama(), lambda: _resized(tiny_llama(), 100), {}, "vocab_size"),
        (lambda: tiny_bert(), lambda: _resized(tiny_bert(), 100), {}, "vocab_size"),
        (lambda: tiny_bert(num_labels=1), lambda: tiny_bert(num_labels=1), {}, "num_labels"),
        (lambda: tiny_bert(layers=2), lambda: tiny_bert(layers=4), dict(hidden_loss_weight=1.0, layer_map={2: 0}), "layer_map"),
        (lambda: tiny_bert(layers=2), lambda: tiny_bert(layers=4), dict(hidden_loss_weight=1.0, layer_map={0: 4}), "layer_map"),
        (lambda: tiny_bert(heads=2), lambda: tiny_bert(heads=4), dict(attention_loss_weight=1.0), "head"),
        (lambda: tiny_bert(hidden=16), lambda: tiny_bert(hidden=32), dict(hidden_loss_weight=1.0, hidden_projection=False), "hidden_projection"),
        (lambda: tiny_bert(), lambda: [tiny_bert(), tiny_bert()], dict(teacher_weights=[1.0]), "teacher_weights"),
        (lambda: tiny_bert(), lambda: [tiny_bert(), tiny_bert()], dict(hidden_loss_weight=1.0), "single teacher"),
        (lambda: tiny_bert(), lambda: torch.nn.Linear(2, 2), {}, "teacher_model"),
    ],
)
def test_trainer_rejects_mismatches_before_training(tmp_path, student, teacher, cfg, match):
    with pytest.raises(ValueError, match=match):
        _make(tmp_path, student(), teacher(), **cfg)


def test_cache_mismatches_rejected(tmp_path):
    teacher3 = tiny_bert(num_labels=3, seed=1)
    data = _hf_dataset(16, num_labels=2)
    cached3 = cache_teacher_logits(teacher3, data, k=3)
    with pytest.raises(ValueError, match="num_labels"):
        DistillationTrainer(model=tiny_bert(num_labels=2), args=_args(tmp_path), train_dataset=cached3, data_collator=_pad_collator)
    with pytest.raises(ValueError, match="teacher_topk_indices"):
        DistillationTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=cached3.remove_columns("teacher_topk_indices"))
    with pytest.raises(ValueError, match="hidden_loss_weight"):
        DistillationTrainer(
            model=tiny_bert(num_labels=3), args=_args(tmp_path), train_dataset=cached3, data_collator=_pad_collator,
            distillation_config=DistillationConfig(hidden_loss_weight=1.0),
        )
    causal = cache_teacher_logits(tiny_llama(), _hf_dataset(8, causal=True), k=4)
    with pytest.raises(ValueError, match="shape"):
        DistillationTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=causal, data_collator=_pad_collator)


def test_nan_loss_names_step_and_part(tmp_path):
    teacher, student = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=2)
    with torch.no_grad():
        teacher.classifier.weight.fill_(float("nan"))
    tr = _make(tmp_path, student, teacher)
    with pytest.raises(FloatingPointError, match=r"soft loss part is NaN/Inf at step 1"):
        tr.train()


def test_bf16_teacher_follows_student_precision_and_kd_stays_float32(tmp_path):
    teacher, student = _sharp(tiny_bert(layers=4, seed=1)), tiny_bert(layers=2, hidden=16, seed=2)
    tr = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path, bf16=True, max_steps=2), train_dataset=TokenDataset(32),
        distillation_config=DistillationConfig(temperature=20.0, hidden_loss_weight=1.0),
    )
    assert tr.teachers[0] is teacher and type(teacher).__name__ == "BertForSequenceClassification"  # no DDP wrapper
    dtypes = []
    teacher.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) and None)
    tr.train()
    assert dtypes and dtypes[0] == torch.bfloat16  # the teacher ran under the student's autocast
    logs = [h for h in tr.state.log_history if "soft_loss" in h]
    assert logs and all(torch.isfinite(torch.tensor([h["soft_loss"], h["hidden_loss"], h["loss"]])).all() for h in logs)
