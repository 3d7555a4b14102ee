"""Cached teacher outputs: run the teacher once, store its top-k logits as dataset columns.

A distillation run over many epochs (or many students) then never runs the teacher again. The two
columns hold, per example, the k largest raw logits (`teacher_topk_values`, float32) and their class
ids (`teacher_topk_indices`): shape [k] for sequence classification, [length, k] for token-level and
causal-LM models (one row per token of the unpadded example). Raw logits are stored, not
probabilities, so the temperature can still be chosen at training time.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from ..modules import unwrap

VALUES = "teacher_topk_values"
INDICES = "teacher_topk_indices"
COLUMNS = (VALUES, INDICES)


def forward_columns(model: nn.Module) -> set[str]:
    """Names the model's forward accepts (what the Trainer keeps of a dataset, labels aside)."""
    model = unwrap(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _pad_collate(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pad token lists of different lengths; input_ids with `pad_id`, masks and type ids with 0."""

    def collate(features):
        out = {}
        for key in features[0]:
            rows = [torch.as_tensor(f[key]) for f in features]
            if rows[0].dim() == 0:
                out[key] = torch.stack(rows)
                continue
            width = max(r.shape[0] for r in rows)
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0]), value=fill) for r in rows])
        return out

    return collate


@torch.no_grad()
def cache_teacher_logits(
    teacher: nn.Module,
    dataset,
    k: int = 8,
    batch_size: int = 32,
    data_collator: Callable | None = None,
):
    """Return `dataset` with the teacher's top-k logits added as columns `teacher_topk_values/indices`.

    `k` is clipped to the number of classes, so for classification with k ≥ num_labels the cache is
    exact. Inputs are the columns the teacher's forward accepts (labels are not needed); batches are
    right-padded by `data_collator` (default: pad with the config's pad id), and token-level rows keep
    only the example's own positions. A `DistillationTrainer` given such a dataset uses the columns and
    does not need a `teacher_model` (unless hidden/attention matching is on).
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ValueError("cache_teacher_logits needs the `datasets` package.") from e
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(
            f"cache_teacher_logits: `dataset` must be a datasets.Dataset (got {type(dataset).__name__}); "
            "build one with datasets.Dataset.from_dict / from_list."
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: the number of cached logits per position must be an integer ≥ 1.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer ≥ 1.")
    accepted = forward_columns(teacher) - {"labels", "label", "label_ids"}
    inputs = [c for c in dataset.column_names if c in accepted]
    if "input_ids" not in inputs:
        raise ValueError(
            f"cache_teacher_logits: the dataset has no `input_ids` column (columns: {dataset.column_names}); "
            "tokenise it first (dataset.map(tokenizer...))."
        )
    pad_id = getattr(getattr(unwrap(teacher), "config", None), "pad_token_id", None) or 0
    collate = data_collator or _pad_collate(pad_id)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()

    values, indices = [], []
    plain = dataset.select_columns(inputs).with_format(None)
    for start in range(0, len(plain), batch_size):
        cols = plain[start : start + batch_size]
        rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
        batch = collate(rows)
        batch = {key: v.to(device) for key, v in batch.items() if key in accepted and torch.is_tensor(v)}
        logits = teacher(**batch).logits.float()
        kk = min(k, logits.shape[-1])
        top = logits.topk(kk, dim=-1)
        if logits.dim() == 3:
            mask = batch.get("attention_mask")
            if mask is not None and bool((mask[:, 0] == 0).any()):
                raise ValueError(
                    "cache_teacher_logits: the collator pads on the left; token-level caches need right padding "
                    "(tokenizer.padding_side = 'right')."
                )
        for b, row in enumerate(rows):
            v, i = top.values[b], top.indices[b]
            if logits.dim() == 3:  # keep the example's own positions
                length = len(row["input_ids"])
                v, i = v[:length], i[:length]
            values.append(v.cpu().tolist())
            indices.append(i.cpu().tolist())
    teacher.train(was_training)

    if not values:
        raise ValueError("cache_teacher_logits: the dataset is empty.")
    out = dataset.remove_columns([c for c in COLUMNS if c in dataset.column_names])
    def feature(dtype):
        f = datasets.Value(dtype)
        for _ in range(logits.dim() - 1):
            f = datasets.List(f)
        return f

    out = out.add_column(VALUES, values, feature=feature("float32"))
    return out.add_column(INDICES, indices, feature=feature("int32"))
    return out


def has_cached_logits(dataset) -> bool:
    """Whether `dataset` carries the cache columns (a datasets.Dataset, or a dataset of dict rows)."""
    names = getattr(dataset, "column_names", None)
    if names is None and dataset is not None:
        try:
            first = dataset[0]
        except Exception:  # iterable datasets: no cheap peek
            return False
        names = list(first) if isinstance(first, dict) else []
    if not names:
        return False
    present = [c for c in COLUMNS if c in names]
    if len(present) == 1:
        raise ValueError(
            f"The dataset has {present[0]} but not {[c for c in COLUMNS if c not in present][0]}: "
            "recreate both with cache_teacher_logits."
        )
    return len(present) == 2


class CachedLogitsCollator:
    """Wraps a data collator so the cache columns survive batching.

    The Trainer drops dataset columns its model's forward does not accept, which would drop the
    cache. With this collator the Trainer keeps every column (remove_unused_columns=False) and the
    filtering happens here instead: the wrapped collator sees exactly the columns it saw before
    (`keep`; None keeps all), and the cache columns are stacked beside them — token-level ones
    right-padded to the batch's sequence length.
    """

    def __init__(self, collator: Callable, keep: set[str] | None = None):
        self.collator = collator
        self.keep = keep

    def __call__(self, features: list[dict]) -> dict:
        cached = {c: [f[c] for f in features] for c in COLUMNS if c in features[0]}
        rest = [
            {k: v for k, v in f.items() if k not in COLUMNS and (self.keep is None or k in self.keep)}
            for f in features
        ]
        batch = self.collator(rest)
        if cached:
            ids = batch.get("input_ids")
            for name, rows in cached.items():
                dtype = torch.float32 if name == VALUES else torch.long
                rows = [torch.as_tensor(r, dtype=dtype) for r in rows]
                if rows[0].dim() == 2:  # [length, k] per example
                    width = max([r.shape[0] for r in rows] + ([ids.shape[1]] if ids is not None else []))
                    rows = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows]
                    mask = batch.get("attention_mask")
                    if mask is not None and bool((mask[:, 0] == 0).any()):
                        raise ValueError(
                            "Cached token-level teacher logits need right padding, but the collator padded on "
                            "the left: set tokenizer.padding_side = 'right' for distillation."
                        )
                batch[name] = torch.stack(rows)
        return batch
