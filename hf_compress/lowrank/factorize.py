"""The mechanism on bare tensors and modules: truncated (weighted) SVD, rank rules, the factorised layer.

A Linear y = W x + b (W: out x in) becomes ``LowRankLinear`` = ``nn.Sequential(Linear(in, r, bias=False),
Linear(r, out, bias))``: y = B (A x) + b with A = sqrt(S_r) V_r^T (r x in) and B = U_r sqrt(S_r) (out x r),
where U S V^T is the SVD of W (plain), of W diag(s) (ASVD: then A = sqrt(S_r) V_r^T diag(1/s)), or of
diag(d) W (FWSVD: then B = diag(1/d) U_r sqrt(S_r)). Both factors are ordinary Linear layers, so every tool
that works on Linears (QAT's fake quantisation, int8 export, sparse storage) works on them. The SVD runs
in float64; the factors take the weight's dtype and device. GPT-2's Conv1D (weight in x out) is treated as
the Linear with weight W^T.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..modules import out_axis


class LowRankLinear(nn.Sequential):
    """``Sequential(Linear(in, r, bias=False), Linear(r, out, bias))`` with `in_features`, `out_features`, `rank`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__(nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype),
                         nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype))
        self.in_features, self.out_features = in_features, out_features

    @property
    def rank(self) -> int:
        return _width(self[0], out=True)

    def __getattr__(self, name):
        if name == "weight":  # code written for the dense Linear (e.g. a QAT plan made before factorisation)
            raise AttributeError(
                f"LowRankLinear({self.in_features} -> {self.out_features}) has no single `weight`: it was factorised "
                "into two Linears (.0 and .1) by hf_compress.lowrank. A QATCallback (or other tool) that chose its "
                "layers before the factorisation still names the dense layer: list LowRankCallback before "
                "QATCallback with lowrank_start_step=0 (factorised when the Trainer is built, so QAT quantises the "
                "factors)."
            )
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _width(m: nn.Module, out: bool) -> int:
    """out_features / in_features of a Linear-like layer (Linear, Conv1D, a quantised Linear)."""
    for attr in ("out_features", "nf") if out else ("in_features",):
        if isinstance(getattr(m, attr, None), int):
            return getattr(m, attr)
    axis = out_axis(m)
    return m.weight.shape[axis if out else 1 - axis]


def is_lowrank(m: nn.Module) -> bool:
    return isinstance(m, LowRankLinear)


def dense_weight(m: nn.Module) -> torch.Tensor:
    """W (out x in) of a Linear / Conv1D, or B A of a LowRankLinear, detached."""
    if is_lowrank(m):
        return m[1].weight.detach() @ m[0].weight.detach()
    w = m.weight.detach()
    return w.t() if out_axis(m) == 1 else w


def shape_of(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features)."""
    if is_lowrank(m):
        return m.in_features, m.out_features
    axis = out_axis(m)
    return m.weight.shape[1 - axis], m.weight.shape[axis]


def saves_parameters(in_features: int, out_features: int, rank: int) -> bool:
    """Whether rank-r factors hold fewer weights than the dense matrix: r (in + out) < in out."""
    return rank * (in_features + out_features) < in_features * out_features


def break_even(in_features: int, out_features: int) -> float:
    return in_features * out_features / (in_features + out_features)


def rule_rank(name: str, in_features: int, out_features: int, ranks: dict | None, fraction: float | None) -> int | None:
    """The rank the rules give without a spectrum: the first `ranks` regex that matches, else the fraction of
    min(in, out) (at least 1); None when the energy rule decides (or no rule applies)."""
    for pattern, r in (ranks or {}).items():
        if re.search(pattern, name):
            return int(r)
    if fraction is not None:
        return max(1, round(fraction * min(in_features, out_features)))
    return None


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values keep `energy` of sum(sigma^2)."""
    e = singular_values.double() ** 2
    kept = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return int(min(len(e), int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12)) + 1))


def weighting(method: str, stats: dict | None, alpha: float = 0.5) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(input scale s [in] or None, row weight d [out] or None) of `method` from collected statistics."""
    if method == "svd" or not stats:
        return None, None
    if method == "asvd":
        mean = stats["abs_sum"].double() / max(float(stats["count"]), 1.0)
        s = mean.clamp_min(mean.max().clamp_min(1e-12) * 1e-6) ** alpha  # a channel never active keeps a tiny weight
        return s, None
    fisher = stats["grad_sq"].double()
    d = (fisher + fisher.mean().clamp_min(1e-30) * 1e-6).sqrt()
    return None, d / d.mean()


def decompose(w: torch.Tensor, s: torch.Tensor | None = None, d: torch.Tensor | None = None):
    """SVD (float64) of the weighted matrix diag(d) W diag(s): U, S, Vh."""
    m = w.double()
    if s is not None:
        m = m * s.to(m.device)[None, :]
    if d is not None:
        m = m * d.to(m.device)[:, None]
    return torch.linalg.svd(m, full_matrices=False)


def factors(u, sv, vh, rank: int, s=None, d=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: r x in, B: out x r), float64, with B A the truncated SVD undone from the weighting."""
    root = sv[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    if s is not None:
        a = a / s.to(a.device)[None, :]
    if d is not None:
        b = b / d.to(b.device)[:, None]
    return a, b


@torch.no_grad()
def factorise_layer(m: nn.Module, rank: int, u=None, sv=None, vh=None, s=None, d=None) -> LowRankLinear:
    """A new LowRankLinear of `rank` from Linear / Conv1D `m` (its bias Parameter is reused, so an optimizer that
    holds it keeps it). `u, sv, vh`: a decomposition already computed by `decompose`."""
    in_f, out_f = shape_of(m)
    w = m.weight
    if u is None:
        u, sv, vh = decompose(dense_weight(m), s, d)
    a, b = factors(u, sv, vh, rank, s, d)
    bias = getattr(m, "bias", None)
    new = LowRankLinear(in_f, out_f, rank, bias=bias is not None, device=w.device, dtype=w.dtype)
    new[0].weight = nn.Parameter(a.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    new[1].weight = nn.Parameter(b.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    if bias is not None:
        new[1].bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
    new.train(m.training)
    return new


@torch.no_grad()
def shrink_layer(m: LowRankLinear, rank: int, s=None, d=None) -> list[torch.Tensor]:
    """Lower the rank of `m` in place to the truncated (weighted) SVD of its product B A. The two Linear modules
    and their Parameter objects stay (so fake quantisation and optimizer param groups stay); their data changes
    shape. Returns the Parameters whose shape changed (their optimizer state must go)."""
    if rank >= m.rank:
        return []
    u, sv, vh = decompose(dense_weight(m), s, d)
    a, b = factors(u, sv, vh, rank, s, d)
    out = []
    for lin, t in ((m[0], a), (m[1], b)):
        p = lin.weight
        p.grad = None
        p.data = t.to(device=p.device, dtype=p.dtype).contiguous()
        out.append(p)
    m[0].out_features = rank
    m[1].in_features = rank
    return out


def parameters_of(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def rank_at(step: int, final: int, full: int, start: int, end: int, frequency: int, schedule: str) -> int:
    """Gradual: the rank in effect after `step` optimizer steps, from `full` at `start` to `final` at `end`
    (the pruning schedules applied to the fraction of rank removed)."""
    from ..pruning.schedules import sparsity_at

    if schedule == "one_shot":
        return final
    removed = sparsity_at(step, 1.0, start, end, frequency, schedule)
    return max(final, min(full, final + math.floor((full - final) * (1.0 - removed) + 0.5)))
