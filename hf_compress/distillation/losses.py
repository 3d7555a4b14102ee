"""Knowledge-distillation losses: pure functions on tensors.

Conventions shared by every function here:
- Teacher targets are *log-probabilities* at temperature T (`teacher_log_probs`), so one teacher, a
  weighted mixture of teachers and cached top-k logits all enter the same divergence code.
- Divergences are summed over the class (vocabulary) axis, then averaged over the positions that
  count (`mask`) — or summed and divided by a given count (`num_items`: the positions that count in the
  whole accumulated batch, transformers' `num_items_in_batch`) — and scaled by T² so gradient magnitudes
  do not shrink as T grows (Hinton et al.).
- Everything is computed in float32, outside autocast: bf16/fp16 softmax at high temperature
  loses the small probabilities the student is supposed to learn from.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
HIDDEN_LOSSES = ("mse", "cosine")


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float32 else x


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def teacher_log_probs(
    teacher_logits: torch.Tensor | Sequence[torch.Tensor],
    temperature: float = 1.0,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """log p of the soft targets: softmax(t/T), or the weighted mean of several teachers' probabilities.

    The mixture is taken over probabilities (not logits): log Σ_i w_i softmax(t_i/T), computed with
    logsumexp so that it stays finite where one teacher is confident.
    """
    if isinstance(teacher_logits, torch.Tensor):
        teacher_logits = [teacher_logits]
    teacher_logits = list(teacher_logits)
    if weights is None:
        weights = [1.0] * len(teacher_logits)
    if len(weights) != len(teacher_logits):
        raise ValueError(f"{len(weights)} teacher weights for {len(teacher_logits)} teachers.")
    with _no_autocast(teacher_logits[0].device):
        logps = [F.log_softmax(_f32(t) / temperature, dim=-1) for t in teacher_logits]
        if len(logps) == 1:
            return logps[0]
        total = float(sum(weights))
        logw = torch.tensor([math.log(w / total) if w > 0 else -math.inf for w in weights], device=logps[0].device)
        stacked = torch.stack(logps, dim=0) + logw.view(-1, *([1] * logps[0].dim()))
        return torch.logsumexp(stacked, dim=0)


def cached_log_probs(topk_values: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Teacher log p from cached top-k logits, renormalised over those k classes."""
    with _no_autocast(topk_values.device):
        return F.log_softmax(_f32(topk_values) / temperature, dim=-1)


def student_log_probs(
    student_logits: torch.Tensor, temperature: float = 1.0, indices: torch.Tensor | None = None, kind: str = "forward_kl"
) -> torch.Tensor:
    """log q = log softmax(s/T), or its values at the teacher's cached top-k `indices`.

    With `indices`, forward KL uses the student's full-vocabulary log-probabilities at those classes
    (student mass outside the top k is still penalised, so the loss approaches the full one as the
    teacher's truncated mass vanishes); reverse KL and JSD need q where p is known, so there the student
    is renormalised over the same k classes. With k = all classes both are exact.
    """
    with _no_autocast(student_logits.device):
        s = _f32(student_logits) / temperature
        if indices is None:
            return F.log_softmax(s, dim=-1)
        indices = indices.long()
        if kind == "forward_kl":
            return torch.gather(F.log_softmax(s, dim=-1), -1, indices)
        return F.log_softmax(torch.gather(s, -1, indices), dim=-1)


