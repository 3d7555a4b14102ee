"""Weight clustering (k-means weight sharing, as in Deep Compression) on bare nn.Modules.

Life cycle (the same names as every technique):
    prepare(model, config)          the plan: targeted layers and their codebook groups (checked: targets match,
                                    group sizes divide the widths); `activate` clusters them (k-means)
    ... training (ClusteringCallback: re-clustering on a schedule, then frozen assignments, trained centroids) ...
    convert(model, config)          what ships: weights set to their clustered values (exact), saved as codebook +
                                    b-bit packed indices; recorded in config.hf_compress["clustering"]; idempotent
Also: rebuild_clustered / load_clustered_weights (the reload paths of hf_compress.loading / integration),
check_clustering_record (metadata validated before anything is allocated), replace_in_optimizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..metadata import get_metadata, record
from ..modules import is_linear, local_name as _local, out_axis, select_modules, unwrap
from ..sharding import is_sharded
from .config import ClusteringConfig
from .kmeans import kmeans, pack, packed_bytes, unpack
from .layers import (PARTS, attach_export, bake, cluster_layer, clustered_layers, decode, detach_export,
                     distinct_per_group, encode, is_clustered, refresh, saved_weight, set_frozen)

FORMAT = "codebook-indices"
FORMAT_VERSION = 1
SECTION = "clustering"

__all__ = [
    "ClusteringConfig", "LayerPlan", "activate", "attach_export", "bake", "build_plan", "check_clustering_record",
    "cluster_layer", "clustered_layers", "convert", "decode", "encode", "is_clustered", "kmeans", "load_clustered_weights",
    "pack", "prepare", "rebuild_clustered", "refresh", "replace_in_optimizer", "saved_weight", "set_frozen", "unpack",
]


@dataclass(frozen=True)
class LayerPlan:
    groups: int
    bits: int


def build_plan(model: nn.Module, config: ClusteringConfig) -> dict[str, LayerPlan]:
    """{layer name: LayerPlan} of the targeted Linear layers; ValueError naming the field on bad input."""
    model = unwrap(model)
    chosen = select_modules(model, config.clustering_targets, config.clustering_exclude, field="clustering_targets")
    plan = {}
    for name, m in chosen.items():
        out = m.weight.shape[out_axis(m)]
        g = config.clustering_group_size
        if g is not None and (g > out or out % g):
            raise ValueError(
                f"ClusteringConfig.clustering_group_size={g} does not divide the output width {out} of {name}: use a "
                f"divisor of every targeted layer's output width (e.g. {_divisor(out, g)}), or None (one codebook per layer)."
            )
        groups = 1 if g is None else out // g
        if m.weight.numel() // groups < config.clusters:
            raise ValueError(
                f"ClusteringConfig.clustering_bits={config.clustering_bits}: {name} has {m.weight.numel() // groups} "
                f"weights per codebook, fewer than the {config.clusters} clusters; lower clustering_bits or use larger "
                "groups (clustering_group_size)."
            )
        plan[name] = LayerPlan(groups, config.clustering_bits)
    return plan


def _divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


def prepare(model: nn.Module, config: ClusteringConfig, frozen: bool = True) -> dict[str, LayerPlan]:
    """Cluster the targeted layers in place (k-means); returns the plan. `frozen`: only the centroids train."""
    plan = build_plan(model, config)
    activate(model, plan, config, frozen=frozen)
    return plan


def _refuse_sharded(model: nn.Module, what: str) -> None:
    if any(is_sharded(p) for p in model.parameters()):
        raise ValueError(f"clustering.{what} needs the full model, not FSDP2 shards: gather it with "
                         "hf_compress.sharding.full_state_dict(model) into an unsharded copy first.")


def activate(model: nn.Module, plan: dict[str, LayerPlan], config: ClusteringConfig, frozen: bool = True,
             state: dict[str, torch.Tensor] | None = None) -> None:
    """Cluster the planned layers: k-means of their weights, or the centroids / assignments in `state`
    ({f"{name}.centroids": [G, k], f"{name}.assignments": [G, n]})."""
    model = unwrap(model)
    _refuse_sharded(model, "activate")
    for name, p in plan.items():
        m = model.get_submodule(name)
        if state is not None:
            cluster_layer(m, p.groups, p.bits, state[f"{name}.centroids"], state[f"{name}.assignments"], frozen=frozen)
        else:
            cluster_layer(m, p.groups, p.bits, frozen=frozen, init=config.kmeans_init, iters=config.kmeans_iters)


def replace_in_optimizer(optimizer, old: torch.Tensor, new: torch.Tensor) -> bool:
    """Put `new` where `old` is in the optimizer's param groups (same group, same position, so the layout of
    `optimizer.state_dict()` stays that of the model's own parameters). `old`'s state moves to `new` when its
    shapes fit `new` (a resumed run: the Trainer loaded the saved centroid state under the old parameter), else
    it is dropped. Returns False when `old` is in no group (then `new` is not trained)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                st = opt.state.pop(old, None)
                if st and all(not torch.is_tensor(v) or v.dim() == 0 or v.shape == new.shape for v in st.values()):
                    opt.state[new] = st
                return True
    return False


