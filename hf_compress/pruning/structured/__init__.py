"""Physical removal of pruned heads, FFN neurons and layers, and the rebuild of a pruned skeleton.

One file per architecture family, each with the same functions (`matches`, `groups`, `remove_heads`,
`remove_neurons`, `remove_layers`, `structure`, `sync_config`). `remove_pruned(model)` deletes every
unit whose consuming weights are all exactly zero (so the outputs cannot change) and every layer marked
as skipped, then records the new shapes in ``config.hf_compress["pruning"]``; `apply_structure` uses
that record to rebuild the same shapes before the weights are loaded (`load_pretrained`).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from ...modules import find_blocks, out_axis, unwrap
from ...metadata import get_metadata, record
from . import bert, gpt2, llama
from ..masks import unit_sum
from .common import UnitGroup, is_skipped, set_layer_skip, unit_index  # noqa: F401

FAMILIES: tuple[ModuleType, ...] = (bert, llama, gpt2)


def family(model: nn.Module) -> ModuleType:
    """The surgery module for `model`'s architecture, or a ValueError naming the supported ones."""
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    raise ValueError(
        f"Structured pruning (heads / neurons / layers) supports BERT-family encoders "
        f"(BERT, RoBERTa, ELECTRA, ...), Llama-style decoders (Llama, Mistral, Qwen2, ...) and GPT-2; "
        f"{type(model).__name__} is none of these. Use granularity='unstructured' or 'n:m' for this model."
    )


def unit_groups(model: nn.Module, kind: str) -> list[UnitGroup]:
    return family(model).groups(model, kind)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _zero_units(model: nn.Module, group: UnitGroup) -> list[int]:
    """Units whose consuming weights (the input-side slices) are all zero; the first unit is kept if all are."""
    dead = torch.ones(group.n_units, dtype=torch.bool)
    for name, dim in group.parts:
        module = model.get_submodule(name)
        if dim != out_axis(module):  # the consumer: its zero input slices make the unit's output vanish
            nonzero = module.weight.detach().ne(0).float()
            dead &= unit_sum(nonzero, dim, group.n_units, group.segments.get(name, 1)).eq(0).cpu()
    units = dead.nonzero().flatten().tolist()
    return units[1:] if len(units) == group.n_units else units


def remove_pruned(model: nn.Module, info: dict | None = None) -> dict:
    """Make structured pruning physical: delete skipped layers, then heads and FFN neurons whose
    consuming weights are all zero (exact: the logits do not change). Updates the config (depth,
    uniform widths) and records the shapes in ``config.hf_compress["pruning"]`` so
    `hf_compress.load_pretrained` rebuilds them. `info` (e.g. the pruning config) is recorded too.
    Returns what was removed."""
    model = unwrap(model)
    fam = family(model)
    before = _n_params(model)
    blocks = find_blocks(model)[1]
    dropped = [i for i, b in enumerate(blocks) if is_skipped(b)]
    if dropped:
        fam.remove_layers(model, dropped)
    heads = neurons = 0
    for kind, remove in (("heads", fam.remove_heads), ("neurons", fam.remove_neurons)):
        for g in fam.groups(model, kind):
            units = _zero_units(model, g)
            if units:
                remove(model, g.layer, units)
                heads += len(units) if kind == "heads" else 0
                neurons += len(units) if kind == "neurons" else 0
    fam.sync_config(model)
    removed = {"layers": len(dropped), "heads": heads, "neurons": neurons, "parameters": before - _n_params(model)}
    meta = get_metadata(model).get("pruning", {})
    total = meta.get("removed", {})
    meta.update(family=fam.NAME, **fam.structure(model))
    meta["removed"] = {k: total.get(k, 0) + v for k, v in removed.items()}
    if info:
        meta.setdefault("runs", []).append(info)
    record(model, "pruning", meta)
    return removed


def structure(model: nn.Module) -> dict:
    """{"heads": [per layer], "ffn": [per layer]} (heads = key/value heads for decoders)."""
    return family(model).structure(model)


def apply_structure(model: nn.Module, meta: dict) -> nn.Module:
    """Shrink a freshly built `model` to the shapes recorded by `remove_pruned` (weights loaded afterwards).
    Depth is already in the config; heads and FFN widths may differ per layer."""
    if "heads" not in meta and "ffn" not in meta:
        return model  # unstructured / N:M: nothing structural to rebuild
    fam = family(model)
    now = fam.structure(model)
    for key, remove in (("heads", fam.remove_heads), ("ffn", fam.remove_neurons)):
        want = meta.get(key)
        if want is None:
            continue
        if len(want) != len(now[key]):
            raise ValueError(
                f"The pruning record lists {len(want)} layers but the config builds {len(now[key])}: "
                "config.json and its hf_compress section disagree (was one edited by hand?)."
            )
        for i, (w, c) in enumerate(zip(want, now[key])):
            if w > c:
                raise ValueError(f"The pruning record asks for {w} {key} in layer {i}, but the config builds only {c}.")
            if w < c:
                remove(model, i, list(range(w, c)))
    return model
