"""What a saved directory holds on disk: the safe way to read it, and sparse weights stored compressed.

Low layer (imports `metadata` and `modules` only); `loading` and `integration` call it.

Reading a directory safely (`weight_files`, `read_header`, `check_checkpoint`):
every weight file named by ``model.safetensors.index.json`` is a plain name inside the directory (no
absolute path, no ``..``), a regular file (``os.lstat`` / ``os.stat`` before it is opened, so a named pipe
is refused instead of blocking; a symbolic link must stay inside the directory, or in the ``blobs/`` folder
of a Hugging Face cache snapshot), and only its safetensors *header* (8-byte length + JSON) is read to learn
names, dtypes and shapes. `check_checkpoint` compares a meta-device skeleton (no memory) with those headers
before anything is allocated.

Sparse storage (``config.hf_compress["storage"]``, format ``sparse-bitmask``): the layout of
compressed-tensors' sparse-bitmask compressor without its row offsets (derivable from the mask). A 2-D
weight ``NAME`` ([rows, cols], any dtype) is saved as three tensors

    NAME.compressed   1-D, the weight's dtype: the non-zero entries in row-major order
    NAME.bitmask      uint8 [rows, ceil(cols / 8)]: bit j of byte k of row r (little-endian bit order)
                      says whether entry (r, 8k + j) is stored
    NAME.shape        int64 [2]: rows, cols

Every entry that is not equal to zero is stored with its exact bits; zeros come back as ``0``
(a ``-0.0`` that a multiplied mask left becomes ``0.0``: an equal value, the same sums and logits). A 50%-sparse
int8 weight takes 0.5 + 1/8 bytes per entry instead of 1. After a pruning run is recorded, every
Linear-like weight (Linear, GPT-2 Conv1D, hf_compress Int8Linear) whose compressed form is smaller is
listed in the metadata; save hooks on those modules (``state_dict`` post-hook, ``load_state_dict`` pre-hook)
write and read the three tensors, so every save path (``save_pretrained``, ``trainer.save_model``, Trainer
checkpoints) writes them and ``load_state_dict`` (Trainer resume, `load_pretrained`) reads them.
`set_storage(model, "dense")` opts out.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path

import torch
from torch import nn

from .metadata import get_metadata, on_record, record
from .modules import BLOCK_PATTERN, is_linear, local_name as _local, out_axis, unwrap

SPARSE_FORMAT = "sparse-bitmask"
STORAGE_VERSION = 1
PARTS = ("compressed", "bitmask", "shape")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
MAX_CONFIG = 16 * 1024 * 1024
MAX_LABELS = 1_000_000

_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "F8_E4M3": (None, 1), "F8_E5M2": (None, 1),
    "U16": (None, 2), "U32": (None, 4), "U64": (None, 8),
}


# ----------------------------------------------------------------------------- the bitmask format


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    """Entries that are stored: those not equal to zero (masks multiply, so pruned floats are often -0.0;
    they come back as 0.0, an equal value that gives the same sums). NaN is stored."""
    return t != 0


def compress(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"compressed", "bitmask", "shape"} of a 2-D tensor (see the module docstring)."""
    if t.dim() != 2:
        raise ValueError(f"sparse-bitmask stores 2-D weights, not shape {tuple(t.shape)}.")
    t = t.detach()
    rows, cols = t.shape
    mask = _nonzero(t)
    pad = (-cols) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(rows, -1, 8)
    weights = (2 ** torch.arange(8, dtype=torch.int32, device=t.device)).to(torch.uint8)
    packed = (bits * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
    return {"compressed": t[mask].contiguous(), "bitmask": packed.contiguous(),
            "shape": torch.tensor([rows, cols], dtype=torch.int64)}


def decompress(parts: dict[str, torch.Tensor], name: str = "tensor", shape=None) -> torch.Tensor:
    """The dense tensor; ValueError when the three parts disagree with each other or with `shape`."""
    values, packed, size = parts["compressed"], parts["bitmask"], parts["shape"]
    if size.dtype != torch.int64 or tuple(size.shape) != (2,):
        raise ValueError(f"{name}.shape must be int64 [2], not {size.dtype} {tuple(size.shape)}.")
    rows, cols = (int(x) for x in size.tolist())
    if shape is not None and (rows, cols) != tuple(shape):
        raise ValueError(f"{name}: stored shape {(rows, cols)} but the model expects {tuple(shape)}.")
    if rows <= 0 or cols <= 0 or packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, math.ceil(cols / 8)):
        raise ValueError(f"{name}.bitmask is {packed.dtype} {tuple(packed.shape)}, not uint8 {(rows, math.ceil(cols / 8))}.")
    bits = (packed.to(torch.int32)[..., None] >> torch.arange(8, device=packed.device)) & 1
    mask = bits.reshape(rows, -1)[:, :cols].bool()
    if values.dim() != 1 or values.numel() != int(mask.sum()):
        raise ValueError(f"{name}: the bitmask marks {int(mask.sum())} entries but {name}.compressed holds "
                         f"{values.numel()}.")
    out = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def compressed_nbytes(t: torch.Tensor) -> int:
    """Bytes the compressed form takes on disk (tensors + a header allowance)."""
    rows, cols = t.shape
    nnz = int(_nonzero(t.detach()).sum())
    return nnz * t.element_size() + rows * math.ceil(cols / 8) + 16 + 3 * (len("compressed") + 120)


