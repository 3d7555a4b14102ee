"""The compression report: what a model costs and what it scores, for any model.

`compression_report` measures, for one model or several (``{name: model}``):
task metric(s), parameters and non-zero parameters (low-bit packed weights counted by their logical
size), on-disk size (``save_pretrained`` to a temporary folder), CPU latency at batch 1 and 32 (median
of repeated forwards after warm-up, fixed sequence length, several models interleaved so they compare
as ratios), and an estimate of FLOPs per token (2 × the weights of the matmul layers, i.e. every 2-D
non-embedding weight; attention-score products are not counted). The command's
`hf_compress.cli.report.write_report` turns the rows into ``report.json``, ``report.md`` and ``report.png``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .metrics import TASKS, collator_for, evaluate_model, primary_metric


@dataclass
class ReportConfig:
    """How the report measures (the ``report`` section of a recipe)."""

    latency: bool = field(default=True, metadata={"help": "Measure CPU forward latency."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "Batch sizes timed."})
    seq_len: int = field(default=64, metadata={"help": "Sequence length of the latency inputs (fixed, no padding)."})
    repeats: int = field(default=10, metadata={"help": "Timed forwards per model and batch size; the median is kept."})
    warmup: int = field(default=3, metadata={"help": "Untimed forwards before timing."})
    latency_device: str | None = field(default="cpu", metadata={"help": "Device the latency is measured on (models are moved there for it and back); null: where each model is."})
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the metric evaluation."})
    disk_size: bool = field(default=True, metadata={"help": "Measure the size of save_pretrained's files."})
    plot: bool = field(default=True, metadata={"help": "Write report.png (needs matplotlib)."})

    def __post_init__(self):
        if isinstance(self.batch_sizes, int):
            self.batch_sizes = [self.batch_sizes]
        self.batch_sizes = list(self.batch_sizes)
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"report.batch_sizes={self.batch_sizes!r}: give positive integers, e.g. [1, 32].")
        for name in ("seq_len", "repeats", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"report.{name}={getattr(self, name)!r} must be >= 1.")
        if self.warmup < 0:
            raise ValueError(f"report.warmup={self.warmup!r} must be >= 0.")


# ----------------------------------------------------------------------------- parameters


def _logical_weights(module: nn.Module) -> list[tuple[Any, torch.Tensor, int]]:
    """(identity, dense view, logical element count) of the module's own weights, low-bit formats included."""
    out = []
    w = module._buffers.get("weight")
    if w is not None and callable(getattr(module, "dequantized_weight", None)):
        # integer weight codes in a buffer (hf_compress Int8Linear): logical size = codes
        out.append((id(w), module.dequantized_weight().detach(), w.numel()))
    for p in module.parameters(recurse=False):
        state = getattr(p, "quant_state", None)
        if state is not None and getattr(state, "shape", None) is not None:  # bnb Params4bit: packed uint8
            import bitsandbytes.functional as bf

            out.append((id(p), bf.dequantize_4bit(p.data, state), math.prod(state.shape)))
        else:
            out.append((id(p), p.detach(), p.numel()))
    if getattr(module, "_packed_params", None) is not None and callable(getattr(module, "weight", None)):
        # torch.ao (dynamic) quantized Linear: int8 weights packed outside nn.Parameter
        w = module.weight()
        out.append(((id(module), "weight"), w.dequantize() if w.is_quantized else w, w.numel()))
        b = module.bias() if callable(getattr(module, "bias", None)) else None
        if b is not None:
            out.append(((id(module), "bias"), b.detach(), b.numel()))
    return out


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def parameter_stats(model: nn.Module) -> dict[str, int]:
    """Parameter counts by logical size: total, non-zero, embeddings, and the matmul weights (2-D, non-embedding).

    Shared (tied) tensors are counted once in the totals; a tied output head still counts as a
    matmul for FLOPs (it is one per token).
    """
    seen: set[int] = set()
    stats = dict(params=0, nonzero_params=0, embedding_params=0, matmul_params=0, matmul_nonzero=0)
    for module in model.modules():
        for key, dense, n in _logical_weights(module):
            nz = int(torch.count_nonzero(dense))
            if key not in seen:
                seen.add(key)
                stats["params"] += n
                stats["nonzero_params"] += nz
                if _is_embedding(module):
                    stats["embedding_params"] += n
            if dense.dim() == 2 and not _is_embedding(module):
                stats["matmul_params"] += n
                stats["matmul_nonzero"] += nz
    return stats


