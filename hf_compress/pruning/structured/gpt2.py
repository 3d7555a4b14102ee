"""Structured surgery for GPT-2 (blocks `transformer.h.N` with Conv1D `attn.c_attn` (q|k|v fused along
its output axis), `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`). Conv1D weights are (in, out). Attention
infers its head count at run time (`view(..., -1, head_dim)`); `split_size` / `num_heads` are updated
so the fused projection splits into the kept heads. GPT-2's config cannot express fewer heads (the
head size follows n_embd / n_head), so head-pruned GPT-2 models reload with `load_pretrained`."""

from __future__ import annotations

import torch
from torch import nn

from ...modules import find_blocks
from .common import UnitGroup, check_units, linears, replace_blocks, shrink, uniform_or_max, unit_index

NAME = "gpt2"


def matches(model: nn.Module) -> bool:
    try:
        _, blocks = find_blocks(model)
    except ValueError:
        return False
    b = blocks[0]
    att, mlp = getattr(b, "attn", None), getattr(b, "mlp", None)
    return all(hasattr(att, a) for a in ("c_attn", "c_proj", "split_size", "head_dim")) and all(
        hasattr(mlp, a) for a in ("c_fc", "c_proj")
    ) and not getattr(att, "is_cross_attention", False)


def num_heads(block: nn.Module) -> int:
    return block.attn.split_size // block.attn.head_dim


def groups(model: nn.Module, kind: str) -> list[UnitGroup]:
    prefix, blocks = find_blocks(model)
    out = []
    for i, b in enumerate(blocks):
        p = f"{prefix}.{i}"
        if kind == "heads":
            qkv = f"{p}.attn.c_attn"
            out.append(UnitGroup(kind, i, num_heads(b), [(qkv, 1), (f"{p}.attn.c_proj", 0)], {qkv: 3}))
        elif kind == "neurons":
            out.append(UnitGroup(kind, i, b.mlp.c_fc.nf, [(f"{p}.mlp.c_fc", 1), (f"{p}.mlp.c_proj", 0)]))
        elif kind == "layers":
            out.append(UnitGroup(kind, i, 1, [(n, 1) for n in linears(b, p)]))
        else:
            raise ValueError(f"Unknown unit kind {kind!r}.")
    return out


def remove_heads(model: nn.Module, layer: int, heads) -> None:
    b = find_blocks(model)[1][layer]
    att = b.attn
    n, d, split = num_heads(b), att.head_dim, att.split_size
    drop = check_units(heads, n, "heads", f"layer {layer}")
    keep = [h for h in range(n) if h not in drop]
    idx = unit_index(keep, d)
    shrink(att.c_attn, torch.cat([idx, idx + split, idx + 2 * split]), "out")
    shrink(att.c_proj, idx, "in")
    att.split_size = len(keep) * d
    att.num_heads = len(keep)


def remove_neurons(model: nn.Module, layer: int, neurons) -> None:
    mlp = find_blocks(model)[1][layer].mlp
    n = mlp.c_fc.nf
    drop = check_units(neurons, n, "FFN neurons", f"layer {layer}")
    idx = unit_index([u for u in range(n) if u not in drop], 1)
    shrink(mlp.c_fc, idx, "out")
    shrink(mlp.c_proj, idx, "in")


def remove_layers(model: nn.Module, layers) -> None:
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            "This GPT-2 scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx=True): removing "
            "layers would change the scaling of the layers after them. Prune heads or neurons instead."
        )
    prefix, blocks = find_blocks(model)
    drop = check_units(layers, len(blocks), "layers", "the model")
    keep = [b for i, b in enumerate(blocks) if i not in drop]
    replace_blocks(model, prefix, keep)
    for i, b in enumerate(keep):  # cache slots are indexed by layer_idx
        b.attn.layer_idx = i
    model.config.num_hidden_layers = len(keep)


def structure(model: nn.Module) -> dict:
    blocks = find_blocks(model)[1]
    return {"heads": [num_heads(b) for b in blocks], "ffn": [b.mlp.c_fc.nf for b in blocks]}


def sync_config(model: nn.Module) -> None:
    s = structure(model)
    model.config.num_hidden_layers = len(s["ffn"])
    model.config.n_inner = uniform_or_max(s["ffn"])[1]
