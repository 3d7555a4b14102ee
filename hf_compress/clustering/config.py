"""`ClusteringConfig`: every option of `ClusteringCallback` (k-means weight sharing), validated before training."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .._config import refuse_renamed

BITS = (1, 2, 3, 4, 5, 6, 7, 8)
INITS = ("linear", "density")
# Field names are unique across TrainingArguments and the hf_compress configs (one HfArgumentParser takes
# them all): the module-selection and schedule fields carry the `clustering_` prefix.
RENAMED = {"targets": "clustering_targets", "exclude": "clustering_exclude", "start_step": "clustering_start_step",
           "bits": "clustering_bits", "group_size": "clustering_group_size", "freeze_step": "clustering_freeze_step"}


@dataclass
class ClusteringConfig:
    clustering_bits: int = field(
        default=4,
        metadata={"help": "Index bits b (1-8): each codebook holds 2^b shared values (centroids); the export stores "
                          "b bits per weight plus the codebooks."},
    )
    clustering_group_size: Optional[int] = field(
        default=None,
        metadata={"help": "Output channels per codebook (must divide each targeted layer's output width). None: "
                          "one codebook per layer."},
    )
    clustering_targets: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Regexes (re.search) of Linear module names to cluster. Default: the Linear layers inside "
                          "the transformer blocks (embeddings, LayerNorm and the task head stay dense)."},
    )
    clustering_exclude: Optional[list[str]] = field(default=None, metadata={"help": "Regexes of module names left dense."})
    clustering_start_step: int = field(
        default=0, metadata={"help": "Optimizer step at which the weights are clustered (k-means) and shared."}
    )
    clustering_freeze_step: Optional[int] = field(
        default=None,
        metadata={"help": "Step from which the assignments are frozen and only the centroids train (each centroid's "
                          "gradient is the sum of its members'). Before it (from clustering_start_step) the dense "
                          "weights keep training through the clustered forward (straight-through) and are "
                          "re-clustered every refresh_interval steps. None: frozen at clustering_start_step."},
    )
    refresh_interval: int = field(
        default=50,
        metadata={"help": "Steps between re-clusterings before clustering_freeze_step (k-means warm-started from "
                          "the current centroids)."},
    )
    kmeans_init: str = field(
        default="linear",
        metadata={"help": f"Initial centroids, one of {INITS}: evenly spaced between the group's min and max (Deep "
                          "Compression's best), or at evenly spaced quantiles of the weights."},
    )
    kmeans_iters: int = field(default=20, metadata={"help": "Lloyd iterations of each k-means (1-1000)."})

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"ClusteringConfig.{name}={getattr(self, name)!r}: {why}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.clustering_bits) or self.clustering_bits not in BITS:
            bad("clustering_bits", "use an integer from 1 to 8 (2^bits clusters per codebook; 4 gives 16).")
        if self.clustering_group_size is not None and (not is_int(self.clustering_group_size) or self.clustering_group_size <= 0):
            bad("clustering_group_size", "use a positive number of output channels per codebook (e.g. 64), or None "
                                         "for one codebook per layer.")
        if not is_int(self.clustering_start_step) or self.clustering_start_step < 0:
            bad("clustering_start_step", "use an integer >= 0.")
        if self.clustering_freeze_step is not None and (
            not is_int(self.clustering_freeze_step) or self.clustering_freeze_step < self.clustering_start_step
        ):
            bad("clustering_freeze_step", f"use an integer >= clustering_start_step={self.clustering_start_step}, "
                                          "or None (frozen at clustering_start_step).")
        if not is_int(self.refresh_interval) or self.refresh_interval <= 0:
            bad("refresh_interval", "use a positive number of steps between re-clusterings (e.g. 50).")
        if self.kmeans_init not in INITS:
            bad("kmeans_init", f"use one of {INITS}.")
        if not is_int(self.kmeans_iters) or not 1 <= self.kmeans_iters <= 1000:
            bad("kmeans_iters", "use an integer from 1 to 1000 (e.g. 20).")
        for name in ("clustering_targets", "clustering_exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [v])
            for p in getattr(self, name) or []:
                try:
                    re.compile(p)
                except re.error as e:
                    bad(name, f"{p!r} is not a valid regular expression ({e}).")

    @property
    def clusters(self) -> int:
        return 2 ** self.clustering_bits

    @property
    def freeze_at(self) -> int:
        return self.clustering_start_step if self.clustering_freeze_step is None else self.clustering_freeze_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


refuse_renamed(ClusteringConfig, RENAMED)
