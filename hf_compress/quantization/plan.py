"""Which layers get quantised, and how: one `LayerPlan` per targeted Linear.

Built from any object with QATConfig's fields (QATConfig itself, or a namespace): the quantization
package never imports the callbacks package, so QAT, PTQ and `rebuild_quantized` all share this.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..modules import out_axis, select_modules
from .numerics import QScheme, int_range


@dataclass(frozen=True)
class ActScheme:
    """Per-tensor fake quantisation of a layer's input, with ranges from an observer."""

    bits: int = 8
    symmetric: bool = False
    observer: str = "moving_average"
    percentile: float = 99.99
    averaging: float = 0.01

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.symmetric)[1]


@dataclass(frozen=True)
class LayerPlan:
    weight: QScheme
    act: ActScheme | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict(), "act": asdict(self.act) if self.act else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
        return cls(QScheme(**d["weight"]), ActScheme(**d["act"]) if d.get("act") else None)


def field_of(config, name, default=None):
    """A QATConfig field of `config` (a QATConfig, any object with its fields, or a dict)."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def layer_bits(name: str, config) -> int:
    """Bits of one layer: the first `layer_bits` regex that matches its name, else `weight_bits`."""
    for pattern, bits in (field_of(config, "layer_bits") or {}).items():
        if re.search(pattern, name):
            return int(bits)
    return int(field_of(config, "weight_bits", 8))


def scheme_for_bits(bits: int, config) -> QScheme:
    """The weight scheme of a layer with `bits`: NF4 replaces the uniform 4-bit grid when asked."""
    fmt = field_of(config, "weight_format") or "int"
    if fmt == "nf4" and bits == 4:
        return QScheme(bits=4, symmetric=True, per_channel=True, group_size=field_of(config, "group_size") or 64, format="nf4")
    group = field_of(config, "group_size") if bits <= 4 else None  # groups are for low-bit layers only
    return QScheme(
        bits=bits,
        symmetric=bool(field_of(config, "symmetric", True)),
        per_channel=bool(field_of(config, "per_channel", True)),
        group_size=group,
        weight_range=weight_range_for(bits, config),
    )


def weight_range_for(bits: int, config) -> str:
    """A layer's symmetric weight grid: the config's `weight_range`, or when None (the default) the grid measured
    better at that width: 'full' ([-8, 7], torchao's) at 4 bits, 'restricted' (±(2^(b-1)-1)) at the others."""
    chosen = field_of(config, "weight_range")
    if chosen is not None:
        return chosen
    return "full" if bits == 4 else "restricted"


def act_scheme(config) -> ActScheme | None:
    bits = field_of(config, "activation_bits")
    if not bits:
        return None
    return ActScheme(
        bits=int(bits),
        symmetric=bool(field_of(config, "activation_symmetric", False)),
        observer=field_of(config, "observer", "moving_average"),
        percentile=float(field_of(config, "percentile", 99.99)),
        averaging=float(field_of(config, "averaging", 0.01)),
    )


def in_features(module: nn.Module) -> int:
    return module.weight.shape[1 - out_axis(module)]


def build_plan(model: nn.Module, config, require: bool = True) -> dict[str, LayerPlan]:
    """{layer name: LayerPlan} for the Linear layers selected by `qat_targets` / `qat_exclude`.

    Raises ValueError when a group size does not tile a layer's input width, and (`require`) when nothing matches;
    with `embedding_bits`, when the input embedding cannot be stored int8 (tied, or not an nn.Embedding).
    """
    from .embedding import embedding_target  # embedding.py imports nothing of plan.py: no cycle

    embedding_target(model, bits=field_of(config, "embedding_bits"), real=bool(field_of(config, "export")))
    try:
        chosen = select_modules(model, field_of(config, "qat_targets"), field_of(config, "qat_exclude"),
                                field="qat_targets", require=require)
    except ValueError as e:
        from ..metadata import get_metadata

        backend = (get_metadata(model).get("quantization") or {}).get("backend")
        if backend:  # the usual cause: its Linears are int8 / 4-bit layers already, not a wrong regex
            raise ValueError(
                f"{type(model).__name__} is already converted (export={backend!r}): its layers hold integer codes, so "
                "there is nothing to quantise again. Start from the float model, or from one quantised with "
                "export=None (float weights on the grid), to quantise it with other settings."
            ) from e
        raise
    act = act_scheme(config)
    plan = {}
    for name, module in chosen.items():
        scheme = scheme_for_bits(layer_bits(name, config), config)
        scheme.check_width(in_features(module), name)
        plan[name] = LayerPlan(scheme, act)
    return plan
