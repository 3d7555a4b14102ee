"""Callback state inside Trainer checkpoints.

Callbacks (pruning masks and scores, QAT observers) save their tensors beside the Trainer's own files
in ``checkpoint-N/hf_compress/<name>.safetensors`` (+ ``<name>.json`` for scalars and the config they
were made with). Only the main process writes, each file goes to a temporary name first and is
renamed, so a run killed while saving never leaves a state file that loads as complete.
On resume, the Trainer has already loaded ``trainer_state.json`` when ``on_train_begin`` fires, so
``state.global_step`` names the checkpoint to read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

SUBDIR = "hf_compress"


def checkpoint_dir(args, state) -> str:
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_state(args, state, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str | None:
    """Write one callback's state into the checkpoint that was just saved (main process only)."""
    if not state.is_world_process_zero:
        return None
    from safetensors.torch import save_file

    folder = os.path.join(checkpoint_dir(args, state), SUBDIR)
    os.makedirs(folder, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(os.path.join(folder, f"{name}.safetensors"), lambda p: save_file(clean, p))

    def _json(p):
        with open(p, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)

    # the JSON goes last: its presence marks the state as complete
    _atomic_write(os.path.join(folder, f"{name}.json"), _json)
    return folder


def find_resume_dir(args, state) -> str | None:
    """The checkpoint a resumed run started from, or None for a fresh run."""
    if state.global_step <= 0:
        return None
    candidates = [checkpoint_dir(args, state)]
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.insert(0, args.resume_from_checkpoint)
    for c in candidates:
        if os.path.isdir(c):
            return c
    return None


def load_state(
    ckpt: str, name: str, config: dict[str, Any] | None = None, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read one callback's state; refuse when it was written with a different compression config."""
    from safetensors.torch import load_file

    folder = os.path.join(ckpt, SUBDIR)
    meta_path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(meta_path):
        raise ValueError(
            f"Resuming from {ckpt}, but it holds no {name} state ({meta_path} is missing). "
            f"It was written without {name} or its save was interrupted: resume from an earlier checkpoint, "
            f"or start a fresh run (a new output_dir)."
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if config is not None and meta.get("config") != config:
        diff = {
            k: (meta.get("config", {}).get(k), v)
            for k, v in config.items()
            if meta.get("config", {}).get(k) != v
        }
        raise ValueError(
            f"Resuming from {ckpt} with a different {name} config than the checkpoint was written with: "
            f"{{field: (checkpoint, now)}} = {diff}. Use the checkpoint's settings, or start a fresh run."
        )
    tensors = load_file(os.path.join(folder, f"{name}.safetensors"), device=str(device))
    return tensors, meta
