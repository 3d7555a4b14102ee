"""Pieces every architecture family shares: unit groups, Linear surgery, layer skipping."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...modules import find_blocks, is_linear, out_axis, replace_module


@dataclass
class UnitGroup:
    """`n_units` prunable units of one layer. Unit u owns the u-th equal slice of each part's weight
    along the part's dim: rows of the Linears that produce the unit, columns of the one that consumes it."""

    kind: str  # "heads" | "neurons" | "layers"
    layer: int
    n_units: int
    parts: list[tuple[str, int]] = field(default_factory=list)  # (module name, weight dim)
    segments: dict[str, int] = field(default_factory=dict)  # module name -> runs packed in that dim (GPT-2 q|k|v)


def first_block(model: nn.Module) -> nn.Module | None:
    """The first transformer block, or None when the model has no block list (for `matches`)."""
    try:
        return find_blocks(model)[1][0]
    except ValueError:
        return None


def unit_groups(model: nn.Module, kind: str, parts_of) -> list[UnitGroup]:
    """One UnitGroup per block: `parts_of(block, prefix, kind)` gives (n_units, parts[, segments]) for heads
    and neurons; a layer unit owns every Linear of its block."""
    if kind not in ("heads", "neurons", "layers"):
        raise ValueError(f"Unknown unit kind {kind!r}.")
    prefix, blocks = find_blocks(model)
    out = []
    for i, b in enumerate(blocks):
        p = f"{prefix}.{i}"
        if kind == "layers":
            out.append(UnitGroup(kind, i, 1, [(n, out_axis(m)) for n, m in _named_linears(b, p)]))
        else:
            out.append(UnitGroup(kind, i, *parts_of(b, p, kind)))
    return out


def kept_units(units, n: int, what: str, where: str, size: int) -> tuple[list[int], torch.Tensor]:
    """(kept unit numbers, element indices of the kept units, each `size` wide) after removing `units`."""
    drop = check_units(units, n, what, where)
    keep = [u for u in range(n) if u not in drop]
    return keep, unit_index(keep, size)


def drop_layers(model: nn.Module, layers, relabel) -> list[int]:
    """Delete blocks `layers`; `relabel(block, new_index)` renumbers what indexes the KV cache. Returns
    the dropped indices."""
    prefix, blocks = find_blocks(model)
    drop = check_units(layers, len(blocks), "layers", "the model")
    keep = [b for i, b in enumerate(blocks) if i not in drop]
    replace_blocks(model, prefix, keep)
    for i, b in enumerate(keep):
        relabel(b, i)
    model.config.num_hidden_layers = len(keep)
    return drop


def unit_index(keep: list[int], size: int) -> torch.Tensor:
    """Element indices of the kept units, each `size` wide."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    return (keep[:, None] * size + torch.arange(size)).reshape(-1)


def check_units(units, n: int, what: str, where: str) -> list[int]:
    """Validated, sorted unique unit indices; removing all of them is an error."""
    units = sorted({int(u) for u in units})
    bad = [u for u in units if not 0 <= u < n]
    if bad:
        raise ValueError(f"{where} has {n} {what}; cannot remove {what} {bad} (valid indices are 0..{n - 1}).")
    if len(units) >= n:
        hint = "" if what == "layers" else ", or remove the whole layer (granularity='layers')"
        raise ValueError(f"Removing {len(units)} {what} of {where} would leave none of its {n}: keep at least one{hint}.")
    return units


@torch.no_grad()
def shrink(linear: nn.Module, index: torch.Tensor, side: str) -> None:
    """Keep only `index` among the output (`side="out"`) or input (`"in"`) channels of a Linear/Conv1D."""
    if not is_linear(linear):
        raise ValueError(
            f"Structured surgery expects Linear layers, got {type(linear).__name__}: it was converted (by "
            "quantize_model or a quantized export) before the pruned units were removed. Call remove_pruned(model) "
            "before quantising (PruningCallback with QATCallback does so in either callback order)."
        )
    oa = out_axis(linear)
    dim = oa if side == "out" else 1 - oa
    w = linear.weight
    linear.weight = nn.Parameter(w.detach().index_select(dim, index.to(w.device)).clone(), requires_grad=w.requires_grad)
    if side == "out" and getattr(linear, "bias", None) is not None:
        b = linear.bias
        linear.bias = nn.Parameter(b.detach().index_select(0, index.to(b.device)).clone(), requires_grad=b.requires_grad)
    if isinstance(linear, nn.Linear):
        linear.in_features, linear.out_features = linear.weight.shape[1], linear.weight.shape[0]
    else:  # GPT-2 Conv1D: weight is (in, out)
        linear.nx, linear.nf = linear.weight.shape


def _named_linears(block: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}", m) for n, m in block.named_modules() if n and is_linear(m)]


# --- skipping whole layers while training; they are deleted by remove_pruned -----------------------
_HANDLE = "_hf_compress_skip_handle"


def _skip_hook(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    out = output[0] if isinstance(output, tuple) else output
    # `out * 0` keeps the block in the autograd graph (DDP expects every parameter to get a gradient)
    passed = hidden + out * 0
    return (passed, *output[1:]) if isinstance(output, tuple) else passed


def set_layer_skip(block: nn.Module, skip: bool) -> None:
    """Make a transformer block pass its input through unchanged (or undo it)."""
    handle = getattr(block, _HANDLE, None)
    if skip and handle is None:
        setattr(block, _HANDLE, block.register_forward_hook(_skip_hook, with_kwargs=True))
    elif not skip and handle is not None:
        handle.remove()
        delattr(block, _HANDLE)


def is_skipped(block: nn.Module) -> bool:
    return getattr(block, _HANDLE, None) is not None


def replace_blocks(model: nn.Module, prefix: str, keep: list[nn.Module]) -> None:
    replace_module(model, prefix, nn.ModuleList(keep))
    for b in keep:
        set_layer_skip(b, False)


def uniform_or_max(values: list[int]) -> tuple[bool, int]:
    return len(set(values)) == 1, max(values)
