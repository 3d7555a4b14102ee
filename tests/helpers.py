"""Test helpers: the tiny models (the command's own `tiny:` builders), random token data, the shared data folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hf_compress.cli.models import VOCAB, minilm_path, tiny_bert, tiny_gpt2, tiny_llama  # noqa: F401


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences whose label is a learnable function of the tokens."""

    def __init__(self, n: int = 64, length: int = 12, num_labels: int = 2, causal: bool = False, seed: int = 0, pad: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        if pad:  # ragged lengths: the last tokens of some rows are padding
            lens = torch.randint(length // 2, length + 1, (n,), generator=g)
            for i, l in enumerate(lens):
                self.ids[i, l:] = 0
                self.mask[i, l:] = 0
        self.causal = causal
        self.labels = (self.ids[:, 0] % num_labels) if not causal else None

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
        if self.causal:
            item["labels"] = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        else:
            item["labels"] = self.labels[i]
        return item


def data_dir() -> Path:
    """The shared real data: $HF_COMPRESS_DATA, else ``../shared/data`` beside the project checkout
    (or beside the working directory), else the workplace's ``/work/shared/data``."""
    env = os.environ.get("HF_COMPRESS_DATA")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    for candidate in (beside, Path.cwd().parent / "shared" / "data", Path("/work/shared/data")):
        if candidate.is_dir():
            return candidate
    return beside  # missing: error messages name the expected place


def read_jsonl(path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def tiny_t5(num_labels: int = 2):
    """A tiny T5ForSequenceClassification: one table used as `shared`, `encoder.embed_tokens` and
    `decoder.embed_tokens` (tied weights), untied from any head."""
    from transformers import T5Config, T5ForSequenceClassification

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, tie_word_embeddings=False,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, num_labels=num_labels, dropout_rate=0.0)
    return T5ForSequenceClassification(cfg).eval()
