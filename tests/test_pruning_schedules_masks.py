"""Schedules and mask construction, checked against independent computations."""

import pytest
import torch

from hf_compress.pruning import apply_masks, is_update_step, sparsity_at
from hf_compress.pruning.masks import kth_smallest, nm_masks, spread, unit_masks, unit_sum, unstructured_masks


def test_cubic_schedule_values():
    # Zhu & Gupta: s_t = s_f (1 - (1 - (t - t0) / (t1 - t0))^3), frequency 1
    for t, expected in [(0, 0.0), (10, 0.0), (20, 0.9 * (1 - 0.75**3)), (30, 0.9 * (1 - 0.5**3)), (50, 0.9), (99, 0.9)]:
        assert sparsity_at(t, 0.9, start=10, end=50, frequency=1, schedule="cubic") == pytest.approx(expected)


def test_schedule_holds_between_update_points():
    # frequency 10 from step 5: masks change at 5, 15, 25 and at end=30; steps in between keep the last value
    assert sparsity_at(14, 0.8, 5, 30, frequency=10, schedule="linear") == pytest.approx(0.0)
    assert sparsity_at(15, 0.8, 5, 30, frequency=10, schedule="linear") == pytest.approx(0.8 * 10 / 25)
    assert sparsity_at(24, 0.8, 5, 30, frequency=10, schedule="linear") == pytest.approx(0.8 * 10 / 25)
    assert sparsity_at(29, 0.8, 5, 30, frequency=10, schedule="linear") == pytest.approx(0.8 * 20 / 25)
    assert sparsity_at(30, 0.8, 5, 30, frequency=10, schedule="linear") == 0.8
    assert [t for t in range(40) if is_update_step(t, 5, 30, 10, "linear")] == [5, 15, 25, 30]


def test_one_shot_and_unknown_schedule():
    assert sparsity_at(6, 0.5, 7, 7, schedule="one_shot") == 0.0
    assert sparsity_at(7, 0.5, 7, 7, schedule="one_shot") == 0.5
    assert [t for t in range(20) if is_update_step(t, 7, 7, 1, "one_shot")] == [7]
    with pytest.raises(ValueError, match="schedule"):
        sparsity_at(3, 0.5, 0, 10, schedule="exponential")


def test_cubic_prunes_faster_early_than_linear():
    c = [sparsity_at(t, 0.9, 0, 100, schedule="cubic") for t in range(0, 101, 10)]
    lin = [sparsity_at(t, 0.9, 0, 100, schedule="linear") for t in range(0, 101, 10)]
    assert all(a >= b - 1e-12 for a, b in zip(c, lin)) and c[1] > lin[1]
    assert c == sorted(c)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_unstructured_exact_count(scope):
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(30, 17, generator=g), torch.rand(8, 9, generator=g), torch.rand(64, generator=g)]
    masks = unstructured_masks(scores, 0.73, scope)
    if scope == "global":
        n = sum(s.numel() for s in scores)
        assert sum(int((~m).sum()) for m in masks) == round(0.73 * n)
        flat = torch.cat([s.flatten() for s in scores])
        kept = torch.cat([m.flatten() for m in masks])
        assert flat[~kept].max() < flat[kept].min()  # the lowest scores went
    else:
        for s, m in zip(scores, masks):
            assert int((~m).sum()) == round(0.73 * s.numel())
            assert s[~m].max() < s[m].min()


def test_unstructured_high_sparsity_path():
    s = torch.randn(1000)
    (m,) = unstructured_masks([s], 0.95, "global")  # k > n/2: selects the kept side
    assert int((~m).sum()) == 950 and s[~m].max() < s[m].min()


@pytest.mark.parametrize("sparsity", [0.001, 0.5, 0.9, 0.999])
def test_kth_smallest_matches_kthvalue_on_large_input(sparsity):
    # > 65k entries: the sampled-bracket path, which must give torch.kthvalue's exact answer
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(300, 200, generator=g).abs(), torch.rand(50_000, generator=g), torch.randn(40, 999, generator=g)]
    flat = torch.cat([s.flatten() for s in scores])
    k = round(sparsity * flat.numel())
    t, ties = kth_smallest(scores, k)
    assert float(t) == float(torch.kthvalue(flat, k).values)
    assert ties == k - int((flat < t).sum())


def test_unstructured_ties_across_tensors_prune_exactly_k():
    # already-pruned weights all score 0: the zeros of later tensors must be kept once k is reached
    g = torch.Generator().manual_seed(4)
    scores = [torch.rand(300, 400, generator=g) for _ in range(3)]
    for s in scores:
        s[s < 0.5] = 0
    n = sum(s.numel() for s in scores)
    for sparsity in (0.1, 0.3, 0.5, 0.8):
        masks = unstructured_masks(scores, sparsity, "global")
        assert sum(int((~m).sum()) for m in masks) == round(sparsity * n)
        flat = torch.cat([s.flatten() for s in scores])
        kept = torch.cat([m.flatten() for m in masks])
        assert flat[~kept].max() <= flat[kept].min()


def test_nm_masks_along_input_dim():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g)  # Linear: (out, in) — groups run along dim 1
    (m,) = nm_masks([w.abs()], 2, 4, [1])
    groups = m.reshape(6, 4, 4)
    assert (groups.sum(-1) == 2).all()
    # the two kept entries of each group are its two largest magnitudes
    top = w.abs().reshape(6, 4, 4).topk(2, dim=-1).indices
    assert torch.equal(groups.gather(-1, top), torch.ones_like(top, dtype=torch.bool))
    # transposed layout (GPT-2 Conv1D: (in, out)): groups run along dim 0
    (mt,) = nm_masks([w.abs().T.contiguous()], 2, 4, [0])
    assert torch.equal(mt.T, m)
    with pytest.raises(ValueError, match="divisible"):
        nm_masks([torch.rand(4, 6)], 2, 4, [1])


def test_unit_masks_keep_one_per_group():
    scores = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([5.0, 6.0, 7.0, 8.0])]
    keep = unit_masks(scores, 0.5, "global", keep_one=True)
    # 4 of 8 go; group 0 is all lower but keeps its best unit
    assert [k.tolist() for k in keep] == [[False, False, False, True], [False, True, True, True]]
    local = unit_masks(scores, 0.5, "local")
    assert [k.tolist() for k in local] == [[False, False, True, True]] * 2


def test_unit_sum_and_spread_roundtrip():
    w = torch.arange(24.0).reshape(6, 4)  # 3 units of 2 rows
    assert unit_sum(w, 0, 3).tolist() == [w[:2].sum().item(), w[2:4].sum().item(), w[4:].sum().item()]
    m = spread(torch.tensor([True, False, True]), 0, w)
    assert m.shape == w.shape and not m[2:4].any() and m[:2].all() and m[4:].all()
    mc = spread(torch.tensor([False, True]), 1, w)  # columns
    assert not mc[:, :2].any() and mc[:, 2:].all()


def test_apply_masks_weights_and_grads():
    w = torch.nn.Parameter(torch.randn(4, 4))
    w.grad = torch.randn(4, 4)
    m = torch.rand(4, 4) > 0.5
    apply_masks([w, w.grad, None], [m, m, m])
    assert (w[~m] == 0).all() and (w.grad[~m] == 0).all() and (w[m] != 0).all()
