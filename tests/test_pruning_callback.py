"""PruningCallback inside real Trainer runs (tiny models): schedule, exactness, optimizer state, logs,
checkpoints / resume, lottery-ticket rewinding, gradient scores, DistillationTrainer."""

import os

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_compress import PruningCallback, PruningConfig
from hf_compress.pruning import Pruner
from helpers import TokenDataset, tiny_bert, tiny_llama


def _args(tmp_path, steps, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=8,
        logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _run(tmp_path, config, steps=12, model=None, trainer_cls=Trainer, extra=(), resume=None, **kw):
    model = model if model is not None else tiny_bert(seed=0)
    cb = PruningCallback(config)
    trainer = trainer_cls(
        model=model, args=_args(tmp_path, steps, **kw), train_dataset=TokenDataset(64, seed=1),
        callbacks=[cb, *extra],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


class Probe(TrainerCallback):
    """Records (after each step) the zero fraction of the targeted weights."""

    def __init__(self, cb):
        self.cb, self.sparsity = cb, {}

    def on_step_end(self, args, state, control, **kw):
        p = self.cb.pruner
        zeros = sum(int((w == 0).sum()) for w in p.weights)
        self.sparsity[state.global_step] = zeros / sum(w.numel() for w in p.weights)


def test_sparsity_follows_schedule_and_is_exact_at_end(tmp_path):
    cfg = PruningConfig(target_sparsity=0.9, schedule="cubic", pruning_start_step=2, pruning_end_step=8, frequency=2)
    model = tiny_bert(seed=0)
    cb = PruningCallback(cfg)
    probe = Probe(cb)
    trainer = Trainer(model=model, args=_args(tmp_path, 12), train_dataset=TokenDataset(64, seed=1), callbacks=[cb, probe])
    trainer.train()
    for step, measured in probe.sparsity.items():
        # the weights' real zeros match the schedule at every step (0.5% for unstructured)
        assert abs(measured - cb.sparsity_at(step)) < 0.005, (step, measured)
    assert probe.sparsity[1] == 0.0 and 0 < probe.sparsity[4] < probe.sparsity[6] < 0.9
    assert all(abs(probe.sparsity[s] - 0.9) < 0.005 for s in range(8, 13))
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert logs[4]["pruning_unstructured/sparsity"] == pytest.approx(probe.sparsity[4], abs=1e-5)
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final and final["pruning_unstructured/sparsity"] == pytest.approx(0.9, abs=0.005)
    per_module = {k: v for k, v in final.items() if k.startswith("pruning_unstructured/sparsity/")}
    assert len(per_module) == 24 and "pruning_unstructured/sparsity/bert.encoder.layer.0.attention.self.query" in per_module
    assert model.config.hf_compress["pruning"]["runs"][0]["sparsity"] == pytest.approx(0.9, abs=0.005)


def test_zeros_survive_adamw_and_its_state_stays_zero(tmp_path):
    # one-shot at step 0, big learning rate and weight decay: nothing may revive a pruned weight
    cfg = PruningConfig(target_sparsity=0.6, schedule="one_shot", pruning_start_step=0, scope="local")
    trainer, cb = _run(tmp_path, cfg, steps=30, learning_rate=5e-2, weight_decay=0.1, logging_steps=30)
    p = cb.pruner
    opt = trainer.optimizer
    for w, m in zip(p.weights, (m.bool() for m in p.masks)):
        assert int((~m).sum()) == round(0.6 * m.numel())  # local: exact per module
        assert (w[~m] == 0).all() and (w[m] != 0).all()
        state = opt.state[w]
        assert (state["exp_avg"][~m] == 0).all() and (state["exp_avg_sq"][~m] == 0).all()


def test_two_four_pattern_in_training(tmp_path):
    cfg = PruningConfig(granularity="2:4", pruning_start_step=1, pruning_end_step=4, frequency=1, schedule="linear")
    trainer, cb = _run(tmp_path, cfg, steps=8, logging_steps=8)
    assert cb.config.target_sparsity == 0.5
    for w in cb.pruner.weights:  # nn.Linear (out, in): groups of 4 consecutive inputs
        groups = w.detach().reshape(w.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all()
    assert cb.pruner.sparsity() == 0.5


def test_movement_and_taylor_scores_use_gradients():
    model = tiny_bert(seed=0)
    ds = TokenDataset(8, seed=2)
    batch = {"input_ids": ds.ids, "attention_mask": ds.mask, "labels": ds.labels}
    pm, pt = Pruner(model, method="movement"), Pruner(model, method="taylor")
    want_m = [torch.zeros_like(w) for w in pm.weights]
    want_t = [torch.zeros_like(w) for w in pm.weights]
    for step in range(2):
        model.zero_grad()
        model(**batch).loss.backward()
        for i, w in enumerate(pm.weights):
            want_m[i] -= w.detach() * w.grad
            want_t[i] += (w.detach() * w.grad).abs()
        pm.accumulate()
        pt.accumulate()
        with torch.no_grad():  # the weights move between steps
            for w in pm.weights:
                w -= 0.1 * w.grad
    for a, b, c, d in zip(pm.scores, want_m, pt.scores, want_t):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, d)
    assert any(s.abs().sum() > 0 for s in pm.scores)
    # movement masks follow the scores, not the magnitudes
    pm.update(0.5)
    flat_s = torch.cat([s.flatten() for s in pm.scores])
    kept = torch.cat([m.flatten() for m in pm.masks]).bool()
    assert flat_s[~kept].max() <= flat_s[kept].min()


def test_structured_heads_exact_in_units_and_physical(tmp_path):
    model = tiny_llama(layers=2, heads=4, kv_heads=4)
    before = sum(p.numel() for p in model.parameters())
    cfg = PruningConfig(granularity="heads", target_sparsity=0.5, method="taylor", pruning_start_step=1, pruning_end_step=4, frequency=1)
    trainer = Trainer(model=model, args=_args(tmp_path, 6), train_dataset=TokenDataset(32, causal=True), callbacks=[PruningCallback(cfg)])
    trainer.train()
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, PruningCallback))
    assert cb.removed["heads"] == 4  # 50% of 8 heads, exactly
    assert sum(model.config.hf_compress["pruning"]["heads"]) == 4
    assert sum(p.numel() for p in model.parameters()) < before
    mid = [h for h in trainer.state.log_history if h.get("step") == 4 and "loss" in h][0]
    assert mid["pruning_heads/units_removed"] == 4 and mid["pruning_heads/sparsity"] == pytest.approx(0.5)


