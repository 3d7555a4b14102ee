"""fp16: which optimizer steps the gradient scaler skips, known before the step.

With fp16 mixed precision accelerate wraps the Trainer's optimizer in an `AcceleratedOptimizer` holding a
`GradScaler`. The scaler skips the step when any gradient of the optimizer's parameters is non-finite
(`GradScaler.unscale_` sets `found_inf` from exactly that test, and the Trainer has already unscaled
when `on_pre_optimizer_step` fires). `skipped_by_scaler` repeats that test there, over the same
gradients (unscaled, clipped: multiplying by a finite positive factor — the unscale, the clip
coefficient — neither creates nor removes a non-finite value), so the callbacks can leave the scores,
the masks and the observer ranges of that step alone.

Why not `AcceleratedOptimizer.step_was_skipped` after the step: it reports whether the scaler *called*
the optimizer's `step`, and with fused optimizers (`adamw_torch_fused`, the Trainer's default) the scaler
always calls it and the fused kernel skips the update itself, so `step_was_skipped` stays False on
every overflow step (and the Trainer steps its LR scheduler then). The gradients are the one signal
that holds for every optimizer.
"""

from __future__ import annotations

import torch

from ..sharding import is_sharded, local


def scaler_of(optimizer):
    """The enabled grad scaler of an `AcceleratedOptimizer`, or None (no fp16: the optimizer never skips)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler


@torch.no_grad()
def skipped_by_scaler(optimizer) -> bool:
    """True when this optimizer step will be skipped by the fp16 grad scaler (a non-finite gradient).

    Call it where the gradients are final (`on_pre_optimizer_step`). Without a scaler: False. Under FSDP2
    (sharded gradients) the answer is reduced over the ranks, as the scaler's own `found_inf` is, so every
    rank decides alike.
    """
    if optimizer is None or scaler_of(optimizer) is None:
        return False
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return False
    sharded = any(is_sharded(g) for g in grads)
    pieces = [local(g) for g in grads]
    pieces = [g.coalesce().values() if g.is_sparse else g for g in pieces]
    # max |g| per tensor: inf for an inf, NaN for a NaN (max propagates NaN)
    norms = torch._foreach_norm([g for g in pieces if g.numel()], float("inf"))
    dev = pieces[0].device
    bad = torch.stack([(~n.isfinite()).to(dev, torch.float32) for n in norms]).amax() if norms else torch.zeros((), device=dev)
    if sharded:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad > 0)
