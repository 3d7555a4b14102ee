"""Importance scores, one tensor per weight, kept up to date with fused (foreach) tensor ops.

- magnitude: |w|, read from the weights when masks are recomputed (nothing accumulated).
- movement (Sanh et al. 2020): S = -sum_t w_t * dL/dw_t — weights moving away from zero score high.
- taylor (first order, Molchanov et al. 2019): S = sum_t |w_t * dL/dw_t| — the loss change if w were zeroed.

Gradient-based scores are accumulated where the gradients are final (after gradient sync and
clipping), so every data-parallel rank computes the same scores.
"""

from __future__ import annotations

import torch

METHODS = ("magnitude", "movement", "taylor")
NEEDS_GRADS = ("movement", "taylor")


def init_scores(weights: list[torch.Tensor], method: str, names: list[str] | None = None) -> list[torch.Tensor]:
    """Zeroed accumulators (none for magnitude, which needs no history)."""
    if method not in METHODS:
        raise ValueError(f"`method`={method!r} is not one of {METHODS}.")
    if method not in NEEDS_GRADS:
        return []
    frozen = [i for i, w in enumerate(weights) if not w.requires_grad]
    if frozen:  # a frozen weight never gets a gradient: its score would stay 0 and it would be pruned first
        which = f" (e.g. {[names[i] for i in frozen[:3]]})" if names else ""
        raise ValueError(
            f"PruningConfig.method={method!r} scores weights by their gradients, but {len(frozen)} of the "
            f"{len(weights)} targeted weights are frozen (requires_grad=False){which}, as the base weights of a "
            "PEFT/LoRA model are: use method='magnitude', or leave them out with `pruning_exclude`, or unfreeze them."
        )
    return [torch.zeros_like(w, dtype=torch.float32) for w in weights]


@torch.no_grad()
def accumulate(scores: list[torch.Tensor], weights: list[torch.Tensor], method: str, grads=None) -> None:
    """Add this step's contribution (`grads`, default each weight's `.grad`; weights without one are skipped)."""
    grads = [w.grad for w in weights] if grads is None else grads
    pairs = [(s, w.detach(), g) for s, w, g in zip(scores, weights, grads) if g is not None]
    if not pairs:
        return
    s, w, g = (list(x) for x in zip(*pairs))
    if any(t.dtype != torch.float32 for t in w + g):  # low-precision weights: accumulate in float32
        w = [t.float() for t in w]
        g = [t.float() for t in g]
    if method == "movement":
        torch._foreach_addcmul_(s, w, g, value=-1.0)
    elif method == "taylor":
        prod = torch._foreach_mul(w, g)
        torch._foreach_abs_(prod)
        torch._foreach_add_(s, prod)
    else:
        raise ValueError(f"`method`={method!r} does not accumulate gradient scores.")


@torch.no_grad()
def current(scores: list[torch.Tensor], weights: list[torch.Tensor], method: str) -> list[torch.Tensor]:
    """The scores masks are computed from: higher = more important."""
    if method == "magnitude":
        return torch._foreach_abs([w.detach().float() for w in weights])
    return scores