# ----------------------------------------------------------------------------- which weights, and the hooks


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """{weight name: module} of Linear-like modules with a plain 2-D weight not shared with another tensor."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not (is_linear(m) or hasattr(m, "weight_scale")) or not isinstance(w, torch.Tensor):
            continue
        if type(w) not in (torch.Tensor, nn.Parameter) or w.dim() != 2 or w.device.type == "meta":
            continue  # bitsandbytes / DTensor weights keep their own storage
        if seen.get(id(w), 0) > 1:
            continue  # tied (e.g. an LM head sharing the embeddings): transformers saves it once
        if getattr(m, "_hfc_cluster_hooks", None) is not None:  # clustering: stored as codebook + indices
            continue
        out[f"{name}.weight" if name else "weight"] = m
    return out


def _save_hook(module, state_dict, prefix, local_metadata):
    key = prefix + "weight"
    w = state_dict.get(key)
    if not isinstance(w, torch.Tensor) or type(w.detach()) is not torch.Tensor or w.dim() != 2:
        return
    del state_dict[key]
    for part, t in compress(w.detach()).items():
        state_dict[f"{key}.{part}"] = t


def _load_hook(module, state_dict, prefix, *args):
    key = prefix + "weight"
    found = {p: f"{key}.{p}" in state_dict for p in PARTS}
    if not any(found.values()):
        return  # stored dense (e.g. a checkpoint written before convert)
    if not all(found.values()):
        raise ValueError(f"{key}: {[p for p, f in found.items() if not f]} missing beside the sparse parts.")
    parts = {p: state_dict.pop(f"{key}.{p}") for p in PARTS}
    w = getattr(module, "weight", None)
    state_dict[key] = decompress(parts, key, None if w is None else tuple(w.shape))


def attach(module: nn.Module) -> None:
    """Save `module.weight` sparse-bitmask on every state_dict and read it back on load_state_dict (idempotent)."""
    if getattr(module, "_hfc_sparse_hooks", None) is None:
        module._hfc_sparse_hooks = (module.register_state_dict_post_hook(_save_hook),
                                    module.register_load_state_dict_pre_hook(_load_hook))


def detach(module: nn.Module) -> None:
    for h in getattr(module, "_hfc_sparse_hooks", None) or ():
        h.remove()
    module._hfc_sparse_hooks = None


def stored_sparse(model_or_config) -> list[str]:
    """Weight names the metadata (a model, a config, or the ``hf_compress`` dict itself) lists as stored sparse."""
    meta = model_or_config if isinstance(model_or_config, dict) else get_metadata(model_or_config)
    st = meta.get("storage") or {}
    if not isinstance(st, dict) or st.get("format") != SPARSE_FORMAT:
        return []
    return list(st.get("tensors") or [])


def attach_listed(model: nn.Module, meta: dict | None = None) -> dict[str, str]:
    """Hooks on the modules whose weights the metadata lists; {local weight name: recorded name}."""
    model = unwrap(model)
    names = stored_sparse(meta if meta is not None else model)
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        local = _local(model, name.rsplit(".", 1)[0], modules)
        if local is not None:
            attach(modules[local])
            out[f"{local}.weight"] = name
    return out


def _has_pruning_run(meta: dict) -> bool:
    p = meta.get("pruning")
    return isinstance(p, dict) and bool(p.get("runs"))


@torch.no_grad()
def update_storage(model: nn.Module) -> None:
    """Record-listener: after a pruning run is recorded, store sparse every weight whose compressed form is
    smaller (measured on the weights now), unless `set_storage(model, "dense")` chose dense."""
    model = unwrap(model)
    if not hasattr(model, "config"):
        return
    meta = get_metadata(model)
    current = meta.get("storage")
    if isinstance(current, dict) and current.get("format") == "dense":
        chosen = {}
    elif not _has_pruning_run(meta):
        chosen = {}
    else:
        chosen = {n: m for n, m in _candidates(model).items()
                  if compressed_nbytes(m.weight) < m.weight.numel() * m.weight.element_size()}
    for m in model.modules():
        if getattr(m, "_hfc_sparse_hooks", None) is not None and m not in chosen.values():
            detach(m)
    for m in chosen.values():
        attach(m)
    if isinstance(current, dict) and current.get("format") == "dense":
        return
    entry = {"format": SPARSE_FORMAT, "version": STORAGE_VERSION, "tensors": sorted(chosen)} if chosen else None
    if entry != current:
        record(model, "storage", entry)


def set_storage(model: nn.Module, mode: str = "auto") -> list[str]:
    """``"auto"`` (default): sparse-bitmask where smaller; ``"dense"``: plain tensors. Returns the weights stored sparse."""
    if mode not in ("auto", "dense"):
        raise ValueError(f"storage mode {mode!r}: use 'auto' or 'dense'.")
    model = unwrap(model)
    if mode == "dense":
        record(model, "storage", {"format": "dense"})
    else:
        if (get_metadata(model).get("storage") or {}).get("format") == "dense":
            record(model, "storage", None)
        update_storage(model)
    return stored_sparse(model)


on_record(update_storage)


# ----------------------------------------------------------------------------- reading a directory safely


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def safe_file(directory: str | os.PathLike, name: str) -> Path:
    """`directory/name` after checking that it is a regular file inside the directory (or a symbolic link to
    one there, or into a Hugging Face cache's ``blobs/``). Never opens it."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name or ".." in Path(name).parts:
        raise ValueError(f"{directory}: weight file name {name!r} is not a plain name inside the directory "
                         "(absolute or '..' paths are refused).")
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/file -> ../../blobs/<hash>
        roots.append(root.parent.parent / "blobs")
    path = directory / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (named by the directory's weight index).") from None
    real = path.resolve()
    if stat.S_ISLNK(st.st_mode):
        if not _inside(real, roots):
            raise ValueError(f"{path} is a symbolic link to {real}, outside {directory}: refused.")
        st = os.stat(real)
    elif not _inside(real, roots):
        raise ValueError(f"{path} lies outside {directory}: refused.")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a named pipe, device or folder): refused.")
    return real


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a saved directory (sharded or not), each checked by `safe_file`."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if os.path.lexists(index):
        real = safe_file(directory, index.name)
        if os.path.getsize(real) > MAX_CONFIG:
            raise ValueError(f"{index} is larger than {MAX_CONFIG} bytes: refused.")
        try:
            data = json.loads(real.read_text())
            names = sorted(set(data["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index ({type(e).__name__}: {e}).") from None
        if not names:
            raise ValueError(f"{index} names no weight file.")
    elif os.path.lexists(directory / "model.safetensors"):
        names = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"No model.safetensors in {directory}. hf_compress loads safetensors only; "
            "re-save the model with `save_pretrained(dir)` (safe_serialization is the default)."
        )
    return [safe_file(directory, n) for n in names]


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], int]:
    """({tensor name: (safetensors dtype, shape)}, file size) from the 8-byte length + JSON header only.

    ValueError when the header is malformed or a tensor's bytes lie outside the file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file: refused.")
        size = st.st_size
        head = os.read(fd, 8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes) or 100 MB.")
        raw = b""
        while len(raw) < n:
            chunk = os.read(fd, n - len(raw))
            if not chunk:
                break
            raw += chunk
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{path}: the safetensors header is not valid JSON ({e}).") from None
    data = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            item = _DTYPES[dtype][1]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(start, int) and isinstance(end, int)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: header entry {name!r} is malformed.") from None
        if not ok or not 0 <= start <= end <= data or end - start != math.prod(shape) * item:
            raise ValueError(f"{path}: tensor {name!r} ({dtype} {shape}, bytes {start}..{end}) does not fit the "
                             f"file's {data} data bytes.")
        out[name] = (dtype, tuple(shape))
    return out, size


def read_headers(files) -> tuple[dict[str, tuple[str, tuple[int, ...]]], int]:
    """Every file's header merged; total bytes on disk. A tensor in two files is an error."""
    headers, total = {}, 0
    for f in files:
        h, size = read_header(f)
        dup = set(h) & set(headers)
        if dup:
            raise ValueError(f"{f}: tensors {sorted(dup)[:5]} are also in another weight file.")
        headers.update(h)
        total += size
    return headers, total