@torch.no_grad()
def convert(model: nn.Module, config: ClusteringConfig, plan: dict[str, LayerPlan] | None = None) -> dict:
    """What ships: every planned layer's weight set to its clustered values (a clustered layer's exact
    `centroids[assignments]`; a dense one is clustered now by k-means), saved as codebook + packed indices;
    recorded in ``config.hf_compress["clustering"]``. Idempotent: a weight already holding at most 2^b distinct
    values per group is kept as it is."""
    model = unwrap(model)
    _refuse_sharded(model, "convert")
    if plan is None:
        done = (get_metadata(model).get(SECTION) or {}).get("layers") or {}
        plan = build_plan(model, config) if not done else {n: LayerPlan(d["groups"], d["bits"]) for n, d in done.items()}
    layers = {}
    for name, p in plan.items():
        m = model.get_submodule(name)
        if is_clustered(m):
            bake(m)
        elif distinct_per_group(m.weight, p.groups, out_axis(m)) > 2 ** p.bits:
            cluster_layer(m, p.groups, p.bits, init=config.kmeans_init, iters=config.kmeans_iters)
            bake(m)
        attach_export(m, p.groups, p.bits)
        layers[name] = {"bits": p.bits, "groups": p.groups}
    result = {"format": FORMAT, "version": FORMAT_VERSION, "layers": layers}
    record(model, SECTION, result)
    return result


# ----------------------------------------------------------------------------- reloading


def recorded_layers(meta: dict) -> dict[str, dict]:
    c = meta.get(SECTION) if isinstance(meta, dict) else None
    return (c.get("layers") or {}) if isinstance(c, dict) else {}


