"""Structured surgery for BERT-family encoders (BERT, RoBERTa, ELECTRA, XLM-R, ...: any model whose
blocks have `attention.self.{query,key,value}`, `attention.output.dense`, `intermediate.dense` and
`output.dense`). Attention infers the head count from the projection width at run time
(`view(..., -1, head_size)`), so each layer may keep a different number of heads."""

from __future__ import annotations

from torch import nn

from ...modules import find_blocks
from .common import UnitGroup, check_units, linears, replace_blocks, shrink, uniform_or_max, unit_index

NAME = "bert"


def matches(model: nn.Module) -> bool:
    try:
        _, blocks = find_blocks(model)
    except ValueError:
        return False
    b = blocks[0]
    att = getattr(getattr(b, "attention", None), "self", None)
    return all(hasattr(att, a) for a in ("query", "key", "value", "attention_head_size")) and hasattr(
        getattr(b, "intermediate", None), "dense"
    ) and hasattr(getattr(b, "output", None), "dense")


def num_heads(block: nn.Module) -> int:
    att = block.attention.self
    return att.query.out_features // att.attention_head_size


def groups(model: nn.Module, kind: str) -> list[UnitGroup]:
    prefix, blocks = find_blocks(model)
    out = []
    for i, b in enumerate(blocks):
        p = f"{prefix}.{i}"
        if kind == "heads":
            a = f"{p}.attention.self"
            parts = [(f"{a}.query", 0), (f"{a}.key", 0), (f"{a}.value", 0), (f"{p}.attention.output.dense", 1)]
            out.append(UnitGroup(kind, i, num_heads(b), parts))
        elif kind == "neurons":
            parts = [(f"{p}.intermediate.dense", 0), (f"{p}.output.dense", 1)]
            out.append(UnitGroup(kind, i, b.intermediate.dense.out_features, parts))
        elif kind == "layers":
            out.append(UnitGroup(kind, i, 1, [(n, 0) for n in linears(b, p)]))
        else:
            raise ValueError(f"Unknown unit kind {kind!r}.")
    return out


def remove_heads(model: nn.Module, layer: int, heads) -> None:
    b = find_blocks(model)[1][layer]
    att = b.attention.self
    n = num_heads(b)
    drop = check_units(heads, n, "heads", f"layer {layer}")
    keep = [h for h in range(n) if h not in drop]
    idx = unit_index(keep, att.attention_head_size)
    for lin in (att.query, att.key, att.value):
        shrink(lin, idx, "out")
    shrink(b.attention.output.dense, idx, "in")
    att.num_attention_heads = len(keep)
    att.all_head_size = len(keep) * att.attention_head_size


def remove_neurons(model: nn.Module, layer: int, neurons) -> None:
    b = find_blocks(model)[1][layer]
    n = b.intermediate.dense.out_features
    drop = check_units(neurons, n, "FFN neurons", f"layer {layer}")
    idx = unit_index([u for u in range(n) if u not in drop], 1)
    shrink(b.intermediate.dense, idx, "out")
    shrink(b.output.dense, idx, "in")


def remove_layers(model: nn.Module, layers) -> None:
    prefix, blocks = find_blocks(model)
    drop = check_units(layers, len(blocks), "layers", "the model")
    keep = [b for i, b in enumerate(blocks) if i not in drop]
    replace_blocks(model, prefix, keep)
    for i, b in enumerate(keep):  # cache slots are indexed by layer_idx
        for att in (b.attention.self, getattr(getattr(b, "crossattention", None), "self", None)):
            if att is not None and hasattr(att, "layer_idx"):
                att.layer_idx = i
    model.config.num_hidden_layers = len(keep)


def structure(model: nn.Module) -> dict:
    blocks = find_blocks(model)[1]
    return {"heads": [num_heads(b) for b in blocks], "ffn": [b.intermediate.dense.out_features for b in blocks]}


def sync_config(model: nn.Module) -> None:
    """Config fields that can describe the new shapes. BERT derives the head size from
    hidden_size / num_attention_heads, so fewer heads cannot be expressed by the config: only
    load_pretrained rebuilds head-pruned BERT models; FFN width and depth reload with the Auto class."""
    s = structure(model)
    model.config.num_hidden_layers = len(s["ffn"])
    model.config.intermediate_size = uniform_or_max(s["ffn"])[1]
