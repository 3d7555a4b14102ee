"""The one quantise / dequantise used by QAT, PTQ and every export backend.

Uniform ("int") grid, the scale / zero-point formula:

    q  = clamp(round(r / S + Z), qmin, qmax)        r̂ = (q - Z) · S

(computed as Z + round(r · (1/S)) with the float32 reciprocal, exactly as PyTorch's fused
fake-quantisation kernels do: training runs those kernels, export stores the same integers)

* symmetric, `weight_range` (WEIGHT_RANGES) choosing the integer range and the scale:
  - "restricted": q in [-(2^(b-1) - 1), 2^(b-1) - 1], S = max|r| / qmax (int4: [-7, 7], 15 levels;
    +max and -max both exact, nothing clipped);
  - "full": q in [-2^(b-1), 2^(b-1) - 1], S = max|r| / ((qmax - qmin) / 2) (int4: [-8, 7], S = max|r| / 7.5):
    torchao's MappingType.SYMMETRIC and torch.ao's symmetric observers, bit for bit. A group's largest
    positive value lands on 7.5 and is clipped to 7·S (its STE gradient is 0, as in torchao);
  - "full_no_clip": q in [-2^(b-1), 2^(b-1) - 1], S = max(-min / 2^(b-1), max / qmax): torchao's
    MappingType.SYMMETRIC_NO_CLIPPING_ERR (no value clipped; -8 used when the negative side dominates);
* asymmetric: q in [-2^(b-1), 2^(b-1) - 1], S = (max - min) / (qmax - qmin), Z = qmin - round(min / S).
  The observed range is first widened to contain 0 and Z is an *integer* inside [qmin, qmax], so the
  real value 0.0 is exactly on the grid (q = Z): pruned zeros stay exactly zero after quantisation.

"nf4" grid (bitsandbytes' NormalFloat4, for the bnb-nf4 export): r̂ = code[i] · absmax(group), with i
the nearest of 16 fixed levels that include 0.0; groups of `group_size` along the input dimension are
exactly bitsandbytes' blocks, so what QAT trains on is what bitsandbytes stores.

Granularity: per tensor, per output channel, or per group of `group_size` consecutive input features
of each output channel. Weights are handled as [out, in] (GPT-2's Conv1D stores [in, out]: `axis=1`).

`round` is round-half-to-even (torch.round), as in PyTorch's own quantisers. Every computation runs in
float32 whatever the input dtype (bf16 / fp16 / autocast) and the result is cast back.

Straight-through estimator: d r̂ / d r = 1 where round(r/S + Z) lies inside [qmin, qmax] and 0 where it
was clamped; scales and zero points get no gradient (they are statistics of the tensor, not learnt).
Group-wise scales use the per-channel kernel on the [out · n_groups, group] view of the weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

FORMATS = ("int", "nf4")
# integer range of symmetric uniform grids (asymmetric grids always use [-2^(b-1), 2^(b-1) - 1]); see int_range
WEIGHT_RANGES = ("restricted", "full", "full_no_clip")
# bitsandbytes' NF4 levels (QLoRA, arXiv:2305.14314), as hard-coded in bitsandbytes.functional
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_GROUP_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' allowed blocksizes
# smallest uniform-grid scale (torch's observers use the same floor): a near-zero range would otherwise
# give a scale whose float32 reciprocal is inf, and x · inf is inf / NaN
MIN_SCALE = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QScheme:
    """How one tensor is quantised. JSON round trip with `to_dict` / `QScheme(**d)`."""

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = True
    group_size: int | None = None
    format: str = "int"
    # records written before this field existed meant "restricted": keep it as the QScheme default
    weight_range: str = "restricted"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: use one of {FORMATS}.")
        if self.weight_range not in WEIGHT_RANGES:
            raise ValueError(f"weight_range={self.weight_range!r}: use one of {WEIGHT_RANGES}.")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is not supported: use an integer from 2 to 8 (usually 8 or 4).")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size={self.group_size!r}: use a positive integer, or None.")
        if self.format == "nf4":
            if self.bits != 4 or self.group_size not in NF4_GROUP_SIZES or not self.symmetric:
                raise ValueError(
                    f"format='nf4' needs bits=4, symmetric=True and group_size in {NF4_GROUP_SIZES} "
                    f"(got bits={self.bits}, symmetric={self.symmetric}, group_size={self.group_size})."
                )

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.symmetric, self.weight_range)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.symmetric, self.weight_range)[1]

    @property
    def granularity(self) -> str:
        return "group" if self.group_size else ("channel" if self.per_channel else "tensor")

    def to_dict(self) -> dict:
        return asdict(self)

    def check_width(self, in_features: int, name: str = "layer") -> None:
        """Group-wise schemes need groups that tile the input width exactly."""
        if self.group_size and in_features % self.group_size:
            raise ValueError(
                f"`group_size`={self.group_size} does not divide the input width {in_features} of {name}: "
                f"use a divisor of {in_features} (e.g. 32, 64, 128) or exclude that layer."
            )


# ---------------------------------------------------------------- scale / zero point


def int_range(bits: int, symmetric: bool, weight_range: str = "restricted") -> tuple[int, int]:
    """(qmin, qmax) of a signed `bits`-bit grid — the one home of the integer range.

    Symmetric with weight_range="restricted": [-(2^(b-1)-1), 2^(b-1)-1] (int4 [-7, 7], int8 ±127).
    Symmetric with "full" / "full_no_clip", and every asymmetric grid: [-2^(b-1), 2^(b-1)-1] (int4 [-8, 7]).
    """
    if weight_range not in WEIGHT_RANGES:
        raise ValueError(f"weight_range={weight_range!r}: use one of {WEIGHT_RANGES}.")
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric and weight_range == "restricted" else -qmax - 1), qmax


def qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, weight_range: str = "restricted"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for values observed in [lo, hi]; float32 tensors, Z integer-valued.

    The range is widened to contain 0, so 0.0 always maps to the integer Z and back to exactly 0.
    Symmetric scales per `weight_range` (module docstring): max|r| / qmax ("restricted"),
    max|r| / ((qmax - qmin) / 2) ("full", torchao's SYMMETRIC), max(-min / -qmin, max / qmax)
    ("full_no_clip", torchao's SYMMETRIC_NO_CLIPPING_ERR); the float32 operations are torchao's own.
    A non-zero range never gets a scale below MIN_SCALE (float32 eps, as torch's observers), so 1/S is
    finite; an all-zero range gets S = 1. Ranges with S >= MIN_SCALE are untouched.
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    qmin, qmax = int_range(bits, symmetric, weight_range)
    if symmetric:
        if weight_range == "full_no_clip":
            scale = torch.maximum(lo / float(qmin), hi / float(qmax))
        else:
            scale = torch.maximum(-lo, hi) / (float(qmax - qmin) / 2)  # restricted: (qmax - qmin) / 2 = qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
    # an all-zero range: any scale represents it exactly; 1 avoids 0/0. A tiny one: at least MIN_SCALE
    scale = torch.where(scale > 0, torch.clamp(scale, min=MIN_SCALE), torch.ones_like(scale))
    if not symmetric:
        zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as float32): clamp(Z + round(x · (1/S)), qmin, qmax).

    Multiplying by the float32 reciprocal is exactly what PyTorch's fused fake-quantisation kernels do,
    so the codes an export stores are bit-identical to what the training forward used.
    """
    return torch.clamp(torch.round(x.float() * torch.reciprocal(scale)) + zero, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


class _FakeRowsCPU(torch.autograd.Function):
    """PyTorch's fake-quantisation arithmetic written with vectorised tensor ops (CPU).

    The same float32 steps as the fused kernels — ``Z + round(x · (1/S))`` (round half to even), clamp to
    [qmin, qmax], ``(q − Z) · S`` — so values and gradients are bit-identical to them for finite inputs
    (tests/test_numerics_fast.py); on this CPU the fused kernels run element by element (~11 ns per element),
    these ops 1.2–1.6× faster. A NaN stays NaN (the fused kernels turn it into a grid value) and ±Inf becomes
    the grid's end, with zero gradient. Backward: the clipped straight-through gradient (``torch.where`` on
    the saved mask: no float conversion of the mask).

    Most calls clip nothing (a dynamic or symmetric "restricted" scale maps the tensor's own range inside
    the grid): one min/max pass over the codes finds that out, and then the clamp is the identity and the
    gradient passes unchanged, so neither the clamp, the mask nor the backward `where` is computed (same
    values and gradients; a NaN or ±Inf code takes the clamping path). With Z = 0 the final ``− Z`` is
    skipped (``q − 0 = q`` bit for bit: q is never −0.0 after ``+ Z``).
    """

    @staticmethod
    def forward(ctx, x, scale, zero, qmin: int, qmax: int):
        v = torch.round(x * torch.reciprocal(scale))
        v.add_(zero)
        lo, hi = torch.aminmax(v)
        ctx.clipped = not (bool(lo >= qmin) and bool(hi <= qmax))  # NaN compares False: clamping path
        if ctx.clipped:
            q = v.clamp(qmin, qmax)
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(q == v)
        else:
            q = v
        if bool(zero.any()):
            q.sub_(zero)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.clipped:
            return grad, None, None, None, None
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None, None


def _fake_rows(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Fused quantise → dequantise of a float32 [rows, k] tensor, one (S, Z) per row or one for all.

    PyTorch's fake-quantisation kernels (on CPU the same arithmetic with vectorised ops, `_FakeRowsCPU`):
    the clipped straight-through gradient built in (identity where Z + round(x/S) lies in [qmin, qmax],
    zero elsewhere) and no gradient to S or Z.
    """
    if x.device.type == "cpu" and type(x) is torch.Tensor:
        s = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
        z = zero.reshape(()) if zero.numel() == 1 else zero.reshape(-1, 1)
        return _FakeRowsCPU.apply(x, s.float(), z.float(), qmin, qmax)
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero.reshape(()).int(), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zero.reshape(-1).int(), 0, qmin, qmax)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor quantise → dequantise (activations) in float32, with the STE; cast back to x's dtype."""
    if scale.numel() != 1:
        raise ValueError("fake_quantize takes one scale and zero point; weights go through fake_quantize_weight.")
    return _fake_rows(x.float(), scale, zero, qmin, qmax).to(x.dtype)


# ---------------------------------------------------------------- NF4


def _nf4_code(device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _nf4_index(normed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level of values in [-1, 1] (midpoint boundaries, like bitsandbytes)."""
    code = _nf4_code(normed.device)
    return torch.bucketize(normed, (code[1:] + code[:-1]) / 2)


class _FakeNF4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, groups, absmax):
        return _nf4_code(groups.device)[_nf4_index(groups / absmax)] * absmax

    @staticmethod
    def backward(ctx, grad):  # every value lies inside [-absmax, absmax]: identity
        return grad, None


# ---------------------------------------------------------------- weights


def _grouped(w: torch.Tensor, scheme: QScheme, axis: int) -> torch.Tensor:
    """float32 view [out, n_groups, group] of a weight (out = 1 for per-tensor)."""
    w2 = w.float()
    if axis != 0:
        w2 = w2.transpose(0, axis)
    w2 = w2.reshape(w2.shape[0], -1)
    if scheme.group_size:
        scheme.check_width(w2.shape[1])
        return w2.reshape(w2.shape[0], -1, scheme.group_size)
    if scheme.per_channel:
        return w2.unsqueeze(1)
    return w2.reshape(1, 1, -1)


def _ungroup(g: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    shape = list(like.shape)
    if axis != 0:
        shape[0], shape[axis] = shape[axis], shape[0]
    out = g.reshape(shape)
    return out.transpose(0, axis) if axis != 0 else out


@torch.no_grad()
def _group_qparams(g: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), shape [rows, n_groups, 1], from each group's own min / max (abs max for nf4)."""
    if scheme.format == "nf4":
        absmax = g.abs().amax(-1, keepdim=True)
        return torch.where(absmax > 0, absmax, torch.ones_like(absmax)), torch.zeros_like(absmax)
    lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
    return qparams(lo, hi, scheme.bits, scheme.symmetric, scheme.weight_range)


def weight_qparams(w: torch.Tensor, scheme: QScheme, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of shape [out or 1, n_groups, 1] of a weight."""
    return _group_qparams(_grouped(w.detach(), scheme, axis), scheme)


def fake_quantize_weight(w: torch.Tensor, scheme: QScheme, axis: int = 0) -> torch.Tensor:
    """The weight as the forward pass of QAT (and every export) sees it; gradients by STE."""
    g = _grouped(w, scheme, axis)
    scale, zero = _group_qparams(g.detach(), scheme)
    if scheme.format == "nf4":
        out = _FakeNF4.apply(g, scale)
    else:
        out = _fake_rows(g.reshape(-1, g.shape[-1]), scale, zero, scheme.qmin, scheme.qmax).reshape(g.shape)
    return _ungroup(out, w, axis).to(w.dtype)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: QScheme, axis: int = 0) -> dict[str, torch.Tensor]:
    """Integer storage of a weight, in [out, in] layout, for the export backends.

    int:  {"q": int8 [out, in], "scale": float32 [out, n_groups], "zero": int8 [out, n_groups]}
          (per-tensor parameters are repeated on every row);
    nf4:  {"index": uint8 [out, in] (0..15), "absmax": float32 [out, n_groups]}.
    `dequantize_weight` of the result equals `fake_quantize_weight(w)` exactly.
    """
    g = _grouped(w, scheme, axis)
    scale, zero = _group_qparams(g, scheme)
    out_features = w.shape[axis]
    if scheme.format == "nf4":
        idx = _nf4_index(g / scale).to(torch.uint8)
        return {"index": idx.reshape(out_features, -1), "absmax": scale.reshape(out_features, -1)}
    q = quantize(g, scale, zero, scheme.qmin, scheme.qmax)
    rows = g.shape[0]  # 1 for per-tensor
    q = q.reshape(out_features, -1).to(torch.int8)
    scale = scale.reshape(rows, -1).expand(out_features, -1).contiguous()
    zero = zero.reshape(rows, -1).expand(out_features, -1).to(torch.int8).contiguous()
    return {"q": q, "scale": scale, "zero": zero}


def dequantize_weight(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [out, in] weight from `quantize_weight`'s storage."""
    if "index" in stored:
        idx, absmax = stored["index"], stored["absmax"]
        g = _nf4_code(idx.device)[idx.long()].reshape(absmax.shape[0], absmax.shape[1], -1)
        return (g * absmax.unsqueeze(-1)).reshape(idx.shape)
    q, scale, zero = stored["q"], stored["scale"], stored["zero"]
    g = q.float().reshape(scale.shape[0], scale.shape[1], -1)
    return dequantize(g, scale.unsqueeze(-1), zero.float().unsqueeze(-1)).reshape(q.shape)


def grid_levels(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Number of distinct values in each output channel (tests / reports: ≤ 2^bits after quantisation)."""
    w2 = (w.transpose(0, axis) if axis else w).reshape(w.shape[axis], -1)
    return torch.tensor([row.unique().numel() for row in w2])


# ---- weights already on a grid ----------------------------------------------------------------------

_ULP_STEPS = (0, -1, 1, -2, 2, -3, 3, -4, 4)


def _step_ulps(x: torch.Tensor, k: int) -> torch.Tensor:
    """Positive float32 values moved by k units in the last place."""
    return x if k == 0 else (x.contiguous().view(torch.int32) + k).view(torch.float32)


@torch.no_grad()
def recover_grid(w: torch.Tensor, scheme: QScheme) -> dict[str, torch.Tensor] | None:
    """Codes, scales and zero points (quantize_weight's layout) of a float32 [out, in] weight that is already
    on `scheme`'s grid; None when some group is not.

    For each group the scale S is searched among max|w| / d (symmetric grids) or span / d (asymmetric) for
    every code d the extreme value can have, and a few float32 ulps around each; a candidate is kept only
    when every value of the group is exactly (q - Z) · S in float32 with its code inside the grid. What is
    returned therefore dequantises to `w` bit for bit, whatever rounding produced the weights.
    """
    out_f, in_f = w.shape
    if scheme.group_size:
        g = w.reshape(out_f, in_f // scheme.group_size, scheme.group_size)
    elif scheme.per_channel:
        g = w.reshape(out_f, 1, in_f)
    else:
        g = w.reshape(1, 1, -1)
    if not torch.isfinite(g).all():
        return None
    rows, n, _ = g.shape
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        span = g.abs().amax(-1)
        first = [qmax, -qmin] if -qmin != qmax else [qmax]
        ds = first + [d for d in range(max(qmax, -qmin), 0, -1) if d not in first]
    else:
        span = g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)
        ds = list(range(qmax - qmin, 0, -1))
    scale = torch.ones(rows, n)
    q_rel = torch.zeros_like(g)
    found = span == 0  # an all-zero group: S = 1, every code 0
    for base in [span / d for d in ds] + [torch.full_like(span, MIN_SCALE)]:
        for k in _ULP_STEPS:
            todo = ~found
            if not todo.any():
                break
            s = _step_ulps(base, k)[todo]
            x = g[todo]
            r = torch.round(x / s[:, None])
            ok = torch.isfinite(s) & (s > 0) & (r * s[:, None] == x).all(-1)
            if scheme.symmetric:
                ok &= (r >= qmin).all(-1) & (r <= qmax).all(-1)
            else:
                ok &= r.amax(-1).clamp(min=0) - r.amin(-1).clamp(max=0) <= qmax - qmin
            idx = todo.nonzero()[ok]
            scale[idx[:, 0], idx[:, 1]] = s[ok]
            q_rel[idx[:, 0], idx[:, 1]] = r[ok]
            found[idx[:, 0], idx[:, 1]] = True
        if found.all():
            break
    if not found.all():
        return None
    # the zero point: 0 on symmetric grids; else the smallest Z inside the grid that holds every code (any such
    # Z gives the same values)
    zero = torch.zeros(rows, n) if scheme.symmetric else qmin - q_rel.amin(-1).clamp(max=0)
    q = (q_rel + zero[..., None]).reshape(out_f, in_f)
    return {"q": q.to(torch.int8), "scale": scale.expand(out_f, n).contiguous(),
            "zero": zero.expand(out_f, n).to(torch.int8).contiguous()}
