"""Structured surgery for GPT-2 (blocks `transformer.h.N` with Conv1D `attn.c_attn` (q|k|v fused along
its output axis), `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`). Conv1D weights are (in, out). Attention
infers its head count at run time (`view(..., -1, head_dim)`); `split_size` / `num_heads` are updated
so the fused projection splits into the kept heads. GPT-2's config cannot express fewer heads (the
head size follows n_embd / n_head), so head-pruned GPT-2 models reload with `load_pretrained`."""

from __future__ import annotations

import torch
from torch import nn

from ...modules import find_blocks
from .common import drop_layers, first_block, kept_units, shrink, uniform_or_max, unit_groups

NAME = "gpt2"
# what `uniform=True` cannot do for this family, and why (PruningConfig.uniform)
UNIFORM_REFUSED = {
    "heads": "GPT2Config has no head_dim field: the head size is n_embd / n_head, so a stock config with fewer "
             "heads builds wider heads, not the kept ones. Uniform FFN neurons (n_inner) and removed layers "
             "(n_layer) are expressible: prune heads with uniform=False (the export then needs hf_compress to "
             "load) or prune neurons / layers only.",
}


def uniform_refusal(model: nn.Module, kind: str, keep: int) -> str | None:
    """Why `keep` units of `kind` in every layer cannot be written in this family's stock config (None: they can)."""
    return UNIFORM_REFUSED.get(kind)


def matches(model: nn.Module) -> bool:
    b = first_block(model)
    att, mlp = getattr(b, "attn", None), getattr(b, "mlp", None)
    return all(hasattr(att, a) for a in ("c_attn", "c_proj", "split_size", "head_dim")) and all(
        hasattr(mlp, a) for a in ("c_fc", "c_proj")
    ) and not getattr(att, "is_cross_attention", False)


def num_heads(block: nn.Module) -> int:
    return block.attn.split_size // block.attn.head_dim


def _parts(b: nn.Module, p: str, kind: str):
    if kind == "heads":
        qkv = f"{p}.attn.c_attn"
        return num_heads(b), [(qkv, 1), (f"{p}.attn.c_proj", 0)], {qkv: 3}
    return b.mlp.c_fc.nf, [(f"{p}.mlp.c_fc", 1), (f"{p}.mlp.c_proj", 0)]


def groups(model: nn.Module, kind: str):
    return unit_groups(model, kind, _parts)


def remove_heads(model: nn.Module, layer: int, heads) -> None:
    b = find_blocks(model)[1][layer]
    att = b.attn
    d, split = att.head_dim, att.split_size
    keep, idx = kept_units(heads, num_heads(b), "heads", f"layer {layer}", d)
    shrink(att.c_attn, torch.cat([idx, idx + split, idx + 2 * split]), "out")
    shrink(att.c_proj, idx, "in")
    att.split_size = len(keep) * d
    att.num_heads = len(keep)


def remove_neurons(model: nn.Module, layer: int, neurons) -> None:
    mlp = find_blocks(model)[1][layer].mlp
    _, idx = kept_units(neurons, mlp.c_fc.nf, "FFN neurons", f"layer {layer}", 1)
    shrink(mlp.c_fc, idx, "out")
    shrink(mlp.c_proj, idx, "in")


def remove_layers(model: nn.Module, layers) -> None:
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            "This GPT-2 scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx=True): removing "
            "layers would change the scaling of the layers after them. Prune heads or neurons instead."
        )
    drop_layers(model, layers, lambda b, i: setattr(b.attn, "layer_idx", i))  # cache slots follow layer_idx


def structure(model: nn.Module) -> dict:
    blocks = find_blocks(model)[1]
    return {"heads": [num_heads(b) for b in blocks], "ffn": [b.mlp.c_fc.nf for b in blocks]}


def sync_config(model: nn.Module) -> None:
    s = structure(model)
    model.config.num_hidden_layers = len(s["ffn"])
    model.config.n_inner = uniform_or_max(s["ffn"])[1]
