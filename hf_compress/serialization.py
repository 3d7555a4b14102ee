"""Saving and reloading compressed models.

What a compression step changed in a model's *structure* (heads removed, FFN widths, low-bit layers)
is recorded under the key ``hf_compress`` of the model's ``config`` — so it lands in the small
``config.json`` beside the weights on every save path (``save_pretrained``, ``trainer.save_model``,
Trainer checkpoints, ``push_to_hub``) without hooks. `load_pretrained` reads it back, rebuilds the
same structure, then loads the safetensors weights. Weights are read from safetensors only.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

META_KEY = "hf_compress"


def get_metadata(model_or_config) -> dict[str, Any]:
    config = getattr(model_or_config, "config", model_or_config)
    return copy.deepcopy(getattr(config, META_KEY, None) or {})


def record(model: nn.Module, section: str, data: Any) -> None:
    """Store `data` (JSON-serialisable) under ``config.hf_compress[section]``; `None` removes it."""
    config = model.config
    meta = dict(getattr(config, META_KEY, None) or {})
    if data is None:
        meta.pop(section, None)
    else:
        json.dumps(data)  # fail now, not at save time
        meta[section] = data
    setattr(config, META_KEY, meta or None)


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
        from .pruning.structured import apply_structure

        apply_structure(model, meta["pruning"])
    if "quantization" in meta:
        from .quantization import rebuild_quantized

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
