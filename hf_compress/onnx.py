"""ONNX export of a compressed model, for ONNX Runtime (docs/onnx.md).

`export_onnx(model_or_dir, out)` writes ``out/model.onnx`` (plus config.json, the tokenizer files of a
source directory and ``onnx_export.json``) with torch.onnx's dynamo exporter, dynamic batch and sequence
axes, and no past key values (decoders return logits for the whole sequence: ``use_cache=False``).

What each kind of layer becomes — the same numerics the PyTorch model computes:

* float layers (plain, structurally pruned with per-layer widths, weights baked onto a 5-8-bit or NF4 grid
  with ``export=None``): the float weights as they are (MatMul / Gemm).
* weight-only layers on a uniform grid of <= 4 bits (QAT / PTQ with ``export=None``, group-wise or per
  channel; QAT still running): ``int4='matmulnbits'`` (default) writes ONNX Runtime's com.microsoft
  MatMulNBits (bits=4) with our integer codes and scales, not re-quantised (``accuracy_level`` 0 by default:
  exact dequantisation, float32 input); ``int4='int8-gemm'`` writes the per-channel ones (and torch-int8
  layers whose codes fit 4 bits) as packed 4-bit codes that ONNX Runtime unpacks once at load for its int8
  GEMM; ``int4='float'`` writes their weights as floats.
* torch-int8 ``Int8Linear`` (QAT or PTQ with ``export='torch-int8'``): our int8 codes and per-channel
  scales / zero points, unchanged (no re-calibration), as ``DynamicQuantizeLinear`` (the activation,
  uint8, per tensor, range of the tensor itself: what ``torch.ops.quantized.linear_dynamic`` does) →
  ``MatMulInteger`` (int32 accumulation) → ``Cast`` → ``Mul`` by activation scale × our weight scales →
  ``Add`` bias. ONNX Runtime fuses this into its ``DynamicQuantizeMatMul`` int8 kernel.
* an int8 word embedding (``QATConfig.embedding_bits=8``): its int8 codes and one float32 scale per row
  (``Gather`` of both, ``Mul``), also when the model keeps it as float values on that grid (``export=None``,
  e.g. with int4 weight-only layers): the file holds ~1 byte per entry instead of 4.
* layers that keep quantising their input (PTQ with ``activation_bits=8``, ``export=None``): our
  calibrated per-tensor scale and zero point as ``QuantizeLinear`` → ``DequantizeLinear`` (int8) before
  the matmul (``observer='dynamic'``: ``DynamicQuantizeLinear`` → ``DequantizeLinear``, the same grid);
  per-channel weights as int8 codes → ``DequantizeLinear`` (axis 0) with our scales.

Refused before anything is written, naming the setting and the alternative: bitsandbytes layers
(``export='bnb-int8'`` / ``'bnb-nf4'``: group-wise NF4 codes and LLM.int8 kernels that ONNX has no
operator for), symmetric dynamic activation ranges, models that are not a transformers model, and for the
<= 4-bit layers: input quantisation MatMulNBits cannot compute, group sizes that are no MatMulNBits block,
weights no longer on their recorded grid.
The output directory appears whole or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .metadata import get_metadata
from .modules import is_linear, model_class_for, out_axis, replace_module
from .quantization import Int8Embedding, QScheme, is_fake_quant, quantize_weight, restore_layer, table_names
from .quantization.backends.torch_int8 import Int8Linear
from .quantization.numerics import recover_grid

OPSET = 18
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
)
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
INSTALL_HINT = "pip install 'hf_compress[onnx]' (onnx, onnxruntime, onnxscript)"


# ---------------------------------------------------------------- custom ops and their ONNX translation
#
# Each special layer is replaced (in a copy of the model) by a module whose forward calls one custom op;
# torch.export keeps the op whole and `custom_translation_table` writes it as the ONNX ops above.


def _dq(weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (weight_t.float() - zero.float()) * scale


def _dynamic_quantize_linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear: uint8 codes (as float), scale, zero point of x's own range (0 included)."""
    x = x.float()
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    zero = torch.clamp(torch.round((0.0 - lo) / scale), 0, 255)
    return torch.clamp(torch.round(x / scale) + zero, 0, 255), scale, zero


