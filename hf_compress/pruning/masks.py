"""Masks: which weights are kept (True) and the one function that enforces them.

- unstructured: the k lowest scores go, k = round(sparsity * n) exactly — over all targeted weights at
  once (`scope="global"`: one top-k over the concatenated scores) or per module (`"local"`).
- N:M: at least n zeros in every group of m consecutive weights along the *input* dimension (the
  layout sparse tensor cores accelerate, 2:4 by default).
- units (heads, FFN neurons, layers): scores summed per unit, the lowest units go; a unit's mask is
  then spread over the slices of the weights it owns (rows of the producing Linear, columns of the
  consuming one).
"""

from __future__ import annotations

import torch

GRANULARITIES = ("unstructured", "n:m", "heads", "neurons", "layers")
STRUCTURED = ("heads", "neurons", "layers")


def _keep_highest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of `flat` with exactly its k lowest entries False (one top-k; the smaller side is selected)."""
    n = flat.numel()
    k = max(0, min(int(k), n))
    if k <= n - k:
        keep = torch.ones(n, dtype=torch.bool, device=flat.device)
        if k:
            keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    else:
        keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
        if n - k:
            keep[torch.topk(flat, n - k, largest=True, sorted=False).indices] = True
    return keep


@torch.no_grad()
def kth_smallest(scores: list[torch.Tensor], k: int) -> tuple[torch.Tensor, int]:
    """(t, ties): the k-th smallest value t over all of `scores` (k >= 1) and how many entries equal to t
    are among the k smallest. Exact, in a few linear passes: a strided sample brackets t, then only the
    entries inside the bracket are ranked — a top-k/kthvalue over millions of scores costs several times
    more on CPU. The sample decides the speed, never the answer."""
    flats = [s.reshape(-1).float() for s in scores]
    n = sum(f.numel() for f in flats)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}].")
    t = None
    if n > (1 << 16):
        step = n >> 16  # a strided sample of ~65k entries
        sample = torch.cat([f[step // 2 :: step] for f in flats])
        q = (k - 0.5) / n
        lo, hi = torch.quantile(sample, torch.tensor([max(0.0, q - 0.01), min(1.0, q + 0.01)], device=sample.device))
        below = int(sum((f < lo).sum() for f in flats))
        band = torch.cat([f[(f >= lo) & (f <= hi)] for f in flats])
        if below < k <= below + band.numel():
            t = torch.kthvalue(band, k - below).values
    if t is None:  # small input, or the bracket missed (never seen; still exact)
        t = torch.kthvalue(torch.cat(flats), k).values
    ties = k - int(sum((f < t).sum() for f in flats))
    return t, ties


def _prune_lowest(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep-masks (bool) over `scores` with exactly their k lowest entries False; ties at the threshold go
    in order (tensor by tensor, then index), so the result is deterministic."""
    if k <= 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    t, ties = kth_smallest(scores, k)
    masks = []
    for s in scores:
        if ties == 0:  # the tie budget is spent: every entry equal to t is kept
            masks.append(s >= t)
            continue
        eq = s == t
        late = eq.reshape(-1).cumsum(0).view_as(s) > ties  # the first `ties` entries equal to t are pruned
        masks.append((s > t) | (eq & late))  # out of place: also works on sharded (FSDP2 DTensor) scores
        ties -= min(ties, int(eq.sum()))
    return masks


@torch.no_grad()
def unstructured_masks(scores: list[torch.Tensor], sparsity: float, scope: str = "global") -> list[torch.Tensor]:
    if scope == "local":
        return [_prune_lowest([s], round(sparsity * s.numel()))[0] for s in scores]
    if scope != "global":
        raise ValueError(f"`scope`={scope!r} must be 'global' or 'local'.")
    return _prune_lowest(scores, round(sparsity * sum(s.numel() for s in scores)))


@torch.no_grad()
def nm_masks(scores: list[torch.Tensor], n: int, m: int, in_dims: list[int]) -> list[torch.Tensor]:
    """Prune the n lowest scores in every group of m consecutive weights along each tensor's input dim."""
    out = []
    for s, d in zip(scores, in_dims):
        t = s.movedim(d, -1)
        shape = t.shape
        if shape[-1] % m:
            raise ValueError(f"N:M pruning needs an input size divisible by m={m}; got a weight of shape {tuple(s.shape)}.")
        groups = t.reshape(-1, m)
        keep = torch.ones_like(groups, dtype=torch.bool)
        if n:
            keep.scatter_(1, torch.topk(groups, n, dim=1, largest=False, sorted=False).indices, False)
        out.append(keep.reshape(shape).movedim(-1, d))
    return out


@torch.no_grad()
def unit_masks(unit_scores: list[torch.Tensor], sparsity: float, scope: str = "global", keep_one: bool = True) -> list[torch.Tensor]:
    """Per group of units (e.g. the heads of one layer), which units survive.

    `keep_one` keeps the best unit of every group (a layer cannot lose all its heads); without it,
    at least one unit survives overall. `global` ranks units of all groups together.
    """
    if scope == "local":
        masks = []
        for s in unit_scores:
            k = min(round(sparsity * s.numel()), s.numel() - 1 if keep_one else s.numel())
            masks.append(_keep_highest(s.float(), k))
        return masks
    sizes = [s.numel() for s in unit_scores]
    flat = torch.cat([s.reshape(-1).float() for s in unit_scores])
    protected = len(sizes) if keep_one else 1
    if keep_one:  # the best unit of each group can never go
        starts = torch.tensor([0] + sizes[:-1], device=flat.device).cumsum(0)
        best = torch.stack([s.float().argmax() for s in unit_scores]) + starts
        flat = flat.clone()
        flat[best] = float("inf")
    else:
        flat = flat.clone()
        flat[flat.argmax()] = float("inf")
    k = min(round(sparsity * flat.numel()), flat.numel() - protected)
    return list(_keep_highest(flat, k).split(sizes))


def unit_sum(score: torch.Tensor, dim: int, n_units: int, segments: int = 1) -> torch.Tensor:
    """Sum of `score` over each of `n_units` equal slices along `dim`. With `segments` > 1 the dim
    packs several such runs back to back (GPT-2's fused q|k|v): unit u owns its slice in each."""
    return score.movedim(dim, 0).reshape(segments, n_units, -1).sum((0, 2))


def spread(unit_mask: torch.Tensor, dim: int, like: torch.Tensor, segments: int = 1) -> torch.Tensor:
    """Element mask shaped like `like`: unit u covers the u-th equal slice along `dim` (in each segment)."""
    size = like.shape[dim] // (unit_mask.numel() * segments)
    m = unit_mask.repeat_interleave(size).repeat(segments)
    view = [1] * like.dim()
    view[dim] = -1
    return m.view(view).expand_as(like).contiguous()


@torch.no_grad()
def apply_masks(tensors: list[torch.Tensor | None], masks: list[torch.Tensor]) -> None:
    """Zero what the masks drop, in place, in one fused op. Used for weights *and* their gradients:
    zero gradients keep AdamW's moments at zero, zero weights after the step undo anything the
    optimizer state (momentum, weight decay) would have revived."""
    pairs = [(t, m) for t, m in zip(tensors, masks) if t is not None]
    if pairs:
        torch._foreach_mul_([t.detach() if t.requires_grad else t for t, _ in pairs], [m for _, m in pairs])
