"""Replacing parameters inside a live torch optimizer (the Trainer builds its optimizer before any callback
event of `train()`, so factorising mid-run must change the optimizer's param groups explicitly)."""

from __future__ import annotations

import torch


def torch_optimizer(optimizer):
    """The torch.optim.Optimizer under wrappers such as accelerate's AcceleratedOptimizer."""
    opt = optimizer
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def replace_parameters(optimizer, old: torch.Tensor, new: list[torch.Tensor]) -> bool:
    """Put `new` where `old` is in its param group (same group: same learning rate and weight decay; same position,
    which is where the Trainer's create_optimizer would put them in a model built factorised, so a resumed run
    loads the optimizer state into the same slots) and drop `old`'s state (AdamW moments of another shape).
    `new == [old]` only drops the state (a parameter whose shape changed). False when `old` is not optimised
    (a frozen weight): then nothing changes."""
    opt = torch_optimizer(optimizer)
    for group in opt.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if p is old:
                params[i:i + 1] = list(new)
                opt.state.pop(old, None)
                for q in new:
                    opt.state.pop(q, None)
                return True
    return False