def header_blocks(headers) -> int:
    """Number of transformer blocks the tensor names imply (highest block index + 1)."""
    pat = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
    found = [int(m.group(1)) for k in headers for m in [pat.search(k)] if m]
    return max(found) + 1 if found else 0


def check_raw_config(directory: str | os.PathLike, headers) -> dict:
    """config.json read as JSON before transformers builds anything from it: a regular file of sane size,
    layer counts no larger than the blocks the weight headers hold, a sane number of labels."""
    real = safe_file(directory, "config.json")
    if os.path.getsize(real) > MAX_CONFIG:
        raise ValueError(f"{real} is larger than {MAX_CONFIG} bytes: refused.")
    try:
        raw = json.loads(real.read_text())
    except ValueError as e:
        raise ValueError(f"{real} is not valid JSON ({e}).") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{real} is not a JSON object.")
    # blocks named like layer.N / layers.N / h.N / block.N: the headers bound the count; other layouts
    # (e.g. ALBERT's shared groups) only get a generous bound
    blocks = header_blocks(headers) or 1000
    configs = [raw] + [v for v in raw.values() if isinstance(v, dict) and "model_type" in v]
    for c in configs:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            v = c.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= blocks):
                raise ValueError(f"config.json: {key}={v!r}, but the weight files hold {blocks} blocks.")
        labels = c.get("num_labels", len(c.get("id2label") or {}))
        if not isinstance(labels, int) or isinstance(labels, bool) or not 0 <= labels <= MAX_LABELS:
            raise ValueError(f"config.json: num_labels={labels!r} is not a count between 0 and {MAX_LABELS}.")
        if len(c.get("id2label") or {}) > MAX_LABELS or len(c.get("label2id") or {}) > MAX_LABELS:
            raise ValueError(f"config.json: more than {MAX_LABELS} labels.")
    return raw


