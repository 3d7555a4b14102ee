"""`SensitivityConfig` (what the analysis perturbs) and `BudgetConfig` (what the plan must fit), validated."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

AXES = ("pruning", "quantization", "lowrank")
METRICS = ("parameters", "bytes", "latency")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_list(v):
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [v]
    return v


@dataclass
class SensitivityConfig:
    sensitivity_axes: Optional[list[str]] = field(
        default=None,
        metadata={"help": f"Perturbations to measure, a subset of {AXES} (default: all three). pruning: magnitude "
                          "(unstructured) at each of `sparsities`; quantization: the weight fake-quantised at each of "
                          "`bits`; lowrank: the truncated SVD at each of `rank_fractions`."},
    )
    sparsities: list[float] = field(
        default_factory=lambda: [0.3, 0.5, 0.7, 0.9],
        metadata={"help": "Sparsities (fraction of the layer's weights zeroed, lowest |w| first), each in (0, 1)."},
    )
    bits: list[int] = field(
        default_factory=lambda: [8, 4, 3],
        metadata={"help": "Weight bit widths, each 2-8 (the grid of hf_compress.quantization: per channel, symmetric unless "
                          "a QATConfig is passed)."},
    )
    rank_fractions: list[float] = field(
        default_factory=lambda: [0.5, 0.25, 0.125],
        metadata={"help": "Ranks as fractions of min(in, out), each in (0, 1]; rank = max(1, round(f * min(in, out)))."},
    )
    sensitivity_targets: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Regexes (re.search) of the layers analysed. Default: the Linear layers inside the transformer "
                          "blocks (the same default as pruning, QAT and low-rank)."},
    )
    sensitivity_exclude: Optional[list[str]] = field(default=None, metadata={"help": "Regexes of layers never analysed."})
    samples: int = field(
        default=256,
        metadata={"help": "hf-compress analyze: rows (classification) or blocks (causal LM) of the held-out slice of the "
                          "training split the loss is measured on (never the evaluation split of the report)."},
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the held-out evaluation."})

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"SensitivityConfig.{name}={getattr(self, name)!r}: {why}")

        self.sensitivity_axes = list(AXES) if self.sensitivity_axes is None else _as_list(self.sensitivity_axes)
        if not isinstance(self.sensitivity_axes, list) or not self.sensitivity_axes or any(a not in AXES for a in self.sensitivity_axes):
            bad("sensitivity_axes", f"use a non-empty list from {AXES}.")
        for name, ok, why in (
            ("sparsities", lambda v: _number(v) and 0 < v < 1, "each a number in (0, 1), e.g. [0.5, 0.7, 0.9]."),
            ("bits", lambda v: isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 8, "each an integer from 2 to 8, e.g. [8, 4]."),
            ("rank_fractions", lambda v: _number(v) and 0 < v <= 1, "each a number in (0, 1], e.g. [0.5, 0.25]."),
        ):
            v = _as_list(getattr(self, name))
            if isinstance(v, list) and name == "bits":
                v = [int(x) if isinstance(x, str) and x.isdigit() else x for x in v]
            elif isinstance(v, list):
                v = [float(x) if isinstance(x, str) and _float(x) is not None else x for x in v]
            setattr(self, name, v)
            axis = {"sparsities": "pruning", "bits": "quantization", "rank_fractions": "lowrank"}[name]
            if axis in self.sensitivity_axes and (not isinstance(v, list) or not v or not all(ok(x) for x in v)):
                bad(name, f"give a non-empty list, {why}")
            if isinstance(v, list) and all(ok(x) for x in v):
                setattr(self, name, sorted(set(v), reverse=(name == "rank_fractions" or name == "bits")))
        for name in ("sensitivity_targets", "sensitivity_exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [v])
            for p in getattr(self, name) or []:
                try:
                    re.compile(p)
                except (re.error, TypeError) as e:
                    bad(name, f"{p!r} is not a valid regular expression ({e}).")
        for name in ("samples", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "use an integer >= 1.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


@dataclass
class BudgetConfig:
    budget_metric: str = field(
        default="parameters",
        metadata={"help": f"What the budget limits, one of {METRICS}: parameters (non-zero weights of the analysed layers; "
                          "pruning and low rank lower it), bytes (their weights on disk: fp32, sparse-bitmask when smaller, "
                          "b-bit codes + scales, or the two factors), latency (measured CPU time of the analysed layers' "
                          "forward; only low rank lowers it — zeros and fake-quantised weights run the same dense kernels)."},
    )
    budget_fraction: Optional[float] = field(
        default=None,
        metadata={"help": "The budget as a fraction, in (0, 1], of the analysed layers' dense total (0.5 = half their "
                          "parameters / bytes / latency). Give this or budget_value."},
    )
    budget_value: Optional[float] = field(
        default=None,
        metadata={"help": "The budget as an absolute total of the analysed layers: parameters, bytes, or milliseconds "
                          "(per forward of latency_tokens tokens). Give this or budget_fraction."},
    )
    budget_axes: Optional[list[str]] = field(
        default=None,
        metadata={"help": f"Which analysed perturbations the plan may use, a subset of {AXES} (default: all analysed). "
                          "Each layer gets one setting (or stays dense)."},
    )
    latency_tokens: int = field(default=512, metadata={"help": "budget_metric=latency: tokens per timed layer forward."})
    resolution: int = field(
        default=20000,
        metadata={"help": "Cost steps of the knapsack: costs are rounded up to 1/resolution of the dense total (exact "
                          "when the costs are integers below it); more = closer to optimal, slower."},
    )

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"BudgetConfig.{name}={getattr(self, name)!r}: {why}")

        if self.budget_metric not in METRICS:
            bad("budget_metric", f"use one of {METRICS}.")
        if (self.budget_fraction is None) == (self.budget_value is None):
            bad("budget_fraction", "give exactly one of budget_fraction (e.g. 0.5 of the dense total) or budget_value "
                                   "(an absolute number of parameters / bytes / milliseconds).")
        if self.budget_fraction is not None and (not _number(self.budget_fraction) or not 0 < self.budget_fraction <= 1):
            bad("budget_fraction", "use a number in (0, 1] (0.5 = half the dense total).")
        if self.budget_value is not None and (not _number(self.budget_value) or self.budget_value <= 0):
            bad("budget_value", "use a positive number (parameters, bytes or milliseconds).")
        if self.budget_axes is not None:
            self.budget_axes = _as_list(self.budget_axes)
            if not isinstance(self.budget_axes, list) or not self.budget_axes or any(a not in AXES for a in self.budget_axes):
                bad("budget_axes", f"use a non-empty list from {AXES}.")
        for name, lo in (("latency_tokens", 1), ("resolution", 10)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, f"use an integer >= {lo}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
