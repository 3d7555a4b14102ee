"""Folders the command writes into, and the files in them it owns.

The command never deletes or overwrites a file it did not write. Each folder it saves a model into
(``<output_dir>/teacher``, the export folder) gets a marker file listing the files the run wrote;
a later run deletes exactly those before saving again (so no stale ``model.safetensors.index.json`` or
shard of an earlier, sharded save survives beside a fresh ``model.safetensors``), and refuses, before
any training, when the folder holds model files it did not write.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

TEACHER_MARKER = "hf_compress_teacher.json"  # also holds the teacher's fingerprint (reuse)
EXPORT_MARKER = "hf_compress_export.json"

# names save_pretrained / save_model / a tokenizer write, and the weight files loaders look for
MODEL_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*",
    "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "added_tokens.json", "chat_template*",
    "training_args.bin", "hf_compress*", "*.gguf", "tf_model.h5", "flax_model.msgpack", "model.pt",
)


def _is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in MODEL_FILES)


def read_marker(folder: Path, marker: str) -> dict | None:
    path = Path(folder) / marker
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        # written by an older hf-compress (the fingerprint only): it owned the files a save writes
        files = [p.name for p in Path(folder).iterdir() if p.is_file() and _is_model_file(p.name) and p.name != marker]
        return {"fingerprint": path.read_text(encoding="utf-8", errors="replace"), "files": files, "legacy": True}
    return data


def foreign_files(folder: Path, marker: str, model_files_only: bool) -> list[str]:
    """Entries of `folder` the command did not write (only model-file names when `model_files_only`)."""
    folder = Path(folder)
    if not folder.exists():
        return []
    owned = set((read_marker(folder, marker) or {}).get("files", [])) | {marker}
    out = []
    for p in sorted(folder.iterdir()):
        if p.name in owned and p.is_file():
            continue
        if model_files_only and not (p.is_file() and _is_model_file(p.name)):
            continue
        out.append(p.name + ("/" if p.is_dir() else ""))
    return out


def check_folder(folder: Path, marker: str, what: str, model_files_only: bool) -> None:
    """Refuse (ValueError) a folder holding files this command did not write (all files, or model files only)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder: move it or choose another output_dir / export.dir.")
    foreign = foreign_files(folder, marker, model_files_only)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"{what} {folder} holds files hf-compress did not write ({shown}; no {marker} lists them): "
            "the run would overwrite or delete them. Move them away, or choose another output_dir / export.dir."
        )


def clear_owned(folder: Path, marker: str) -> list[str]:
    """Delete the files an earlier run wrote into `folder` (as its marker lists them) and the marker."""
    folder = Path(folder)
    data = read_marker(folder, marker)
    if data is None:
        return []
    removed = []
    for name in data["files"]:
        p = folder / name
        if "/" in name or name in ("", ".", "..") or not p.is_file():
            continue
        p.unlink()
        removed.append(name)
    (folder / marker).unlink(missing_ok=True)
    return removed


def mark(folder: Path, marker: str, before: set[str], **extra) -> list[str]:
    """Write the marker: the files now in `folder` that were not there before (the ones this run wrote)."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in before and p.name != marker)
    (folder / marker).write_text(json.dumps({**extra, "files": files}, indent=1), encoding="utf-8")
    return files


def present(folder: Path) -> set[str]:
    folder = Path(folder)
    return {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
