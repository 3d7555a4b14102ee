"""Pruning technique on bare modules and tensors: `PruningConfig` (config.py), schedules, scores, masks, surgery.

Life cycle: `prepare(model, config)` gives the `Pruner` (masks and scores) that `PruningCallback`
drives at Trainer events; `convert(model, config)` makes it what ships (structured units and layers
removed, the run recorded with the sparsity measured on the weights). `apply_structure` rebuilds a
pruned skeleton on load; `merge_lora(peft_model)` keeps pruned weights exactly zero.
"""

from .config import PruningConfig
from .lifecycle import convert, measured_sparsity, prepare
from .lora import merge_lora
from .masks import GRANULARITIES, STRUCTURED, apply_masks
from .pruner import Pruner
from .schedules import SCHEDULES, is_update_step, sparsity_at
from .scores import METHODS
from .structured import apply_structure, remove_pruned, structure

__all__ = [
    "GRANULARITIES", "METHODS", "SCHEDULES", "STRUCTURED", "Pruner", "PruningConfig", "apply_masks", "apply_structure",
    "convert", "is_update_step", "measured_sparsity", "merge_lora", "prepare", "remove_pruned", "sparsity_at",
    "structure",
]
