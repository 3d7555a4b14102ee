"""Reloading compressed models (top layer: imports the technique packages' rebuild functions).

`load_pretrained` reads the ``hf_compress`` entry of ``config.json`` (`hf_compress.metadata`),
rebuilds the same structure (pruned units and layers, low-bit layers), then loads the safetensors
weights. Weights are read from safetensors only. Nothing in the library below this imports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .metadata import get_metadata
from .modules import model_class_for
from .pruning.structured import apply_structure
from .quantization import rebuild_quantized


def load_state_dict_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the (possibly sharded) safetensors files in `path`. Never unpickles."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"No model.safetensors in {path}. hf_compress loads safetensors only; "
            "re-save the model with `save_pretrained(dir)` (safe_serialization is the default)."
        )
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def load_pretrained(path: str | os.PathLike, model_class: type | None = None, **config_kwargs) -> nn.Module:
    """Reload a model saved after compression, with the same structure and weights.

    Works for plain models too (then it is ``model_class(config)`` + the saved weights). Pruned
    structure (non-uniform head counts or FFN widths, removed layers) and low-bit layers are
    rebuilt from ``config.hf_compress`` before the weights are loaded.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    meta = get_metadata(config)
    cls = model_class_for(config, model_class)
    model = cls(config)
    if "pruning" in meta:
        apply_structure(model, meta["pruning"])
    if "quantization" in meta:
        rebuild_quantized(model, meta["quantization"])
    state = load_state_dict_safetensors(path)
    result = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: the saved weights do not fit the rebuilt model "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}). "
            "Was config.json edited, or the model saved before compression finished?"
        )
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that save_pretrained drops because they share storage with another."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
            tied.add(seen[id(p)])
        else:
            seen[id(p)] = name
    return tied
