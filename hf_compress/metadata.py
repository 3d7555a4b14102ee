"""The ``hf_compress`` entry of a model config: what compression changed in a model's structure.

Bottom layer: every technique records here what `load_pretrained` needs to rebuild the model
(heads removed, FFN widths, low-bit layers); it lands in ``config.json`` on every save path
(``save_pretrained``, ``trainer.save_model``, Trainer checkpoints, ``push_to_hub``) without hooks.
Imports nothing of hf_compress.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from torch import nn

META_KEY = "hf_compress"

# called as fn(model) after every `record`: hf_compress.integration registers the one that marks a
# compressed model's config so that every save path writes a directory stock transformers refuses
_LISTENERS: list = []


def on_record(fn):
    """Register `fn(model)`, called after each `record` (idempotent). Returns `fn`."""
    if fn not in _LISTENERS:
        _LISTENERS.append(fn)
    return fn


def get_metadata(model_or_config) -> dict[str, Any]:
    """A copy of the ``hf_compress`` entry of a model's (or a config's) config; {} when there is none."""
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
    for fn in _LISTENERS:
        fn(model)
