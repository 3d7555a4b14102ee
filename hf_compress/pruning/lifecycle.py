"""The pruning life cycle on a bare model: `prepare` → training (the callback drives the `Pruner`) → `convert`."""

from __future__ import annotations

import re  # sensitivity
import warnings

import torch
from torch import nn

from ..metadata import get_metadata, record
from ..modules import select_modules, unwrap
from ..sharding import is_sharded, local, sum_shards
from .pruner import Pruner, unit_layers
from .structured import check_uniform, is_uniform, remove_pruned


def prepare(model: nn.Module, config) -> Pruner:
    """The `Pruner` (masks and scores) of the layers `config` (a PruningConfig) targets; checks the target.
    With ``config.uniform`` the units are ranked within each layer (every layer loses the same number) and
    the model is checked to be one whose stock config can describe the result (`check_uniform`)."""
    c = config
    uniform = getattr(c, "uniform", False)
    # uniform: every layer loses round(s * units) of its own lowest-scoring units — per-layer ranking ("local")
    scope = "local" if uniform else c.scope
    pruner = Pruner(model, c.method, c.granularity, scope, c.n, c.m, c.pruning_targets, c.pruning_exclude)
    pruner.check_target(c.target_sparsity)
    if getattr(c, "layer_sparsity", None):  # sensitivity: per-layer targets
        per = [c.sparsity_of(x) for x in pruner.names]
        unused = [p for p in c.layer_sparsity if not any(re.search(p, x) for x in pruner.names)]
        if unused:
            raise ValueError(f"PruningConfig.layer_sparsity: {unused} match no targeted layer of {type(unwrap(model)).__name__} "
                             f"(targeted layers look like {pruner.names[:3]}); fix the regexes or pruning_targets.")
        pruner.set_layer_sparsity(per, c.target_sparsity)
    if uniform:
        check_uniform(model, c.granularity, c.target_sparsity, pruner.groups)
    return pruner


@torch.no_grad()
def measured_sparsity(model: nn.Module, config) -> float | None:
    """Fraction of exactly-zero weights in the (float Linear) layers `config` prunes, read from the weights
    themselves; None when there are none (e.g. all converted to low-bit layers already). Structured: the
    layers of its units only (the attention projections for heads, the FFN for neurons), as its Pruner and its
    training logs count them."""
    zeros = total = 0
    model = unwrap(model)
    chosen = select_modules(model, config.pruning_targets, config.pruning_exclude, require=False)
    if config.structured and chosen:
        chosen = {x: chosen[x] for x in unit_layers(model, config.granularity, chosen)[1]}
    for w in (module.weight for module in chosen.values()):
        zeros += int(sum_shards((local(w.detach()) == 0).sum(), w))
        total += w.numel()
    return zeros / total if total else None


def convert(model: nn.Module, config, name: str | None = None, sparsity: float | None = None) -> dict | None:
    """Make what training pruned into what ships, from the weights as they are now; idempotent.

    Structured granularities with ``remove_pruned``: every unit whose consuming weights are all zero and
    every layer marked as skipped is deleted (`remove_pruned`; the logits do not change). Always: the
    run is recorded in ``config.hf_compress["pruning"]["runs"]`` under `name` (default: the config's
    tag; converting again replaces the entry), with the sparsity *measured* on the weights — after a
    best-model reload that is the reloaded checkpoint's, never the schedule's claim. A structured conversion
    that finds nothing left to remove keeps the figure recorded before (the zeros left with the units).
    Structured removal needs the full model: under FSDP2 gather first. Returns what was removed (structured)
    or None.

    `sparsity`: the run's own measure, recorded instead of the one read from the weights. `PruningCallback`
    passes it, from its masks (after a best-model reload, the reloaded checkpoint's): structured, the fraction
    of its units removed; else of its targeted weights zeroed. Zeros alone cannot tell whose they are: runs
    overlap (layers with heads / neurons, unstructured with any), and the first removal takes every all-zero
    unit out, the other runs' zeros too. Converting two structured runs by hand, pass each its
    `sparsity=pruner.unit_sparsity()` (`prepare` returns the Pruner), or the second records 0.0.
    """
    model = unwrap(model)
    c = config
    meta = get_metadata(model).get("pruning", {})
    name = name or c.tag
    before = next((r for r in meta.get("runs", []) if r.get("name") == name), {})
    given = sparsity is not None
    if not given:
        sparsity = measured_sparsity(model, c)
    info = {
        "name": name,
        "granularity": c.granularity if c.granularity != "n:m" else f"{c.n}:{c.m}",
        "method": c.method,
        "target_sparsity": c.target_sparsity,
        "sparsity": round(sparsity, 6) if sparsity is not None else before.get("sparsity"),
    }
    if getattr(c, "uniform", False):
        info["uniform"] = True
    runs = [r for r in meta.get("runs", []) if r.get("name") != name]
    removed = None
    if c.structured and c.remove_pruned:
        if any(is_sharded(p) for p in model.parameters()):
            raise ValueError(
                "Removing pruned heads / neurons / layers needs the full model, but its parameters are FSDP2 shards "
                "(DTensor): gather them first (hf_compress.sharding.full_state_dict) into an unsharded copy and convert "
                "that, or set remove_pruned=False (zeros stay in place)."
            )
        removed = remove_pruned(model)
        meta = get_metadata(model)["pruning"]
        if before and not any(removed[k] for k in ("layers", "heads", "neurons")) and not given:
            # converted before: its zeros left with the units it removed, so the weights now read 0
            info["sparsity"] = before.get("sparsity")
        if getattr(c, "uniform", False) and not is_uniform(model):
            warnings.warn(
                f"PruningConfig.uniform=True, but the layers now differ ({meta.get('heads')} heads, {meta.get('ffn')} "
                "FFN neurons): some other units were all zero too, or the model was pruned non-uniformly before. "
                "The export needs hf_compress to load (its config says so).", stacklevel=2,
            )
    meta["runs"] = runs + [info]
    record(model, "pruning", meta)
    return removed