# ----------------------------------------------------------------------------- metadata vs skeleton vs headers


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_pruning_record(meta: dict, base_structure: dict | None = None) -> None:
    """Before the skeleton is shrunk: the recorded heads / FFN widths are lists of positive integers and, given
    the base architecture's `structure` (what the config builds), as long and no larger."""
    if not isinstance(meta, dict):
        raise ValueError(f"config.json's hf_compress entry is {type(meta).__name__}, not an object.")
    p = meta.get("pruning")
    if p is not None:
        if not isinstance(p, dict):
            raise ValueError("config.json: hf_compress.pruning is not an object.")
        for key in ("heads", "ffn"):
            want = p.get(key)
            if want is None:
                continue
            if not isinstance(want, list) or not all(_pos_int(v) for v in want):
                raise ValueError(f"config.json: hf_compress.pruning.{key} must be a list of positive integers, "
                                 f"not {want!r:.200}.")
            if base_structure is not None:
                now = base_structure.get(key) or []
                if len(want) != len(now) or any(w > c for w, c in zip(want, now)):
                    raise ValueError(f"config.json: hf_compress.pruning.{key}={want!r:.200} does not fit the "
                                     f"architecture, which builds {now!r:.200} (lengths must agree, counts no larger).")


def check_lowrank_record(skeleton: nn.Module, meta: dict) -> None:  # lowrank
    """Before the skeleton is factorised (or after: both forms pass): ``hf_compress.lowrank`` is an object whose
    ``layers`` name Linear layers of the architecture with the recorded in / out widths, each with a rank that is
    a positive integer <= min(in, out) and a bool bias. Nothing is allocated."""
    lr = meta.get("lowrank") if isinstance(meta, dict) else None
    if lr is None:
        return

    def bad(why):
        raise ValueError(f"config.json: hf_compress.lowrank {why} (edited config.json, or a directory assembled from "
                         "different models?).")

    if not isinstance(lr, dict) or not isinstance(lr.get("layers"), dict):
        bad("must be an object with a 'layers' object")
    if lr.get("version", 1) != 1:
        bad(f"has format version {lr.get('version')!r}, which this hf_compress does not read: upgrade hf_compress")
    modules = dict(skeleton.named_modules())
    for name, d in lr["layers"].items():
        if not isinstance(d, dict) or not all(_pos_int(d.get(k)) for k in ("in_features", "out_features", "rank")) \
                or not isinstance(d.get("bias", False), bool):
            bad(f"layer {name!r:.200} needs positive integers in_features / out_features / rank and a bool bias")
        i, o, r = d["in_features"], d["out_features"], d["rank"]
        if r > min(i, o):
            bad(f"layer {name!r:.200} has rank {r}, above min(in, out) = {min(i, o)}")
        local = _local(skeleton, name, modules)
        m = modules.get(local) if local is not None else None
        if m is not None and is_linear(m):
            axis = out_axis(m)
            shape = (m.weight.shape[1 - axis], m.weight.shape[axis])
        elif m is not None and all(is_linear(getattr(m, c, None) or nn.Module()) for c in ("0", "1")):  # factorised
            shape = (getattr(m, "0").weight.shape[1], getattr(m, "1").weight.shape[0])
        else:
            bad(f"names {name!r:.200}, which is not a Linear layer of {type(skeleton).__name__}")
        if shape != (i, o):
            bad(f"layer {name!r:.200} records (in, out) = ({i}, {o}) but the architecture has {shape}")