def _int8_matmul(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What the exported graph computes: DynamicQuantizeLinear → MatMulInteger (exact, in float64) → Cast → Mul."""
    xq, xs, xz = _dynamic_quantize_linear(x)
    acc = (xq.double() - xz.double()) @ (weight_t.double() - zero.double())
    return acc.float() * (xs * scale)


# The eager implementations compute what the ONNX graph computes (ONNX's rounding of x / S), so the export
# copy run in PyTorch is a reference for ONNX Runtime; the exporter only needs their shapes.
@torch.library.custom_op("hf_compress::int8_linear", mutates_args=())
def _int8_linear(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _int8_matmul(x, weight_t, scale, zero) + bias


@_int8_linear.register_fake
def _(x, weight_t, scale, zero, bias):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1], dtype=torch.float32)


@torch.library.custom_op("hf_compress::int8_linear_nobias", mutates_args=())
def _int8_linear_nobias(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return _int8_matmul(x, weight_t, scale, zero)


@_int8_linear_nobias.register_fake
def _(x, weight_t, scale, zero):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1], dtype=torch.float32)


@torch.library.custom_op("hf_compress::qdq_static", mutates_args=())
def _qdq_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(torch.round(torch.clamp(x.float(), lo, hi) / scale) + zero, -128, 127)
    return (q - zero) * scale


@_qdq_static.register_fake
def _(x, scale, zero, lo, hi):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("hf_compress::qdq_dynamic", mutates_args=())
def _qdq_dynamic(x: torch.Tensor) -> torch.Tensor:
    xq, xs, xz = _dynamic_quantize_linear(x)
    return (xq - xz) * xs


@_qdq_dynamic.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("hf_compress::dq_weight_t", mutates_args=())
def _dq_weight_t(weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return _dq(weight_t, scale, zero)


@_dq_weight_t.register_fake
def _(weight_t, scale, zero):
    return weight_t.new_empty(weight_t.shape, dtype=torch.float32)


def translation_table() -> dict:
    """torch.onnx `custom_translation_table` for the stand-in layers' custom ops."""
    from onnxscript import opset18 as op

    FLOAT = 1  # onnx.TensorProto.FLOAT

    def int8_linear_nobias(x, weight_t, scale, zero):
        # the pattern onnxruntime.quantization.quantize_dynamic writes, which ORT fuses to DynamicQuantizeMatMul
        xq, xs, xz = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, weight_t, xz, zero)
        return op.Mul(op.Cast(acc, to=FLOAT), op.Mul(xs, scale))

    def int8_linear(x, weight_t, scale, zero, bias):
        return op.Add(int8_linear_nobias(x, weight_t, scale, zero), bias)

    def qdq_static(x, scale, zero, lo, hi):
        return op.DequantizeLinear(op.QuantizeLinear(op.Clip(x, lo, hi), scale, zero), scale, zero)

    def qdq_dynamic(x):
        xq, xs, xz = op.DynamicQuantizeLinear(x)
        return op.DequantizeLinear(xq, xs, xz)

    def dq_weight_t(weight_t, scale, zero):
        return op.DequantizeLinear(weight_t, scale, zero, axis=1)

    ops = torch.ops.hf_compress
    return {
        ops.int8_linear.default: int8_linear,
        ops.int8_linear_nobias.default: int8_linear_nobias,
        ops.qdq_static.default: qdq_static,
        ops.qdq_dynamic.default: qdq_dynamic,
        ops.dq_weight_t.default: dq_weight_t,
    }


class _Int8LinearOnnx(nn.Module):
    """Stands for an `Int8Linear` in the exported graph: its codes (stored [in, out] for MatMulInteger),
    scales and zero points, unchanged."""

    def __init__(self, m: Int8Linear):
        super().__init__()
        self.register_buffer("weight_t", m.weight.detach().t().contiguous())
        self.register_buffer("scale", m.weight_scale.detach().float().clone())
        self.register_buffer("zero", m.weight_zero_point.detach().clone())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())

    def forward(self, x):
        ops = torch.ops.hf_compress
        if self.bias is None:
            return ops.int8_linear_nobias(x, self.weight_t, self.scale, self.zero).to(x.dtype)
        return ops.int8_linear(x, self.weight_t, self.scale, self.zero, self.bias).to(x.dtype)


class _InputQuantLinearOnnx(nn.Module):
    """Stands for a layer that quantises its input (PTQ with activation_bits, export=None)."""

    def __init__(self, m: nn.Module, name: str):
        super().__init__()
        plan = m.hfc_plan
        act, axis = plan.act, m.hfc_axis
        self.dynamic = act.observer == "dynamic"
        if self.dynamic:
            if act.symmetric:
                raise ValueError(
                    f"{name}: symmetric dynamic activation ranges (activation_symmetric=True, observer='dynamic') have "
                    "no ONNX operator (DynamicQuantizeLinear is asymmetric uint8). Quantise with activation_symmetric=False, "
                    "or export='torch-int8'."
                )
        else:
            obs = m.input_observer
            scale, zero = obs.qparams(act.bits, act.symmetric)
            if act.bits != 8:
                raise ValueError(f"{name}: {act.bits}-bit activations cannot be exported to ONNX: use activation_bits=8.")
            scale, zero = scale.reshape(()).float(), zero.reshape(()).float()
            self.register_buffer("a_scale", scale.clone())
            self.register_buffer("a_zero", zero.to(torch.int8))
            # clipping to the grid's ends first: the symmetric grid stops at -127, int8 saturation at -128
            self.register_buffer("a_lo", ((act.qmin - zero) * scale).reshape(()))
            self.register_buffer("a_hi", ((act.qmax - zero) * scale).reshape(()))
        w = m.weight.detach()
        scheme = plan.weight
        self.quantized = scheme.format == "int" and not scheme.group_size
        if self.quantized:  # per-channel / per-tensor grid: int8 codes + DequantizeLinear with our scales
            s = quantize_weight(w, scheme, axis)
            self.register_buffer("weight_t", s["q"].t().contiguous())
            self.register_buffer("w_scale", s["scale"][:, 0].float().contiguous())
            self.register_buffer("w_zero", s["zero"][:, 0].contiguous())
        else:  # group-wise grids: the quantised weight in float, exactly
            wq = m.quantized_weight().detach().float()
            self.register_buffer("weight_f", (wq if axis == 1 else wq.t()).contiguous())  # [in, out]
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())

    def forward(self, x):
        ops = torch.ops.hf_compress
        if self.dynamic:
            xq = ops.qdq_dynamic(x)
        else:
            xq = ops.qdq_static(x, self.a_scale, self.a_zero, self.a_lo, self.a_hi)
        w = ops.dq_weight_t(self.weight_t, self.w_scale, self.w_zero) if self.quantized else self.weight_f
        y = xq @ w
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


