"""Quantisation technique on bare nn.Modules: `QATConfig` (config.py, one config for QAT *and* PTQ), one numerics.

Life cycle (the same names as every technique):
    prepare(model, config)               QAT: fake quantisation into the targeted layers (Parameters untouched)
    ... training (QATCallback drives the observers) ...
    convert(model, config, plan=None)    what ships: weights baked onto the grid, or real low-bit layers
                                         (config.export); records the scheme; idempotent
Also: build_plan (which layers, which scheme), quantize_model (PTQ = prepare + calibrate + convert),
rebuild_quantized (the reload path of hf_compress.loading).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from ..metadata import get_metadata, record
from ..modules import is_linear, out_axis, replace_module
from ..sharding import is_sharded
from .backends import get_backend
from .fake_quant import (
    commit_observers,
    fake_quant_layers,
    insert_fake_quant,
    is_fake_quant,
    observers,
    remove_fake_quant,
    restore_layer,
    set_observing,
)
from .embedding import Int8Embedding, convert_embedding, embedding_target, table_names
from .numerics import (
    QScheme, dequantize_weight, fake_quantize, fake_quantize_weight, qparams, quantize_weight, recover_grid,
)
from .observers import Observer
from .plan import ActScheme, LayerPlan, build_plan, field_of

FORMAT_VERSION = 1

__all__ = [
    "ActScheme", "Int8Embedding", "LayerPlan", "Observer", "QScheme", "build_plan", "commit_observers", "dequantize_weight",
    "convert", "fake_quant_layers", "fake_quantize", "fake_quantize_weight", "get_backend", "insert_fake_quant",
    "is_fake_quant", "observers", "prepare", "qparams", "quantize_model", "quantize_weight", "rebuild_quantized",
    "remove_fake_quant", "set_observing", "table_names",
]


def _fit(scheme: QScheme, width: int, name: str) -> QScheme:
    """A scheme whose groups tile `width` (structured pruning may have narrowed a layer after QAT)."""
    if not scheme.group_size or width % scheme.group_size == 0:
        return scheme
    warnings.warn(
        f"{name}: input width {width} is no longer a multiple of group_size={scheme.group_size} "
        "(pruned after QAT?); quantising it per channel."
    )
    return dataclasses.replace(scheme, per_channel=True, group_size=None, format="int")


def prepare(model: nn.Module, config) -> dict[str, LayerPlan]:
    """QAT: fake quantisation into the layers `config` targets, in place; returns the plan."""
    plan = build_plan(model, config)
    insert_fake_quant(model, plan)
    return plan


def convert(
    model: nn.Module, config=None, plan: dict[str, LayerPlan] | None = None, keep_input_quant: bool = False,
    export: str | None = None, embedding_bits: int | None = None,
) -> dict[str, Any]:
    """End of QAT or PTQ: make the targeted layers what ships, and record the scheme.

    `config` (a QATConfig) gives the export backend and, without `plan`, the layers (its targets on
    this model). Runs on a full, unsharded model (under FSDP2, gather first). Idempotent: layers that
    are already low-bit keep their recorded entry; float weights already on the grid stay as they are.

    `export=None`: each targeted weight is replaced by its quantised-dequantised value (float storage,
    every group of each output channel on ≤ 2^bits levels) and fake quantisation is removed — unless
    `keep_input_quant` (PTQ with activation_bits), where layers keep quantising their inputs (frozen
    calibrated ranges, or each tensor's own range for observer="dynamic"), recorded as
    ``input_quant`` so that `load_pretrained` restores it.
    `export=<backend>`: each targeted layer becomes that backend's real low-bit layer, built with the
    same numerics from the float master weight. Layers that no longer exist (removed by structured
    pruning) are skipped; layers pruning replaced by plain Linears are quantised all the same.
    Returns the metadata recorded under ``config.hf_compress["quantization"]``.
    """
    if plan is None:
        if config is None:
            raise ValueError("quantization.convert: pass the QATConfig (or a plan from build_plan / prepare).")
        layers_now = fake_quant_layers(model)
        recorded = get_metadata(model).get("quantization", {}).get("layers", {})
        plan = {n: m.hfc_plan for n, m in layers_now.items()} or build_plan(model, config, require=not recorded)
        plan.update({n: LayerPlan.from_dict(d) for n, d in recorded.items() if n not in plan})
    if config is not None and export is None:
        export = field_of(config, "export")
    if config is not None and embedding_bits is None:
        embedding_bits = field_of(config, "embedding_bits", None)
    embedding_target(model, bits=embedding_bits, real=bool(export))  # refused (tied, shared, ...) before anything changes
    if any(is_sharded(p) for p in model.parameters()):
        raise ValueError(
            "quantization.convert needs the full model, but its parameters are FSDP2 shards (DTensor): gather "
            "them first (hf_compress.sharding.full_state_dict) into an unsharded copy, then convert that "
            "(docs/architecture.md)."
        )
    backend = get_backend(export) if export else None
    if backend is not None:
        backend.require()
    modules = dict(model.named_modules())
    before_meta = get_metadata(model).get("quantization", {})
    before = before_meta.get("layers", {})
    layers = {}
    for name, lp in plan.items():
        m = modules.get(name)
        if m is not None and not is_linear(m) and name in before:  # converted already: keep its record
            layers[name] = before[name]
            continue
        if m is None or not is_linear(m):  # removed (or replaced) by structured pruning
            continue
        axis = out_axis(m)
        width, out = m.weight.shape[1 - axis], m.weight.shape[axis]
        lp = LayerPlan(_fit(lp.weight, width, name), lp.act)
        entry = {"in_features": width, "out_features": out, "bias": m.bias is not None}
        obs = getattr(m, "input_observer", None)
        dynamic = lp.act is not None and lp.act.observer == "dynamic"
        keep = keep_input_quant and backend is None and is_fake_quant(m) and (dynamic or (obs is not None and obs.ready))
        # a float weight baked by an earlier convert (or loaded so): where re-quantising is not a fixed point of the
        # grid ('full', 'full_no_clip', asymmetric), its exact codes are recovered and kept; None once it has moved
        # off the grid (trained further), and then it is quantised like any float weight. Fake-quantised layers
        # too: quantize_model inserts fake quantisation before converting, and a QAT run on a baked model trains
        # its float weights off the grid (then nothing is recovered)
        stored = None
        if name in before and not before_meta.get("backend") and not _fixed_point(lp.weight):
            w = m.weight.detach()
            # the search runs on the CPU (its bookkeeping tensors live there); the codes are copied to the layer
            stored = recover_grid((w.t() if axis == 1 else w).cpu().contiguous(), lp.weight) \
                if w.dtype == torch.float32 else None
        if is_fake_quant(m) and not keep:
            restore_layer(m)
        if keep:
            m.hfc_plan = lp
            if obs is not None:
                obs.observing = False
            entry["input_quant"] = "dynamic" if dynamic else [float(obs.lo), float(obs.hi)]
        if backend is None:
            if not getattr(m, "hfc_weight_on_grid", False) and stored is None:
                with torch.no_grad():
                    m.weight.copy_(fake_quantize_weight(m.weight.detach(), lp.weight, axis))
            if keep:  # its forward must not quantise the baked weight again (weight_range="full": not a fixed point)
                m.hfc_weight_on_grid = True
        else:
            replace_module(model, name, backend.convert(m, lp.weight, axis, stored=stored).train(m.training))
        layers[name] = {**lp.to_dict(), **entry}
    meta = {"version": FORMAT_VERSION, "backend": export, "layers": layers}
    emb = convert_embedding(model, embedding_bits, backend is not None,
                            get_metadata(model).get("quantization", {}).get("embedding"))
    if emb is not None:
        meta["embedding"] = emb
    if hasattr(model, "config"):
        record(model, "quantization", meta)
    return meta


def _fixed_point(scheme: QScheme) -> bool:
    """Whether quantising a weight already on `scheme`'s grid gives it back unchanged: symmetric 'restricted'
    (±max is a level, so the scale is found again) and NF4 (absmax is the level 1.0)."""
    return scheme.format == "nf4" or (scheme.symmetric and scheme.weight_range == "restricted")


def rebuild_quantized(model: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """Replace the recorded layers by empty low-bit layers of the recorded backend, before weights load.

    With ``backend: None`` the quantised weights were saved as floats: nothing to rebuild.
    """
    if not isinstance(meta, dict) or "layers" not in meta:
        raise ValueError(f"config.hf_compress['quantization'] is malformed: {meta!r:.200}")
    if meta.get("version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(
            f"This model was quantised by a newer hf_compress (format {meta['version']} > {FORMAT_VERSION}): upgrade hf_compress."
        )
    export = meta.get("backend")
    if not export:  # float weights already on the grid; static PTQ layers get their input ranges back
        kept = {n: d for n, d in meta["layers"].items() if d.get("input_quant")}
        if kept:
            insert_fake_quant(model, {n: LayerPlan.from_dict(d) for n, d in kept.items()})
            for name in kept:  # the saved weights are the baked ones
                model.get_submodule(name).hfc_weight_on_grid = True
            for name, d in kept.items():
                if d["input_quant"] != "dynamic":
                    lo, hi = d["input_quant"]
                    obs = model.get_submodule(name).input_observer
                    obs.load_state({"lo": torch.tensor(lo), "hi": torch.tensor(hi), "initialized": torch.tensor(True)})
                    obs.observing = False
        return model
    backend = get_backend(export)
    backend.require()
    emb = meta.get("embedding")
    if isinstance(emb, dict) and emb.get("stored") == "int8":
        new = Int8Embedding(emb["num_embeddings"], emb["embedding_dim"], emb.get("padding_idx"))
        old = getattr(model.get_submodule(emb["name"]), "weight", None)  # the Auto-class path parks it: no weight
        dtype = old.dtype if isinstance(old, torch.Tensor) and old.is_floating_point() else getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:  # from_pretrained(dtype=float16): 16-bit output
            new.weight_scale = new.weight_scale.to(dtype)
        replace_module(model, emb["name"], new)
    for name, d in meta["layers"].items():
        lp = LayerPlan.from_dict(d)
        try:
            replace_module(model, name, backend.empty(d["in_features"], d["out_features"], d["bias"], lp.weight))
        except AttributeError as e:
            raise ValueError(f"Quantised layer {name!r} recorded in config.json does not exist in {type(model).__name__}.") from e
    return model


def quantize_model(*args, **kwargs):
    from .ptq import quantize_model as _q

    return _q(*args, **kwargs)


quantize_model.__doc__ = "PTQ entry point; see hf_compress.quantization.ptq.quantize_model."