def check_metadata(skeleton: nn.Module, meta: dict) -> None:
    """The ``hf_compress`` entry against the architecture built from the config (on the meta device, already
    shrunk to the recorded pruned shapes): recorded low-bit layers exist with the recorded widths, listed
    sparse weights exist."""
    check_pruning_record(meta)
    modules = dict(skeleton.named_modules())
    q = meta.get("quantization")
    if q is not None:
        if not isinstance(q, dict) or not isinstance(q.get("layers"), dict):
            raise ValueError("config.json: hf_compress.quantization must be an object with a 'layers' object.")
        for name, d in q["layers"].items():
            local = _local(skeleton, name, modules)
            m = modules.get(local) if local is not None else None
            if m is None or not is_linear(m):
                raise ValueError(f"config.json: quantised layer {name!r} is not a Linear layer of "
                                 f"{type(skeleton).__name__}.")
            if not isinstance(d, dict) or not all(_pos_int(d.get(k)) for k in ("in_features", "out_features")):
                raise ValueError(f"config.json: quantised layer {name!r} needs positive in_features / out_features.")
            axis = out_axis(m)
            shape = (m.weight.shape[1 - axis], m.weight.shape[axis])
            if (d["in_features"], d["out_features"]) != shape or not isinstance(d.get("bias", False), bool):
                raise ValueError(f"config.json: quantised layer {name!r} records (in, out) = "
                                 f"({d['in_features']}, {d['out_features']}) but the architecture has {shape}.")
        if q.get("embedding") is not None:  # QATConfig.embedding_bits: the word embedding stored per row
            from .quantization.embedding import check_embedding_record

            e = q["embedding"]
            name = e.get("name") if isinstance(e, dict) else None
            local = _local(skeleton, name, modules) if isinstance(name, str) else None
            check_embedding_record(e, modules.get(local) if local is not None else None, name)
    st = meta.get("storage")
    if st is not None:
        if not isinstance(st, dict) or st.get("format") not in (SPARSE_FORMAT, "dense"):
            raise ValueError(f"config.json: hf_compress.storage {st!r:.200} is not a storage format of this hf_compress.")
        if st.get("version", STORAGE_VERSION) != STORAGE_VERSION:
            raise ValueError(f"config.json: storage version {st.get('version')!r}: upgrade hf_compress.")
        tensors = st.get("tensors") or []
        if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
            raise ValueError("config.json: hf_compress.storage.tensors must be a list of weight names.")
        for t in tensors:
            local = _local(skeleton, t.rsplit(".", 1)[0], modules) if t.endswith(".weight") else None
            if local is None or getattr(modules[local], "weight", None) is None or modules[local].weight.dim() != 2:
                raise ValueError(f"config.json: sparse weight {t!r} is not a 2-D weight of {type(skeleton).__name__}.")