# ---------------------------------------------------------------- int4: com.microsoft MatMulNBits
#
# Weight-only uniform layers of <= 4 bits (QAT / PTQ with export=None, or QAT still fake-quantising) become
# ONNX Runtime's MatMulNBits (bits=4): B = our integer codes + 8, packed two per byte (low nibble first), shape
# [N, n_blocks, block_size / 2]; scales [N, n_blocks] float32 = our scales; no zero-point input for the
# symmetric grids (MatMulNBits' default zero point 8 is our 0), packed uint8 zero points (our Z + 8) for the
# asymmetric ones. Group-wise: block_size = group_size. Per channel / per tensor: one block size
# (PER_CHANNEL_BLOCK, or the smallest power of two >= 16 covering K) with the scale repeated in every block,
# K padded with zero codes. 2- and 3-bit grids fit the 4-bit codes as they are. Nothing is re-quantised:
# fake-quantised layers give their codes and scales (numerics.quantize_weight); baked float weights give them
# back exactly (`numerics.recover_grid`, checked value for value: every (q - Z) · S in float32 equals the stored
# weight, else the export is refused).

INT4_MODES = ("matmulnbits", "int8-gemm", "float")
DEFAULT_INT4 = "matmulnbits"
ACCURACY_LEVELS = (0, 4)
DEFAULT_ACCURACY_LEVEL = 0
PER_CHANNEL_BLOCK = 128


def _check_options(int4: str, accuracy_level: int) -> None:
    if int4 not in INT4_MODES:
        raise ValueError(
            f"int4={int4!r}: use 'matmulnbits' (<= 4-bit layers as ONNX Runtime's com.microsoft MatMulNBits: packed "
            "4-bit codes with our scales), 'int8-gemm' (per-channel ones as packed 4-bit codes that ONNX Runtime "
            "unpacks at load for its int8 GEMM, inputs quantised at run time) or 'float' (their weights as floats: "
            "standard ONNX, exact, not smaller)."
        )
    if isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(
            f"accuracy_level={accuracy_level!r}: use 0 (MatMulNBits takes its float32 input as it is and "
            "dequantises the weights exactly) or 4 (it quantises each block of its input to int8 first)."
        )


def _is_nbits_block(n) -> bool:
    return isinstance(n, int) and n >= 16 and n & (n - 1) == 0


def _nbits_block(scheme: QScheme, k: int) -> int:
    """MatMulNBits block_size of a layer: its group size, or one block size for a per-channel scale."""
    if scheme.group_size:
        return scheme.group_size
    block = 16
    while block < min(k, PER_CHANNEL_BLOCK):
        block *= 2
    return block


def _fits_4bit(scheme: QScheme | None) -> bool:
    """A uniform grid whose codes fit 4 bits (2, 3 or 4 bits)."""
    return scheme is not None and scheme.format == "int" and scheme.bits <= 4


def _recorded_int4(model: nn.Module) -> dict[str, QScheme]:
    """{module name: scheme} of the <= 4-bit layers recorded as float weights on the grid (export=None)."""
    from .modules import local_name

    meta = get_metadata(model).get("quantization") or {}
    if not isinstance(meta, dict) or meta.get("backend"):
        return {}
    modules = dict(model.named_modules())
    out = {}
    for rec_name, d in (meta.get("layers") or {}).items():
        try:
            scheme = QScheme(**d["weight"])
        except (KeyError, TypeError, ValueError):
            continue
        name = local_name(model, rec_name, modules)
        if name is not None and _fits_4bit(scheme):
            out[name] = scheme
    return out


def _recorded_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, table) of a word embedding recorded as int8 (``QATConfig.embedding_bits=8``) but kept as float
    values on its per-row grid (``export=None``): written as its int8 codes and scales. A table that has left
    that grid (trained after conversion, or cast to 16 bits) is written as the floats it holds, with a warning:
    int8 codes would not be the model's."""
    from .modules import local_name

    meta = get_metadata(model).get("quantization") or {}
    e = meta.get("embedding") if isinstance(meta, dict) else None
    if not isinstance(e, dict) or e.get("stored") != "float" or not isinstance(e.get("name"), str):
        return None
    modules = dict(model.named_modules())
    name = local_name(model, e["name"], modules)
    table = modules.get(name) if name is not None else None
    if type(table) is not nn.Embedding:
        return None
    with torch.no_grad():
        on_grid = table.weight.dtype == torch.float32 and torch.equal(
            Int8Embedding.from_float(table).dequantized_weight(), table.weight)
    if not on_grid:
        import warnings

        warnings.warn(
            f"export_onnx: {name} is recorded as an int8 word embedding (QATConfig.embedding_bits=8, export=None) "
            f"but the table ({table.weight.dtype}) is no longer on its per-row int8 grid (changed after quantisation, "
            "or rounded to 16 bits?): it is written as the float values it holds, 4 bytes per entry. For the int8 "
            "table, quantise the float32 model again (quantize_model with embedding_bits=8) before exporting.",
            stacklevel=3,
        )
        return None
    return name, table


