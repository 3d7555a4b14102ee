"""Callback state under `Trainer.hyperparameter_search` (issue 13): each trial saves its checkpoints in
`<output_dir>/run-<trial>/checkpoint-N`, not `<output_dir>/checkpoint-N`; the callbacks' state must go
with them (one set per trial, tied to that trial's weights), and one callback object serves every trial's
fresh model (the Trainer keeps the callbacks and re-creates the model through `model_init`)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from hf_compress import PruningCallback, PruningConfig, QATCallback, QATConfig
from helpers import TokenDataset, tiny_bert

optuna = pytest.importorskip("optuna")


def test_each_trial_keeps_its_own_callback_state(tmp_path):
    pruning = PruningCallback(PruningConfig(target_sparsity=0.5, pruning_start_step=0, pruning_end_step=2, frequency=1))
    qat = QATCallback(QATConfig(weight_bits=8, activation_bits=8, qat_start_step=1))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=4, save_steps=2,
                             per_device_train_batch_size=8, disable_tqdm=True, seed=0, eval_strategy="no")
    trainer = Trainer(model_init=lambda trial=None: tiny_bert(layers=2, seed=0), args=args,
                      train_dataset=TokenDataset(n=64, seed=3), eval_dataset=TokenDataset(n=16, seed=4),
                      callbacks=[pruning, qat])
    lrs = []

    def space(trial):
        lr = [1e-3, 1e-2][trial.number]
        lrs.append(lr)
        return {"learning_rate": lr}

    trainer.hyperparameter_search(hp_space=space, n_trials=2, direction="minimize", backend="optuna",
                                  compute_objective=lambda metrics: 0.0)
    assert not list(tmp_path.glob("checkpoint-*")), "state written beside the trials, where nothing resumes it"
    assert not (tmp_path / ".hf_compress-staging").exists()
    weights = {}
    for trial in (0, 1):
        for step in (2, 4):
            ckpt = tmp_path / f"run-{trial}" / f"checkpoint-{step}"
            for name in ("pruning_unstructured", "qat"):
                meta = json.loads((ckpt / "hf_compress" / f"{name}.json").read_text())
                assert meta["step"] == step
            # the pruning state belongs to this trial's weights: its masks are the zeros of this checkpoint
            state = load_file(str(ckpt / "hf_compress" / "pruning_unstructured.safetensors"))
            model = load_file(str(ckpt / "model.safetensors"))
            for key, mask in state.items():
                if key.startswith("mask."):
                    w = model[key[len("mask."):] + ".weight"]
                    assert torch.equal(w[~mask], torch.zeros_like(w[~mask])), (trial, step, key)
            weights[(trial, step)] = model
    # two learning rates: different weights, so the states above were not one trial's files twice
    k = next(iter(weights[(0, 4)]))
    assert not torch.equal(weights[(0, 4)][k], weights[(1, 4)][k])
    assert lrs == [1e-3, 1e-2]
