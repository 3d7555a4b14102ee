"""Exact resume of all three methods together, and checkpoints cut short while saving.

Run A trains 8 steps straight. Run B is the same run stopped after the checkpoint at step 4 (as if
killed), then resumed by fresh objects with `resume_from_checkpoint`. On CPU with fixed seeds, B must
end bit-identical to A: student weights, pruning masks and scores, QAT observer state.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from hf_compress import (DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig, QATCallback,
                         QATConfig)
from helpers import TokenDataset, tiny_bert


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def run(out, stop=None, resume=None, sparsity=0.5):
    teacher = tiny_bert(layers=4, hidden=48, ffn=96, seed=1)
    student = tiny_bert(layers=2, seed=2 if resume is None else 99)  # resumed weights must come from the checkpoint
    pruning = PruningCallback(PruningConfig(target_sparsity=sparsity, method="movement", pruning_start_step=1, pruning_end_step=6, frequency=1))
    qat = QATCallback(QATConfig(weight_bits=8, activation_bits=8, observer="moving_average", qat_start_step=2))
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to=[], max_steps=8, per_device_train_batch_size=8,
        learning_rate=1e-3, save_strategy="steps", save_steps=4, logging_steps=4, disable_tqdm=True, seed=0,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args,
        distillation_config=DistillationConfig(alpha=0.5, hidden_loss_weight=1.0),
        train_dataset=TokenDataset(n=96, seed=3),
        callbacks=[pruning, qat] + ([StopAt(stop)] if stop else []),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, pruning, qat


def snapshot(trainer, pruning, qat):
    """Final weights (QAT-baked at train end), masks and scores, and the step-8 checkpoint's compression state."""
    out = {f"w.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"p.{k}": v.clone() for k, v in pruning.pruner.state_dict().items()})
    for f in (Path(trainer.args.output_dir) / "checkpoint-8" / "hf_compress").glob("*.safetensors"):
        out.update({f"{f.stem}.{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_resume_is_bit_identical_with_kd_pruning_and_qat(tmp_path):
    full = snapshot(*run(tmp_path / "a"))
    run(tmp_path / "b", stop=4)
    assert not (tmp_path / "b" / "checkpoint-8").exists()
    resumed = snapshot(*run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-4")))
    assert full.keys() == resumed.keys()
    kinds = {k.split(".")[0] for k in full}
    assert {"w", "p", "qat", "distillation", "pruning_unstructured"} <= kinds, kinds
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, different[:5]


def test_resume_refuses_a_different_compression_config(tmp_path):
    run(tmp_path, stop=4)
    with pytest.raises(ValueError, match=r"different pruning_unstructured config.*target_sparsity.*\(0.5, 0.7\)"):
        run(tmp_path, resume=str(tmp_path / "checkpoint-4"), sparsity=0.7)


def test_checkpoint_cut_short_while_saving_does_not_load_as_complete(tmp_path):
    run(tmp_path, stop=4)
    ckpt = tmp_path / "checkpoint-4"
    # a kill while the compression state was written: its JSON (written last, by atomic rename) is absent
    (ckpt / "hf_compress" / "pruning_unstructured.json").unlink()
    with pytest.raises(ValueError, match="interrupted"):
        run(tmp_path, resume=str(ckpt))
    # a kill during the weights: the truncated safetensors file is refused, never half-loaded
    shutil.rmtree(ckpt / "hf_compress")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        run(tmp_path, resume=str(ckpt))


def _tamper(path, edit):
    from safetensors.torch import save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "what, edit, message",
    [
        ("mask shape", lambda t: t.update({k: v[:1] for k, v in list(t.items()) if k.startswith("mask.")}), r"has shape \[1, "),
        ("score NaN", lambda t: next(v for k, v in t.items() if k.startswith("score.")).view(-1).__setitem__(0, float("nan")), "NaN/Inf in `score."),
        ("mask missing", lambda t: t.pop(next(k for k in list(t) if k.startswith("mask."))), "lacks"),
        ("observer range Inf", None, r"NaN/Inf in `.*\.hi`"),
    ],
)
def test_checkpoint_state_is_validated_before_it_is_loaded(tmp_path, what, edit, message):
    """A damaged or foreign state file is refused on resume, naming the tensor; before, a 1-row mask was
    broadcast over every row by copy_ and NaN scores/ranges were loaded as they were."""
    run(tmp_path, stop=4)
    state = tmp_path / "checkpoint-4" / "hf_compress"
    if edit is None:  # the QAT observers
        def edit(t):
            t[next(k for k in t if k.endswith(".hi"))].fill_(float("inf"))
        path = state / "qat.safetensors"
    else:
        path = state / "pruning_unstructured.safetensors"
    _tamper(path, edit)
    with pytest.raises(ValueError, match=message):
        run(tmp_path, resume=str(tmp_path / "checkpoint-4"))


def test_checkpoint_from_before_a_new_config_field_resumes_when_the_field_has_its_default(tmp_path):
    """A field added to a config after a checkpoint was written: its default keeps the old behaviour, so the
    resume is accepted; a non-default value is a different config and refused."""
    import json

    run(tmp_path, stop=4)
    path = tmp_path / "checkpoint-4" / "hf_compress" / "pruning_unstructured.json"
    meta = json.loads(path.read_text())
    del meta["config"]["uniform"]      # default False: as if written before the field existed
    del meta["config"]["frequency"]    # the run uses frequency=1, not the default
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'frequency': \(None, 1\)"):
        run(tmp_path, resume=str(tmp_path / "checkpoint-4"))
    meta["config"]["frequency"] = 1
    path.write_text(json.dumps(meta))
    run(tmp_path, resume=str(tmp_path / "checkpoint-4"))  # only `uniform` is missing, at its default: accepted