def _packable_int8(m: Int8Linear) -> bool:
    """An Int8Linear whose codes and zero points fit 4 bits (QAT / PTQ export='torch-int8' with weight_bits <= 4)."""
    w, z = m.weight, m.weight_zero_point
    return bool(w.numel()) and int(w.min()) >= -8 and int(w.max()) <= 7 and int(z.min()) >= -8 and int(z.max()) <= 7


def _int4_layers(model: nn.Module, int4: str) -> dict[str, tuple[nn.Module, QScheme | None, str]]:
    """{name: (layer, scheme, kind)} of the <= 4-bit layers written with 4-bit codes, kind 'matmulnbits' or
    'int8_gemm'; refuses those that cannot be."""
    if int4 == "float":
        return {}
    recorded = _recorded_int4(model)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            if int4 == "int8-gemm" and _packable_int8(m):
                layers[name] = (m, None, "int8_gemm")
            continue
        if is_fake_quant(m):
            scheme, act = m.hfc_plan.weight, m.hfc_plan.act
            if not _fits_4bit(scheme):
                continue
            dynamic = act is not None and act.observer == "dynamic" and not act.symmetric and act.bits == 8
            if act is not None and not (int4 == "int8-gemm" and dynamic and not scheme.group_size):
                raise ValueError(
                    f"{name} has {scheme.bits}-bit weights and quantises its input (activation_bits={act.bits}, "
                    f"observer={act.observer!r}): int4={int4!r} cannot compute that (MatMulNBits takes float inputs; "
                    "int4='int8-gemm' quantises inputs with their own range at run time, per-channel weights only). "
                    "Export with int4='float' (the weights as floats and the input quantisation as QuantizeLinear / "
                    "DequantizeLinear: exact, not smaller), or quantise the weights only (activation_bits=None)."
                )
        elif name in recorded and is_linear(m):
            scheme = recorded[name]
        else:
            continue
        if scheme.group_size and not _is_nbits_block(scheme.group_size):
            raise ValueError(
                f"{name}: group_size={scheme.group_size} cannot be a MatMulNBits block (a power of two >= 16: 16, 32, "
                "64, 128, ...). Re-run QAT / quantize_model with group_size=32, 64 or 128, or export with "
                "int4='float' (the weights as floats: exact, not smaller)."
            )
        kind = "int8_gemm" if int4 == "int8-gemm" and not scheme.group_size else "matmulnbits"
        layers[name] = (m, scheme, kind)
    return layers


def int4_storage(m: nn.Module, scheme: QScheme, name: str = "layer") -> dict[str, torch.Tensor]:
    """Our codes, scales and zero points of a <= 4-bit layer ([out, in] layout, as quantize_weight): computed
    from the float master weight of a fake-quantised layer, recovered exactly from weights baked on the grid."""
    axis = out_axis(m)
    if is_fake_quant(m) and not getattr(m, "hfc_weight_on_grid", False):
        return quantize_weight(m.weight.detach(), scheme, axis)
    w = m.weight.detach()
    w = (w.t() if axis == 1 else w).float().contiguous()
    stored = None
    if not scheme.group_size or w.shape[1] % scheme.group_size == 0:
        stored = recover_grid(w, scheme) if m.weight.dtype == torch.float32 else None
    if stored is None:
        raise ValueError(
            f"{name}: its weights ({m.weight.dtype}) are not on the {scheme.bits}-bit grid recorded in its config "
            f"(group_size={scheme.group_size}, weight_range={scheme.weight_range!r}): changed after quantisation, or "
            "rounded to 16 bits? MatMulNBits can only carry weights that are exactly codes times scales. Export with "
            "int4='float' (the weights as they are), or quantise the float32 model again (quantize_model)."
        )
    return stored


def pack_nbits(stored: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor | None]:
    """MatMulNBits inputs (bits=4) of our storage: B uint8 [N, n_blocks, block / 2], scales float32
    [N, n_blocks], zero_points uint8 [N, ceil(n_blocks / 2)] or None (all zero points 0: the default 8)."""
    q, scale, zero = stored["q"], stored["scale"].float(), stored["zero"]
    n_out, k = q.shape
    n_blocks = -(-k // block)
    if scale.shape[1] != n_blocks:  # one scale per channel (or tensor): repeated in every block
        scale, zero = scale[:, :1].expand(n_out, n_blocks), zero[:, :1].expand(n_out, n_blocks)
    u = q.to(torch.int32) + 8
    pad = n_blocks * block - k
    if pad:  # the padded codes are the zero point: they dequantise to 0
        u = torch.cat([u, (zero[:, -1:].to(torch.int32) + 8).expand(n_out, pad)], 1)
    u = u.reshape(n_out, n_blocks, block)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8).contiguous()
    zp = None
    if (zero != 0).any():
        z = zero.to(torch.int32) + 8
        if n_blocks % 2:
            z = torch.cat([z, torch.full((n_out, 1), 8, dtype=torch.int32)], 1)
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return {"B": packed, "scales": scale.contiguous(), "zero_points": zp}


