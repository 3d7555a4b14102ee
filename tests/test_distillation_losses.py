"""KD losses against independent computations (numpy / torch.nn.functional written out by hand)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_compress.distillation import losses as L


def _np_softmax(x, T=1.0):
    z = np.asarray(x, dtype=np.float64) / T
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_forward_kl_matches_formula(logits, T):
    s, t = logits
    got = L.kd_loss(s, L.teacher_log_probs(t, T), "forward_kl", T)
    p, q = _np_softmax(t.numpy(), T), _np_softmax(s.numpy(), T)
    want = T**2 * _np_kl(p, q).mean()
    assert got.item() == pytest.approx(want, rel=1e-5)
    # and the usual torch spelling of the same thing
    ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_reverse_kl_and_jsd_match_formula(logits):
    s, t = logits
    T, beta = 2.0, 0.3
    p, q = _np_softmax(t.numpy(), T), _np_softmax(s.numpy(), T)
    rev = L.kd_loss(s, L.teacher_log_probs(t, T), "reverse_kl", T)
    assert rev.item() == pytest.approx(T**2 * _np_kl(q, p).mean(), rel=1e-5)
    m = beta * p + (1 - beta) * q
    want = T**2 * (beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)).mean()
    jsd = L.kd_loss(s, L.teacher_log_probs(t, T), "jsd", T, beta=beta)
    assert jsd.item() == pytest.approx(want, rel=1e-5)
    # the end points are the two KLs
    fwd = L.kd_loss(s, L.teacher_log_probs(t, T), "forward_kl", T)
    assert L.kd_loss(s, L.teacher_log_probs(t, T), "jsd", T, beta=0.0).item() == pytest.approx(fwd.item())
    assert L.kd_loss(s, L.teacher_log_probs(t, T), "jsd", T, beta=1.0).item() == pytest.approx(rev.item())


def test_divergences_zero_when_equal_and_positive_otherwise(logits):
    s, t = logits
    for kind in L.KD_LOSSES:
        assert L.kd_loss(t, L.teacher_log_probs(t, 2.0), kind, 2.0).item() == pytest.approx(0.0, abs=1e-6)
        assert L.kd_loss(s, L.teacher_log_probs(t, 2.0), kind, 2.0).item() > 1e-3


def test_teacher_mixture_is_weighted_mean_of_probabilities(logits):
    s, t1 = logits
    t2 = t1.flip(-1)
    T = 3.0
    got = L.teacher_log_probs([t1, t2], T, [1.0, 3.0]).exp()
    want = 0.25 * _np_softmax(t1.numpy(), T) + 0.75 * _np_softmax(t2.numpy(), T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # a zero-weight teacher drops out and gives no NaN
    only = L.teacher_log_probs([t1, t2], T, [1.0, 0.0])
    np.testing.assert_allclose(only.exp().numpy(), _np_softmax(t1.numpy(), T), rtol=1e-5)
    assert torch.isfinite(L.kd_loss(s, only, "forward_kl", T))


@pytest.mark.parametrize("kind", L.KD_LOSSES)
def test_topk_equals_full_when_k_is_all_classes(kind):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 9, 50, generator=g), torch.randn(4, 9, 50, generator=g)
    full = L.kd_loss(s, L.teacher_log_probs(t, 2.0), kind, 2.0)
    top = t.topk(50, dim=-1)  # sorted: a permutation of the classes
    cached = L.kd_loss(s, L.cached_log_probs(top.values, 2.0), kind, 2.0, indices=top.indices)
    assert cached.item() == pytest.approx(full.item(), rel=1e-5)


def test_topk_forward_kl_close_when_truncated_mass_is_small():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 9, 50, generator=g)
    t = torch.randn(4, 9, 50, generator=g) * 6  # a confident teacher: little mass outside its top-k
    full = L.kd_loss(s, L.teacher_log_probs(t), "forward_kl").item()
    for k, tol in [(10, 0.05), (25, 0.005)]:
        top = t.topk(k, dim=-1)
        dropped = 1 - F.softmax(t, -1).topk(k, -1).values.sum(-1).mean().item()
        cached = L.kd_loss(s, L.cached_log_probs(top.values), "forward_kl", indices=top.indices).item()
        assert dropped < tol
        assert abs(cached - full) / full < tol


def test_causal_shift_masks_next_label_and_padding():
    logits = torch.randn(2, 5, 3)
    labels = torch.tensor([[1, 2, -100, 1, 2], [0, 1, 2, -100, -100]])
    shifted, mask = L.causal_shift(logits, labels, None)
    assert shifted.shape == (2, 4, 3)
    assert mask.tolist() == [[True, False, True, True], [True, True, False, False]]
    _, mask = L.causal_shift(logits, None, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    # masked positions change nothing
    t = torch.randn(2, 4, 3)
    base = L.kd_loss(shifted, L.teacher_log_probs(t), mask=mask)
    noisy = shifted.clone()
    noisy[~mask] = 100.0
    assert L.kd_loss(noisy, L.teacher_log_probs(t), mask=mask).item() == pytest.approx(base.item())


def test_hidden_and_attention_losses_match_formula():
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    keep = mask.bool()
    assert L.hidden_loss(hs, ht, "mse", mask).item() == pytest.approx(((hs - ht) ** 2).mean(-1)[keep].mean().item(), rel=1e-6)
    cos = F.cosine_similarity(hs, ht, dim=-1)
    assert L.hidden_loss(hs, ht, "cosine", mask).item() == pytest.approx((1 - cos)[keep].mean().item(), rel=1e-6)
    a_s = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1)
    a_t = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1)
    per_query = ((a_s - a_t) ** 2).sum(-1)  # [B, H, L]
    want = per_query.permute(0, 2, 1)[keep].mean()
    assert L.attention_loss(a_s, a_t, mask).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="heads"):
        L.attention_loss(a_s, a_t[:, :2], mask)


def test_kd_loss_is_float32_and_finite_for_low_precision_logits():
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(8, 1000, generator=g) * 30).bfloat16()
    t = (torch.randn(8, 1000, generator=g) * 30).bfloat16()
    T = 20.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.kd_loss(s, L.teacher_log_probs(t, T), "forward_kl", T)
    want = L.kd_loss(s.float(), L.teacher_log_probs(t.float(), T), "forward_kl", T)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_layer_maps_and_projections():
    from hf_compress.distillation.layers import make_projections, resolve_layer_map, uniform_layer_map

    assert uniform_layer_map(3, 6) == {0: 1, 1: 3, 2: 5}
    assert uniform_layer_map(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert uniform_layer_map(2, 12) == {0: 5, 1: 11}
    m = uniform_layer_map(5, 7)
    assert sorted(m.values()) == list(m.values()) and m[4] == 6
    assert resolve_layer_map(None, 3, 6) == {0: 1, 1: 3, 2: 5}
    assert resolve_layer_map({0: 0}, 3, 6) == {0: 0}
    with pytest.raises(ValueError, match="layer_map entry 3: 0"):
        resolve_layer_map({3: 0}, 3, 6)
    state = torch.get_rng_state()
    p1, p2 = make_projections(16, 32, [0, 2], seed=5), make_projections(16, 32, [0, 2], seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert set(p1) == {"0", "2"} and p1["0"].weight.shape == (32, 16) and torch.equal(p1["2"].weight, p2["2"].weight)
    assert len(make_projections(32, 32, [0, 1])) == 0


def test_bad_kind_names():
    with pytest.raises(ValueError, match="kd_loss"):
        L.kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), "kl")
    with pytest.raises(ValueError, match="hidden_loss"):
        L.hidden_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), "l1")
    assert math.isfinite(L.masked_mean(torch.ones(3), torch.zeros(3)).item())
