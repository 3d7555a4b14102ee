"""DistillationConfig: what the DistillationTrainer optimises, validated before any training."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from .losses import HIDDEN_LOSSES, KD_LOSSES


def _number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}`={value!r} must be a number.") from None
    if not math.isfinite(value):
        raise ValueError(f"`{name}`={value} must be finite.")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"`{name}`={value} must be {'>' if low_open else '≥'} {low}.")
    if high is not None and value > high:
        raise ValueError(f"`{name}`={value} must be ≤ {high}.")
    return value


def _count(name: str, value) -> int:
    """An integer ≥ 0 (a whole float or digit string is taken; bools, fractions and negatives are refused)."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}`={value!r} must be an integer ≥ 0, not a bool.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}`={value!r} must be an integer ≥ 0.") from None
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise ValueError(f"`{name}`={value!r} must be an integer ≥ 0.")
    return int(number)


@dataclass
class DistillationConfig:
    """Loss settings of `DistillationTrainer`.

    Classification: ``loss = (1 − alpha)·CE(s, y) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T))``
    (+ ``hidden_loss_weight·hidden + attention_loss_weight·attention``); without labels the KD term
    ``T²·KL`` alone. Rows labelled −100 count in neither term unless ``distill_unlabeled`` (a transfer set
    of unlabelled text: then they get the KD term). Token-level / causal-LM models: the same per position over the positions whose
    label is not −100 (after the causal shift); the CE term is the model's own loss.
    """

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T (> 0) of teacher and student; the KD term is scaled by T²."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the KD term in [0, 1]: 0 = plain fine-tuning, 1 = pure distillation."})
    kd_loss: str = field(default="forward_kl", metadata={"help": f"Divergence between teacher and student distributions: one of {KD_LOSSES}."})
    beta: float = field(default=0.5, metadata={"help": "Mixture weight of the teacher in the generalised JSD (kd_loss='jsd'), in [0, 1]; 0 = forward KL, 1 = reverse KL."})
    hidden_loss_weight: float = field(default=0.0, metadata={"help": "Weight (≥ 0) of hidden-state matching between mapped layers; 0 turns it off."})
    hidden_loss: str = field(default="mse", metadata={"help": f"Hidden-state matching loss: one of {HIDDEN_LOSSES}."})
    hidden_projection: bool = field(default=True, metadata={"help": "Learn a linear projection student→teacher width when hidden sizes differ (saved in checkpoints, not in the exported student). False: differing widths are an error."})
    attention_loss_weight: float = field(default=0.0, metadata={"help": "Weight (≥ 0) of TinyBERT-style attention-map matching between mapped layers (needs equal head counts); 0 turns it off."})
    layer_map: Optional[Union[dict, str]] = field(default=None, metadata={"help": "Student block → teacher block for hidden/attention matching, as a dict or JSON string like '{\"0\": 1, \"1\": 3}'. Default: the student's layers spread uniformly over the teacher's."})
    teacher_weights: Optional[list[float]] = field(default=None, metadata={"help": "Weights (≥ 0) of several teachers; the soft targets are the weighted mean of their probabilities. Default: equal weights."})
    check_finite: bool = field(default=True, metadata={"help": "Stop with an error naming the first step and the loss part that were NaN/Inf. Checked on the device every micro-batch; read back (one host sync, under DDP one small all-gather) only at steps that log, save or evaluate, at epoch ends, at the end of training and every check_finite_steps steps."})
    check_finite_steps: int = field(default=0, metadata={"help": "With check_finite: also read the device-side NaN/Inf flag back every this many optimizer steps (1 = every step); 0 (default) = only at steps that log, save or evaluate, at epoch ends and at the end of training."})
    distill_unlabeled: bool = field(default=False, metadata={"help": "Sequence classification: rows labelled -100 (unlabelled text mixed into train_dataset as a transfer set, the teacher's logits online or cached) get the KD term, so the teacher labels them; the KD term then averages over every row and the CE term over the labelled rows. False (default): -100 rows count in neither term, as the stock Trainer's CE ignores them. Not for token-level or causal-LM models (there -100 marks prompt and padding positions)."})
    kd_chunk_size: Optional[int] = field(default=None, metadata={"help": "Token-level / causal-LM KD loss: positions per chunk, so that no float32 batch×length×vocabulary tensor of teacher or student is built (same value and gradient as unchunked). None (default) = automatic: at most 2^24 logits per chunk (128 tokens at a 128k vocabulary) and at least 8 chunks; 0 = off (the whole batch at once)."})

    def __post_init__(self):
        self.temperature = _number("temperature", self.temperature, low=0.0, low_open=True)
        self.alpha = _number("alpha", self.alpha, 0.0, 1.0)
        self.beta = _number("beta", self.beta, 0.0, 1.0)
        self.hidden_loss_weight = _number("hidden_loss_weight", self.hidden_loss_weight, 0.0)
        self.attention_loss_weight = _number("attention_loss_weight", self.attention_loss_weight, 0.0)
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"`kd_loss`={self.kd_loss!r}: choose one of {KD_LOSSES}.")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"`hidden_loss`={self.hidden_loss!r}: choose one of {HIDDEN_LOSSES}.")
        self.layer_map = self._parse_layer_map(self.layer_map)
        self.check_finite_steps = _count("check_finite_steps", self.check_finite_steps)
        if not isinstance(self.distill_unlabeled, bool):
            raise ValueError(f"`distill_unlabeled`={self.distill_unlabeled!r} must be True or False.")
        if self.kd_chunk_size is not None:
            self.kd_chunk_size = _count("kd_chunk_size", self.kd_chunk_size)
        if self.teacher_weights is not None:
            if isinstance(self.teacher_weights, (int, float)):
                self.teacher_weights = [self.teacher_weights]
            w = [_number("teacher_weights", x, 0.0) for x in self.teacher_weights]
            if not w or sum(w) <= 0:
                raise ValueError(f"`teacher_weights`={self.teacher_weights} must hold one weight ≥ 0 per teacher, not all zero.")
            self.teacher_weights = w

    @staticmethod
    def _parse_layer_map(value) -> dict[int, int] | None:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"`layer_map`={value!r} is not valid JSON; write it like '{{\"0\": 1, \"1\": 3}}'.") from e
        if not isinstance(value, dict) or not value:
            raise ValueError(f"`layer_map`={value!r} must be a non-empty mapping student layer → teacher layer, e.g. {{0: 1, 1: 3}}.")
        out = {}
        for s, t in value.items():
            try:
                si, ti = int(s), int(t)
            except (TypeError, ValueError):
                raise ValueError(f"`layer_map` entry {s!r}: {t!r} must map an integer layer index to an integer layer index.") from None
            if si < 0 or ti < 0:
                raise ValueError(f"`layer_map` entry {si}: {ti} uses a negative layer index; use 0-based block indices.")
            out[si] = ti
        return out

    @property
    def uses_intermediate(self) -> bool:
        return self.hidden_loss_weight > 0 or self.attention_loss_weight > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (layer_map keys as strings), so a checkpoint's copy compares equal after a round trip."""
        d = asdict(self)
        if d["layer_map"] is not None:
            d["layer_map"] = {str(k): v for k, v in sorted(d["layer_map"].items())}
        return d
