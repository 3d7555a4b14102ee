"""Structured surgery for BERT-family encoders (BERT, RoBERTa, ELECTRA, XLM-R, ...: any model whose
blocks have `attention.self.{query,key,value}`, `attention.output.dense`, `intermediate.dense` and
`output.dense`). Attention infers the head count from the projection width at run time
(`view(..., -1, head_size)`), so each layer may keep a different number of heads."""

from __future__ import annotations

from torch import nn

from ...modules import find_blocks
from .common import drop_layers, first_block, kept_units, shrink, uniform_or_max, unit_groups

NAME = "bert"
# what `uniform=True` cannot do for this family, and why (PruningConfig.uniform)
UNIFORM_REFUSED = {
    "heads": "BERT-family configs have no head_dim field: the head size is hidden_size / num_attention_heads, "
             "so a stock config with fewer heads builds wider heads, not the kept ones. Uniform FFN neurons "
             "(intermediate_size) and removed layers (num_hidden_layers) are expressible: prune heads with "
             "uniform=False (the export then needs hf_compress to load) or prune neurons / layers only.",
}


def uniform_refusal(model: nn.Module, kind: str, keep: int) -> str | None:
    """Why `keep` units of `kind` in every layer cannot be written in this family's stock config (None: they can)."""
    return UNIFORM_REFUSED.get(kind)


def matches(model: nn.Module) -> bool:
    b = first_block(model)
    att = getattr(getattr(b, "attention", None), "self", None)
    return all(hasattr(att, a) for a in ("query", "key", "value", "attention_head_size")) and hasattr(
        getattr(b, "intermediate", None), "dense"
    ) and hasattr(getattr(b, "output", None), "dense")


def num_heads(block: nn.Module) -> int:
    att = block.attention.self
    return att.query.out_features // att.attention_head_size


def _parts(b: nn.Module, p: str, kind: str):
    if kind == "heads":
        a = f"{p}.attention.self"
        return num_heads(b), [(f"{a}.query", 0), (f"{a}.key", 0), (f"{a}.value", 0), (f"{p}.attention.output.dense", 1)]
    return b.intermediate.dense.out_features, [(f"{p}.intermediate.dense", 0), (f"{p}.output.dense", 1)]


def groups(model: nn.Module, kind: str):
    return unit_groups(model, kind, _parts)


def remove_heads(model: nn.Module, layer: int, heads) -> None:
    b = find_blocks(model)[1][layer]
    att = b.attention.self
    keep, idx = kept_units(heads, num_heads(b), "heads", f"layer {layer}", att.attention_head_size)
    for lin in (att.query, att.key, att.value):
        shrink(lin, idx, "out")
    shrink(b.attention.output.dense, idx, "in")
    att.num_attention_heads = len(keep)
    att.all_head_size = len(keep) * att.attention_head_size


def remove_neurons(model: nn.Module, layer: int, neurons) -> None:
    b = find_blocks(model)[1][layer]
    _, idx = kept_units(neurons, b.intermediate.dense.out_features, "FFN neurons", f"layer {layer}", 1)
    shrink(b.intermediate.dense, idx, "out")
    shrink(b.output.dense, idx, "in")


def _relabel(b: nn.Module, i: int) -> None:  # cache slots are indexed by layer_idx
    for att in (b.attention.self, getattr(getattr(b, "crossattention", None), "self", None)):
        if att is not None and hasattr(att, "layer_idx"):
            att.layer_idx = i


def remove_layers(model: nn.Module, layers) -> None:
    drop_layers(model, layers, _relabel)


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
