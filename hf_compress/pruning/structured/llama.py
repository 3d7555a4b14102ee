"""Structured surgery for Llama-style decoders (Llama, Mistral, Qwen2/3, ...: blocks with
`self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`).

A head unit is one key/value head together with the query heads that share it (grouped-query
attention), so every layer keeps its `num_key_value_groups` and `head_dim`; attention infers the head
count from the projection width at run time (`view(..., -1, head_dim)`), so layers may differ.
"""

from __future__ import annotations

import copy

from torch import nn

from ...modules import find_blocks
from .common import drop_layers, first_block, kept_units, shrink, uniform_or_max, unit_groups, unit_index

NAME = "llama"


def matches(model: nn.Module) -> bool:
    b = first_block(model)
    att, mlp = getattr(b, "self_attn", None), getattr(b, "mlp", None)
    return all(hasattr(att, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups")) and all(
        hasattr(mlp, a) for a in ("up_proj", "down_proj")
    )


def num_kv_heads(block: nn.Module) -> int:
    return block.self_attn.k_proj.out_features // block.self_attn.head_dim


def _parts(b: nn.Module, p: str, kind: str):
    if kind == "heads":
        a = f"{p}.self_attn"
        return num_kv_heads(b), [(f"{a}.q_proj", 0), (f"{a}.k_proj", 0), (f"{a}.v_proj", 0), (f"{a}.o_proj", 1)]
    names = [n for n in ("gate_proj", "up_proj") if hasattr(b.mlp, n)]
    return b.mlp.up_proj.out_features, [(f"{p}.mlp.{n}", 0) for n in names] + [(f"{p}.mlp.down_proj", 1)]


def groups(model: nn.Module, kind: str):
    return unit_groups(model, kind, _parts)


def remove_heads(model: nn.Module, layer: int, heads) -> None:
    """Remove key/value heads `heads` of `layer` and the query heads grouped with them."""
    b = find_blocks(model)[1][layer]
    att = b.self_attn
    d, g = att.head_dim, att.num_key_value_groups
    keep, kv_idx = kept_units(heads, num_kv_heads(b), "key/value heads", f"layer {layer}", d)
    q_idx = unit_index(keep, g * d)
    shrink(att.q_proj, q_idx, "out")
    shrink(att.k_proj, kv_idx, "out")
    shrink(att.v_proj, kv_idx, "out")
    shrink(att.o_proj, q_idx, "in")
    for attr, value in (("num_heads", len(keep) * g), ("num_key_value_heads", len(keep))):
        if hasattr(att, attr):  # older variants keep the counts on the module
            setattr(att, attr, value)


def remove_neurons(model: nn.Module, layer: int, neurons) -> None:
    mlp = find_blocks(model)[1][layer].mlp
    _, idx = kept_units(neurons, mlp.up_proj.out_features, "FFN neurons", f"layer {layer}", 1)
    for name in ("gate_proj", "up_proj"):
        if hasattr(mlp, name):
            shrink(getattr(mlp, name), idx, "out")
    shrink(mlp.down_proj, idx, "in")
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(idx)


def _relabel(b: nn.Module, i: int) -> None:  # cache slots are indexed by layer_idx
    b.self_attn.layer_idx = i
    if hasattr(b, "layer_idx"):
        b.layer_idx = i


def remove_layers(model: nn.Module, layers) -> None:
    n = len(find_blocks(model)[1])
    drop = drop_layers(model, layers, _relabel)
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop]


def structure(model: nn.Module) -> dict:
    blocks = find_blocks(model)[1]
    return {"heads": [num_kv_heads(b) for b in blocks], "ffn": [b.mlp.up_proj.out_features for b in blocks]}


def sync_config(model: nn.Module) -> None:
    """Write the new shapes into the config. FFN width: the widest layer (load_pretrained shrinks the others).
    Head counts only when every layer has the same and the config class accepts them (LlamaConfig and its
    kin require hidden_size % num_attention_heads == 0 even with head_dim pinned): then the Auto class
    reloads the model as it is. Otherwise the counts stay (load_pretrained shrinks each layer from them)."""
    blocks = find_blocks(model)[1]
    s = structure(model)
    cfg, att = model.config, blocks[0].self_attn
    cfg.num_hidden_layers = len(blocks)
    cfg.intermediate_size = uniform_or_max(s["ffn"])[1]
    same, kv = uniform_or_max(s["heads"])
    heads = kv * att.num_key_value_groups
    cfg.head_dim = att.head_dim  # pinned: it no longer follows hidden_size / num_attention_heads
    if same and heads_accepted(cfg, heads):
        cfg.num_key_value_heads = kv
        cfg.num_attention_heads = heads


def heads_accepted(cfg, heads: int) -> bool:
    """Whether `cfg`'s class validates with `heads` attention heads (its own validate_architecture)."""
    trial = copy.copy(cfg)
    trial.num_attention_heads = heads
    try:
        validate = getattr(trial, "validate_architecture", None)
        if validate is not None:
            validate()
    except (ValueError, TypeError):
        return False
    return True


def uniform_refusal(model: nn.Module, kind: str, keep: int) -> str | None:
    """Why `keep` key/value heads in every layer cannot be written in the stock config (None: they can)."""
    if kind != "heads":
        return None
    cfg, g = model.config, find_blocks(model)[1][0].self_attn.num_key_value_groups
    if heads_accepted(cfg, keep * g):
        return None
    n = num_kv_heads(find_blocks(model)[1][0])
    ok = [k for k in range(1, n + 1) if heads_accepted(cfg, k * g)]
    return (
        f"{type(cfg).__name__} requires hidden_size ({cfg.hidden_size}) to be a multiple of num_attention_heads, "
        f"and {keep} kept key/value heads x {g} query heads each = {keep * g} is not (head_dim is pinned, but the "
        f"config class still checks it). Key/value heads per layer it accepts: {ok} of {n}: pick target_sparsity "
        f"so that round(target_sparsity x {n}) heads go from each layer leaves one of these."
    )
