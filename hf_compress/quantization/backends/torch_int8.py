"""PyTorch int8 export: `Int8Linear`, real int8 CPU kernels, safetensors-friendly storage.

Storage is plain buffers — `weight` int8 [out, in], `weight_scale` float32 [out], `weight_zero_point`
int8 [out] — so save_pretrained writes ~1 byte per weight (≈4× smaller than float32) and safetensors
never sees a packed or quantized tensor type. (`torch.ao.quantization.quantize_dynamic` stores packed
params that safetensors cannot save, with per-tensor scales that cost accuracy.)

Forward on CPU runs `torch.ops.quantized.linear_dynamic` (fbgemm / x86 int8 GEMM; the activation is
quantised per tensor at run time) with a per-channel qint8 weight prepacked once, lazily, and again
whenever the buffers change (load_state_dict). Measured here: faster than `torch._int_mm` at every
MiniLM shape we tried (see docs/quantization.md). Elsewhere (GPU, or a torch without the quantized
ops) it falls back to dequantise + float matmul: same numbers, no int8 speed.

Any uniform scheme of ≤ 8 bits, per channel or per tensor, symmetric or not, with either symmetric
`weight_range`, is stored exactly (a 4-bit per-channel grid is int8 codes in [-7, 7], or [-8, 7] with
weight_range='full'; 8-bit 'full' codes reach -128, which the qint8 kernels take); group-wise scales
and NF4 are not.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import QScheme, dequantize_weight, quantize_weight
from . import Backend


def _has_kernels() -> bool:
    return hasattr(torch.ops, "quantized") and hasattr(torch.ops.quantized, "linear_dynamic")


def _qint8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # the quantized-tensor constructors print a deprecation notice
        warnings.simplefilter("ignore")
        return torch._make_per_channel_quantized_tensor(q, scale.double(), zero.long(), 0)


@functools.lru_cache(maxsize=None)
def reduce_range() -> bool:
    """Whether activations need 7 bits: x86 CPUs without VNNI add u8·s8 pairs in int16 and saturate.

    Probed once: a product that saturates int16 pairs must come out exact with full-range activations.
    """
    x = torch.ones(1, 64)
    x[0, 0] = 0.0  # range [0, 1] -> activation codes 0 and 255
    q = torch.full((2, 64), 127, dtype=torch.int8)
    packed = torch.ops.quantized.linear_prepack(_qint8(q, torch.ones(2), torch.zeros(2, dtype=torch.int8)), None)
    y = torch.ops.quantized.linear_dynamic(x, packed, False)
    return not torch.allclose(y, torch.full_like(y, 63 * 127.0), rtol=1e-3)


class Int8Linear(nn.Module):
    """y = x · dequant(W)ᵀ + b with W stored as int8 codes + per-channel scale / zero point."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed = None  # (buffer versions, prepacked weight)

    @classmethod
    def from_float(cls, module: nn.Module, scheme: QScheme, axis: int = 0, stored: dict | None = None) -> "Int8Linear":
        w = module.weight
        out = cls(w.shape[1 - axis], w.shape[axis], module.bias is not None).to(w.device)
        s = quantize_weight(w, scheme, axis) if stored is None else stored
        with torch.no_grad():
            out.weight.copy_(s["q"])
            out.weight_scale.copy_(s["scale"][:, 0])
            out.weight_zero_point.copy_(s["zero"][:, 0])
            if module.bias is not None:
                out.bias.copy_(module.bias.float())
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(
            {"q": self.weight, "scale": self.weight_scale[:, None], "zero": self.weight_zero_point[:, None]}
        )

    def _prepacked(self):
        key = tuple(t._version for t in (self.weight, self.weight_scale, self.weight_zero_point)) + (
            self.weight.data_ptr(), None if self.bias is None else (self.bias._version, self.bias.data_ptr())
        )
        if self._packed is None or self._packed[0] != key:
            qw = _qint8(self.weight, self.weight_scale, self.weight_zero_point)
            bias = None if self.bias is None else self.bias.detach().float()
            self._packed = (key, torch.ops.quantized.linear_prepack(qw, bias))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _has_kernels():
            y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._prepacked(), reduce_range())
            return y.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class TorchInt8(Backend):
    name = "torch-int8"
    package = "torch"

    def unavailable(self) -> str | None:
        if not _has_kernels():
            return "this torch build has no torch.ops.quantized.linear_dynamic (int8 CPU kernels)."
        return None

    def check(self, scheme: QScheme) -> None:
        if scheme.format != "int" or scheme.group_size:
            raise ValueError(
                f"`export`='torch-int8' stores one scale per output channel: it cannot hold a "
                f"{scheme.format} / group-wise (group_size={scheme.group_size}) scheme. Use group_size=None, "
                f"or export='bnb-nf4' for 4-bit group-wise weights."
            )

    def convert(self, module: nn.Module, scheme: QScheme, axis: int, stored: dict | None = None) -> nn.Module:
        self.check(scheme)
        return Int8Linear.from_float(module, scheme, axis, stored)

    def empty(self, in_features: int, out_features: int, bias: bool, scheme: QScheme) -> nn.Module:
        self.check(scheme)
        return Int8Linear(in_features, out_features, bias)