def check_clustering_record(skeleton: nn.Module, meta: dict, headers: dict | None = None) -> None:
    """Before allocating: ``hf_compress.clustering`` is well formed, each recorded layer is a Linear of the
    (meta-device) architecture whose widths the groups divide, and — given the safetensors headers
    ({name: (dtype, shape)}) — its codebook and indices have the shapes the record implies."""
    c = meta.get(SECTION)
    if c is None:
        return
    if not isinstance(c, dict) or c.get("format") != FORMAT or not isinstance(c.get("layers"), dict):
        raise ValueError(f"config.json: hf_compress.clustering {c!r:.200} is not a clustering record of this hf_compress "
                         f"(format {FORMAT!r} with a 'layers' object).")
    if c.get("version") != FORMAT_VERSION:
        raise ValueError(f"config.json: clustering format version {c.get('version')!r}: upgrade hf_compress.")
    modules = dict(skeleton.named_modules())
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    for name, d in c["layers"].items():
        local = _local(skeleton, name, modules)
        m = modules.get(local) if local is not None else None
        if m is None or not is_linear(m):
            raise ValueError(f"config.json: clustered layer {name!r} is not a Linear layer of {type(skeleton).__name__}.")
        ok = isinstance(d, dict) and all(isinstance(d.get(k), int) and not isinstance(d.get(k), bool) for k in ("bits", "groups"))
        if not ok or not 1 <= d["bits"] <= 8 or d["groups"] <= 0 or m.weight.shape[out_axis(m)] % d["groups"]:
            raise ValueError(f"config.json: clustered layer {name!r} records {d!r:.200}; it needs bits in 1..8 and a "
                             f"number of groups dividing its output width {m.weight.shape[out_axis(m)]}.")
        if headers is None:
            continue
        key = next((k for k in (f"{name}.weight", f"{local}.weight", f"{prefix}.{local}.weight")
                    if f"{k}.codebook" in headers or k in headers), None)
        if key is None or key in headers:
            continue  # absent (check_checkpoint reports it) or stored dense
        n = m.weight.numel()
        want = {"codebook": ((d["groups"], 2 ** d["bits"]),), "indices": (("U8",), (packed_bytes(n, d["bits"]),))}
        book, idx = headers.get(f"{key}.codebook"), headers.get(f"{key}.indices")
        if book is None or idx is None or book[1] != want["codebook"][0] or book[0] not in ("F32", "F16", "BF16", "F64") \
                or idx != ("U8", want["indices"][1]):
            raise ValueError(f"config.json: clustered weight {key!r}: stored codebook {book} / indices {idx} do not fit "
                             f"{d['groups']} group(s) of {2 ** d['bits']} values over {list(m.weight.shape)} "
                             f"(want float {list(want['codebook'][0])} and U8 {list(want['indices'][1])}).")


def rebuild_clustered(model: nn.Module, meta: dict) -> dict[str, str]:
    """Attach the codebook load / save hooks to the recorded layers; {local weight name: recorded weight name}."""
    model = unwrap(model)
    modules = dict(model.named_modules())
    out = {}
    for name, d in recorded_layers(meta).items():
        local = _local(model, name, modules)
        if local is not None:
            attach_export(modules[local], d["groups"], d["bits"])
            out[f"{local}.weight"] = f"{name}.weight"
    return out


def clustered_ignore_patterns(model: nn.Module, meta: dict) -> tuple[set[str], set[str]]:
    """(unexpected, missing) key patterns for transformers' load report: the codebook parts are read by
    `load_clustered_weights`, not by transformers."""
    names = recorded_layers(meta)
    if not names:
        return set(), set()
    modules = dict(unwrap(model).named_modules())
    missing = {rf"(^|\.){re.escape(local)}\.weight$" for n in names
               for local in [_local(unwrap(model), n, modules)] if local is not None}
    return {r"\.weight\.(codebook|indices)$"}, missing


@torch.no_grad()
def load_clustered_weights(model: nn.Module, meta: dict, files) -> None:
    """After transformers loaded everything else (Auto classes): decode each recorded weight from `files` into the
    model and attach the hooks that keep it clustered on the next save."""
    from safetensors import safe_open

    local = rebuild_clustered(model, meta)  # {local weight name: recorded name}
    if not local:
        return
    wanted = {rec: loc for loc, rec in local.items()}
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for rec in wanted:
                if f"{rec}.codebook" in keys:
                    found[rec] = {p: f.get_tensor(f"{rec}.{p}") for p in PARTS}
    model = unwrap(model)
    for rec, loc in wanted.items():
        if rec not in found:
            continue  # stored dense: transformers loaded it
        module = model.get_submodule(loc.rsplit(".", 1)[0])
        groups, bits, axis = module._hfc_export
        param = module.weight
        dense = decode(found[rec], tuple(param.shape), groups, bits, axis, rec)
        param.data = dense.to(device=param.device if param.device.type != "meta" else "cpu", dtype=param.dtype)
