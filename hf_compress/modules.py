"""Selecting the modules a compression method works on.

One home for "which layers": pruning, QAT, PTQ, export, the CLI and the tests all call
`select_modules`. By default the targets are the Linear layers inside the transformer blocks;
embeddings, LayerNorm, poolers and the task head stay untouched.

PEFT models are recognised by structure (no peft import): a LoRA-wrapped layer contributes its
`base_layer` Linear (the frozen weight a mask belongs on), never its adapters (`lora_A`, `lora_B`, ...),
and regexes also match the name the layer has in the plain model (what `merge_and_unload` returns).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

try:  # GPT-2 family keeps its projections in a transposed "Conv1D"
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always has it today
    Conv1D = ()

# A module name inside a block list: "bert.encoder.layer.3.attention.self.query",
# "model.layers.0.mlp.up_proj", "transformer.h.2.attn.c_attn", ...
BLOCK_PATTERN = r"(^|\.)(layer|layers|h|block|blocks)\.\d+\."
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D else ())


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def is_plain_linear(module: nn.Module) -> bool:
    """A plain Linear / Conv1D, or one that QAT's fake quantisation only wraps for training: its class says
    so (`hfc_float_view`), its float `weight` Parameter is still the one the optimizer updates, and the wrap
    comes off at conversion. Converted layers (int8, 4-bit, factorised, clustered) are not plain."""
    cls = type(module)
    return cls in LINEAR_TYPES or (getattr(cls, "hfc_float_view", False) and getattr(cls, "hfc_base", None) in LINEAR_TYPES)


def out_axis(module: nn.Module) -> int:
    """Axis of the weight that indexes output channels (0 for Linear, 1 for GPT-2's Conv1D)."""
    return 1 if Conv1D and isinstance(module, Conv1D) else 0


def _compile(patterns: str | Iterable[str] | None) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"`targets`/`exclude`: {p!r} is not a valid regular expression ({e}).") from e
    return out


def select_modules(
    model: nn.Module,
    targets: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    *,
    field: str = "targets",
    require: bool = True,
) -> dict[str, nn.Module]:
    """Linear modules of `model` whose name matches a `targets` regex (`re.search`) and no `exclude` regex.

    `targets=None` means the Linear layers inside the transformer blocks. With `require=True` a
    selection that matches nothing is a `ValueError` naming `field`, so a typo never trains silently
    with no compression.
    """
    inc = _compile(targets) or [re.compile(BLOCK_PATTERN)]
    exc = _compile(exclude)
    linear, peft = _linear_modules(model)
    chosen = {}
    for name, module in linear.items():
        names = (name, plain_name(name)) if peft else (name,)
        if any(p.search(x) for p in inc for x in names) and not any(p.search(x) for p in exc for x in names):
            chosen[name] = module
    if require and not chosen:
        some = list(linear)[:5]
        raise ValueError(
            f"`{field}`={targets!r} (exclude={exclude!r}) matches no Linear module of "
            f"{type(model).__name__}. Linear modules look like {some}; pass a regex that matches some of them."
        )
    return chosen


# a PEFT name -> the plain model's name: drop the wrapper prefix, the `.base_layer` of a tuner layer
# and the `.modules_to_save.<adapter>` of a trainable copy
_PEFT_PARTS = re.compile(r"^base_model\.model\.|\.base_layer(?=\.|$)|\.modules_to_save\.[^.]+(?=\.|$)")


def plain_name(name: str) -> str:
    """The name a module of a PEFT model has in the plain model (after `merge_and_unload`)."""
    return _PEFT_PARTS.sub("", name)


def _linear_modules(model: nn.Module) -> tuple[dict[str, nn.Module], bool]:
    """Every named Linear of `model` except those PEFT owns: the adapters of a tuner layer (every child
    but `base_layer`) and the frozen `original_module` a modules_to_save copy replaces. Also: is it PEFT?"""
    skip = set()
    for name, module in model.named_modules():
        if isinstance(getattr(module, "base_layer", None), nn.Module):  # peft BaseTunerLayer
            skip.update(f"{name}.{c}" for c, _ in module.named_children() if c != "base_layer")
        elif isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict):  # peft ModulesToSaveWrapper
            skip.add(f"{name}.original_module")
    below = tuple(x + "." for x in skip)
    linear = {n: m for n, m in model.named_modules() if n and is_linear(m) and n not in skip and not n.startswith(below)}
    return linear, bool(skip)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the transformer blocks, and its dotted name."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and re.search(r"(^|\.)(layer|layers|h|block|blocks)$", name):
            if best is None or len(name) < len(best[0]):
                best = (name, module)
    if best is None:
        raise ValueError(f"Could not find the transformer block list of {type(model).__name__}.")
    return best


def split_block_name(name: str, prefix: str) -> tuple[int, str] | None:
    """(block index, name inside the block) of a module `name` under the block list `prefix` (``find_blocks``);
    None for a name outside the blocks. ``bert.encoder.layer.3.output.dense`` -> (3, "output.dense")."""
    if not name.startswith(prefix + "."):
        return None
    index, _, inner = name[len(prefix) + 1:].partition(".")
    return (int(index), inner) if index.isdigit() else None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / accelerate / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_class_for(config, model_class: type | None = None) -> type:
    """The transformers class named by ``config.architectures`` (or `model_class` when given)."""
    if model_class is not None:
        return model_class
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"config.architectures={getattr(config, 'architectures', None)!r} names no transformers class: "
        "pass `model_class=`, e.g. AutoModelForSequenceClassification."
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule called `name` (dotted) is; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def local_name(model: nn.Module, name: str, modules: dict | None = None) -> str | None:
    """A module name recorded on a saved model as a module name of `model`, which may be the base model of
    that head model or the other way round (``bert.encoder...`` <-> ``encoder...``); None when `model` has
    no such module. `modules`: ``dict(model.named_modules())`` when the caller has it already."""
    modules = dict(model.named_modules()) if modules is None else modules
    if name in modules:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in modules:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in modules:
        return f"{prefix}.{name}"
    return None
