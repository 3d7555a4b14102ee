"""Weight-only int8 storage of the input word embedding (`QATConfig.embedding_bits=8`).

The table of `model.get_input_embeddings()` (an ``nn.Embedding`` [vocab, dim]) is quantised at convert
time (end of QAT, or `quantize_model`) through the same numerics as every layer
(`numerics.quantize_weight`): symmetric, one float32 scale per row (axis 0), codes in [-127, 127]
(``weight_range='restricted'``). During QAT the embedding stays float (it is PTQ of the table at convert).

`Int8Embedding` holds two buffers — ``weight`` int8 [vocab, dim] and ``weight_scale`` float32 [vocab] —
so save_pretrained writes ~1 byte per entry. Its forward gathers the looked-up rows' codes and scales and
multiplies them (`numerics.dequantize`): the float table is never materialised.

Tied embeddings (an output head sharing the table, e.g. causal LMs' lm_head) are refused: the head would
need the dequantised float table, and transformers re-ties the two tensors on load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .numerics import QScheme, dequantize, fake_quantize_weight, quantize_weight

EMBEDDING_BITS = (8,)
# symmetric, one scale per row (axis 0), int8 codes in [-127, 127]
EMBEDDING_SCHEME = QScheme(bits=8, symmetric=True, per_channel=True, group_size=None, format="int",
                           weight_range="restricted")


class Int8Embedding(nn.Module):
    """out[..., :] = codes[ids] · scale[ids] (per-row symmetric int8), in the dtype of the scales (float32
    unless the model was cast to 16 bits)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, emb: nn.Embedding, scheme: QScheme = EMBEDDING_SCHEME) -> "Int8Embedding":
        w = emb.weight
        out = cls(w.shape[0], w.shape[1], emb.padding_idx).to(w.device)
        s = quantize_weight(w, scheme, 0)
        with torch.no_grad():
            out.weight.copy_(s["q"])
            out.weight_scale = s["scale"][:, 0].to(w.dtype).contiguous()  # the model's float dtype (forward's output)
        return out

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        codes = F.embedding(input_ids, self.weight)  # int8 [..., dim]: only the looked-up rows
        scale = F.embedding(input_ids, self.weight_scale[:, None])  # [..., 1]
        # computed in float32, returned in the model's float dtype (the scales follow model.half() / dtype=...)
        return dequantize(codes, scale.float(), 0.0).to(self.weight_scale.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float table (tests / inspection only; forward never builds it)."""
        return dequantize(self.weight, self.weight_scale[:, None], 0.0)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, int8 per-row"


def table_names(model: nn.Module, emb: nn.Module) -> list[str]:
    """Every module name under which `model` uses the table `emb`: the module itself (also when registered under
    several names) and other modules sharing its weight (transformers ties T5's ``shared`` and
    ``encoder.embed_tokens`` / ``decoder.embed_tokens`` that way)."""
    return [n for n, m in model.named_modules(remove_duplicate=False)
            if m is emb or getattr(m, "weight", None) is emb.weight]


def embedding_target(model: nn.Module, bits: int | None = None, real: bool = False) -> tuple[str, nn.Module] | None:
    """(name, module) of the input word embedding `embedding_bits` quantises, or None when it is unset.

    ValueError (naming QATConfig.embedding_bits and the fix) when the model has no plain ``nn.Embedding``
    input embedding, or when that table is tied to an output head; with `real` (an export backend: the table
    becomes an `Int8Embedding`) also when the model uses the same table under several module names (T5's
    ``shared`` = ``encoder.embed_tokens`` = ``decoder.embed_tokens``): replacing one name would leave the others
    computing with the float table. Writes nothing: called by build_plan (QATCallback before training,
    quantize_model before calibrating) and again by convert.
    """
    if bits is None:
        return None
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, Int8Embedding):
        name = next(n for n, m in model.named_modules() if m is emb)
        return name, emb
    out = getattr(model, "get_output_embeddings", lambda: None)()
    out_w = getattr(out, "weight", None)
    tied = isinstance(emb, nn.Embedding) and out_w is not None and (
        out_w is emb.weight or bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    )
    if type(emb) is not nn.Embedding or emb.max_norm is not None or tied:
        out_name = next((n for n, m in model.named_modules() if m is out), type(out).__name__)
        what = ("its input embedding is tied to the output head "
                f"({out_name} shares the table; config.tie_word_embeddings="
                f"{getattr(getattr(model, 'config', None), 'tie_word_embeddings', None)!r})" if tied else
                f"its input embedding is {type(emb).__name__ if emb is not None else 'missing'}"
                f"{' with max_norm' if isinstance(emb, nn.Embedding) and emb.max_norm is not None else ''}, "
                "not a plain nn.Embedding")
        raise ValueError(
            f"QATConfig.embedding_bits={bits!r}: {type(model).__name__} cannot store an int8 word embedding: {what}. "
            "Leave embedding_bits unset (None), or untie the embedding from the output head "
            "(config.tie_word_embeddings=False and a separate head weight) before quantising."
        )
    names = table_names(model, emb)
    if real and len(names) > 1:
        raise ValueError(
            f"QATConfig.embedding_bits={bits!r} with an export backend: {type(model).__name__} uses its input embedding "
            f"under several names ({', '.join(names)}), which transformers ties again on load; an int8 table cannot be "
            "shared that way, and replacing one name would leave the others computing in float. Use export=None (the "
            "table's values on the same int8 grid, stored as floats; export_onnx writes it int8), or leave "
            "embedding_bits unset."
        )
    return next(n for n, m in model.named_modules() if m is emb), emb


@torch.no_grad()
def convert_embedding(model: nn.Module, bits: int | None, real: bool, before: dict | None) -> dict | None:
    """The embedding part of `quantization.convert`: returns its metadata entry (None when unset).

    `real` (an export backend): replace the table by an `Int8Embedding`; otherwise (export=None) its float
    weight is set to the quantised values (one scale per row). Idempotent.
    """
    from ..modules import replace_module

    found = embedding_target(model, bits=bits, real=real)
    if found is None:
        return before if isinstance(before, dict) else None
    name, emb = found
    entry = {"name": name, "bits": bits, "num_embeddings": emb.weight.shape[0] if not isinstance(emb, Int8Embedding)
             else emb.num_embeddings, "embedding_dim": emb.weight.shape[1], "padding_idx": emb.padding_idx,
             "stored": "int8" if real else "float", "weight": EMBEDDING_SCHEME.to_dict()}
    if isinstance(emb, Int8Embedding):
        return {**entry, "stored": "int8"}
    if real:
        replace_module(model, name, Int8Embedding.from_float(emb, EMBEDDING_SCHEME).train(emb.training))
    else:  # a table baked before is a fixed point of its per-row grid (symmetric, ±127): only one moved since changes
        emb.weight.copy_(fake_quantize_weight(emb.weight.detach(), EMBEDDING_SCHEME, 0))
    return entry


def check_embedding_record(e, skeleton_module: nn.Module | None, name: str) -> None:
    """The recorded embedding entry against the architecture (before anything is allocated)."""
    def bad(why):
        raise ValueError(f"config.json: hf_compress.quantization.embedding {why}.")

    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        bad("must be an object with the embedding's module 'name'")
    if e.get("bits") not in EMBEDDING_BITS or e.get("stored") not in ("int8", "float"):
        bad(f"records bits={e.get('bits')!r}, stored={e.get('stored')!r}: this hf_compress stores 8-bit tables "
            "('int8' or 'float')")
    if type(skeleton_module) is not nn.Embedding:
        bad(f"names {name!r:.200}, which is not the nn.Embedding of the architecture")
    shape = tuple(skeleton_module.weight.shape)
    recorded = (e.get("num_embeddings"), e.get("embedding_dim"))
    if (e.get("stored") == "float" and recorded[1] == shape[1] and isinstance(recorded[0], int)
            and not isinstance(recorded[0], bool) and recorded[0] > 0):
        # a float table loads as the floats it holds: a row count changed since (resize_token_embeddings after
        # the conversion; its new rows are off the grid until quantize_model runs again) changes nothing here
        return
    if recorded != shape:
        bad(f"records (num_embeddings, embedding_dim) = ({e.get('num_embeddings')!r}, {e.get('embedding_dim')!r}) "
            f"but the architecture has {shape}")