def _tied(model: nn.Module) -> set[str]:
    """Names saved once for several (tied now, or declared tied: transformers builds skeletons untied)."""
    declared = getattr(model, "all_tied_weights_keys", None)
    tied = set()
    if isinstance(declared, dict) and getattr(getattr(model, "config", None), "tie_word_embeddings", True) is not False:
        tied.update(declared)
    seen = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.update((name, seen[id(p)]))
        else:
            seen[id(p)] = name
    return tied


def _clustered(meta: dict) -> dict:  # clustering: the recorded clustered layers
    c = meta.get("clustering")
    return (c.get("layers") or {}) if isinstance(c, dict) and isinstance(c.get("layers"), dict) else {}


def check_checkpoint(skeleton: nn.Module, meta: dict, headers: dict, file_bytes: int) -> None:
    """Every tensor the (meta-device) skeleton will load is in the headers with its shape (dense, or the three
    sparse-bitmask parts of a listed weight); tensors of low-bit layers exist; what the skeleton allocates
    beyond the stored tensors is bounded by the files' size. Nothing is read but headers."""
    prefix = getattr(skeleton, "base_model_prefix", "") or ""

    def on_disk(key):  # the checkpoint name of a skeleton key (base model <-> head model)
        for k in (key, f"{prefix}.{key}" if prefix else None,
                  key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None):
            if k is not None and (k in headers or f"{k}.compressed" in headers
                                  or f"{k}.codebook" in headers):  # clustering: codebook + indices
                return k
        return None

    q = meta.get("quantization") or {}
    modules = dict(skeleton.named_modules())
    low_bit = set()
    for name in (q.get("layers") or {}) if q.get("backend") else ():
        local = _local(skeleton, name, modules)
        if local is not None:
            low_bit.add(local + ".")
    emb = q.get("embedding") if q.get("backend") else None  # int8 word embedding: codes + per-row scales
    emb_local = None
    if isinstance(emb, dict) and emb.get("stored") == "int8":
        emb_local = _local(skeleton, emb["name"], modules)
        if emb_local is not None:
            low_bit.add(emb_local + ".")
    listed = set(stored_sparse(meta))
    tied = _tied(skeleton)
    state = skeleton.state_dict(keep_vars=True)
    missing, wrong = [], []
    for key, t in state.items():
        if any(key.startswith(lb) for lb in low_bit):
            continue
        k = on_disk(key)
        if k is None:
            if key not in tied:
                missing.append(key)
            continue
        if k in headers:
            if headers[k][1] != tuple(t.shape):
                wrong.append(f"{k}: file {list(headers[k][1])}, model {list(t.shape)}")
            continue
        if f"{k}.codebook" in headers and k[: -len(".weight")] in _clustered(meta):  # clustering: parts checked
            continue  # by hf_compress.clustering.check_clustering_record
        if k not in listed:
            wrong.append(f"{k}: stored sparse but config.json's hf_compress.storage does not list it")
            continue
        parts = {p: headers.get(f"{k}.{p}") for p in PARTS}
        rows, cols = (tuple(t.shape) + (0, 0))[:2] if t.dim() == 2 else (0, 0)
        if (None in parts.values() or t.dim() != 2 or parts["bitmask"] != ("U8", (rows, math.ceil(cols / 8)))
                or parts["shape"] != ("I64", (2,)) or len(parts["compressed"][1]) != 1
                or parts["compressed"][1][0] > rows * cols):
            wrong.append(f"{k}: sparse parts {parts} do not fit the model's {list(t.shape)}")
    for lb in low_bit:
        name = lb[:-1]
        if on_disk(f"{name}.weight") is None:
            missing.append(f"{name}.weight")
    if emb_local is not None:
        # the scales follow the model's float dtype (a model saved after .half() stores them in 16 bits)
        want = {"weight": (("I8",), (emb["num_embeddings"], emb["embedding_dim"])),
                "weight_scale": (("F32", "F16", "BF16"), (emb["num_embeddings"],))}
        for part, (dtypes, shape) in want.items():
            k = on_disk(f"{emb_local}.{part}")
            if k is None:
                missing.append(f"{emb_local}.{part}")
            elif k in headers and (headers[k][0] not in dtypes or tuple(headers[k][1]) != shape):
                wrong.append(f"{k}: file {headers[k][0]} {list(headers[k][1])}, int8 embedding {'/'.join(dtypes)} {list(shape)}")
    if missing or wrong:
        raise ValueError(
            "The weight files do not fit the model config.json describes "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}; wrong {wrong[:5]}). "
            "Was config.json edited, or the directory assembled from different models?"
        )
    # what the model allocates that is not read from the files: non-persistent buffers
    persistent = set(state)
    extra = sum(b.numel() * b.element_size() for n, b in skeleton.named_buffers() if n not in persistent)
    if extra > 256 * 2**20 + file_bytes:
        raise ValueError(f"config.json describes {extra / 2**20:.0f} MiB of buffers beyond the "
                         f"{file_bytes / 2**20:.1f} MiB of weights stored: refused.")