def _unpack_nbits(packed: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None, k: int) -> torch.Tensor:
    """float32 [N, K] weights that MatMulNBits dequantises (the eager reference of the stand-in)."""
    n_out, n_blocks, _ = packed.shape
    p = packed.to(torch.int32)
    u = torch.stack([p & 15, p >> 4], -1).reshape(n_out, n_blocks, -1).float()
    if zp is None:
        z = torch.full((n_out, n_blocks), 8.0)
    else:
        zi = zp.to(torch.int32)
        z = torch.stack([zi & 15, zi >> 4], -1).reshape(n_out, -1)[:, :n_blocks].float()
    return ((u - z[..., None]) * scales[..., None]).reshape(n_out, -1)[:, :k]


def _int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """accuracy_level=4 in PyTorch: each block of `block` input features of each row quantised to symmetric
    int8 with its own scale max|x| / 127 (what MatMulNBits does to its input before the int8 dot products)."""
    k = x.shape[-1]
    pad = -k % block
    xp = torch.nn.functional.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, block)
    amax = xp.abs().amax(-1, keepdim=True)
    scale = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xp * inv) * scale).reshape(*x.shape[:-1], -1)[..., :k]


class _Int4LinearOnnx(nn.Module):
    """Stands for a <= 4-bit weight-only layer: com.microsoft MatMulNBits with our codes and scales.

    Run in PyTorch (the export copy as a reference for ONNX Runtime), it computes the same: the dequantised
    weights, and with accuracy_level=4 the input rounded to int8 per block as MatMulNBits does."""

    def __init__(self, stored: dict[str, torch.Tensor], bias: torch.Tensor | None, block: int, accuracy_level: int):
        super().__init__()
        self.n_out, self.k = stored["q"].shape
        self.block, self.accuracy_level = block, accuracy_level
        t = pack_nbits(stored, block)
        self.register_buffer("B", t["B"])
        self.register_buffer("scales", t["scales"])
        self.register_buffer("zero_points", t["zero_points"])
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            inputs = [x, self.B, self.scales, self.zero_points, None, self.bias]
            attrs = {"K": self.k, "N": self.n_out, "bits": 4, "block_size": self.block,
                     "accuracy_level": self.accuracy_level}
            from torch.onnx import ops as onnx_ops

            return onnx_ops.symbolic("com.microsoft::MatMulNBits", inputs, attrs, dtype=x.dtype,
                                           shape=[*x.shape[:-1], self.n_out], version=1)
        w = _unpack_nbits(self.B, self.scales, self.zero_points, self.k)
        xin = _int8_blocks(x, self.block) if self.accuracy_level == 4 else x.float()
        return torch.nn.functional.linear(xin, w, self.bias).to(x.dtype)