@contextlib.contextmanager
def quiet_progress():
    """No "Writing model shards" bars while the report saves models to measure them."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def disk_size_mb(model: nn.Module) -> float | None:
    """Size in MB of every file `save_pretrained` writes (weights + config), or None if it cannot save."""
    sizes = disk_sizes_mb(model)
    return sizes["total"] if sizes else None


def disk_sizes_mb(model: nn.Module) -> dict[str, float] | None:
    """MB that `save_pretrained` writes: ``total`` (every file) and the weights by part, read from the
    safetensors headers (`hf_compress.storage.disk_size_by_part`): ``embeddings``, ``blocks`` (the
    transformer blocks), ``other`` (heads, poolers, final norms). None if the model cannot be saved."""
    from .storage import disk_size_by_part

    if not hasattr(model, "save_pretrained"):
        return None
    with tempfile.TemporaryDirectory() as tmp, quiet_progress():
        model.save_pretrained(tmp)
        total = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
        parts = disk_size_by_part(tmp)
    return {"total": total, **{k: parts[k] / 1e6 for k in ("embeddings", "blocks", "other")}}


# ----------------------------------------------------------------------------- latency


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.inference_mode()
def measure_latency(
    models: Mapping[str, nn.Module], batch_sizes=(1, 32), seq_len: int = 64, repeats: int = 10, warmup: int = 3,
    seed: int = 0, device: str | torch.device | None = "cpu",
) -> dict[str, dict[str, float]]:
    """Median forward time in milliseconds, ``{name: {"b1": ms, "b32": ms}}``.

    The models are timed in turn inside each repeat (interleaved), so drifts of a shared machine hit all
    of them alike and their ratios are meaningful. Inputs are random token ids, no padding. With
    `device`, each model is moved there for the measurement and moved back afterwards.
    """
    if device is not None:
        home = {name: _device(m) for name, m in models.items()}
        moved = {name: m.to(device) if home[name] != torch.device(device) else m for name, m in models.items()}
        try:
            return measure_latency(moved, batch_sizes, seq_len, repeats, warmup, seed, device=None)
        finally:
            for name, m in models.items():
                if home[name] != torch.device(device):
                    m.to(home[name])
    vocab = min(int(getattr(getattr(m, "config", None), "vocab_size", 100) or 100) for m in models.values())
    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for bs in batch_sizes:
        ids = torch.randint(min(5, vocab - 1), vocab, (bs, seq_len), generator=g)
        times: dict[str, list[float]] = {name: [] for name in models}
        inputs = {}
        for name, m in models.items():
            m.eval()
            dev = _device(m)
            inputs[name] = {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids, device=dev)}
            for _ in range(warmup):
                m(**inputs[name])
        for _ in range(repeats):
            for name, m in models.items():
                dev = _device(m)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t = time.perf_counter()
                m(**inputs[name])
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times[name].append(time.perf_counter() - t)
        for name in models:
            out[name][f"b{bs}"] = 1000 * statistics.median(times[name])
    return out


# ----------------------------------------------------------------------------- the report


def _infer_task(model: nn.Module) -> str:
    arch = type(model).__name__
    return "causal-lm" if arch.endswith(("ForCausalLM", "LMHeadModel")) else "sequence-classification"


def compression_report(
    models: nn.Module | Mapping[str, nn.Module],
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    *,
    dataset=None,
    tokenizer=None,
    collator=None,
    task: str | None = None,
    metrics: Mapping[str, dict[str, float]] | None = None,
    settings: Mapping[str, dict[str, Any]] | None = None,
    config: ReportConfig | None = None,
    **config_overrides,
) -> list[dict[str, Any]]:
    """Rows of the compression report, one per model (the first is the baseline for ratios).

    - `models`: a model, or ``{name: model}`` (e.g. ``{"teacher": t, "student": s}``).
    - Metrics come from `eval_fn(model) -> {name: value}`, or from `dataset` (tokenised rows with
      ``labels``) evaluated with `collator` (default: padding with `tokenizer`) for `task`
      ("sequence-classification" or "causal-lm"; inferred from the model class when omitted), or are
      given per name in `metrics`. With none of these, the row has no metric.
    - `settings`: ``{name: {...}}`` compression settings recorded with each row.
    - `config` / keyword overrides: a `ReportConfig` (``batch_sizes=[1]``, ``repeats=5``, ``latency=False``...).

    Example::

        rows = compression_report({"teacher": teacher, "student": student}, dataset=val, tokenizer=tok)
        write_report("out", rows)
    """
    cfg = dataclasses.replace(config or ReportConfig(), **config_overrides)
    if isinstance(models, nn.Module):
        models = {getattr(models, "name_or_path", None) or type(models).__name__: models}
    if not models:
        raise ValueError("compression_report: `models` is empty; pass a model or {name: model}.")
    models = dict(models)
    first = next(iter(models.values()))
    task = task or _infer_task(first)
    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {TASKS}.")
    if dataset is not None and collator is None:
        collator = collator_for(task, tokenizer)
    metrics = dict(metrics or {})
    settings = dict(settings or {})

    rows = []
    for name, model in models.items():
        if name in metrics:
            scores = dict(metrics[name])
        elif eval_fn is not None:
            scores = dict(eval_fn(model))
        elif dataset is not None:
            scores = evaluate_model(model, dataset, task, collator, cfg.eval_batch_size)
        else:
            scores = {}
        st = parameter_stats(model)
        row = {
            "name": name,
            "task": task,
            "metrics": {k: float(v) for k, v in scores.items()},
            "params": st["params"],
            "nonzero_params": st["nonzero_params"],
            "embedding_params": st["embedding_params"],
            "matmul_params": st["matmul_params"],
            "matmul_sparsity": 1 - st["matmul_nonzero"] / st["matmul_params"] if st["matmul_params"] else 0.0,
            "flops_per_token": 2 * st["matmul_params"],
            "flops_per_token_nonzero": 2 * st["matmul_nonzero"],
            **_disk_fields(model if cfg.disk_size else None),
            "latency_ms": {},
            "device": str(_device(model)),
            "settings": copy.deepcopy(settings.get(name, {})),
        }
        rows.append(row)
    if cfg.latency:
        lat = measure_latency(models, cfg.batch_sizes, cfg.seq_len, cfg.repeats, cfg.warmup, device=cfg.latency_device)
        for row in rows:
            row["latency_ms"] = lat[row["name"]]
            row["latency_seq_len"] = cfg.seq_len
            row["latency_device"] = str(cfg.latency_device or row["device"])
    _add_ratios(rows)
    return rows


def _disk_fields(model) -> dict:
    """``disk_mb`` and ``disk_mb_by_part`` of a row (None when not measured or the model cannot be saved)."""
    if model is None:
        return {"disk_mb": None}
    try:
        sizes = disk_sizes_mb(model)
    except Exception as e:  # a model that cannot be saved still gets the rest of its row
        print(f"[hf-compress] report: could not save {type(model).__name__} to measure its size ({e})")
        sizes = None
    if not sizes:
        return {"disk_mb": None}
    return {"disk_mb": sizes.pop("total"), "disk_mb_by_part": sizes}


def _add_ratios(rows: list[dict]) -> None:
    """Retention, size ratio and speed-ups of every row against the first (the baseline)."""
    if not rows:
        return
    base = rows[0]
    task = base.get("task", "sequence-classification")
    key, higher = primary_metric(task)
    for row in rows:
        b, v = base["metrics"].get(key), row["metrics"].get(key)
        if b and v:
            row["retention"] = v / b if higher else b / v
        if base.get("disk_mb") and row.get("disk_mb"):
            row["size_ratio"] = base["disk_mb"] / row["disk_mb"]
        b_blocks, r_blocks = (base.get("disk_mb_by_part") or {}).get("blocks"), (row.get("disk_mb_by_part") or {}).get("blocks")
        if b_blocks and r_blocks:
            row["blocks_size_ratio"] = b_blocks / r_blocks  # the transformer blocks alone (embeddings are not compressed)
        for bs, ms in row.get("latency_ms", {}).items():
            if base.get("latency_ms", {}).get(bs) and ms:
                row.setdefault("speedup", {})[bs] = base["latency_ms"][bs] / ms
