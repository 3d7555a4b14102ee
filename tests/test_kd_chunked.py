"""Issue 16, training cost: the token-chunked KD loss equals the unchunked one (value and gradient), and the
NaN/Inf check of DistillationTrainer no longer syncs the host every micro-batch.

Exactness is checked against the unchunked `kd_loss` (itself checked against hand-written formulas in
tests/test_distillation_losses.py) and, through the trainer, as weights after one SGD step.
"""

import copy
import functools

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_compress import DistillationConfig, DistillationTrainer
from hf_compress.distillation import losses as L
from helpers import TokenDataset, tiny_llama

ATOL_VALUE, ATOL_GRAD = 1e-5, 1e-6


def _logits(B=3, T=9, V=37, seed=0, teachers=1):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g) * 3).requires_grad_()
    ts = [torch.randn(B, T, V, generator=g) * 3 for _ in range(teachers)]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    return s, ts, labels


def _unchunked(s, ts, labels, kind, T, beta, weights=None, num_items=None):
    shifted, mask = L.causal_shift(s, labels, None)
    logp = L.teacher_log_probs(ts, T, weights)[:, :-1]
    return L.kd_loss(shifted, logp, kind, T, beta, mask, num_items=num_items)


def _grad(loss, s):
    (g,) = torch.autograd.grad(loss, s)
    return g


@pytest.mark.parametrize("kind", L.KD_LOSSES)
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("num_items", [None, 13.0])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_chunked_equals_unchunked_value_and_gradient(kind, T, num_items, chunk):
    s, ts, labels = _logits()
    n = None if num_items is None else torch.tensor(num_items)
    ref = _unchunked(s, ts, labels, kind, T, 0.3, num_items=n)
    got = L.chunked_kd_loss(s, ts, kind, T, 0.3, L.causal_mask_full(labels, None, labels.shape), num_items=n, chunk_size=chunk)
    assert abs(ref.item() - got.item()) <= ATOL_VALUE * max(1.0, abs(ref.item()))
    assert (_grad(ref, s) - _grad(got, s)).abs().max().item() <= ATOL_GRAD
    # positions that do not count get no gradient
    g = _grad(L.chunked_kd_loss(s, ts, kind, T, 0.3, L.causal_mask_full(labels, None, labels.shape), chunk_size=chunk), s)
    assert g[0, :4].abs().max().item() == 0.0 and g[:, -1].abs().max().item() == 0.0


def test_chunked_teacher_mixture_and_no_mask():
    s, ts, labels = _logits(teachers=2, seed=3)
    w = [1.0, 3.0]
    ref = _unchunked(s, ts, labels, "jsd", 2.0, 0.5, weights=w)
    got = L.chunked_kd_loss(s, ts, "jsd", 2.0, 0.5, L.causal_mask_full(labels, None, labels.shape), weights=w, chunk_size=5)
    assert got.item() == pytest.approx(ref.item(), abs=ATOL_VALUE)
    assert (_grad(ref, s) - _grad(got, s)).abs().max().item() <= ATOL_GRAD
    # no mask at all: every position counts, a plain mean
    ref = L.kd_loss(s, L.teacher_log_probs(ts[0], 2.0), "reverse_kl", 2.0)
    got = L.chunked_kd_loss(s, ts[0], "reverse_kl", 2.0, chunk_size=2)
    assert got.item() == pytest.approx(ref.item(), abs=ATOL_VALUE)
    assert (_grad(ref, s) - _grad(got, s)).abs().max().item() <= ATOL_GRAD


@pytest.mark.parametrize("kind", L.KD_LOSSES)
def test_chunked_cached_topk_equals_unchunked(kind):
    s, ts, labels = _logits(seed=5)
    values, indices = ts[0].topk(6, dim=-1)
    logp = L.cached_log_probs(values, 2.0)
    mask = L.token_mask(labels, None)
    ref = L.kd_loss(s, logp, kind, 2.0, 0.5, mask, indices)
    got = L.chunked_kd_loss(s, teacher_logp=logp, indices=indices, kind=kind, temperature=2.0, mask=mask, chunk_size=3)
    assert got.item() == pytest.approx(ref.item(), abs=ATOL_VALUE)
    assert (_grad(ref, s) - _grad(got, s)).abs().max().item() <= ATOL_GRAD