def pack_int4_t(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-channel codes [N, K] (int8, in [-8, 7]) as uint8 [ceil(K / 2), N]: u = code + 8, input feature k < K/2
    in the low nibble of row k, feature k + ceil(K/2) in the high nibble (unpacked by one Concat, no interleave)."""
    u = (stored["q"].to(torch.int32) + 8).t()  # [K, N]
    k = u.shape[0]
    half = -(-k // 2)
    if k % 2:
        u = torch.cat([u, torch.full((1, u.shape[1]), 8, dtype=torch.int32)], 0)
    return (u[:half] | (u[half:] << 4)).to(torch.uint8).contiguous()


class _Int4Int8GemmOnnx(nn.Module):
    """Stands for a per-channel <= 4-bit layer run by ONNX Runtime's int8 GEMM: the file holds the codes packed
    two per byte; BitwiseAnd / BitShift / Concat / Cast / Sub turn them back into the int8 codes (constant
    inputs only: ONNX Runtime folds them once, at load) for the torch-int8 pattern of `_Int8LinearOnnx`
    (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, fused into DynamicQuantizeMatMul), with our scales
    and zero points."""

    def __init__(self, stored: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.k = stored["q"].shape[1]
        self.register_buffer("packed", pack_int4_t(stored))
        self.register_buffer("scale", stored["scale"][:, 0].float().contiguous())
        self.register_buffer("zero", stored["zero"][:, 0].to(torch.int8).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("c15", torch.tensor(15, dtype=torch.uint8))
        self.register_buffer("c4", torch.tensor(4, dtype=torch.uint8))
        self.register_buffer("c8", torch.tensor(8.0))

    def weight_t(self) -> torch.Tensor:
        """The int8 codes [K, N]; in the export, ONNX ops of the packed initializer (explicit types)."""
        p = self.packed
        if not torch.onnx.is_in_onnx_export():
            return (torch.cat([p & 15, p >> 4], 0)[: self.k].to(torch.int32) - 8).to(torch.int8)
        from torch.onnx import ops as onnx_ops

        half, n_out = p.shape
        lo = onnx_ops.symbolic("BitwiseAnd", [p, self.c15], dtype=torch.uint8, shape=[half, n_out], version=18)
        hi = onnx_ops.symbolic("BitShift", [p, self.c4], {"direction": "RIGHT"}, dtype=torch.uint8, shape=[half, n_out],
                               version=18)
        u = onnx_ops.symbolic("Concat", [lo, hi], {"axis": 0}, dtype=torch.uint8, shape=[2 * half, n_out], version=18)
        if 2 * half != self.k:
            u = u[: self.k]
        f = onnx_ops.symbolic("Cast", [u], {"to": 1}, dtype=torch.float32, shape=[self.k, n_out], version=18)
        f = onnx_ops.symbolic("Sub", [f, self.c8], dtype=torch.float32, shape=[self.k, n_out], version=18)
        return onnx_ops.symbolic("Cast", [f], {"to": 3}, dtype=torch.int8, shape=[self.k, n_out], version=18)

    def forward(self, x):
        ops = torch.ops.hf_compress
        w = self.weight_t()
        if self.bias is None:
            return ops.int8_linear_nobias(x, w, self.scale, self.zero).to(x.dtype)
        return ops.int8_linear(x, w, self.scale, self.zero, self.bias).to(x.dtype)


# ---------------------------------------------------------------- checks (before anything is written)


def _require_packages() -> None:
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}.")


def check_exportable_config(config) -> None:
    """The checks `check_exportable` can make from a saved config alone (before loading any weights)."""
    _check_metadata(get_metadata(config))


def _check_metadata(meta: dict) -> None:
    backend = (meta.get("quantization") or {}).get("backend")
    if backend in ("bnb-int8", "bnb-nf4"):
        what = ("bitsandbytes NF4: 4-bit NormalFloat codes with one absmax per group of weights (group-wise)"
                if backend == "bnb-nf4" else "bitsandbytes LLM.int8 (Linear8bitLt) kernels")
        raise ValueError(
            f"This model was quantised with QATConfig.export={backend!r} ({what}); ONNX has no operator that "
            "computes it. Re-run QAT / quantize_model with export='torch-int8' (per-channel int8, <= 8-bit weights: "
            "exported as integer ONNX ops with the same scales) or export=None (weights on the grid, stored as "
            "floats: exported exactly; <= 4-bit grids as ONNX Runtime's 4-bit MatMulNBits with the same codes and scales)."
        )


def check_exportable(
    model: nn.Module, int4: str = DEFAULT_INT4, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> dict[str, dict[str, Any]]:
    """ValueError naming the setting and the alternative when `model` has a layer ONNX cannot represent
    with the numerics it computes in PyTorch. Writes nothing. Returns, for the <= 4-bit layers that become
    MatMulNBits (`int4='matmulnbits'`), {name: {"stored": codes / scales / zero points, "block": block_size}}."""
    _check_options(int4, accuracy_level)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"export_onnx exports a transformers model (or its saved directory); got {type(model).__name__}.")
    _check_metadata(get_metadata(model))
    for name, m in model.named_modules():
        mod = type(m).__module__ or ""
        if mod.startswith("bitsandbytes"):
            raise ValueError(
                f"{name} is a bitsandbytes layer ({type(m).__name__}); ONNX has no operator for it. Quantise with "
                "QATConfig.export='torch-int8' or export=None instead."
            )
        if is_fake_quant(m) and m.hfc_plan.act is not None:
            act = m.hfc_plan.act
            if act.observer == "dynamic" and act.symmetric:
                _InputQuantLinearOnnx(m, name)  # raises with the message
            if act.observer != "dynamic":
                obs = getattr(m, "input_observer", None)
                if obs is None or not obs.ready:
                    raise ValueError(
                        f"{name} quantises its input but has no calibrated range yet (QAT still running?). Finish QAT "
                        "(convert at train end) or calibrate with quantize_model before exporting."
                    )
    out = {}
    for name, (m, scheme, kind) in _int4_layers(model, int4).items():
        if isinstance(m, Int8Linear):
            stored = {"q": m.weight.detach(), "scale": m.weight_scale.detach()[:, None].float(),
                      "zero": m.weight_zero_point.detach()[:, None]}
        else:
            stored = int4_storage(m, scheme, name)
        out[name] = {"kind": kind, "stored": stored, "block": _nbits_block(scheme, stored["q"].shape[1]) if scheme else None}
    return out


# ---------------------------------------------------------------- export


class _Wrapper(nn.Module):
    """Named tensor inputs → one tensor output (logits, or last_hidden_state for a base model)."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if getattr(self.model.config, "is_decoder", False) or _is_decoder(self.model):
            kw["use_cache"] = False
        return getattr(self.model(**kw), self.output)


def _is_decoder(model: nn.Module) -> bool:
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin) or bool(getattr(model.config, "is_decoder", False))


def _uses_token_types(model: nn.Module) -> bool:
    import inspect

    return "token_type_ids" in inspect.signature(model.forward).parameters and getattr(model.config, "type_vocab_size", 0) > 0


