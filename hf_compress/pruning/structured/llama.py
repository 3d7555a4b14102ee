"""Structured surgery for Llama-style decoders (Llama, Mistral, Qwen2/3, ...: blocks with
`self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`).

A head unit is one key/value head together with the query heads that share it (grouped-query
attention), so every layer keeps its `num_key_value_groups` and `head_dim`; attention infers the head
count from the projection width at run time (`view(..., -1, head_dim)`), so layers may differ.
"""

from __future__ import annotations

from torch import nn

from ...modules import find_blocks
from .common import UnitGroup, check_units, linears, replace_blocks, shrink, uniform_or_max, unit_index

NAME = "llama"


def matches(model: nn.Module) -> bool:
    try:
        _, blocks = find_blocks(model)
    except ValueError:
        return False
    b = blocks[0]
    att, mlp = getattr(b, "self_attn", None), getattr(b, "mlp", None)
    return all(hasattr(att, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups")) and all(
        hasattr(mlp, a) for a in ("up_proj", "down_proj")
    )


def num_kv_heads(block: nn.Module) -> int:
    return block.self_attn.k_proj.out_features // block.self_attn.head_dim


def groups(model: nn.Module, kind: str) -> list[UnitGroup]:
    prefix, blocks = find_blocks(model)
    out = []
    for i, b in enumerate(blocks):
        p = f"{prefix}.{i}"
        if kind == "heads":
            a = f"{p}.self_attn"
            parts = [(f"{a}.q_proj", 0), (f"{a}.k_proj", 0), (f"{a}.v_proj", 0), (f"{a}.o_proj", 1)]
            out.append(UnitGroup(kind, i, num_kv_heads(b), parts))
        elif kind == "neurons":
            names = [n for n in ("gate_proj", "up_proj") if hasattr(b.mlp, n)]
            parts = [(f"{p}.mlp.{n}", 0) for n in names] + [(f"{p}.mlp.down_proj", 1)]
            out.append(UnitGroup(kind, i, b.mlp.up_proj.out_features, parts))
        elif kind == "layers":
            out.append(UnitGroup(kind, i, 1, [(n, 0) for n in linears(b, p)]))
        else:
            raise ValueError(f"Unknown unit kind {kind!r}.")
    return out


def remove_heads(model: nn.Module, layer: int, heads) -> None:
    """Remove key/value heads `heads` of `layer` and the query heads grouped with them."""
    b = find_blocks(model)[1][layer]
    att = b.self_attn
    n, d, g = num_kv_heads(b), att.head_dim, att.num_key_value_groups
    drop = check_units(heads, n, "key/value heads", f"layer {layer}")
    keep = [h for h in range(n) if h not in drop]
    q_idx, kv_idx = unit_index(keep, g * d), unit_index(keep, d)
    shrink(att.q_proj, q_idx, "out")
    shrink(att.k_proj, kv_idx, "out")
    shrink(att.v_proj, kv_idx, "out")
    shrink(att.o_proj, q_idx, "in")
    for attr, value in (("num_heads", len(keep) * g), ("num_key_value_heads", len(keep))):
        if hasattr(att, attr):  # older variants keep the counts on the module
            setattr(att, attr, value)


def remove_neurons(model: nn.Module, layer: int, neurons) -> None:
    mlp = find_blocks(model)[1][layer].mlp
    n = mlp.up_proj.out_features
    drop = check_units(neurons, n, "FFN neurons", f"layer {layer}")
    idx = unit_index([u for u in range(n) if u not in drop], 1)
    for name in ("gate_proj", "up_proj"):
        if hasattr(mlp, name):
            shrink(getattr(mlp, name), idx, "out")
    shrink(mlp.down_proj, idx, "in")
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(idx)


def remove_layers(model: nn.Module, layers) -> None:
    prefix, blocks = find_blocks(model)
    drop = check_units(layers, len(blocks), "layers", "the model")
    keep = [b for i, b in enumerate(blocks) if i not in drop]
    replace_blocks(model, prefix, keep)
    for i, b in enumerate(keep):  # cache slots are indexed by layer_idx
        b.self_attn.layer_idx = i
        if hasattr(b, "layer_idx"):
            b.layer_idx = i
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == len(blocks):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop]
    cfg.num_hidden_layers = len(keep)


def structure(model: nn.Module) -> dict:
    blocks = find_blocks(model)[1]
    return {"heads": [num_kv_heads(b) for b in blocks], "ffn": [b.mlp.up_proj.out_features for b in blocks]}


def sync_config(model: nn.Module) -> None:
    """Write the new shapes into the config (the widest layer when they differ; load_pretrained shrinks
    the others). With uniform shapes the Auto class reloads the model as it is."""
    blocks = find_blocks(model)[1]
    s = structure(model)
    cfg, att = model.config, blocks[0].self_attn
    cfg.num_hidden_layers = len(blocks)
    cfg.intermediate_size = uniform_or_max(s["ffn"])[1]
    kv = uniform_or_max(s["heads"])[1]
    cfg.head_dim = att.head_dim  # pinned: it no longer follows hidden_size / num_attention_heads
    cfg.num_key_value_heads = kv
    cfg.num_attention_heads = kv * att.num_key_value_groups
