"""Reloading compressed models (top layer: imports the technique packages' rebuild functions).

`load_pretrained` checks the directory before it allocates anything (`hf_compress.storage`): weight files
are regular files inside the directory, their safetensors headers are read (not the tensors), config.json's
layer counts fit them, the class is a transformers model class, and a meta-device skeleton built from the
config — shrunk to the recorded pruned shapes — matches the headers tensor for tensor. Then it rebuilds the
same structure (pruned units and layers, low-bit layers, sparse-bitmask weights) and loads the safetensors
weights. Weights are read from safetensors only. Nothing in the library below this imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .clustering import check_clustering_record, rebuild_clustered  # clustering
from .distillation.sharing import apply_sharing  # clustering (cross-layer sharing)
from .lowrank import rebuild_lowrank  # lowrank
from .metadata import get_metadata
from .modules import model_class_for
from .pruning.structured import apply_structure, structure
from .quantization import rebuild_quantized
from .storage import (attach_listed, check_checkpoint, check_metadata, check_pruning_record, check_raw_config,
                      read_headers, weight_files)
from .storage import check_lowrank_record  # lowrank


def load_state_dict_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the (possibly sharded) safetensors files in `path`, each file checked first
    (`storage.weight_files`: regular files inside `path`). Never unpickles. Sparse-bitmask weights come back
    as their three stored parts (the model's load hooks decompress them)."""
    from safetensors.torch import load_file

    state = {}
    for f in weight_files(path):
        state.update(load_file(str(f)))
    return state


def _model_class(config, model_class: type | None) -> type:
    from transformers import PreTrainedModel

    cls = model_class_for(config, model_class)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(
            f"{cls!r} (from config.architectures={getattr(config, 'architectures', None)!r} or `model_class`) is not "
            "a transformers model class (a PreTrainedModel subclass): refused."
        )
    return cls


def check_directory(path: str | os.PathLike, model_class: type | None = None, **config_kwargs):
    """Everything `load_pretrained` checks before allocating: returns (config, class, weight files).

    Raises ValueError / FileNotFoundError naming what is wrong; reads config.json and the safetensors
    headers only, and builds the architecture on the meta device (no memory)."""
    from transformers import AutoConfig

    path = Path(path)
    files = weight_files(path)
    headers, file_bytes = read_headers(files)
    check_raw_config(path, headers)
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    meta = get_metadata(config)
    cls = _model_class(config, model_class)
    with torch.device("meta"):
        skeleton = cls(config)
    base = None
    if isinstance(meta.get("pruning"), dict) and ("heads" in meta["pruning"] or "ffn" in meta["pruning"]):
        base = structure(skeleton)
    check_pruning_record(meta, base)
    if "pruning" in meta:
        apply_structure(skeleton, meta["pruning"])
    if "sharing" in meta:  # clustering (cross-layer sharing): shared blocks are stored once
        apply_sharing(skeleton, meta["sharing"])
    check_lowrank_record(skeleton, meta)  # lowrank: layers and ranks checked before the skeleton is factorised
    rebuild_lowrank(skeleton, meta.get("lowrank") or {})  # lowrank
    check_metadata(skeleton, meta)
    check_clustering_record(skeleton, meta, headers)  # clustering
    check_checkpoint(skeleton, meta, headers, file_bytes)
    return config, cls, files


def load_pretrained(path: str | os.PathLike, model_class: type | None = None, **config_kwargs) -> nn.Module:
    """Reload a model saved after compression, with the same structure and weights.

    Works for plain models too (then it is ``model_class(config)`` + the saved weights). Pruned
    structure (non-uniform head counts or FFN widths, removed layers), low-bit layers and sparse-bitmask
    weights are rebuilt from ``config.hf_compress`` before the weights are loaded. The directory is
    checked first (`check_directory`): a crafted or mismatched directory is refused before anything is
    allocated.
    """
    from safetensors.torch import load_file

    config, cls, files = check_directory(path, model_class, **config_kwargs)
    meta = get_metadata(config)
    model = cls(config)
    if "pruning" in meta:
        apply_structure(model, meta["pruning"])
    if "sharing" in meta:  # clustering (cross-layer sharing)
        apply_sharing(model, meta["sharing"])
    rebuild_lowrank(model, meta.get("lowrank") or {})  # lowrank: factors first, rebuild_quantized may replace them
    if "quantization" in meta:
        rebuild_quantized(model, meta["quantization"])
    attach_listed(model, meta)  # sparse-bitmask weights: decompressed on load, compressed again on save
    rebuild_clustered(model, meta)  # clustering: codebook + indices decoded on load, encoded on save
    state = {}
    for f in files:
        state.update(load_file(str(f)))
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
