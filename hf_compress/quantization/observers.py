"""Activation range observers: minmax, moving_average, percentile.

Percentiles are exact: `quantiles(x, qs)` equals `torch.quantile(x, qs)` (linear interpolation) on the
whole tensor, of any size. On CPU it first keeps the values beyond a threshold read from a strided
sample and checks that enough of them were kept (else it uses the whole tensor), so the tail order
statistics come from a small set; a sample can only make it slower, never wrong.

PTQ calibration (`calibrating=True`, set by `quantize_model`) commits once per batch and averages with
equal weights: after n batches moving_average holds the mean of the n per-batch minima / maxima and
percentile the mean of the n per-batch percentiles (minmax: the min / max over the batches, as
always). During training the moving averages are exponential with weight `averaging`.

An observer watches the input of one layer. Statistics of the batches of the current optimizer step
accumulate in `pending_*` buffers; `commit()` (once per optimizer step, after `sync_observers` has
reduced the pending statistics over all ranks) folds them into the range used for quantisation. So
within a step every rank quantises with the same, already committed range, and no host sync happens
in the forward pass. A step the optimizer skips (fp16 overflow) is `discard()`ed instead: its
statistics never reach the range. Before the first commit an observer is not `ready` and its layer's activations
stay in float.

Buffers are non-persistent: they never enter the model's state_dict (the model saves and reloads as a
plain model); `state()` / `load_state()` carry them into Trainer checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .numerics import qparams

KINDS = ("minmax", "moving_average", "percentile")
# "dynamic" needs no observer: each tensor is quantised with its own min / max (fake_quant.py)
ACT_RANGES = KINDS + ("dynamic",)
MAX_SAMPLES = 1 << 16  # percentile: size of the strided sample that picks the tail threshold (CPU)


def _order_stats(x: torch.Tensor, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ascending order statistics x_(i), x_(j) (0-based, j in {i, i + 1}) of flat float32 `x`."""
    n = x.numel()
    if x.device.type != "cpu":  # kthvalue: no host sync
        return torch.kthvalue(x, i + 1).values, torch.kthvalue(x, j + 1).values
    a = x.numpy()
    upper = i >= n // 2
    need = n - i if upper else j + 1  # how many extreme values must be kept
    if need * 4 < n and n > MAX_SAMPLES:
        sample = a[:: -(-n // MAX_SAMPLES)]
        m = sample.size
        ks = min(m, -(-2 * need * m // n) + 8)  # about twice the share of values needed, read on the sample
        t = np.partition(sample, m - ks)[m - ks] if upper else np.partition(sample, ks - 1)[ks - 1]
        kept = a[a >= t] if upper else a[a <= t]  # every value beyond t: the top (bottom) kept.size of x
        if kept.size >= need:  # else the sample misled the threshold: use the whole tensor
            off = n - kept.size if upper else 0
            a, i, j = kept, i - off, j - off
    v = np.partition(a, i)  # one kth: much faster than a list of them
    return torch.tensor(v[i]), torch.tensor(v[i + 1:].min() if j > i else v[i])  # x_(i+1) = min of what follows


@torch.no_grad()
def quantiles(x: torch.Tensor, qs) -> torch.Tensor:
    """torch.quantile(x.flatten(), qs) (linear interpolation), exact for any size (torch.quantile stops at
    2^24 elements) and fast for the tails on CPU."""
    x = x.detach().float().reshape(-1)
    n = x.numel()
    out = []
    for q in qs:
        pos = float(q) * (n - 1)
        i = min(int(pos), n - 1)
        j = min(i + 1, n - 1)
        a, b = _order_stats(x, i, j)
        out.append(torch.lerp(a, b, torch.tensor(pos - i, dtype=a.dtype, device=a.device)))
    return torch.stack(out)


class Observer(nn.Module):
    """Running range [lo, hi] of the tensors it sees (per tensor)."""

    def __init__(self, kind: str = "minmax", averaging: float = 0.01, percentile: float = 99.99):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"observer={kind!r}: use one of {KINDS}.")
        if not 0 < averaging <= 1:
            raise ValueError(f"averaging={averaging}: use a value in (0, 1].")
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile={percentile}: use a value in (50, 100], e.g. 99.99.")
        self.kind, self.averaging, self.percentile = kind, averaging, percentile
        self.observing = True  # False once frozen
        self.observe_in_eval = False  # PTQ calibration observes with the model in eval mode
        self.ready = False  # True after the first commit that had data
        self._seen = False  # a batch arrived since the last commit (python side: no host sync)
        for name in ("lo", "hi"):
            self.register_buffer(name, torch.zeros(()), persistent=False)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("pending", torch.zeros(3), persistent=False)  # lo, hi, count
        # PTQ calibration: equal weights, the mean over the committed batches (`commits` of them)
        self.calibrating = False
        self.register_buffer("commits", torch.zeros(()), persistent=False)
        self._reset_pending()

    def _reset_pending(self):
        if self.kind == "percentile":  # sums of per-batch percentiles
            self.pending.zero_()
        else:  # min / max over the step's batches
            self.pending.copy_(torch.tensor([float("inf"), float("-inf"), 0.0]))

    @torch.no_grad()
    def batch_range(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().reshape(-1)
        if self.kind != "percentile":
            return torch.stack(torch.aminmax(x))
        p = self.percentile / 100
        return quantiles(x, (1 - p, p))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record the batch (when observing); returns x unchanged."""
        if self.observing and x.numel():
            r = self.batch_range(x)
            if self.kind == "percentile":
                self.pending[:2] += r
            else:
                self.pending[0] = torch.minimum(self.pending[0], r[0])
                self.pending[1] = torch.maximum(self.pending[1], r[1])
            self.pending[2] += 1
            self._seen = True
        return x

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the pending statistics into [lo, hi] (tensor ops only; a step without data changes nothing)."""
        n = self.pending[2]
        has = n > 0
        lo, hi = self.pending[0], self.pending[1]
        if self.kind == "percentile":
            lo, hi = lo / n.clamp(min=1), hi / n.clamp(min=1)
        if self.kind == "minmax":
            new_lo, new_hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:  # moving average of the per-step ranges: exponential, or (calibration) equal weights
            if self.calibrating:
                self.commits += has.float()
                c = 1 / self.commits.clamp(min=1)
            else:
                c = self.averaging
            new_lo, new_hi = self.lo + c * (lo - self.lo), self.hi + c * (hi - self.hi)
        first = has & ~self.initialized
        self.lo.copy_(torch.where(first, lo, torch.where(has, new_lo, self.lo)))
        self.hi.copy_(torch.where(first, hi, torch.where(has, new_hi, self.hi)))
        self.initialized |= has
        self._reset_pending()
        self.ready = self.ready or self._seen
        self._seen = False

    @torch.no_grad()
    def discard(self) -> None:
        """Drop the pending statistics without committing them (a step the fp16 grad scaler skipped)."""
        self._reset_pending()
        self._seen = False

    def qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams(self.lo, self.hi, bits, symmetric)

    def state(self) -> dict[str, torch.Tensor]:
        return {"lo": self.lo, "hi": self.hi, "initialized": self.initialized}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in ("lo", "hi", "initialized"):
            getattr(self, k).copy_(tensors[k])
        self._reset_pending()
        self._seen = False
        self.ready = bool(self.initialized)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, observing={self.observing}, ready={self.ready}"


@torch.no_grad()
def sync_observers(observers: list[Observer]) -> None:
    """Reduce the pending statistics over all ranks (one collective), so every rank commits the same range."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    # every rank holds the same observers in the same order, so the collectives line up
    for kind in KINDS:
        live = [o for o in observers if o.observing and o.kind == kind]
        if not live:
            continue
        flat = torch.stack([o.pending for o in live])
        if kind == "percentile":  # means of per-batch percentiles: sum the sums and the counts
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        else:  # min of lo, max of hi: one MAX over (-lo, hi); counts: one SUM
            mm = torch.stack([-flat[:, 0], flat[:, 1]], 1)
            dist.all_reduce(mm, op=dist.ReduceOp.MAX)
            counts = flat[:, 2].contiguous()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            flat = torch.stack([-mm[:, 0], mm[:, 1], counts], 1)
        for o, row in zip(live, flat):
            o.pending.copy_(row)