def _masks(cb):
    return {x: m.clone() for x, m in zip(cb.pruner.names, cb.pruner.masks)}


def test_resume_gives_the_same_masks_and_weights(tmp_path):
    cfg = dict(target_sparsity=0.8, method="movement", pruning_start_step=1, pruning_end_step=10, frequency=2)
    common = dict(steps=12, save_strategy="steps", save_steps=5, logging_steps=12)
    full, cb_full = _run(tmp_path / "a", PruningConfig(**cfg), **common)
    ckpt = tmp_path / "a" / "checkpoint-5" / "hf_compress"
    assert (ckpt / "pruning_unstructured.safetensors").exists() and (ckpt / "pruning_unstructured.json").exists()
    want_masks, want_w = _masks(cb_full), [w.detach().clone() for w in cb_full.pruner.weights]
    # resume the same run from step 5 with a fresh model object
    resumed, cb_res = _run(tmp_path / "a", PruningConfig(**cfg), resume=str(tmp_path / "a" / "checkpoint-5"), **common)
    got = _masks(cb_res)
    assert all(torch.equal(got[k], want_masks[k]) for k in want_masks)
    for a, b in zip(cb_res.pruner.weights, want_w):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-6)
    # a different config is refused on resume
    with pytest.raises(ValueError, match="different pruning_unstructured config"):
        _run(tmp_path / "a", PruningConfig(**{**cfg, "target_sparsity": 0.5}), resume=str(tmp_path / "a" / "checkpoint-5"), **common)
    # so is a changed run length when the schedule end follows it
    default_end = {**cfg, "pruning_end_step": None}
    _run(tmp_path / "b", PruningConfig(**default_end), **common)
    with pytest.raises(ValueError, match="run length changed"):
        _run(tmp_path / "b", PruningConfig(**default_end), resume=str(tmp_path / "b" / "checkpoint-5"), **{**common, "steps": 20})


def test_lottery_ticket_rewind(tmp_path):
    model = tiny_bert(seed=0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = PruningConfig(target_sparsity=0.7, pruning_start_step=1, pruning_end_step=4, frequency=1, rewind_step=0)
    cb = PruningCallback(cfg)

    class AtEnd(TrainerCallback):  # listed after the pruning callback: sees the rewound weights
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            if state.global_step == 4:
                self.weights = [w.detach().clone() for w in cb.pruner.weights]
                self.masks = [m.clone() for m in cb.pruner.masks]
                self.opt_state = [w in optimizer.state for w in cb.pruner.weights]

    probe = AtEnd()
    trainer = Trainer(model=model, args=_args(tmp_path, 6), train_dataset=TokenDataset(64, seed=1), callbacks=[cb, probe])
    trainer.train()
    for name, w, m in zip(cb.pruner.names, probe.weights, probe.masks):
        torch.testing.assert_close(w, init[name + ".weight"] * m)
    assert not any(probe.opt_state)  # the rewound weights restart with a fresh optimizer state
    assert cb.pruner.sparsity() == pytest.approx(0.7, abs=0.005)


def test_prunes_the_student_inside_distillation_trainer(tmp_path):
    dt = pytest.importorskip("hf_compress.trainers.distillation_trainer")
    teacher, student = tiny_bert(layers=4, seed=1), tiny_bert(layers=2, seed=2)
    t_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    cfg = PruningConfig(target_sparsity=0.5, pruning_start_step=1, pruning_end_step=4, frequency=1)
    cb = PruningCallback(cfg)
    trainer = dt.DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path, 6, logging_steps=6),
        train_dataset=TokenDataset(64, seed=1), callbacks=[cb],
    )
    trainer.train()
    assert cb.pruner.model is student and cb.pruner.sparsity() == pytest.approx(0.5, abs=0.005)
    zeros = sum(int((w == 0).sum()) for w in cb.pruner.weights) / sum(w.numel() for w in cb.pruner.weights)
    assert zeros == pytest.approx(0.5, abs=0.005)
    assert all(torch.equal(p, t_before[n]) for n, p in teacher.named_parameters())
    assert not any((p == 0).float().mean() > 0.1 for p in teacher.parameters() if p.dim() == 2)
