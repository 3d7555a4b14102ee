"""Pruning on bare modules and tensors: schedules, importance scores, masks, structured surgery.

`Pruner` holds the masks and scores of one model; `PruningCallback` drives it from Trainer events.
`remove_pruned(model)` makes structured pruning physical; `apply_structure` rebuilds it on load.
`merge_lora(peft_model)` merges LoRA adapters and keeps pruned weights exactly zero.
"""

from .lora import merge_lora
from .masks import GRANULARITIES, STRUCTURED, apply_masks
from .pruner import Pruner
from .schedules import SCHEDULES, is_update_step, sparsity_at
from .scores import METHODS
from .structured import apply_structure, remove_pruned, structure

__all__ = [
    "GRANULARITIES", "METHODS", "SCHEDULES", "STRUCTURED", "Pruner", "apply_masks", "apply_structure",
    "is_update_step", "merge_lora", "remove_pruned", "sparsity_at", "structure",
]
