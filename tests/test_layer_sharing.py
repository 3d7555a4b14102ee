"""Cross-layer parameter sharing (ALBERT-style, issue 15 part 2): `shared_student_from_teacher`.

Groups of consecutive blocks hold the same Parameter objects, initialised from the teacher (mean of the group or
one chosen block), trained with KD; saved with each shared tensor stored once, reloaded (load_pretrained and the
Auto classes after `import hf_compress`) with the sharing intact — same storage, and still shared after a training
step; refused by plain transformers.
"""

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSequenceClassification, TrainingArguments

import hf_compress
from hf_compress import DistillationConfig, DistillationTrainer
from hf_compress.distillation.sharing import shared_groups, shared_student_from_teacher
from helpers import TokenDataset, tiny_bert, tiny_llama

L = "bert.encoder.layer"


def _same(a, b):
    return a is b and a.data_ptr() == b.data_ptr()


def test_groups_share_parameter_objects_initialised_from_the_teacher():
    teacher = tiny_bert(layers=6)
    mean = shared_student_from_teacher(teacher, group_size=2)
    tb = teacher.bert.encoder.layer
    sb = mean.bert.encoder.layer
    for g in ([0, 1], [2, 3], [4, 5]):
        for (n, p), (_, q) in zip(sb[g[0]].named_parameters(), sb[g[1]].named_parameters()):
            assert _same(p, q), n
        q = sb[g[0]].attention.self.query.weight
        assert torch.equal(q, (tb[g[0]].attention.self.query.weight + tb[g[1]].attention.self.query.weight) / 2)
    assert not _same(sb[1].output.dense.weight, sb[2].output.dense.weight)
    n_block = sum(p.numel() for p in tb[0].parameters())
    assert sum(p.numel() for p in teacher.parameters()) - sum(p.numel() for p in mean.parameters()) == 3 * n_block
    # one chosen block; explicit uneven groups
    first = shared_student_from_teacher(teacher, groups=[[0, 1, 2], [3, 4], [5]], init="first")
    assert torch.equal(first.bert.encoder.layer[2].intermediate.dense.weight, tb[0].intermediate.dense.weight)
    assert torch.equal(first.bert.encoder.layer[4].intermediate.dense.weight, tb[3].intermediate.dense.weight)
    assert torch.equal(first.bert.encoder.layer[5].intermediate.dense.weight, tb[5].intermediate.dense.weight)
    second = shared_student_from_teacher(teacher, group_size=3, init=1)
    assert torch.equal(second.bert.encoder.layer[0].output.dense.weight, tb[1].output.dense.weight)
    assert torch.equal(second.bert.encoder.layer[5].output.dense.weight, tb[4].output.dense.weight)
    # the teacher is untouched, and the embeddings / head are copies
    assert not shared_groups(teacher)
    assert not _same(mean.classifier.weight, teacher.classifier.weight)


def test_llama_blocks_share_weights_but_keep_their_own_layer_index():
    teacher = tiny_llama(layers=4)
    student = shared_student_from_teacher(teacher, group_size=2)
    layers = student.model.layers
    assert _same(layers[0].self_attn.q_proj.weight, layers[1].self_attn.q_proj.weight)
    assert layers[0].self_attn.layer_idx == 0 and layers[1].self_attn.layer_idx == 1
    ids = torch.randint(3, 100, (1, 6))
    out = student.generate(ids, max_new_tokens=3, do_sample=False)  # the KV cache keeps one slot per layer
    assert out.shape == (1, 9)


def _kd_train(student, teacher, out, steps=2):
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=1e-2, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  distillation_config=DistillationConfig(alpha=0.5, hidden_loss_weight=1.0),
                                  train_dataset=TokenDataset(n=32, seed=3))
    trainer.train()
    return trainer


def test_kd_training_keeps_the_sharing_and_the_optimizer_holds_each_tensor_once(tmp_path):
    teacher = tiny_bert(layers=4, seed=1)
    student = shared_student_from_teacher(teacher, group_size=2)
    before = student.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    trainer = _kd_train(student, teacher, tmp_path)
    sb = trainer.model.bert.encoder.layer
    w0, w1 = sb[0].attention.self.query.weight, sb[1].attention.self.query.weight
    assert _same(w0, w1) and not torch.equal(w0, before)
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) == sum(1 for _ in trainer.model.parameters())


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_saved_once_and_reloaded_with_the_sharing_intact(tmp_path):
    teacher = tiny_bert(layers=4, seed=1)
    student = _kd_train(shared_student_from_teacher(teacher, group_size=2), teacher, tmp_path / "run").model
    ids = torch.randint(3, 100, (2, 9))
    ref = _logits(student, ids)
    out = tmp_path / "export"
    student.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    blocks = sorted({k.split(".")[3] for k in keys if k.startswith(L + ".")})
    assert blocks == ["1", "3"]  # each shared tensor once, under the group's last block
    per_block = sum(1 for k in keys if k.startswith(f"{L}.1."))
    assert len(keys) == len(teacher.state_dict()) - 2 * per_block
    # the file is smaller than the unshared model's by two blocks
    plain = tmp_path / "plain"
    teacher.save_pretrained(plain)
    assert (out / "model.safetensors").stat().st_size < (plain / "model.safetensors").stat().st_size
    for loaded in (hf_compress.load_pretrained(out), AutoModelForSequenceClassification.from_pretrained(out)):
        assert torch.equal(_logits(loaded, ids), ref)
        lb = loaded.bert.encoder.layer
        for (n, p), (_, q) in zip(lb[0].named_parameters(), lb[1].named_parameters()):
            assert _same(p, q), n
        assert len(shared_groups(loaded)) == len(shared_groups(student))
        # one training step on the reloaded model: the group stays one tensor
        loaded.train()
        opt = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
        loaded(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        assert _same(lb[2].output.dense.weight, lb[3].output.dense.weight)
        assert not torch.equal(lb[2].output.dense.weight, student.bert.encoder.layer[2].output.dense.weight)
    # the base model of the saved head model loads shared too
    base = AutoModel.from_pretrained(out)
    assert _same(base.encoder.layer[0].attention.output.dense.weight, base.encoder.layer[1].attention.output.dense.weight)
    # a re-save stays stored once
    again = tmp_path / "again"
    hf_compress.load_pretrained(out).save_pretrained(again)
    with safe_open(str(again / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(keys)


def test_plain_transformers_refuses_a_shared_export(tmp_path):
    shared_student_from_teacher(tiny_bert(layers=2), group_size=2).save_pretrained(tmp_path)
    code = ("import sys; from transformers import AutoModelForSequenceClassification as A\n"
            "try:\n    A.from_pretrained(sys.argv[1])\nexcept Exception as e:\n    print('REFUSED', e); sys.exit(0)\n"
            "sys.exit(1)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "REFUSED" in r.stdout and "hf_compress" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("kwargs, message", [
    (dict(group_size=0), r"group_size=0: use an integer from 1 to the teacher's 4 blocks"),
    (dict(group_size=None, groups=[[0, 1], [3, 2]]), r"groups=.*list every block 0..3 once, in order"),
    (dict(group_size=2, init="median"), r"init='median': use one of \('mean', 'first', 'last'\)"),
    (dict(group_size=3, init=2), r"init=2: outside the smallest group \(1 blocks\)"),
])
def test_bad_sharing_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shared_student_from_teacher(tiny_bert(layers=4), **kwargs)