# ----------------------------------------------------------------------------- disk size per part


def disk_size_by_part(directory: str | os.PathLike) -> dict[str, int]:
    """Bytes of the weight files of a saved directory by part, read from the headers:
    ``embeddings`` (token / position embeddings), ``blocks`` (the transformer blocks), ``other`` (heads,
    poolers, final norms), ``headers`` (safetensors headers and padding) and ``total``."""
    out = {"embeddings": 0, "blocks": 0, "other": 0, "headers": 0, "total": 0}
    block = re.compile(BLOCK_PATTERN)
    for f in weight_files(directory):
        h, size = read_header(f)
        used = 0
        for name, (dtype, shape) in h.items():
            n = math.prod(shape) * _DTYPES[dtype][1]
            used += n
            base = name
            for p in PARTS:
                if base.endswith("." + p):
                    base = base[: -len(p) - 1]
            if block.search(base):
                out["blocks"] += n
            elif re.search(r"embed|(^|\.)(wte|wpe)\.", base):
                out["embeddings"] += n
            else:
                out["other"] += n
        out["headers"] += size - used
        out["total"] += size
    return out


# ----------------------------------------------------------------------------- the quantizer's (Auto classes') side


def check_loaded_files(files, name_or_path) -> list[Path]:
    """The checkpoint files transformers resolved, each checked by `safe_file` against the directory it
    loads from (the local folder; for a Hub id, the cache snapshot that holds them)."""
    local = name_or_path and os.path.isdir(str(name_or_path))
    out = []
    for f in files:
        directory = Path(str(name_or_path)) if local else Path(f).parent
        out.append(safe_file(directory, os.path.relpath(f, directory)))
    return out


