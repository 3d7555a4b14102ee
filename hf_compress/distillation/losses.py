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

