"""Fake quantisation inserted into Linear / Conv1D layers in place.

The layer's class is swapped for a subclass whose forward quantises → dequantises the weight (and,
when asked, the input) before the matmul. Nothing else changes: the `weight` and `bias` Parameter
objects are the same ones the optimizer already holds (float master weights, updated by the optimizer
through the straight-through gradient), the state_dict keys are unchanged, `isinstance(m, nn.Linear)`
still holds, and the observer's buffers are non-persistent. Removing restores the original class.

Numerics run in float32 (see numerics.py), so autocast / bf16 only changes the matmul that follows:
under bf16 autocast F.linear casts the grid values to bf16, exactly as it casts any weight.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import out_axis
from .numerics import fake_quantize, fake_quantize_weight, qparams
from .observers import Observer
from .plan import LayerPlan


_LAST = threading.local()  # the last dynamic input and its grid values (weak references only)


def _dynamic_input(x: torch.Tensor, act) -> torch.Tensor:
    """`x` on the grid of its own range. Layers fed the very same tensor (BERT's query / key / value, a
    LLaMA's q/k/v and gate/up projections) share one result: same values, and one straight-through node
    whose gradient is the sum of theirs. Reused only while `x` is unchanged (same object and version), the
    grid is the same and the result is still alive; never while compiling."""
    key = (act, torch.is_grad_enabled(), x._version)
    last = getattr(_LAST, "entry", None)
    if last is not None and last[0]() is x and last[1] == key and not torch.compiler.is_compiling():
        out = last[2]()
        if out is not None:
            return out
    with torch.no_grad():
        scale, zero = qparams(*torch.aminmax(x.detach()), act.bits, act.symmetric)
    out = fake_quantize(x, scale, zero, act.qmin, act.qmax)
    if not torch.compiler.is_compiling():
        _LAST.entry = (weakref.ref(x), key, weakref.ref(out))
    return out


class FakeQuantMixin:
    """Forward of a fake-quantised Linear (or GPT-2 Conv1D, whose weight is [in, out])."""

    hfc_plan: LayerPlan
    hfc_axis: int
    hfc_base: type
    hfc_float_view = True  # the float layer, wrapped for training: modules.is_plain_linear

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        act = self.hfc_plan.act
        if act is None:
            return x
        if act.observer == "dynamic":  # this tensor's own range, as the int8 CPU kernels do at run time
            return _dynamic_input(x, act)
        obs = self.input_observer
        if obs.observe_in_eval:  # PTQ calibration: ranges of the float inputs, nothing quantised yet
            return obs(x)
        if obs.observing and self.training:
            obs(x)
        if not obs.ready:  # no committed range yet: the first step sees float inputs
            return x
        scale, zero = obs.qparams(act.bits, act.symmetric)
        return fake_quantize(x, scale, zero, act.qmin, act.qmax)

    def quantized_weight(self) -> torch.Tensor:
        if getattr(self, "hfc_weight_on_grid", False):  # baked by convert (a PTQ layer kept for its inputs):
            return self.weight  # quantised once; weight_range="full" is not a fixed point of re-quantisation
        return fake_quantize_weight(self.weight, self.hfc_plan.weight, self.hfc_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        w = self.quantized_weight()
        if self.hfc_axis == 1:  # Conv1D: y = x @ W + b
            w = w.t()
        return F.linear(x, w, self.bias)


_CLASSES: dict[type, type] = {}


def _fake_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"FakeQuant{cls.__name__}", (FakeQuantMixin, cls), {"hfc_base": cls})
    return _CLASSES[cls]


def is_fake_quant(module: nn.Module) -> bool:
    return isinstance(module, FakeQuantMixin)


def fake_quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_fake_quant(m)}


def observers(model: nn.Module) -> dict[str, Observer]:
    """{layer name: its input observer}, in module order (the same on every rank)."""
    return {n: m.input_observer for n, m in fake_quant_layers(model).items() if getattr(m, "input_observer", None) is not None}


def insert_fake_quant(model: nn.Module, plan: dict[str, LayerPlan]) -> list[str]:
    """Fake-quantise the planned layers in place (idempotent). Returns the names now fake-quantised."""
    modules = dict(model.named_modules())
    missing = [n for n in plan if n not in modules]
    if missing:
        raise ValueError(f"insert_fake_quant: layers {missing[:5]} are not in the model.")
    for name, lp in plan.items():
        m = modules[name]
        if is_fake_quant(m):
            continue
        axis = out_axis(m)
        m.__class__ = _fake_class(type(m))
        m.hfc_plan, m.hfc_axis = lp, axis
        if lp.act is not None and lp.act.observer != "dynamic":
            m.input_observer = Observer(lp.act.observer, lp.act.averaging, lp.act.percentile).to(m.weight.device)
    return list(plan)


def restore_layer(m: nn.Module) -> None:
    """Give a fake-quantised layer back its original class (weights untouched)."""
    if getattr(m, "input_observer", None) is not None:
        del m.input_observer
    m.__class__ = m.hfc_base
    for attr in ("hfc_plan", "hfc_axis", "hfc_weight_on_grid"):
        m.__dict__.pop(attr, None)


@torch.no_grad()
def remove_fake_quant(model: nn.Module, bake: bool = True) -> list[str]:
    """Restore the original classes; with `bake`, the weights become their quantised-dequantised values."""
    names = []
    for name, m in fake_quant_layers(model).items():
        if bake:
            m.weight.copy_(m.quantized_weight())
        restore_layer(m)
        names.append(name)
    return names


def set_observing(model: nn.Module, observing: bool, in_eval: bool = False) -> None:
    """Start / stop range collection (frozen observers keep their committed range)."""
    for obs in observers(model).values():
        obs.observing = observing
        obs.observe_in_eval = in_eval


def commit_observers(model: nn.Module) -> None:
    from .observers import sync_observers

    obs = list(observers(model).values())
    sync_observers(obs)
    for o in obs:
        o.commit()