def test_chunked_bf16_logits_get_a_bf16_gradient_like_unchunked():
    s, ts, labels = _logits(seed=7)
    s16 = s.detach().bfloat16().requires_grad_()
    mask = L.causal_mask_full(labels, None, labels.shape)
    got = L.chunked_kd_loss(s16, ts[0].bfloat16(), "forward_kl", 2.0, mask=mask, chunk_size=4)
    ref = _unchunked(s16, [ts[0].bfloat16()], labels, "forward_kl", 2.0, 0.5)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-5)
    g = _grad(got, s16)
    assert g.dtype == torch.bfloat16
    ref_g = _grad(ref, s16).float()
    assert torch.allclose(g.float(), ref_g, rtol=2**-7, atol=1e-7)  # equal up to one bfloat16 rounding


def test_config_fields_validated():
    assert DistillationConfig().kd_chunk_size is None and DistillationConfig().check_finite_steps == 0
    assert DistillationConfig(kd_chunk_size="256").kd_chunk_size == 256
    for bad in (-1, 1.5, True, "many"):
        with pytest.raises(ValueError, match="kd_chunk_size"):
            DistillationConfig(kd_chunk_size=bad)
        with pytest.raises(ValueError, match="check_finite_steps"):
            DistillationConfig(check_finite_steps=bad)
    assert L.auto_chunk_size(131072) == 128 and L.auto_chunk_size(32000) == 524
    assert L.auto_chunk_size(131072, 16384) == 128 and L.auto_chunk_size(32000, 512) == 64 and L.auto_chunk_size(10, 3) == 1


# ---- through the trainer: one SGD step with gradient accumulation ------------------------------------


class _Rows(torch.utils.data.Dataset):
    """Causal rows with very different counted-token numbers (1, 6, 3) and a padded one."""

    def __init__(self, length=10):
        g = torch.Generator().manual_seed(0)
        self.rows = []
        for n, pad in ((1, 0), (6, 2), (3, 0)):
            ids = torch.randint(3, 128, (length,), generator=g)
            labels = torch.full((length,), -100)
            labels[length - pad - n : length - pad] = ids[length - pad - n : length - pad]
            mask = torch.ones(length, dtype=torch.long)
            if pad:
                mask[-pad:] = 0
                ids[-pad:] = 0
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, per_device_train_batch_size=1,
                gradient_accumulation_steps=3, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                weight_decay=0.0, max_grad_norm=0.0, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("kind", L.KD_LOSSES)
def test_trainer_step_equal_with_and_without_chunks(tmp_path, kind):
    student, teacher = tiny_llama(layers=1, seed=2), tiny_llama(layers=2, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    after = {}
    for chunk in (0, 3, None):
        cfg = DistillationConfig(alpha=0.5, temperature=2.0, kd_loss=kind, beta=0.3, kd_chunk_size=chunk)
        tr = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=_args(tmp_path / str(chunk)),
                                 train_dataset=_Rows(), distillation_config=cfg)
        tr.train()
        after[chunk] = ({n: p.detach().clone() for n, p in tr.model.named_parameters()}, tr.state.log_history[0])
    ref_w, ref_log = after[0]
    for chunk in (3, None):
        w, log = after[chunk]
        diff = max((w[n] - ref_w[n]).abs().max().item() for n in ref_w)
        assert diff <= 1e-6, (chunk, diff)
        assert log["soft_loss"] == pytest.approx(ref_log["soft_loss"], rel=1e-5)


# ---- the finite check: on the device, read back only at log / save / evaluation / end steps ------------------


SYNCS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy", "cpu")


