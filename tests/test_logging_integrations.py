"""The callbacks' `pruning*/…` and `qat/…` log keys reach the report_to integrations (real TensorBoard event
files, read back), and never the evaluation results (evaluate()'s dict, eval_results.json, all_results.json,
the eval entries of log_history the model card is made from)."""

import json
import logging

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_compress import DistillationTrainer, PruningCallback, PruningConfig, QATCallback, QATConfig
from hf_compress.callbacks import report_to_integrations
from helpers import TokenDataset, tiny_bert

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

KEYS = ("pruning_", "qat/")


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=["tensorboard"],
        max_steps=4, per_device_train_batch_size=8, logging_steps=2, save_strategy="no", disable_tqdm=True,
        learning_rate=1e-3, seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _callbacks():
    prune = PruningCallback(PruningConfig(target_sparsity=0.5, pruning_start_step=1, pruning_end_step=3))
    return [prune, QATCallback(QATConfig(activation_bits=8))]


def _scalars(tb_dir) -> dict[str, dict[int, float]]:
    out = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def _check_tensorboard(tmp_path, trainer):
    scalars = _scalars(tmp_path / "out")
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4]
    for key in ("pruning_unstructured/sparsity", "pruning_unstructured/target", "qat/fake_quant_fraction", "qat/act_max"):
        tag = f"train/{key}"
        assert tag in scalars, (tag, sorted(scalars))
        for h in train_logs:  # the value TensorBoard got is the one in the Trainer's log entry
            assert scalars[tag][h["step"]] == pytest.approx(h[key], rel=1e-6)
    assert scalars["train/pruning_unstructured/sparsity"][4] == pytest.approx(0.5, abs=5e-3)
    # the end-of-training entry (per module sparsity) too
    assert any(t.startswith("train/pruning_unstructured/sparsity/bert.") for t in scalars)


def test_stock_trainer_keys_reach_tensorboard(tmp_path, caplog):
    trainer = Trainer(model=tiny_bert(seed=0), args=_args(tmp_path), train_dataset=TokenDataset(64, seed=1),
                      callbacks=_callbacks())
    report_to_integrations(trainer)
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        trainer.train()
    _check_tensorboard(tmp_path, trainer)
    assert "never see its log keys" not in caplog.text


def test_stock_trainer_without_the_call_warns(tmp_path, caplog):
    trainer = Trainer(model=tiny_bert(seed=0), args=_args(tmp_path), train_dataset=TokenDataset(64, seed=1),
                      callbacks=_callbacks())
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        trainer.train()
    assert caplog.text.count("never see its log keys") == 2  # once per callback, not once per log
    assert "report_to_integrations(trainer)" in caplog.text
    # the keys still reach the log history
    assert "pruning_unstructured/sparsity" in trainer.state.log_history[0]


def test_distillation_trainer_keys_reach_tensorboard(tmp_path, caplog):
    teacher = tiny_bert(seed=1)
    trainer = DistillationTrainer(model=tiny_bert(seed=0), teacher_model=teacher, args=_args(tmp_path),
                                  train_dataset=TokenDataset(64, seed=1), callbacks=_callbacks())
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        trainer.train()
    _check_tensorboard(tmp_path, trainer)
    assert "never see its log keys" not in caplog.text
    assert "hard_loss" in trainer.state.log_history[0]


@pytest.mark.parametrize("trainer_cls", [Trainer, DistillationTrainer])
def test_no_compression_keys_in_eval_results(tmp_path, trainer_cls):
    kw = dict(teacher_model=tiny_bert(seed=1)) if trainer_cls is DistillationTrainer else {}
    trainer = trainer_cls(
        model=tiny_bert(seed=0), args=_args(tmp_path, eval_strategy="steps", eval_steps=2, report_to=[]),
        train_dataset=TokenDataset(64, seed=1), eval_dataset=TokenDataset(16, seed=2), callbacks=_callbacks(), **kw)
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    assert not [k for k in metrics if k.startswith(KEYS)], metrics
    trainer.save_metrics("eval", metrics)
    for name in ("eval_results.json", "all_results.json"):
        saved = json.loads((tmp_path / "out" / name).read_text())
        assert "eval_loss" in saved and not [k for k in saved if k.startswith(KEYS)], (name, saved)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3  # two during training, one after
    for h in evals:  # what the model card's results table is read from
        assert not [k for k in h if k.startswith(KEYS)], h
    # training entries keep them
    assert all("pruning_unstructured/sparsity" in h and "qat/fake_quant_fraction" in h
               for h in trainer.state.log_history if "loss" in h)
    torch.testing.assert_close(torch.tensor(metrics["eval_loss"]), torch.tensor(evals[-1]["eval_loss"]))