def divergence(logq: torch.Tensor, logp: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between teacher p and student q (both as log-probabilities), summed over classes.

    forward_kl: KL(p‖q). reverse_kl: KL(q‖p). jsd: generalised Jensen-Shannon with mixture
    m = β·p + (1−β)·q: β·KL(p‖m) + (1−β)·KL(q‖m); β=0 and β=1 are taken as forward and reverse KL
    (the limits of the scaled divergence, as in GKD / TRL). Returns shape `logq.shape[:-1]`.
    """
    if kind not in KD_LOSSES:
        raise ValueError(f"kd_loss={kind!r}: choose one of {KD_LOSSES}.")
    with _no_autocast(logq.device):
        logq, logp = _f32(logq), _f32(logp)
        if kind == "jsd" and beta <= 0.0:
            kind = "forward_kl"
        if kind == "jsd" and beta >= 1.0:
            kind = "reverse_kl"
        if kind == "forward_kl":
            return _plogratio(logp, logq).sum(-1)
        if kind == "reverse_kl":
            return (logq.exp() * (logq - logp)).sum(-1)
        logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log1p(-beta)]), dim=0)
        return beta * _plogratio(logp, logm).sum(-1) + (1.0 - beta) * (logq.exp() * (logq - logm)).sum(-1)


def _plogratio(logp: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """p·(log p − log r), taken as 0 where p is exactly 0 (a zero-weight teacher); NaN still shows."""
    return torch.where(logp == -math.inf, torch.zeros_like(logp), logp.exp() * (logp - logr))


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is true (0 when nothing counts)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of `values` over the positions where `mask` is true (all positions without a mask)."""
    if mask is None:
        return values.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logp: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    num_items: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """T² · divergence, averaged over the examples (classification) or the counted positions (tokens).

    `teacher_logp` is over all classes, or over the cached top-k classes named by `indices`. With
    `num_items` the divergence is summed over the counted positions and divided by `num_items` instead:
    the count of the whole accumulated batch, so micro-batches add up to one token mean.
    """
    if kind not in KD_LOSSES:
        raise ValueError(f"kd_loss={kind!r}: choose one of {KD_LOSSES}.")
    logq = student_log_probs(student_logits, temperature, indices, kind)
    div = divergence(logq, teacher_logp, kind, beta)
    if num_items is None:
        return temperature**2 * masked_mean(div, mask)
    if mask is not None:
        mask = mask.bool()
    return temperature**2 * masked_sum(div, mask) / num_items


def causal_shift(logits: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None):
    """Logits at position i predict token i+1: drop the last logit and mask by the *next* label.

    Returns (logits[:, :-1], mask) where mask is labels[:, 1:] != -100, or, without labels,
    attention_mask[:, 1:] (padding never counts).
    """
    logits = logits[:, :-1]
    if labels is not None:
        mask = labels[:, 1:] != -100
    elif attention_mask is not None:
        mask = attention_mask[:, 1:].bool()
    else:
        mask = None
    return logits, mask


def token_mask(labels: torch.Tensor | None, attention_mask: torch.Tensor | None):
    """Positions that count for token-level tasks without a shift (token classification)."""
    if labels is not None:
        return labels != -100
    if attention_mask is not None:
        return attention_mask.bool()
    return None


def hidden_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "mse", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Hidden-state matching for one layer pair [B, L, D] (student already projected to the teacher's D).

    mse: squared error averaged over D, then over real tokens. cosine: 1 − cos over D, averaged over real tokens.
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"hidden_loss={kind!r}: choose one of {HIDDEN_LOSSES}.")
    with _no_autocast(student_hidden.device):
        s, t = _f32(student_hidden), _f32(teacher_hidden)
        if kind == "mse":
            per_token = (s - t).pow(2).mean(-1)
        else:
            per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        return masked_mean(per_token, mask)


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT-style attention matching for one layer pair of probability maps [B, H, L, L].

    Squared error summed over key positions (a row is a distribution, like the KL's class sum),
    averaged over heads and over real query positions. Padded keys carry zero probability in both maps.
    """
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(
            f"attention maps differ in shape: student {tuple(student_attn.shape)} vs teacher {tuple(teacher_attn.shape)}; "
            "attention matching needs the same number of heads and the same tokenisation."
        )
    with _no_autocast(student_attn.device):
        per_query = (_f32(student_attn) - _f32(teacher_attn)).pow(2).sum(-1)  # [B, H, L]
        if mask is not None:
            mask = mask.bool()[:, None, :].expand_as(per_query)
        return masked_mean(per_query, mask)



# ---- token-chunked KD for large vocabularies -------------------------------------------------------

CHUNK_ELEMENTS = 1 << 24  # automatic chunk: at most about 16M logits (64 MB in float32) per chunk
MIN_CHUNKS = 8  # and at least 8 chunks, so one chunk's temporaries stay well below one B×T×V tensor


def auto_chunk_size(width: int, rows: int | None = None) -> int:
    """Tokens per chunk when `kd_chunk_size` is automatic: at most 2²⁴ logits per chunk (128 tokens at a 128k
    vocabulary), and at most 1/8 of the `rows` positions."""
    chunk = max(1, CHUNK_ELEMENTS // max(int(width), 1))
    if rows is not None:
        chunk = min(chunk, max(1, -(-int(rows) // MIN_CHUNKS)))
    return chunk


def _chunk_divergence(s, teachers, weights, t_logp, indices, kind, temperature, beta):
    """Per-row divergence of one chunk of rows: the same functions, in the same order, as the unchunked loss."""
    logq = student_log_probs(s, temperature, indices, kind)
    logp = teacher_log_probs(teachers, temperature, weights) if t_logp is None else t_logp
    return divergence(logq, logp, kind, beta)


class _ChunkedDivergenceSum(torch.autograd.Function):
    """Σ over rows with `mask` of divergence(student row, teacher row), one chunk of rows at a time.

    The gradient with respect to the student logits is computed chunk by chunk in the forward pass
    (autograd on the chunk only) and written into one buffer of the logits' shape (float32 for 16-bit
    logits, else their dtype), so no
    float32 B×T×V intermediate of either model is kept or built: at most one chunk's float32
    temporaries exist at a time, besides that gradient buffer (which the backward pass of any loss
    on these logits creates anyway). The teacher side gets no gradient.
    """

    @staticmethod
    def forward(ctx, s, mask, chunk, teachers, weights, t_logp, indices, kind, temperature, beta):
        rows = s.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        # float32 for half-precision logits: the chunk gradients are scaled by the upstream gradient only in
        # backward, and a loss scaler's factor must not meet gradients already rounded (or flushed) to 16 bits
        wide = torch.float32 if s.dtype in (torch.float16, torch.bfloat16) else s.dtype
        grad = torch.empty(s.shape, dtype=wide, device=s.device) if ctx.needs_input_grad[0] else None
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            with torch.enable_grad():
                sc = s[i:j].detach().requires_grad_(grad is not None)
                div = _chunk_divergence(
                    sc, [t[i:j] for t in teachers] if teachers is not None else None, weights,
                    None if t_logp is None else t_logp[i:j], None if indices is None else indices[i:j],
                    kind, temperature, beta,
                )
                part = torch.where(mask[i:j], div, torch.zeros_like(div)).sum()
            if grad is not None:
                (g,) = torch.autograd.grad(part, sc)
                grad[i:j].copy_(g)
            total = total + part.detach()
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.used, ctx.dtype = False, s.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if ctx.used:  # a second backward (retain_graph=True): do not scale the stored gradient twice
            out = grad * grad_out.to(grad.dtype)
        else:
            ctx.used = True
            out = grad.mul_(grad_out.to(grad.dtype))
        return (out.to(ctx.dtype),) + (None,) * 9


def chunked_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | Sequence[torch.Tensor] | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    *,
    weights: Sequence[float] | None = None,
    teacher_logp: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    num_items: torch.Tensor | float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`kd_loss` computed `chunk_size` positions at a time, equal to it in value and gradient.

    Takes the teacher's *raw* logits (one tensor or a list, mixed with `weights` as `teacher_log_probs`
    does) so that neither side's float32 log-probabilities over the whole batch exist at once; or, for
    cached top-k targets, `teacher_logp` with `indices` (already small). Shapes: `[..., V]` logits,
    `mask` over the leading dims (None: every position counts). The leading dims are flattened, so pass
    contiguous logits; for causal LMs pass the unshifted logits with the mask of `causal_shift` padded
    with False at the last position (`causal_mask_full`), which is the same loss without a copy.
    `chunk_size` None: `auto_chunk_size(V, positions)`. No host synchronisation.
    """
    if kind not in KD_LOSSES:
        raise ValueError(f"kd_loss={kind!r}: choose one of {KD_LOSSES}.")
    if (teacher_logits is None) == (teacher_logp is None):
        raise ValueError("pass exactly one of teacher_logits (raw logits) and teacher_logp (cached top-k log-probabilities).")
    width = student_logits.shape[-1]
    teachers = None
    if teacher_logits is not None:
        teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
        if any(t.requires_grad for t in teachers):  # the chunked path gives the teacher no gradient
            return kd_loss(student_logits, teacher_log_probs(teachers, temperature, weights), kind, temperature, beta,
                           mask, indices, num_items)
        teachers = [t.reshape(-1, t.shape[-1]) for t in teachers]
    if weights is not None and teachers is not None and len(weights) != len(teachers):
        raise ValueError(f"{len(weights)} teacher weights for {len(teachers)} teachers.")
    s = student_logits.reshape(-1, width)
    rows = s.shape[0]
    if teacher_logp is not None:
        teacher_logp = teacher_logp.reshape(rows, -1)
    if indices is not None:
        indices = indices.reshape(rows, -1)
    full = torch.ones(rows, dtype=torch.bool, device=s.device) if mask is None else mask.reshape(rows).bool()
    chunk = auto_chunk_size(width, rows) if not chunk_size else int(chunk_size)
    total = _ChunkedDivergenceSum.apply(s, full, chunk, teachers, weights, teacher_logp, indices, kind, temperature, beta)
    if num_items is not None:
        return temperature**2 * total / num_items
    if mask is None:
        return temperature**2 * total / max(rows, 1)
    return temperature**2 * total / full.sum().clamp_min(1).to(total.dtype)


def causal_mask_full(labels: torch.Tensor | None, attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """`causal_shift`'s mask over all T positions of the unshifted logits: False at the last one (it predicts nothing)."""
    batch, length = shape
    _, mask = causal_shift(torch.empty(batch, length, 0), labels, attention_mask)
    device = labels.device if labels is not None else attention_mask.device if attention_mask is not None else None
    if mask is None:
        mask = torch.ones(batch, length - 1, dtype=torch.bool, device=device)
    return torch.cat([mask, torch.zeros(batch, 1, dtype=torch.bool, device=mask.device)], dim=1)
