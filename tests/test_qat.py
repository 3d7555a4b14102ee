"""QATCallback inside real Trainer runs (tiny models): optimizer keeps its Parameters, the grid after
training, start / freeze steps, logs, checkpoints and resume, export + reload, pruning zeros, bad input."""

import json
import logging
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_compress import PruningCallback, PruningConfig, QATCallback, QATConfig, load_pretrained
from hf_compress.quantization import fake_quant_layers, observers
from hf_compress.quantization.fake_quant import FakeQuantMixin
from helpers import TokenDataset, tiny_bert, tiny_gpt2

warnings.filterwarnings("ignore", message=".*kernels.*")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

TARGETED = r"bert\.encoder\.layer\.\d+\.(attention|intermediate|output)"


def _args(tmp_path, steps, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=8,
        logging_steps=2, save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _run(tmp_path, config, steps=6, model=None, extra=(), before=(), resume=None, **kw):
    model = model if model is not None else tiny_bert(seed=0, layers=2)
    cb = QATCallback(config)
    trainer = Trainer(
        model=model, args=_args(tmp_path, steps, **kw), train_dataset=TokenDataset(48, seed=1),
        callbacks=[*before, cb, *extra],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


class Probe(TrainerCallback):
    """After each step: which layers are fake-quantised, and whether the optimizer holds their weights."""

    def __init__(self, cb):
        self.cb, self.steps = cb, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        layers = fake_quant_layers(model)
        self.steps[state.global_step] = {
            "n_fake": len(layers),
            "in_optimizer": all(id(m.weight) in held for m in layers.values()),
            "ranges": {n: (float(o.lo), float(o.hi)) for n, o in observers(model).items()},
        }


def _levels_ok(w, bits, group=None):
    rows = w.reshape(w.shape[0], -1, group) if group else w.unsqueeze(1)
    return all(g.unique().numel() <= 2 ** bits for row in rows for g in row)


def test_parameters_stay_in_optimizer_and_train(tmp_path):
    model = tiny_bert(seed=0, layers=2)
    before = {n: p for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = QATCallback(QATConfig(weight_bits=8, activation_bits=8, qat_start_step=2))
    probe = Probe(cb)
    trainer = Trainer(model=model, args=_args(tmp_path, 6), train_dataset=TokenDataset(48, seed=1), callbacks=[cb, probe])
    opt_params = None
    trainer.train()
    assert probe.steps[1]["n_fake"] == 0 and probe.steps[2]["n_fake"] == 0  # float training before qat_start_step
    assert probe.steps[3]["n_fake"] == 12 and all(probe.steps[s]["in_optimizer"] for s in range(3, 7))
    assert {n: p for n, p in model.named_parameters()} == before  # the same Parameter objects throughout
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in before.values())
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(before[name].detach(), start[name])  # the optimizer updated the master weights
    # after step 3 the activation ranges exist (committed after the first QAT step) and keep moving
    assert probe.steps[3]["ranges"] and probe.steps[3]["ranges"] != probe.steps[5]["ranges"]
    del opt_params


def test_grid_after_training_and_hooks_removed(tmp_path):
    model = tiny_bert(seed=0, layers=2)
    head_before = model.classifier.weight.detach().clone()
    trainer, cb = _run(tmp_path, QATConfig(weight_bits=4, group_size=16, symmetric=False, layer_bits={r"attention\.self": 8}), model=model)
    assert not fake_quant_layers(model) and not any(isinstance(m, FakeQuantMixin) for m in model.modules())
    for name, m in model.named_modules():
        if name in cb.plan:
            if "attention.self" in name:
                assert _levels_ok(m.weight.detach(), 8)
            else:
                assert _levels_ok(m.weight.detach(), 4, 16)
    # the head is not targeted: trained freely, not on a 16-level grid
    assert not torch.equal(model.classifier.weight, head_before)
    assert not _levels_ok(model.bert.encoder.layer[0].attention.output.LayerNorm.weight.detach().unsqueeze(0), 2)
    meta = model.config.hf_compress["quantization"]
    assert meta["backend"] is None and len(meta["layers"]) == 12
    assert meta["layers"]["bert.encoder.layer.0.intermediate.dense"]["weight"]["bits"] == 4


@pytest.mark.parametrize("kw,tol", [(dict(weight_bits=4, group_size=16), 1e-6),
                                    (dict(activation_bits=8, observer="dynamic", export="torch-int8"), 2e-2)],
                         ids=["int4-float-weights", "int8-dynamic-torch-int8"])
def test_what_was_trained_is_what_ships(tmp_path, kw, tol):
    """The model after on_train_end computes what the fake-quantised model computed just before it
    (exactly for float weights on the grid; int8 kernels: within the stated tolerance)."""
    model = tiny_bert(seed=0, layers=2)
    batch = TokenDataset(8, seed=4)[0:8]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    seen = {}

    class Before(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            model.eval()
            with torch.no_grad():
                seen["fake"] = model(**inputs).logits

    _run(tmp_path, QATConfig(**kw), model=model, before=[Before()])
    model.eval()
    with torch.no_grad():
        out = model(**inputs).logits
    assert ((out - seen["fake"]).norm() / seen["fake"].norm()).item() <= tol


def test_logs_fraction_and_ranges(tmp_path):
    trainer, _ = _run(tmp_path, QATConfig(activation_bits=8, observer="percentile", qat_start_step=2), steps=6, logging_steps=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["qat/fake_quant_fraction"] == 0.0  # step 2: not started yet
    # all 12 block Linears; not the pooler nor the head
    assert logs[-1]["qat/fake_quant_fraction"] == pytest.approx(12 / 14, abs=1e-6)
    assert logs[-1]["qat/act_min"] < 0 < logs[-1]["qat/act_max"] and logs[-1]["qat/act_range_mean"] > 0
    assert "qat/weight_absmax_max" in logs[-1]


def test_freeze_observers(tmp_path):
    model = tiny_bert(seed=0, layers=2)
    cb = QATCallback(QATConfig(activation_bits=8, observer="minmax", freeze_observers_step=3))
    probe = Probe(cb)
    Trainer(model=model, args=_args(tmp_path, 6), train_dataset=TokenDataset(48, seed=1), callbacks=[cb, probe]).train()
    assert probe.steps[2]["ranges"] != probe.steps[3]["ranges"]
    assert probe.steps[3]["ranges"] == probe.steps[4]["ranges"] == probe.steps[6]["ranges"]


def test_resume_restores_observers_bit_identically(tmp_path):
    cfg = dict(weight_bits=8, activation_bits=8, observer="moving_average", export=None)
    common = dict(steps=8, save_strategy="steps", save_steps=4, logging_steps=8)
    full, cb_full = _run(tmp_path / "a", QATConfig(**cfg), **common)
    ck = tmp_path / "a" / "checkpoint-4" / "hf_compress"
    assert (ck / "qat.safetensors").exists() and json.loads((ck / "qat.json").read_text())["active"] is True
    from safetensors.torch import load_file

    want_state = load_file(str(tmp_path / "a" / "checkpoint-8" / "hf_compress" / "qat.safetensors"))
    assert len(want_state) == 12 * 3
    want = {n: p.detach().clone() for n, p in full.model.named_parameters()}
    # resume from step 4 with a fresh model object; the observers must come back from the checkpoint
    resumed, _ = _run(tmp_path / "a", QATConfig(**cfg), model=tiny_bert(seed=7, layers=2), resume=str(tmp_path / "a" / "checkpoint-4"), **common)
    got_state = load_file(str(tmp_path / "a" / "checkpoint-8" / "hf_compress" / "qat.safetensors"))
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p.detach(), want[n]), n
    with pytest.raises(ValueError, match="different qat config"):
        _run(tmp_path / "a", QATConfig(**{**cfg, "observer": "minmax"}), resume=str(tmp_path / "a" / "checkpoint-4"), **common)


@pytest.mark.parametrize("export", ["torch-int8", "bnb-nf4"])
def test_export_save_model_and_load_pretrained(tmp_path, export):
    bits = 4 if export == "bnb-nf4" else 8
    model = tiny_bert(seed=0, layers=2, hidden=64, ffn=128)
    trainer, cb = _run(tmp_path, QATConfig(weight_bits=bits, export=export), model=model, steps=4)
    kind = {"torch-int8": "Int8Linear", "bnb-nf4": "Linear4bit"}[export]
    assert type(model.bert.encoder.layer[0].intermediate.dense).__name__ == kind
    trainer.save_model(str(tmp_path / "final"))
    back = load_pretrained(tmp_path / "final")
    assert type(back.bert.encoder.layer[0].intermediate.dense).__name__ == kind
    batch = TokenDataset(8, seed=4)[0:8]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, model(**inputs).logits)


def test_gpt2_conv1d_qat_and_int8_export(tmp_path):
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=_args(tmp_path, 3), train_dataset=TokenDataset(32, causal=True),
                      callbacks=[QATCallback(QATConfig(export="torch-int8"))])
    trainer.train()
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Int8Linear"
    trainer.save_model(str(tmp_path / "final"))
    back = load_pretrained(tmp_path / "final")
    ids = torch.randint(3, 100, (2, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pruned_zeros_stay_zero_with_qat(tmp_path, symmetric):
    model = tiny_bert(seed=0, layers=2)
    prune = PruningCallback(PruningConfig(target_sparsity=0.6, schedule="one_shot", pruning_start_step=0))
    _run(tmp_path, QATConfig(weight_bits=8, symmetric=symmetric), model=model, before=[prune], steps=4)
    for name in prune.pruner.names:
        w = model.get_submodule(name).weight
        mask = prune.pruner.masks[prune.pruner.names.index(name)]
        assert torch.all(w[mask == 0] == 0), name
        assert _levels_ok(w.detach(), 8)
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in prune.pruner.names)
    total = sum(model.get_submodule(n).weight.numel() for n in prune.pruner.names)
    assert zeros / total >= 0.599  # the pruner rounds the count of 60% down


def test_bf16_autocast_training(tmp_path):
    model = tiny_bert(seed=0, layers=2)
    _run(tmp_path, QATConfig(weight_bits=8, activation_bits=8), model=model, steps=3, bf16=True)
    w = model.bert.encoder.layer[0].output.dense.weight
    assert w.dtype == torch.float32 and _levels_ok(w.detach(), 8)


def test_bad_input_fails_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match="qat_targets"):
        Trainer(model=tiny_bert(), args=_args(tmp_path, 2), train_dataset=TokenDataset(8),
                callbacks=[QATCallback(QATConfig(qat_targets=["nothing_matches"]))])
    with pytest.raises(ValueError, match="group_size.*does not divide"):
        Trainer(model=tiny_bert(hidden=48, heads=4, ffn=96), args=_args(tmp_path, 2), train_dataset=TokenDataset(8),
                callbacks=[QATCallback(QATConfig(weight_bits=4, group_size=32))])
    with pytest.raises(ValueError, match="not both"):
        QATCallback(QATConfig(), weight_bits=4)
    with pytest.raises(ValueError, match="weight_bits"):
        QATCallback(weight_bits=3.0)