def _count_syncs(monkeypatch, trainer_cls):
    """Calls of host-reading Tensor methods made inside `compute_loss` of `trainer_cls` but outside the models'
    own forward (the tiny Llama's mask code reads the host itself, for the stock Trainer too)."""
    from transformers import LlamaForCausalLM

    counts = {"syncs": 0, "calls": 0, "inside": False}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, __original=original, **k):
            if counts["inside"]:
                counts["syncs"] += 1
            return __original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    def pausing(method):
        @functools.wraps(method)  # the Trainer reads forward's signature
        def run(self, *a, **k):
            outer, counts["inside"] = counts["inside"], False
            try:
                return method(self, *a, **k)
            finally:
                counts["inside"] = outer
        return run

    monkeypatch.setattr(LlamaForCausalLM, "forward", pausing(LlamaForCausalLM.forward))
    compute_loss = trainer_cls.compute_loss

    def counting(self, *a, **k):
        counts["inside"], counts["calls"] = True, counts["calls"] + 1
        try:
            return compute_loss(self, *a, **k)
        finally:
            counts["inside"] = False

    monkeypatch.setattr(trainer_cls, "compute_loss", counting)
    return counts


def test_loss_path_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Over 6 steps × 2 micro-batches, DistillationTrainer.compute_loss reads nothing back from the device beyond
    what the models' forward does, like the stock Trainer's. The old check made one `bool()` per micro-batch (12);
    the device-side record is read back only at the logging steps (3, 6)."""
    data = TokenDataset(48, length=10, causal=True)
    kw = dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=3,
              logging_nan_inf_filter=False, optim="adamw_torch", learning_rate=1e-3, max_grad_norm=1.0)
    stock_counts = _count_syncs(monkeypatch, Trainer)
    Trainer(model=tiny_llama(layers=1, seed=2), args=_args(tmp_path / "stock", **kw), train_dataset=data).train()
    monkeypatch.undo()
    ours_counts = _count_syncs(monkeypatch, DistillationTrainer)
    tr = DistillationTrainer(model=tiny_llama(layers=1, seed=2), teacher_model=tiny_llama(layers=2, seed=1),
                             args=_args(tmp_path / "ours", **kw), train_dataset=data)
    flushes = []
    flush = tr._flush_finite_check
    tr._flush_finite_check = lambda: (flushes.append(tr.state.global_step), flush())[1]
    tr.train()
    monkeypatch.undo()
    assert ours_counts["calls"] == stock_counts["calls"] == 12
    assert stock_counts["syncs"] == 0
    assert ours_counts["syncs"] == 0, ours_counts
    assert flushes[:2] == [3, 6]  # read back at the logging steps (and at the end), not every step


def _nan_from_step(model, step):
    """The model's logits turn NaN from optimizer step `step` on (micro-batches counted, one per step)."""
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) >= step else output

    model.lm_head.register_forward_hook(poison)
    return model


@pytest.mark.parametrize("every, found", [(0, 4), (1, None)])
def test_nan_stops_at_next_check_naming_the_first_bad_step(tmp_path, every, found):
    teacher = _nan_from_step(tiny_llama(layers=2, seed=1), 2)
    tr = DistillationTrainer(model=tiny_llama(layers=1, seed=2), teacher_model=teacher,
                             args=_args(tmp_path, max_steps=10, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                        logging_steps=4, save_strategy="steps", save_steps=4, learning_rate=1e-3),
                             train_dataset=TokenDataset(64, causal=True),
                             distillation_config=DistillationConfig(check_finite_steps=every))
    with pytest.raises(FloatingPointError, match=r"the soft loss part is NaN/Inf at step 2 \(parts: \{'hard': [0-9.]+, 'soft': nan\}") as e:
        tr.train()
    if found:
        assert f"found at the check after step {found})" in str(e.value)
    else:
        assert "found at" not in str(e.value)
    assert tr.state.global_step == (found or 2)
    assert not tr.state.log_history  # no log line after the bad step
    assert not list(tmp_path.glob("checkpoint-*"))  # and no checkpoint


def test_nan_in_last_steps_is_caught_at_the_end(tmp_path):
    teacher = _nan_from_step(tiny_llama(layers=2, seed=1), 3)
    tr = DistillationTrainer(model=tiny_llama(layers=1, seed=2), teacher_model=teacher,
                             args=_args(tmp_path, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                        logging_steps=100, learning_rate=1e-3),
                             train_dataset=TokenDataset(64, causal=True))
    with pytest.raises(FloatingPointError, match=r"soft loss part is NaN/Inf at step 3"):
        tr.train()
