"""student_from_teacher, teacher preparation and the logit cache, on tiny models."""

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_compress import cache_teacher_logits, student_from_teacher
from hf_compress.distillation.teacher import is_frozen, prepare_teacher, to_low_bit
from hf_compress.modules import find_blocks
from helpers import tiny_bert, tiny_gpt2, tiny_llama


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "make,auto",
    [(lambda: tiny_bert(layers=6, seed=3), AutoModelForSequenceClassification), (lambda: tiny_llama(layers=4, seed=3), AutoModelForCausalLM), (lambda: tiny_gpt2(layers=4, seed=3), AutoModelForCausalLM)],
)
def test_student_copies_chosen_blocks_and_reloads_with_auto_class(tmp_path, make, auto):
    teacher = make()
    n = teacher.config.num_hidden_layers
    layers = [0, 2, n - 1]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, layers=layers)
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 3
    _, sb = find_blocks(student)
    _, tb = find_blocks(teacher)
    for i, j in enumerate(layers):
        assert _same(sb[i], tb[j])
    # everything outside the blocks (embeddings, final norm, pooler, head) is the teacher's
    name, _ = find_blocks(teacher)
    outside = [k for k in teacher.state_dict() if not k.startswith(name + ".")]
    assert outside and all(torch.equal(student.state_dict()[k], teacher.state_dict()[k]) for k in outside)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    assert student.num_parameters() < teacher.num_parameters()
    assert student.config.hf_compress["distillation"]["teacher_blocks"] == layers

    student.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path)
    assert type(reloaded) is type(student)
    ids = torch.randint(3, 100, (2, 7))
    student.eval()
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)


def test_student_from_teacher_rejects_bad_layers():
    teacher = tiny_bert(layers=4)
    for layers, match in [([], "empty"), ([0, 4], "out of range"), ([1, 1], "repeats"), ([-1], "out of range")]:
        with pytest.raises(ValueError, match=match):
            student_from_teacher(teacher, layers=layers)


def test_prepare_teacher_freezes():
    teacher = tiny_bert()
    teacher.train()
    assert prepare_teacher(teacher) is teacher and is_frozen(teacher)
    with pytest.raises(ValueError, match="nn.Module"):
        prepare_teacher("bert-base-uncased")


def test_low_bit_teacher_runs_on_cpu_close_to_full_precision():
    teacher = tiny_bert(layers=2, hidden=64, ffn=128, seed=1)
    ids = torch.randint(3, 100, (4, 9))
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits
        import bitsandbytes as bnb

        q = to_low_bit(teacher, "int8")
        assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in q.modules())
        got = q(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item() + 1e-3)
    with pytest.raises(ValueError, match="low_bit"):
        to_low_bit(tiny_bert(), "int3")


def test_cache_stores_topk_per_example_and_position():
    teacher = tiny_llama(seed=1)
    rows = [{"input_ids": list(range(3, 3 + n)), "attention_mask": [1] * n} for n in (4, 7, 5)]
    data = datasets.Dataset.from_list(rows)
    cached = cache_teacher_logits(teacher, data, k=6, batch_size=2)
    with torch.no_grad():
        for row, n in zip(cached, (4, 7, 5)):
            logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            top = logits.topk(6, -1)
            assert torch.tensor(row["teacher_topk_values"]).shape == (n, 6)
            assert torch.allclose(torch.tensor(row["teacher_topk_values"]), top.values, atol=1e-5)
            assert torch.equal(torch.tensor(row["teacher_topk_indices"]).long(), top.indices)
    with pytest.raises(ValueError, match="input_ids"):
        cache_teacher_logits(teacher, datasets.Dataset.from_list([{"text": "a"}]))
    with pytest.raises(ValueError, match="datasets.Dataset"):
        cache_teacher_logits(teacher, rows)
    with pytest.raises(ValueError, match="k="):
        cache_teacher_logits(teacher, data, k=0)


def test_load_teacher_frozen_and_low_bit(tmp_path):
    import bitsandbytes as bnb

    from hf_compress.distillation.teacher import load_teacher

    tiny_bert(layers=2, hidden=64, ffn=128, seed=1).save_pretrained(tmp_path)
    full = load_teacher(tmp_path)
    assert type(full).__name__ == "BertForSequenceClassification" and is_frozen(full)
    low = load_teacher(tmp_path, low_bit="nf4")
    assert is_frozen(low) and any(isinstance(m, bnb.nn.Linear4bit) for m in low.modules())
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        assert low(input_ids=ids).logits.shape == full(input_ids=ids).logits.shape
    with pytest.raises(ValueError, match="low_bit"):
        load_teacher(tmp_path, low_bit="int2")
