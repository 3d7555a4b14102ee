"""`LowRankConfig`: every option of `LowRankCallback`, validated before training starts."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from ..pruning.schedules import SCHEDULES

METHODS = ("svd", "asvd", "fwsvd")
DATA_AWARE = ("asvd", "fwsvd")
DEFAULT_FRACTION = 0.25
DEFAULT_END_FRACTION = 0.7  # gradual without lowrank_end_step: the final ranks are reached at 70% of training


def _parse_ranks(value) -> dict | None:
    """`lowrank_ranks` as a dict: a dict, or its JSON text (what HfArgumentParser hands over)."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise ValueError(f"LowRankConfig.lowrank_ranks={value!r}: not valid JSON ({e}); write it as "
                             "'{\"attention\": 16, \"intermediate\": 32}' (regex -> rank).") from None
        if isinstance(parsed, dict):
            return parsed
    raise ValueError(f"LowRankConfig.lowrank_ranks={value!r}: use a dict of regex -> rank, e.g. {{'query|key': 8}}.")


@dataclass
class LowRankConfig:
    lowrank_ranks: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "Rank per layer: a dict (or its JSON) of regex (re.search on the module name) -> rank, the "
                          "first matching pattern wins. Layers no pattern matches use lowrank_rank_fraction or "
                          "lowrank_energy (dense when neither is set)."},
    )
    lowrank_rank_fraction: Optional[float] = field(
        default=None,
        metadata={"help": f"Rank as a fraction of full rank min(in, out), in (0, 1]. Default {DEFAULT_FRACTION} when "
                          "no rank rule is given at all."},
    )
    lowrank_energy: Optional[float] = field(
        default=None,
        metadata={"help": "Rank by kept energy, in (0, 1]: the smallest rank whose singular values keep this fraction "
                          "of sum(sigma^2) (of the weighted matrix for asvd / fwsvd), chosen at lowrank_start_step."},
    )
    lowrank_method: str = field(
        default="svd",
        metadata={"help": f"One of {METHODS}: svd (truncated SVD of W); asvd (Yuan et al. 2023: SVD of W diag(s), "
                          "s_j = mean|x_j|^alpha over the training inputs seen before lowrank_start_step); fwsvd (Hsu "
                          "et al. 2022: SVD of diag(d) W, d_i = sqrt(sum of squared gradients of row i) before "
                          "lowrank_start_step). The data-aware methods need lowrank_start_step >= 1."},
    )
    lowrank_asvd_alpha: float = field(default=0.5, metadata={"help": "ASVD exponent alpha of the input scaling, in (0, 1]."})
    lowrank_start_step: int = field(
        default=0,
        metadata={"help": "Optimizer steps completed before the layers are factorised (0: when the Trainer is "
                          "built, before the optimizer exists). Statistics of asvd / fwsvd are collected before it."},
    )
    lowrank_schedule: str = field(
        default="one_shot",
        metadata={"help": f"One of {SCHEDULES}: one_shot factorises at the final rank at lowrank_start_step; cubic / "
                          "linear factorise at full rank min(in, out) (exact) and shrink the rank to the final one "
                          "by lowrank_end_step (the pruning schedules, applied to the rank removed)."},
    )
    lowrank_end_step: Optional[int] = field(
        default=None,
        metadata={"help": f"Gradual schedules: step at which the final ranks are reached. Default {DEFAULT_END_FRACTION:g} "
                          "x the training steps."},
    )
    lowrank_frequency: int = field(default=10, metadata={"help": "Gradual schedules: steps between rank reductions."})
    lowrank_targets: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Regexes (re.search) on module names to factorise. Default: the Linear layers inside the "
                          "transformer blocks (embeddings, norms and the task head stay dense)."},
    )
    lowrank_exclude: Optional[list[str]] = field(default=None, metadata={"help": "Regexes of module names never factorised."})

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"LowRankConfig.{name}={getattr(self, name)!r}: {why}")

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        self.lowrank_ranks = _parse_ranks(self.lowrank_ranks)
        for pattern, rank in (self.lowrank_ranks or {}).items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                bad("lowrank_ranks", f"{pattern!r} is not a valid regular expression ({e}).")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                bad("lowrank_ranks", f"rank {rank!r} for {pattern!r} must be an integer >= 1 (and <= min(in, out) of "
                                     "the layers it matches).")
        if self.lowrank_rank_fraction is not None and self.lowrank_energy is not None:
            bad("lowrank_energy", "give either lowrank_rank_fraction or lowrank_energy, not both.")
        if self.lowrank_rank_fraction is None and self.lowrank_energy is None and not self.lowrank_ranks:
            self.lowrank_rank_fraction = DEFAULT_FRACTION
        for name in ("lowrank_rank_fraction", "lowrank_energy"):
            v = getattr(self, name)
            if v is not None:
                if not number(v) or not 0 < v <= 1:
                    bad(name, "use a number in (0, 1] (0.25 = a quarter of the full rank / of the energy).")
                setattr(self, name, float(v))
        if self.lowrank_method not in METHODS:
            bad("lowrank_method", f"use one of {METHODS}.")
        if not number(self.lowrank_asvd_alpha) or not 0 < self.lowrank_asvd_alpha <= 1:
            bad("lowrank_asvd_alpha", "use a number in (0, 1], e.g. 0.5.")
        if isinstance(self.lowrank_start_step, bool) or not isinstance(self.lowrank_start_step, int) or self.lowrank_start_step < 0:
            bad("lowrank_start_step", "use an integer >= 0.")
        if self.lowrank_method in DATA_AWARE and self.lowrank_start_step < 1:
            bad("lowrank_start_step", f"lowrank_method={self.lowrank_method!r} weights the SVD with statistics of "
                                      "training steps, so it needs lowrank_start_step >= 1 (steps to collect them), "
                                      "or use lowrank_method='svd'.")
        if self.lowrank_schedule not in SCHEDULES:
            bad("lowrank_schedule", f"use one of {SCHEDULES}.")
        if isinstance(self.lowrank_frequency, bool) or not isinstance(self.lowrank_frequency, int) or self.lowrank_frequency < 1:
            bad("lowrank_frequency", "use an integer >= 1.")
        if self.lowrank_end_step is not None:
            if self.lowrank_schedule == "one_shot":
                bad("lowrank_end_step", "applies to gradual schedules (lowrank_schedule='cubic' or 'linear'); "
                                        "drop it for one_shot.")
            if (isinstance(self.lowrank_end_step, bool) or not isinstance(self.lowrank_end_step, int)
                    or self.lowrank_end_step <= self.lowrank_start_step):
                bad("lowrank_end_step", f"use an integer > lowrank_start_step={self.lowrank_start_step}.")
        for name in ("lowrank_targets", "lowrank_exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [v])
            for p in getattr(self, name) or []:
                try:
                    re.compile(p)
                except (re.error, TypeError) as e:
                    bad(name, f"{p!r} is not a valid regular expression ({e}).")

    @property
    def gradual(self) -> bool:
        return self.lowrank_schedule != "one_shot"

    @property
    def data_aware(self) -> bool:
        return self.lowrank_method in DATA_AWARE

    def resolve_end(self, max_steps: int) -> int:
        """The step at which the final ranks are reached, for a run of `max_steps` optimizer steps."""
        start = self.lowrank_start_step
        if not self.gradual:
            end = start
        elif self.lowrank_end_step is not None:
            end = self.lowrank_end_step
        else:
            end = max(start + 1, round(DEFAULT_END_FRACTION * max_steps))
        if max_steps > 0 and (start >= max_steps and start > 0 or end > max_steps):
            what = "lowrank_start_step" if start >= max_steps else "lowrank_end_step"
            raise ValueError(
                f"LowRankConfig: {what}={start if what == 'lowrank_start_step' else end} is at or after the last "
                f"training step ({max_steps}), so the layers would never reach their final rank while training: "
                "lower it or train longer (to factorise without training call hf_compress.lowrank.convert)."
            )
        return end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