def onnx_ready_copy(
    model: nn.Module, int4: str = DEFAULT_INT4, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `model` whose special layers are the export stand-ins above; counts of each kind."""
    int4_layers = check_exportable(model, int4, accuracy_level)
    embedding = _recorded_embedding(model)
    attn = getattr(model.config, "_attn_implementation", None)
    model = copy.deepcopy(model).eval()
    # a deep copy of a model whose config hf_compress re-classed (after pruning / quantisation records) comes
    # back with config._attn_implementation None, and attention then ignores the padding mask: set it again
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and attn is not None and getattr(cfg, "_attn_implementation", None) is None:
            cfg._attn_implementation = attn
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in model.state_dict().values()):
        nn.Module.float(model)  # ONNX export in float32 (transformers' own .float() refuses quantised models)
    counts = {"int8_linear": 0, "input_quant_linear": 0, "fake_quant_weight": 0, "int4_matmulnbits": 0, "int4_int8_gemm": 0,
              "int8_embedding": 0}
    if embedding is not None:  # int8 codes + one scale per row (Gather, Mul), exactly the float values it holds
        table = model.get_submodule(embedding[0])
        int8 = Int8Embedding.from_float(table).eval()
        for name in table_names(model, table):  # T5: shared = encoder / decoder embed_tokens
            replace_module(model, name, int8)
    for name, m in list(model.named_modules()):
        if name in int4_layers:
            d = int4_layers[name]
            if d["kind"] == "matmulnbits":
                replace_module(model, name, _Int4LinearOnnx(d["stored"], m.bias, d["block"], accuracy_level))
            else:
                replace_module(model, name, _Int4Int8GemmOnnx(d["stored"], m.bias))
            counts[f"int4_{d['kind']}"] += 1
        elif isinstance(m, Int8Linear):
            replace_module(model, name, _Int8LinearOnnx(m))
            counts["int8_linear"] += 1
        elif is_fake_quant(m):
            if m.hfc_plan.act is not None:
                replace_module(model, name, _InputQuantLinearOnnx(m, name))
                counts["input_quant_linear"] += 1
            else:  # weight-only fake quantisation (QAT not converted): the weight on its grid, in float
                with torch.no_grad():
                    w = m.quantized_weight().detach()
                restore_layer(m)
                with torch.no_grad():
                    m.weight.copy_(w)
                counts["fake_quant_weight"] += 1
    counts["int8_embedding"] = sum(isinstance(m, Int8Embedding) for m in model.modules())
    return model, counts


def _load(source) -> tuple[nn.Module, Path | None]:
    if isinstance(source, nn.Module):
        return source, None
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json here; pass a directory written by save_pretrained (or a model).")
    from transformers import AutoConfig

    # `import hf_compress` (done: this module is inside it) registered the loading hooks, so the class named
    # by config.architectures rebuilds a compressed directory exactly as hf_compress.load_pretrained does
    config = AutoConfig.from_pretrained(path)
    _check_metadata(get_metadata(config))  # refuse bitsandbytes before loading it
    model = model_class_for(config).from_pretrained(path, config=config)  # the concrete class would re-read it
    return model.eval(), path


def _sample_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if _uses_token_types(model):
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return inputs


def _output_name(model: nn.Module, inputs) -> str:
    with torch.no_grad():
        kw = dict(inputs, return_dict=True)
        if _is_decoder(model):
            kw["use_cache"] = False
        out = model(**kw)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return name
    raise ValueError(f"{type(model).__name__} returns neither logits nor last_hidden_state: cannot choose the ONNX output.")


def export_onnx(
    model_or_dir, out, *, overwrite: bool = False, opset: int = OPSET, verify: bool = True, source_dir=None,
    int4: str = DEFAULT_INT4, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> dict[str, Any]:
    """Export a (compressed) transformers model, or the directory it was saved to, to ONNX in `out`.

    Writes ``out/model.onnx``, ``out/config.json``, the tokenizer files of a source directory and
    ``out/onnx_export.json`` (inputs, output, what each kind of layer became, the verification). Inputs:
    ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for models that take them), int64, with dynamic
    batch and sequence axes; output ``logits`` (``last_hidden_state`` for a base model). Decoders are
    exported without past key values.

    Everything is checked before anything is written: a model ONNX cannot represent raises ValueError
    naming the setting and the alternative. The directory is written beside `out` and renamed into place,
    so `out` is either the whole export or untouched. An existing `out` is refused unless `overwrite`.
    `source_dir`: with a model object, the directory it was loaded from (its config.json and tokenizer
    files are copied).

    `verify`: run the file in ONNX Runtime on a padded sample batch and record the largest difference from
    the PyTorch model and from the export copy run in PyTorch (the same graph: float layers as they are,
    int8 layers computing ONNX's DynamicQuantizeLinear / MatMulInteger exactly); raises, writing nothing,
    when a model without quantised activations differs by more than 1e-4 · (1 + max|y|). With dynamic
    per-tensor activation quantisation a one-code rounding difference can move a whole tensor's scale, so
    int8 differences are of the size of the quantisation noise: recorded only (docs/onnx.md).

    `int4` (layers whose weights are on a uniform grid of <= 4 bits; a file only ONNX Runtime runs):
    'matmulnbits' (default) writes the weight-only ones (QAT / PTQ with export=None, group-wise or per
    channel) as com.microsoft MatMulNBits with our codes and scales (linears ~7x smaller than fp32);
    'int8-gemm' writes the per-channel ones (and torch-int8 layers with 4-bit codes) as packed 4-bit codes
    that ONNX Runtime unpacks once at load for its int8 GEMM (DynamicQuantizeMatMul: inputs quantised per
    tensor at run time, as torch-int8 does), group-wise ones still as MatMulNBits; 'float' writes their
    weights as floats (standard ONNX, exact). `accuracy_level` of the MatMulNBits nodes: 0 (default: float32
    input, the weights dequantised exactly; verified to 1e-4 · (1 + max|y|) like a float model) or 4 (the
    kernel quantises each block of its input to int8; differences of the size of that rounding, recorded
    only). See docs/onnx.md.
    Returns the dict written to onnx_export.json.
    """
    _require_packages()
    _check_options(int4, accuracy_level)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose a new directory, or pass overwrite=True (--overwrite).")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory.")
    model, src = _load(model_or_dir)
    if src is None and source_dir is not None:
        src = Path(source_dir)
    export_model, counts = onnx_ready_copy(model, int4, accuracy_level)  # every refusal happens here, before any file
    inputs = _sample_inputs(model)
    output = _output_name(export_model, inputs)
    names = list(inputs)
    wrapper = _Wrapper(export_model, output).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        onnx_path = tmp / "model.onnx"
        dyn = {n: {0: "batch", 1: "sequence"} for n in names}
        n_bytes = sum(t.numel() * t.element_size() for t in export_model.state_dict().values())
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (), str(onnx_path), kwargs=dict(inputs), dynamo=True, dynamic_shapes=dyn,
                input_names=names, output_names=[output], opset_version=opset,
                custom_translation_table=translation_table(), external_data=n_bytes > 1_500_000_000,
                verbose=False,
            )
        _copy_side_files(model, src, tmp)
        info: dict[str, Any] = {
            "format": "onnx", "opset": opset, "exporter": f"torch.onnx (dynamo) {torch.__version__}",
            "inputs": names, "output": output, "dynamic_axes": {"0": "batch", "1": "sequence"},
            "past_key_values": False, "layers": counts,
            "int8": ("DynamicQuantizeLinear -> MatMulInteger with the model's int8 codes, per-channel scales and zero "
                     "points (torch-int8 numerics)") if counts["int8_linear"] else None,
            "int4": ({"mode": int4, "codes": "the model's integer codes + 8, packed two per byte; its float32 scales",
                      "matmulnbits": ({"op": "com.microsoft.MatMulNBits", "bits": 4, "accuracy_level": accuracy_level}
                                      if counts["int4_matmulnbits"] else None),
                      "int8_gemm": ("BitwiseAnd/BitShift/Concat/Cast unpack (folded by ONNX Runtime at load) -> "
                                    "DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul"
                                    if counts["int4_int8_gemm"] else None)}
                     if counts["int4_matmulnbits"] or counts["int4_int8_gemm"] else None),
            "source": str(src) if src else None, "hf_compress": get_metadata(model) or None,
        }
        if verify:
            v = info["verification"] = verify_onnx(onnx_path, model, inputs, output, graph_reference=export_model)
            exact = not counts["int8_linear"] and not counts["input_quant_linear"] and not counts["int4_int8_gemm"] and not (
                counts["int4_matmulnbits"] and accuracy_level == 4)
            if exact and v["max_abs_diff"] > 1e-4 * (1 + v["max_abs_reference"]):
                raise ValueError(
                    f"ONNX Runtime output differs by {v['max_abs_diff']:.3g} from the PyTorch model: nothing was "
                    "written (please report this)."
                )
        (tmp / "onnx_export.json").write_text(json.dumps(info, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _copy_side_files(model: nn.Module, src: Path | None, tmp: Path) -> None:
    if src is not None and (src / "config.json").is_file():
        shutil.copy2(src / "config.json", tmp / "config.json")
    else:
        model.config.to_json_file(tmp / "config.json")
    if src is not None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():  # overwrite: move the old one aside first, remove it only once the new one is in place
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def ort_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session of `path` (a model.onnx or the export directory)."""
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_torch(model: nn.Module, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
    with torch.no_grad():
        kw = dict(inputs, return_dict=True)
        if _is_decoder(model):
            kw["use_cache"] = False
        return getattr(model(**kw), output).float()


def verify_onnx(
    path, model: nn.Module, inputs: dict[str, torch.Tensor], output: str = "logits", graph_reference: nn.Module | None = None,
) -> dict[str, float]:
    """Largest difference between ONNX Runtime and the PyTorch `model` on `inputs`; with `graph_reference`
    (the export copy, whose int8 layers compute in PyTorch what the ONNX graph computes) also from that."""
    sess = ort_session(path)
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(None, feed)[0])
    ref = _run_torch(model, inputs, output)
    result = {"max_abs_diff": float((got - ref).abs().max()), "max_abs_reference": float(ref.abs().max()),
              "batch": int(inputs["input_ids"].shape[0]), "sequence": int(inputs["input_ids"].shape[1])}
    if graph_reference is not None:
        result["max_abs_diff_graph_reference"] = float((got - _run_torch(graph_reference, inputs, output)).abs().max())
    return result
