"""`PruningConfig`: every option of `PruningCallback`, validated before training starts."""

from __future__ import annotations

import json  # sensitivity
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from .._config import refuse_renamed
from .masks import GRANULARITIES, STRUCTURED
from .schedules import SCHEDULES
from .scores import METHODS, NEEDS_GRADS

DEFAULT_END_FRACTION = 0.7  # without pruning_end_step the target is reached at 70% of training; the rest recovers
# Field names are unique across TrainingArguments, DistillationConfig, PruningConfig and QATConfig (one
# HfArgumentParser takes all four): the module-selection and schedule-window fields carry the technique's
# prefix. The old names are refused with the new one.
RENAMED = {"targets": "pruning_targets", "exclude": "pruning_exclude", "start_step": "pruning_start_step",
           "end_step": "pruning_end_step"}


@dataclass
class PruningConfig:
    target_sparsity: Optional[float] = field(
        default=None,
        metadata={"help": "Final fraction of pruned weights (unstructured) or units (heads / neurons / layers), "
                          "0 <= s < 1. Default 0.5; for granularity 'n:m' it is n/m."},
    )
    method: str = field(
        default="magnitude",
        metadata={"help": f"Importance score, one of {METHODS}: |w|; movement (Sanh et al. 2020, "
                          "-sum w*dL/dw); taylor (first order, sum |w*dL/dw|). Pruning an already fine-tuned model to high "
                          "sparsity: taylor (docs/pruning.md, 'Which method')."},
    )
    granularity: str = field(
        default="unstructured",
        metadata={"help": f"What is pruned, one of {GRANULARITIES} (or 'N:M' such as '2:4'). heads / neurons / "
                          "layers are removed physically at the end of training (see remove_pruned)."},
    )
    n: int = field(default=2, metadata={"help": "N of N:M: at least n zeros in every m consecutive input weights."})
    m: int = field(default=4, metadata={"help": "M of N:M (group size along the input dimension)."})
    scope: str = field(
        default="global",
        metadata={"help": "'global': one threshold over all targeted weights (or units); 'local': the same "
                          "sparsity in every module (every layer for heads / neurons). Layers are always global."},
    )
    schedule: str = field(
        default="cubic",
        metadata={"help": f"Sparsity over steps, one of {SCHEDULES}: cubic (Zhu & Gupta 2017), linear, or "
                          "one_shot (all at pruning_start_step)."},
    )
    pruning_start_step: int = field(default=0, metadata={"help": "Optimizer step at which pruning starts."})
    pruning_end_step: Optional[int] = field(
        default=None,
        metadata={"help": f"Step at which target_sparsity is reached (masks fixed from then on). Default: "
                          f"{DEFAULT_END_FRACTION:g} x the training steps."},
    )
    frequency: int = field(default=10, metadata={"help": "Steps between mask updates while the schedule runs."})
    pruning_targets: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Regexes (re.search) on module names to prune. Default: the Linear layers inside the "
                          "transformer blocks (embeddings, norms and the task head stay dense)."},
    )
    pruning_exclude: Optional[list[str]] = field(default=None, metadata={"help": "Regexes of module names never pruned."})
    rewind_step: Optional[int] = field(
        default=None,
        metadata={"help": "Lottery-ticket rewinding (Frankle & Carbin 2019): when the final mask is set (pruning_end_step), "
                          "surviving weights go back to their values at this step and train on with a fresh "
                          "optimizer state. None disables it."},
    )
    remove_pruned: bool = field(
        default=True,
        metadata={"help": "Structured granularities: at the end of training delete the pruned heads / neurons / "
                          "layers (smaller Linear layers, fewer heads and layers) instead of leaving zeros."},
    )
    layer_sparsity: Optional[Union[dict, str]] = field(  # sensitivity
        default=None,
        metadata={"help": "Unstructured only: per-layer sparsity, {regex: sparsity in [0, 1)} (re.search on module names, "
                          "first match wins; JSON or 'regex=s,regex=s' on the command line). A matching layer is pruned "
                          "to its own sparsity (its weights ranked alone); the others share target_sparsity. The schedule "
                          "ramps all together: where it is at fraction p of target_sparsity, a layer is at p x its own. "
                          "Written by hf-compress analyze (docs/sensitivity.md)."},
    )
    uniform: bool = field(
        default=False,
        metadata={"help": "heads / neurons: remove the same number of units in every layer (the budget split evenly, "
                          "each layer losing its lowest-scoring units; scope does not apply), so the result is a plain "
                          "architecture whose stock config.json loads with transformers alone. Refused when the "
                          "model's config cannot express it (fewer heads in BERT-family models and GPT-2). Not for "
                          "unstructured / n:m (no shapes change) or layers (depth is always in the config)."},
    )

    def __post_init__(self):
        nm = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.granularity))
        if nm:  # "2:4" is shorthand for granularity="n:m", n=2, m=4
            self.granularity, self.n, self.m = "n:m", int(nm.group(1)), int(nm.group(2))
        if self.method not in METHODS:
            raise ValueError(f"PruningConfig.method={self.method!r} is unknown: use one of {METHODS}.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"PruningConfig.granularity={self.granularity!r} is unknown: use one of {GRANULARITIES} (or 'N:M' like '2:4')."
            )
        if self.granularity == "n:m":
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
                raise ValueError(f"PruningConfig n={self.n}, m={self.m}: N:M needs integers 0 < n < m (e.g. n=2, m=4).")
            if self.target_sparsity is None:
                self.target_sparsity = self.n / self.m
            elif abs(self.target_sparsity - self.n / self.m) > 1e-9:
                raise ValueError(
                    f"PruningConfig.target_sparsity={self.target_sparsity} contradicts n:m={self.n}:{self.m} "
                    f"(whose sparsity is {self.n / self.m:g}): leave target_sparsity unset or set it to n/m."
                )
        if self.target_sparsity is None:
            self.target_sparsity = 0.5
        if isinstance(self.target_sparsity, bool) or not isinstance(self.target_sparsity, (int, float)) or not (
            0.0 <= self.target_sparsity < 1.0
        ):
            raise ValueError(
                f"PruningConfig.target_sparsity={self.target_sparsity!r} must be a number in [0, 1) "
                "(0.9 = 90% of the weights or units pruned)."
            )
        self.target_sparsity = float(self.target_sparsity)
        if self.scope not in ("global", "local"):
            raise ValueError(f"PruningConfig.scope={self.scope!r} must be 'global' or 'local'.")
        if self.scope == "local" and self.granularity == "layers":
            raise ValueError("PruningConfig.scope='local' does not apply to granularity='layers' (layers are ranked "
                             "against each other): use scope='global'.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PruningConfig.schedule={self.schedule!r} is unknown: use one of {SCHEDULES}.")
        for name in ("pruning_start_step", "frequency"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (1 if name == "frequency" else 0):
                raise ValueError(f"PruningConfig.{name}={v!r} must be an integer >= {1 if name == 'frequency' else 0}.")
        if self.pruning_end_step is not None and (not isinstance(self.pruning_end_step, int) or self.pruning_end_step < self.pruning_start_step):
            raise ValueError(
                f"PruningConfig.pruning_end_step={self.pruning_end_step!r} is before pruning_start_step={self.pruning_start_step}: "
                "pruning_end_step must be >= pruning_start_step."
            )
        if self.schedule == "one_shot" and self.pruning_start_step == 0 and self.method in NEEDS_GRADS:
            raise ValueError(
                f"PruningConfig: method={self.method!r} scores come from gradients, so one-shot pruning cannot happen at "
                "pruning_start_step=0: set pruning_start_step >= 1 (steps to collect scores) or use method='magnitude'."
            )
        if self.rewind_step is not None:
            last = self.pruning_start_step if self.schedule == "one_shot" else self.pruning_end_step
            if not isinstance(self.rewind_step, int) or self.rewind_step < 0 or (last is not None and self.rewind_step >= last):
                raise ValueError(
                    f"PruningConfig.rewind_step={self.rewind_step!r} must be an integer >= 0 and before the step "
                    f"the final mask is set ({'pruning_start_step' if self.schedule == 'one_shot' else 'pruning_end_step'}={last})."
                )
        if self.granularity == "layers" and not self.remove_pruned:
            raise ValueError(
                "PruningConfig: granularity='layers' needs remove_pruned=True — a pruned layer is skipped by a "
                "forward hook while training, which a saved model would not keep."
            )
        if not isinstance(self.uniform, bool):
            raise ValueError(f"PruningConfig.uniform={self.uniform!r} must be True or False.")
        if self.uniform and self.granularity not in ("heads", "neurons"):
            why = ("removing whole layers already gives a plain architecture (num_hidden_layers in the config)"
                   if self.granularity == "layers" else "it changes no shapes, so its result is always a plain architecture")
            raise ValueError(
                f"PruningConfig.uniform=True applies to granularity 'heads' or 'neurons' (the same count in every "
                f"layer); granularity={self.granularity!r}: {why}. Drop uniform=True."
            )
        self._check_layer_sparsity()  # sensitivity
        if self.pruning_targets is not None and isinstance(self.pruning_targets, str):
            self.pruning_targets = [self.pruning_targets]
        if self.pruning_exclude is not None and isinstance(self.pruning_exclude, str):
            self.pruning_exclude = [self.pruning_exclude]

    def _check_layer_sparsity(self) -> None:  # sensitivity
        v = self.layer_sparsity
        if v is None:
            return
        if isinstance(v, str):
            text = v.strip()
            try:
                v = json.loads(text) if text.startswith("{") else dict(
                    (a.strip(), b.strip()) for a, _, b in (part.rpartition("=") for part in text.split(",")) if a)
            except ValueError as e:
                raise ValueError(f"PruningConfig.layer_sparsity={text!r}: write 'regex=sparsity,...' or a JSON object ({e}).") from None
        if not isinstance(v, dict) or not v:
            raise ValueError(f"PruningConfig.layer_sparsity={self.layer_sparsity!r}: use a non-empty dict of regex -> sparsity, "
                             "e.g. {'layer\\.0\\.': 0.3, 'intermediate': 0.7}.")
        if self.granularity != "unstructured":
            raise ValueError(f"PruningConfig.layer_sparsity applies to granularity='unstructured', not {self.granularity!r}: "
                             "drop layer_sparsity or use unstructured pruning.")
        if self.target_sparsity <= 0:
            raise ValueError("PruningConfig.layer_sparsity needs target_sparsity > 0: target_sparsity drives the schedule "
                             "(and is the sparsity of the layers no pattern matches); restrict pruning_targets to the "
                             "listed layers to leave the others dense.")
        clean = {}
        for pattern, s in v.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"PruningConfig.layer_sparsity: {pattern!r} is not a valid regular expression ({e}).") from None
            try:
                s = float(s) if not isinstance(s, bool) else None
            except (TypeError, ValueError):
                s = None
            if s is None or not 0.0 <= s < 1.0:
                raise ValueError(f"PruningConfig.layer_sparsity: sparsity {v[pattern]!r} for {pattern!r} must be a number in [0, 1).")
            clean[pattern] = s
        self.layer_sparsity = clean

    def sparsity_of(self, name: str) -> float | None:  # sensitivity
        """The layer_sparsity of module `name` (first matching regex), None when no pattern matches."""
        for pattern, s in (self.layer_sparsity or {}).items():
            if re.search(pattern, name):
                return s
        return None

    @property
    def structured(self) -> bool:
        return self.granularity in STRUCTURED

    @property
    def tag(self) -> str:
        """Short name of this pruning in logs and checkpoint files (two callbacks need different granularities)."""
        return "pruning_" + self.granularity.replace(":", "")

    def resolve_end(self, max_steps: int) -> int:
        """The step at which the target is reached, for a run of `max_steps` optimizer steps."""
        if self.schedule == "one_shot":
            end = self.pruning_start_step
        elif self.pruning_end_step is not None:
            end = self.pruning_end_step
        else:
            end = max(self.pruning_start_step, round(DEFAULT_END_FRACTION * max_steps))
        if max_steps > 0 and end > max_steps:
            what = "pruning_start_step" if self.schedule == "one_shot" or self.pruning_end_step is None else "pruning_end_step"
            raise ValueError(
                f"PruningConfig: {what}={end} is after the last training step ({max_steps}), so target_sparsity would "
                f"never be reached: lower it or train longer."
            )
        if self.rewind_step is not None and self.rewind_step >= end:
            raise ValueError(f"PruningConfig.rewind_step={self.rewind_step} must be before the final mask step {end}.")
        return end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


refuse_renamed(PruningConfig, RENAMED)
