"""Physical removal of pruned heads, FFN neurons and layers, and the rebuild of a pruned skeleton.

One file per architecture family, each with the same functions (`matches`, `groups`, `remove_heads`,
`remove_neurons`, `remove_layers`, `structure`, `sync_config`). `remove_pruned(model)` deletes every
unit whose consuming weights are all exactly zero (so the outputs cannot change) and every layer marked
as skipped, then records the new shapes in ``config.hf_compress["pruning"]``; `apply_structure` uses
that record to rebuild the same shapes before the weights are loaded (`load_pretrained`).
"""

from __future__ import annotations

import copy
from types import ModuleType

import torch
from torch import nn

from ...modules import find_blocks, is_plain_linear, out_axis, split_block_name, unwrap
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


def _rename_recorded_layers(model: nn.Module, prefix: str, dropped: list[int], n_before: int) -> None:
    """What other techniques recorded per layer (quantization, lowrank, clustering: keyed by layer name) follows
    the blocks: layers of the removed blocks leave the record, the others take their block's new index."""
    new_index = {i: j for j, i in enumerate(i for i in range(n_before) if i not in dropped)}
    meta = get_metadata(model)
    for section in ("quantization", "lowrank", "clustering"):
        entry = meta.get(section)
        if not isinstance(entry, dict) or not isinstance(entry.get("layers"), dict):
            continue
        renamed = {}
        for name, d in entry["layers"].items():
            place = split_block_name(name, prefix)
            if place is not None and place[0] < n_before:
                if place[0] in dropped:
                    continue
                name = f"{prefix}.{new_index[place[0]]}" + (f".{place[1]}" if place[1] else "")
            renamed[name] = d
        record(model, section, {**entry, "layers": renamed})


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
        _rename_recorded_layers(model, find_blocks(model)[0], dropped, len(blocks))
    heads = neurons = 0
    for kind, remove in (("heads", fam.remove_heads), ("neurons", fam.remove_neurons)):
        for g in fam.groups(model, kind):
            if not all(is_plain_linear(model.get_submodule(x)) for x, _ in g.parts):
                continue  # e.g. factorised by LowRankCallback: no single weight to read or shrink; not pruned here
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


def uniform_keep(n_units: int, sparsity: float) -> int:
    """Units every layer keeps when `sparsity` of each layer's `n_units` go (at least one stays)."""
    return n_units - min(round(sparsity * n_units), n_units - 1)


def check_uniform(model: nn.Module, kind: str, sparsity: float, groups: list[UnitGroup]) -> None:
    """ValueError unless `uniform=True` pruning of `kind` ("heads" / "neurons") to `sparsity` leaves shapes the
    model's stock config describes: `groups` (the targeted units) cover every layer with the same count, and a
    model built from the config written after removal (the family's `sync_config`) has the pruned shapes —
    checked by doing the surgery on a meta-device skeleton, so nothing is allocated."""
    from transformers import PreTrainedModel

    model = unwrap(model)
    fam = family(model)
    blocks = find_blocks(model)[1]
    what = "key/value heads" if kind == "heads" and fam.NAME == "llama" else ("heads" if kind == "heads" else "FFN neurons")
    covered = sorted(g.layer for g in groups)
    if covered != list(range(len(blocks))):
        missing = sorted(set(range(len(blocks))) - set(covered))
        raise ValueError(
            f"PruningConfig.uniform=True keeps the same number of {what} in every layer, but pruning_targets / "
            f"pruning_exclude leave layers {missing} untouched: target every layer, or set uniform=False."
        )
    counts = [g.n_units for g in groups]
    if len(set(counts)) != 1:
        raise ValueError(
            f"PruningConfig.uniform=True needs every layer to start with the same number of {what}, but they "
            f"have {counts} (pruned non-uniformly before?): set uniform=False."
        )
    n = counts[0]
    keep = uniform_keep(n, sparsity)
    refused = fam.uniform_refusal(model, kind, keep) if keep < n else None
    if refused:
        raise ValueError(f"PruningConfig.uniform=True with granularity={kind!r} on {type(model).__name__}: {refused}")
    if keep == n:
        return
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"PruningConfig.uniform=True promises a stock config, which needs a transformers PreTrainedModel; "
            f"{type(model).__name__} is not one: set uniform=False."
        )
    remove = fam.remove_heads if kind == "heads" else fam.remove_neurons
    try:
        with torch.device("meta"):
            skeleton = type(model)(copy.deepcopy(model.config))
        for g in fam.groups(skeleton, kind):
            remove(skeleton, g.layer, list(range(keep, g.n_units)))
        fam.sync_config(skeleton)
        config = type(skeleton.config).from_dict(skeleton.config.to_dict())  # validated, as loading does
        with torch.device("meta"):
            rebuilt = type(model)(config)
        ok = fam.structure(rebuilt) == fam.structure(skeleton)
    except Exception as e:  # noqa: BLE001 - any failure means the stock config cannot describe it
        ok, detail = False, f" ({type(e).__name__}: {e})"
    else:
        detail = ""
    if not ok:
        raise ValueError(
            f"PruningConfig.uniform=True with granularity={kind!r}: {type(model).__name__}'s config cannot describe "
            f"{keep} of {n} {what} per layer{detail}, so the export would need hf_compress anyway. Set uniform=False "
            "(hf_compress.load_pretrained, or the Auto classes after `import hf_compress`, reload any shapes)."
        )


def is_uniform(model: nn.Module) -> bool:
    """Every layer has the same head count and the same FFN width."""
    s = structure(model)
    return all(len(set(v)) <= 1 for v in s.values())