def check_skeleton_before_loading(model: nn.Module, meta: dict, files, name_or_path) -> None:
    """The quantizer's check (before transformers materialises a weight): files inside the directory and
    regular, headers read, metadata and the pruned meta-device skeleton agree with them. Call it after the
    skeleton was shrunk to the recorded pruned shapes."""
    checked = check_loaded_files(files, name_or_path)
    headers, total = read_headers(checked)
    check_metadata(model, meta)
    check_checkpoint(model, meta, headers, total)


def sparse_ignore_patterns(model: nn.Module, meta: dict) -> tuple[set[str], set[str]]:
    """(unexpected, missing) key patterns for transformers' load report: the stored parts of sparse weights are
    read by `load_sparse_weights`, not by transformers."""
    names = stored_sparse(meta)
    if not names:
        return set(), set()
    unexpected = {r"\.weight\.(compressed|bitmask|shape)$"}
    modules = dict(unwrap(model).named_modules())
    missing = set()
    for n in names:
        local = _local(unwrap(model), n.rsplit(".", 1)[0], modules)
        if local is not None:
            missing.add(rf"(^|\.){re.escape(local)}\.weight$")
    return unexpected, missing


@torch.no_grad()
def load_sparse_weights(model: nn.Module, meta: dict, files, skip=()) -> None:
    """After transformers loaded everything else: decompress each listed sparse weight from `files` into the
    model (modules under `skip`, e.g. low-bit layers loaded by their own state dict, are left to their hooks),
    and attach the hooks that keep it sparse on the next save."""
    from safetensors import safe_open

    local = attach_listed(model, meta)  # {local weight name: recorded name}
    skip = tuple(s + "." for s in skip)
    wanted = {rec: loc for loc, rec in local.items() if not loc.startswith(skip)}
    if not wanted:
        return
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for rec in wanted:
                if f"{rec}.compressed" in keys:
                    found[rec] = {p: f.get_tensor(f"{rec}.{p}") for p in PARTS}
    model = unwrap(model)
    for rec, loc in wanted.items():
        if rec not in found:
            continue  # stored dense: transformers loaded it
        param = model.get_parameter(loc) if loc in dict(model.named_parameters()) else model.get_buffer(loc)
        dense = decompress(found[rec], rec, tuple(param.shape))
        param.data = dense.to(device=param.device if param.device.type != "meta" else "cpu", dtype=param.dtype)
