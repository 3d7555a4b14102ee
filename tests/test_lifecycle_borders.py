"""The borders of the compression life cycle through the stock Trainer: best-model reload, resume from
anywhere, kills at every point of a save with save_total_limit=1, two callbacks of one kind, convert twice.

Reference runs are uninterrupted runs of the same settings; everything is compared bit for bit on CPU.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_compress import PruningCallback, PruningConfig, QATCallback, QATConfig, load_pretrained, pruning, quantization
from hf_compress.metadata import get_metadata
from helpers import TokenDataset, tiny_bert


class Killed(Exception):
    pass


class KillAt(TrainerCallback):
    """Raises (a kill, as far as the files on disk are concerned) at one event of one step."""

    def __init__(self, event, step):
        self.event, self.step = event, step

    def _maybe(self, event, state):
        if event == self.event and state.global_step == self.step:
            raise Killed(f"{event}@{state.global_step}")

    def on_step_end(self, args, state, control, **kw):
        self._maybe("on_step_end", state)

    def on_save(self, args, state, control, **kw):
        self._maybe("on_save", state)


def make(out, callbacks, max_steps=8, seed=2, **kw):
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps,
                             per_device_train_batch_size=8, learning_rate=5e-3, save_strategy="steps", save_steps=2,
                             logging_steps=2, disable_tqdm=True, seed=0, **kw)
    return Trainer(model=tiny_bert(layers=2, seed=seed), args=args, train_dataset=TokenDataset(n=96, seed=3),
                   eval_dataset=TokenDataset(n=16, seed=4), callbacks=callbacks)


def compressors(**pcfg):
    p = PruningCallback(PruningConfig(**{"target_sparsity": 0.5, "method": "movement", "pruning_start_step": 1,
                                         "pruning_end_step": 6, "frequency": 1, **pcfg}))
    q = QATCallback(QATConfig(weight_bits=8, activation_bits=8, observer="moving_average", qat_start_step=2))
    return [p, q]


def final(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    t = make(tmp_path_factory.mktemp("ref"), compressors())
    t.train()
    return final(t), get_metadata(t.model)


# ----------------------------------------------------------------------------- best-model reload


def best_is_first_eval(**kw):
    calls = []

    def metrics(_):
        calls.append(1)
        return {"score": 1.0 / len(calls)}  # the first evaluation is the best one

    return dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="score",
                greater_is_better=True, **kw), metrics


@pytest.mark.parametrize("granularity", ["unstructured", "heads"])
def test_best_model_reload_saves_weights_and_metadata_that_agree(tmp_path, granularity):
    kw, metrics = best_is_first_eval()
    cbs = compressors(granularity=granularity, method="magnitude", pruning_start_step=0, pruning_end_step=6,
                      target_sparsity=0.5)
    t = make(tmp_path, cbs, **kw)
    t.compute_metrics = metrics
    t.train()
    assert t.state.best_model_checkpoint.endswith("checkpoint-2")
    t.save_model(str(tmp_path / "model"))
    meta = json.loads((tmp_path / "model" / "config.json").read_text())["hf_compress"]
    run = meta["pruning"]["runs"][0]
    best_masks = json.loads((tmp_path / "checkpoint-2" / "hf_compress" / "pruning_" f"{granularity}.json").read_text())
    assert best_masks["step"] == 2
    if granularity == "unstructured":
        # the recorded sparsity is that of the saved (best, step-2) weights, not the schedule's final 0.5
        assert 0 < run["sparsity"] < 0.45
        zeros = {n: float((m.weight == 0).float().mean()) for n, m in t.model.named_modules()
                 if n.startswith("bert.encoder") and type(m).__name__ == "Linear"}
        assert zeros and 0 < min(zeros.values())  # the live (best) weights hold the zeros the record counts
    else:
        # heads removed are exactly those zero in the best checkpoint: fewer than the final schedule's
        assert 0 < meta["pruning"]["removed"]["heads"] < 4
    back = load_pretrained(tmp_path / "model")
    x = torch.randint(3, 100, (2, 10))
    t.model.eval()
    assert torch.allclose(back(input_ids=x).logits, t.model(input_ids=x).logits, atol=1e-6)
    assert meta["quantization"]["layers"]


# ----------------------------------------------------------------------------- resume from anywhere


def test_resume_from_a_checkpoint_outside_output_dir(tmp_path, reference):
    t = make(tmp_path / "a", compressors() + [KillAt("on_step_end", 5)])
    with pytest.raises(Killed):
        t.train()
    elsewhere = tmp_path / "moved" / "checkpoint-4"
    shutil.move(str(tmp_path / "a" / "checkpoint-4"), elsewhere)
    # train(resume_from_checkpoint=...) alone: the callbacks cannot see the path, so they refuse (never restart)
    with pytest.raises(ValueError, match="outside output_dir.*resume_from_checkpoint=PATH"):
        make(tmp_path / "a", compressors()).train(resume_from_checkpoint=str(elsewhere))
    t = make(tmp_path / "a", compressors(), resume_from_checkpoint=str(elsewhere))
    t.train(resume_from_checkpoint=str(elsewhere))
    assert_same(final(t), reference[0])


def test_state_of_another_run_is_refused_by_its_fingerprint(tmp_path):
    other = make(tmp_path / "out", compressors() + [KillAt("on_step_end", 5)], seed=5)
    with pytest.raises(Killed):
        other.train()  # a different run left its checkpoint-4 in output_dir
    t = make(tmp_path / "b", compressors() + [KillAt("on_step_end", 5)])
    with pytest.raises(Killed):
        t.train()
    with pytest.raises(ValueError, match="other weights"):
        make(tmp_path / "out", compressors()).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))


# ----------------------------------------------------------------------------- kills around a save


@pytest.mark.parametrize("where", ["before-state", "state-staged", "after-rotation"])
def test_no_kill_point_leaves_the_run_without_a_resumable_checkpoint(tmp_path, reference, where):
    killer = {"before-state": (KillAt("on_step_end", 4), "first"), "state-staged": (KillAt("on_step_end", 4), "last"),
              "after-rotation": (KillAt("on_save", 4), "first")}[where]
    cbs = [killer[0]] + compressors() if killer[1] == "first" else compressors() + [killer[0]]
    t = make(tmp_path, cbs, save_total_limit=1)
    with pytest.raises(Killed):
        t.train()
    ckpt = get_last_checkpoint(str(tmp_path))
    assert ckpt is not None
    if where == "after-rotation":
        assert ckpt.endswith("checkpoint-4") and not (tmp_path / "checkpoint-2").exists()
        assert not (Path(ckpt) / "hf_compress").exists()  # on_save never ran: the staged copy must serve
    t = make(tmp_path, compressors(), save_total_limit=1)
    t.train(resume_from_checkpoint=ckpt)
    assert_same(final(t), reference[0])
    assert not (tmp_path / ".hf_compress-staging").exists()


# ----------------------------------------------------------------------------- two callbacks of one kind


def test_two_pruning_callbacks_of_one_kind_keep_separate_state(tmp_path):
    def two():
        return [PruningCallback(PruningConfig(target_sparsity=0.5, pruning_targets=[r"layer\.0\."], pruning_end_step=4, frequency=1)),
                PruningCallback(PruningConfig(target_sparsity=0.25, pruning_targets=[r"layer\.1\."], pruning_end_step=4, frequency=1))]

    ref = make(tmp_path / "ref", two())
    ref.train()
    cbs = two() + [KillAt("on_step_end", 5)]
    with pytest.raises(Killed):
        make(tmp_path / "b", cbs).train()
    assert [c.name for c in cbs[:2]] == ["pruning_unstructured", "pruning_unstructured_2"]
    saved = sorted(p.name for p in (tmp_path / "b" / "checkpoint-4" / "hf_compress").iterdir())
    assert saved == ["pruning_unstructured.json", "pruning_unstructured.safetensors",
                     "pruning_unstructured_2.json", "pruning_unstructured_2.safetensors"]
    t = make(tmp_path / "b", two())
    t.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    assert_same(final(t), final(ref))
    runs = get_metadata(t.model)["pruning"]["runs"]
    assert [r["name"] for r in runs] == ["pruning_unstructured", "pruning_unstructured_2"]


# ----------------------------------------------------------------------------- QAT that would never run


def test_qat_that_never_runs_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="qat_start_step=8 is at or after the last training step"):
        make(tmp_path, [QATCallback(QATConfig(export="torch-int8", qat_start_step=8))])


# ----------------------------------------------------------------------------- convert twice


def test_convert_is_idempotent():
    model = tiny_bert(layers=2, seed=1).eval()
    pcfg = PruningConfig(granularity="heads", target_sparsity=0.5)
    p = pruning.prepare(model, pcfg)
    p.update(0.5)
    qcfg = QATConfig(export="torch-int8")
    quantization.prepare(model, qcfg)
    first = pruning.convert(model, pcfg), quantization.convert(model, qcfg)
    x = torch.randint(3, 100, (2, 10))
    logits, meta = model(input_ids=x).logits, get_metadata(model)
    assert first[0]["heads"] == 4 and len(first[1]["layers"]) == 12
    again = pruning.convert(model, pcfg), quantization.convert(model, qcfg)
    assert again[0]["heads"] == 0 and again[1] == first[1]
    assert get_metadata(model)["pruning"]["runs"] == meta["pruning"]["runs"]
    assert get_metadata(model)["quantization"] == meta["quantization"]
    assert torch.equal(model(input_ids=x).logits, logits)


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3


@pytest.mark.parametrize("callback", [lambda: PruningCallback(PruningConfig()), lambda: QATCallback(QATConfig())])
def test_zero3_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch, callback):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="does not support DeepSpeed ZeRO-3"):
        make(tmp_path, [callback()])


# ----------------------------------------------------------------------------- distillation projections too


def test_kill_after_rotation_keeps_the_distillation_projections(tmp_path):
    from hf_compress import DistillationConfig, DistillationTrainer

    def kd(out, callbacks):
        args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=6, save_strategy="steps",
                                 save_steps=2, save_total_limit=1, per_device_train_batch_size=8, disable_tqdm=True, seed=0)
        return DistillationTrainer(model=tiny_bert(layers=2, seed=2), teacher_model=tiny_bert(layers=4, hidden=48, ffn=96, seed=1),
                                   args=args, distillation_config=DistillationConfig(alpha=0.5, hidden_loss_weight=1.0),
                                   train_dataset=TokenDataset(n=96, seed=3), callbacks=callbacks)

    ref = kd(tmp_path / "ref", [])
    ref.train()
    with pytest.raises(Killed):
        kd(tmp_path / "b", [KillAt("on_save", 4)]).train()
    ckpt = get_last_checkpoint(str(tmp_path / "b"))
    assert ckpt.endswith("checkpoint-4") and not (Path(ckpt) / "hf_compress").exists()
    t = kd(tmp_path / "b", [])
    t.train(resume_from_checkpoint=ckpt)  # the projections come from the staged copy
    assert_same(final(t), final(ref))
    assert all(torch.equal(a, b) for a, b in zip(t.projections.parameters(), ref.projections.parameters()))
