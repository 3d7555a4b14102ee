"""Merging LoRA (or any PEFT) adapters into pruned base weights.

`PruningCallback` on a PEFT model prunes the frozen `base_layer` weights; the LoRA update s·B·A stays
dense. A plain `merge_and_unload()` would write that update into the pruned positions and lose the
sparsity, so `merge_lora` merges and then zeroes them again: the merged model has exactly the trained
sparsity. The part of the LoRA update that fell on pruned positions is dropped, so the merged model is
not bit-for-bit the model that trained (docs/pruning.md, "LoRA / PEFT"; tests/test_pruning_lora.py
measures the logit drift).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import plain_name, unwrap
from ..metadata import get_metadata, record


def merge_lora(model: nn.Module, pruning=None) -> nn.Module:
    """Merge the adapters of a PEFT `model` (`merge_and_unload`) with its pruned weights kept exactly zero.

    `pruning`: the `PruningCallback` (or its `Pruner`) that pruned `model`; its masks say which weights
    are pruned. Without it, the exact zeros of each adapted base weight are. Returns the plain
    transformers model: it saves with `save_pretrained` and reloads with its Auto class or
    `hf_compress.load_pretrained`.
    """
    model = unwrap(model)
    if not callable(getattr(model, "merge_and_unload", None)):
        raise ValueError(
            f"merge_lora needs a PEFT model (from peft.get_peft_model); {type(model).__name__} has no adapters to merge."
        )
    pruner = getattr(pruning, "pruner", pruning)
    known = {id(w): mk for w, mk in zip(pruner.weights, pruner.masks)} if pruner is not None else {}
    layers = {}  # id -> (base Linear, its plain name, keep mask)
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "base_layer", None), nn.Module):
            continue
        base = module.get_base_layer()
        w = getattr(base, "weight", None)
        if isinstance(w, torch.Tensor) and id(base) not in layers:
            keep = known.get(id(w))
            layers[id(base)] = (base, plain_name(name), (w.detach() != 0) if keep is None else keep.bool())
    merged = model.merge_and_unload()
    inside = {id(m) for m in merged.modules()}
    zeros = total = 0
    with torch.no_grad():
        for key, (base, name, keep) in layers.items():
            if key not in inside:  # merge_and_unload keeps the base modules; anything else is a PEFT change
                raise RuntimeError(f"merge_lora: `{name}` is not in the merged model; this PEFT version merges differently.")
            base.weight.mul_(keep.to(base.weight.device, base.weight.dtype))
            zeros += int((~keep).sum())
            total += keep.numel()
    meta = get_metadata(merged).get("pruning", {})
    meta["lora_merged"] = {"layers": len(layers), "sparsity": round(zeros / max(total, 1), 6)}
    record(merged, "pruning", meta)
    return merged
