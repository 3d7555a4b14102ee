"""`QATConfig`: every option of `QATCallback` (and of PTQ, `hf_compress.quantize_model`), validated
before training starts."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from .._config import refuse_renamed
from .backends import get_backend, names as backend_names
from .numerics import NF4_GROUP_SIZES, WEIGHT_RANGES
from .observers import ACT_RANGES
from .plan import scheme_for_bits

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
FORMATS = ("int", "nf4")
# Field names are unique across TrainingArguments, DistillationConfig, PruningConfig and QATConfig (one
# HfArgumentParser takes all four): the module-selection and schedule-window fields carry the technique's
# prefix. The old names are refused with the new one.
RENAMED = {"targets": "qat_targets", "exclude": "qat_exclude", "start_step": "qat_start_step"}


def _parse_layer_bits(value) -> dict[str, int] | None:
    """dict, JSON text, or "regex=bits,regex=bits" (command line)."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"QATConfig.layer_bits={text!r} is not valid JSON ({e}).") from e
    out = {}
    for part in text.split(","):
        pattern, sep, bits = part.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"QATConfig.layer_bits={text!r}: write 'regex=bits,regex=bits' or a JSON object.")
        out[pattern.strip()] = bits.strip()
    return out


@dataclass
class QATConfig:
    weight_bits: int = field(
        default=8,
        metadata={"help": "Bits of the targeted weights: 8 or 4 (any 2-8 trains; exports store 8, NF4 4, and "
                          "torch-int8 any per-channel grid of <= 8 bits)."},
    )
    activation_bits: Optional[int] = field(
        default=None,
        metadata={"help": "None: weights only. 8: also fake-quantise each targeted layer's input (per tensor, "
                          "range from `observer`). Exports quantise activations at run time (dynamic)."},
    )
    per_channel: bool = field(
        default=True, metadata={"help": "One scale (and zero point) per output channel; False: one per tensor."}
    )
    group_size: Optional[int] = field(
        default=None,
        metadata={"help": "Layers of <= 4 bits: one scale per group of this many consecutive input features of "
                          "each output channel (must divide the input width). NF4 defaults to 64."},
    )
    symmetric: bool = field(
        default=True,
        metadata={"help": "Weights: zero point 0, levels in [-(2^(b-1)-1), 2^(b-1)-1]. False: asymmetric, with "
                          "an integer zero point so 0.0 stays exactly on the grid (pruned zeros stay zero)."},
    )
    weight_range: Optional[str] = field(
        default=None,
        metadata={"help": "Integer range of symmetric uniform weights (b bits). None (default): 'full' for 4-bit "
                          "layers (measured better, BENCHMARKS.md 'int4 weight grid'), 'restricted' for the others "
                          "(per layer, so layer_bits mixes are covered). 'restricted' = [-(2^(b-1)-1), "
                          "2^(b-1)-1], scale max|w|/qmax (int4 [-7, 7]); 'full' = [-2^(b-1), 2^(b-1)-1], scale "
                          "max|w|/((qmax-qmin)/2) (int4 [-8, 7], max|w|/7.5: torchao's and torch.ao's symmetric "
                          "grid); 'full_no_clip' = the same codes, scale max(-min/2^(b-1), max/qmax) (torchao's "
                          "SYMMETRIC_NO_CLIPPING_ERR). Asymmetric and NF4 grids ignore it; bnb-int8 needs "
                          "'restricted'."},
    )
    weight_format: Optional[str] = field(
        default=None,
        metadata={"help": "Grid of 4-bit layers: 'int' (uniform) or 'nf4' (bitsandbytes NormalFloat4, what "
                          "bnb-nf4 stores). Default: 'nf4' when export='bnb-nf4', else 'int'."},
    )
    activation_symmetric: bool = field(
        default=False, metadata={"help": "Activations: symmetric instead of asymmetric (the usual) ranges."}
    )
    observer: str = field(
        default="moving_average",
        metadata={"help": f"Activation ranges, one of {ACT_RANGES}: running min/max; exponential moving average "
                          "of each step's min/max; moving average of each batch's percentile; 'dynamic': each "
                          "tensor's own min/max, exactly what the torch-int8 kernels do at run time."},
    )
    percentile: float = field(
        default=99.99,
        metadata={"help": "observer='percentile': the range is [p_(100-x), p_x] of each batch, x in (50, 100]."},
    )
    averaging: float = field(
        default=0.01, metadata={"help": "moving_average / percentile observers: weight of each new step, in (0, 1]."}
    )
    qat_targets: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Regexes (re.search) of Linear module names to quantise. Default: the Linear layers "
                          "inside the transformer blocks (embeddings, LayerNorm and the task head stay float)."},
    )
    qat_exclude: Optional[list[str]] = field(default=None, metadata={"help": "Regexes of module names kept in float."})
    layer_bits: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "Mixed precision: {regex: bits}; the first regex matching a layer name sets its bits "
                          "(others use weight_bits). On the command line: 'regex=bits,regex=bits' or JSON."},
    )
    qat_start_step: int = field(
        default=0, metadata={"help": "Optimizer step at which fake quantisation starts (float training before)."}
    )
    freeze_observers_step: Optional[int] = field(
        default=None,
        metadata={"help": "Step from which activation ranges stop moving (must be > qat_start_step). None: never."},
    )
    export: Optional[str] = field(
        default=None,
        metadata={"help": f"At the end of training: None keeps float weights set to their quantised values; "
                          f"one of {backend_names()} converts the targeted layers into real low-bit layers "
                          f"(torch-int8: int8 CPU kernels, which quantise activations at run time — train with "
                          f"activation_bits=8, observer='dynamic' to match them; bnb-*: bitsandbytes Linear8bitLt / "
                          f"Linear4bit)."},
    )
    embedding_bits: Optional[int] = field(
        default=None,
        metadata={"help": "None: the input word embedding stays float32. 8: at convert (end of QAT, or "
                          "quantize_model) store it as int8 codes + one float32 scale per row (symmetric; ~1/4 of "
                          "the float bytes; with export=None its float values are set on that grid). It stays float "
                          "during QAT. Refused for embeddings tied to an output head (causal LMs)."},
    )

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"QATConfig.{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.export, str) and self.export.strip().lower() in ("", "none"):
            self.export = None
        if self.export is not None and self.export not in backend_names():
            bad("export", f"use None or one of {backend_names()}.")
        if not isinstance(self.weight_bits, int) or isinstance(self.weight_bits, bool) or self.weight_bits not in WEIGHT_BITS:
            bad("weight_bits", "supported weight bits are 8 and 4 (2-8 for fake quantisation / torch-int8).")
        if self.activation_bits is not None and (type(self.activation_bits) is not int or self.activation_bits != 8):
            bad("activation_bits", "use None (weights only) or 8.")
        if self.embedding_bits is not None and (type(self.embedding_bits) is not int or self.embedding_bits != 8):
            bad("embedding_bits", "use None (float32 word embedding) or 8 (int8 codes + one float32 scale per row); "
                                  "other widths are not supported.")
        if self.weight_range is not None and self.weight_range not in WEIGHT_RANGES:
            bad("weight_range", f"use one of {WEIGHT_RANGES} ('restricted': int4 codes [-7, 7]; 'full': "
                                "[-8, 7] as torchao; 'full_no_clip': [-8, 7] with torchao's no-clipping scale), or "
                                "None (the default): 'full' for 4-bit layers, 'restricted' for the others.")
        if self.weight_format is None:
            self.weight_format = "nf4" if self.export == "bnb-nf4" else "int"
        if self.weight_format not in FORMATS:
            bad("weight_format", f"use one of {FORMATS}.")
        self.layer_bits = _parse_layer_bits(self.layer_bits)
        if self.layer_bits is not None:
            clean = {}
            for pattern, bits in self.layer_bits.items():
                try:
                    re.compile(pattern)
                except re.error as e:
                    bad("layer_bits", f"{pattern!r} is not a valid regular expression ({e}).")
                b = int(bits) if isinstance(bits, int) or (isinstance(bits, str) and bits.isdigit()) else None
                if b not in WEIGHT_BITS or isinstance(bits, bool):
                    bad("layer_bits", f"bits {bits!r} for {pattern!r} are not supported: use 8 or 4 (2-8).")
                clean[pattern] = b
            self.layer_bits = clean
        low_bit = any(b <= 4 for b in self.all_bits)
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                bad("group_size", "use a positive integer (e.g. 64 or 128), or None.")
            if not low_bit:
                bad("group_size", "groups apply to layers of <= 4 bits, and no layer has <= 4 bits "
                                  "(set weight_bits=4 or a layer_bits entry, or group_size=None).")
        if self.weight_format == "nf4":
            if 4 not in self.all_bits:
                bad("weight_format", "'nf4' is a 4-bit grid: set weight_bits=4 (or a layer_bits entry with 4).")
            if self.group_size is None:
                self.group_size = 64  # bitsandbytes' default blocksize
            if self.group_size not in NF4_GROUP_SIZES:
                bad("group_size", f"NF4 groups are bitsandbytes blocks: use one of {NF4_GROUP_SIZES}.")
            if not self.symmetric:
                bad("symmetric", "NF4 is symmetric (absmax scaling): use symmetric=True.")
        if self.observer not in ACT_RANGES:
            bad("observer", f"use one of {ACT_RANGES}.")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not 50 < self.percentile <= 100:
            bad("percentile", "use a number in (50, 100], e.g. 99.99.")
        if isinstance(self.averaging, bool) or not isinstance(self.averaging, (int, float)) or not 0 < self.averaging <= 1:
            bad("averaging", "use a number in (0, 1], e.g. 0.01.")
        if isinstance(self.qat_start_step, bool) or not isinstance(self.qat_start_step, int) or self.qat_start_step < 0:
            bad("qat_start_step", "use an integer >= 0.")
        if self.freeze_observers_step is not None and (
            not isinstance(self.freeze_observers_step, int) or self.freeze_observers_step <= self.qat_start_step
        ):
            bad("freeze_observers_step", f"use an integer > qat_start_step={self.qat_start_step} (or None: never freeze).")
        for name in ("qat_targets", "qat_exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [v])
            for p in getattr(self, name) or []:
                try:
                    re.compile(p)
                except re.error as e:
                    bad(name, f"{p!r} is not a valid regular expression ({e}).")
        if self.export is not None:
            backend = get_backend(self.export)
            for bits in sorted(set(self.all_bits)):
                try:
                    backend.check(scheme_for_bits(bits, self))
                except ValueError as e:
                    raise ValueError(f"QATConfig.export={self.export!r} with {bits}-bit layers: {e}") from None
            reason = backend.unavailable()
            if reason:
                bad("export", f"{reason} Choose another export backend or export=None.")

    @property
    def all_bits(self) -> list[int]:
        return [self.weight_bits, *((self.layer_bits or {}).values())]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


refuse_renamed(QATConfig, RENAMED)
