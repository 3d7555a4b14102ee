"""bitsandbytes export: `Linear8bitLt` (int8, row-wise absmax) and `Linear4bit` (NF4, block absmax).

Layers are built directly from our quantised weights (loading a model through `BitsAndBytesConfig`
failed on CPU here, building the layers works):

* int8: our symmetric per-channel 8-bit codes *are* LLM.int8's row-wise format: CB = q, SCB = 127·S.
  `Linear8bitLt(has_fp16_weights=False, threshold=0)`; no outlier decomposition.
* nf4: QAT trained on numerics' NF4 grid with groups = bitsandbytes blocks, so bitsandbytes' own
  quantiser applied to the fake-quantised weight reproduces the same codes and absmax exactly
  (compress_statistics=False keeps absmax in float32). Compute in float32.

On CPU bitsandbytes 0.50 repacks 4-bit weights on the first eval forward when the CPU has AVX512-BF16,
storing absmax in bf16: outputs moved by ~1e-2 and a saved-then-reloaded layer no longer matched. We
switch that repack off per layer (`support_avx512bf16_for_cpu = False`): the layer then dequantises
and multiplies in float32, with the exact stored values.

Reload: `Linear8bitLt` loads its own state_dict once its weight is int8; `Linear4bit` does not read
the quant-state keys it writes, so `empty()` registers a load_state_dict pre-hook that rebuilds the
`Params4bit` from them (`Params4bit.from_prequantized`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..numerics import QScheme, fake_quantize_weight, quantize_weight
from . import Backend


@functools.lru_cache(maxsize=None)
def _probe() -> str | None:
    """Build and run one tiny layer of each kind; the reason they cannot run, or None."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes is not importable ({type(e).__name__}: {e}). Install it with `pip install bitsandbytes`."
    try:
        lin = nn.Linear(64, 4)
        x = torch.randn(2, 64)
        for scheme in (QScheme(8), QScheme(4, group_size=64, format="nf4")):
            with torch.no_grad():
                _convert(lin, scheme, 0)(x)
    except Exception as e:
        return f"bitsandbytes layers do not run on this machine's CPU ({type(e).__name__}: {e})."
    return None


def _int8_layer(in_features, out_features, bias, q, scb, device):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=0.0, device=device)
    layer.weight = bnb.nn.Int8Params(q, requires_grad=False, has_fp16_weights=False, CB=q, SCB=scb)
    return layer


def _nf4_layer(in_features, out_features, bias, group_size, device):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias, compute_dtype=torch.float32, compress_statistics=False,
        quant_type="nf4", device=device,
    )
    layer.support_avx512bf16_for_cpu = False  # see the module docstring
    return layer


def _convert(module: nn.Module, scheme: QScheme, axis: int) -> nn.Module:
    import bitsandbytes as bnb

    w = module.weight
    out_f, in_f = w.shape[axis], w.shape[1 - axis]
    bias = module.bias is not None
    if scheme.format == "nf4":
        layer = _nf4_layer(in_f, out_f, bias, scheme.group_size, "meta")
        w_hat = fake_quantize_weight(w.detach(), scheme, axis).float()
        if axis:
            w_hat = w_hat.t()
        layer.weight = bnb.nn.Params4bit(
            w_hat.contiguous().cpu(), requires_grad=False, quant_type="nf4", compress_statistics=False,
            blocksize=scheme.group_size, module=layer,
        )
        if bias:
            layer.bias = nn.Parameter(module.bias.detach().float().cpu().clone(), requires_grad=False)
        return layer.to(w.device)  # bitsandbytes quantises here
    s = quantize_weight(w.detach(), scheme, axis)
    layer = _int8_layer(in_f, out_f, bias, s["q"], (s["scale"][:, 0] * 127).float(), w.device)
    if bias:
        layer.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
    return layer


def _load_nf4_hook(module, state_dict, prefix, *args):
    """Rebuild the Params4bit from the quant-state keys Linear4bit writes beside `weight`."""
    import bitsandbytes as bnb

    key = prefix + "weight"
    stats = {k[len(key) + 1:]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key + ".")}
    if stats and key in state_dict:
        device = module.bias.device if module.bias is not None else "cpu"
        module.weight = bnb.nn.Params4bit.from_prequantized(state_dict[key], stats, device=str(device), module=module)


class Bnb(Backend):
    """`bnb-int8`: 8-bit layers as Linear8bitLt. `bnb-nf4`: 4-bit layers as NF4 Linear4bit (8-bit layers of
    a mixed-precision plan still become Linear8bitLt)."""

    package = "bitsandbytes"

    def __init__(self, name: str):
        self.name = name

    def unavailable(self) -> str | None:
        return _probe()

    def check(self, scheme: QScheme) -> None:
        if scheme.format == "nf4":
            if self.name != "bnb-nf4":
                raise ValueError("NF4 weights export with `export`='bnb-nf4'.")
            return
        if scheme.bits == 8 and scheme.symmetric and not scheme.group_size:
            if scheme.weight_range != "restricted":  # SCB = 127 · S: codes ±127 only
                raise ValueError(
                    f"`export`={self.name!r} stores 8-bit weights as Linear8bitLt (row absmax / 127, codes in "
                    f"[-127, 127]); it cannot hold weight_range={scheme.weight_range!r} ([-128, 127]). Use "
                    f"weight_range='restricted', or export='torch-int8', which stores either range."
                )
            return
        hint = "export='bnb-nf4' (NF4 grid)" if scheme.bits == 4 else "export='torch-int8'"
        raise ValueError(
            f"`export`={self.name!r} stores symmetric 8-bit per-channel weights (Linear8bitLt) or NF4 4-bit "
            f"(Linear4bit); it cannot hold bits={scheme.bits}, symmetric={scheme.symmetric}, "
            f"group_size={scheme.group_size}. Use symmetric=True with weight_bits=8, or {hint}."
        )

    def convert(self, module: nn.Module, scheme: QScheme, axis: int, stored: dict | None = None) -> nn.Module:
        self.check(scheme)  # its grids (int8 'restricted', NF4) are fixed points: `stored` is never needed here
        return _convert(module, scheme, axis)

    def empty(self, in_features: int, out_features: int, bias: bool, scheme: QScheme) -> nn.Module:
        self.check(scheme)
        if scheme.format == "nf4":
            layer = _nf4_layer(in_features, out_features, bias, scheme.group_size, None)
            layer.register_load_state_dict_pre_hook(_load_nf4_hook)
            return layer
        q = torch.zeros(out_features, in_features, dtype=torch.int8)
        return _int8_layer(in_features, out_features, bias, q, torch.ones(out_features), None)
