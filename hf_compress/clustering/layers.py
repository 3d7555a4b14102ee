"""Clustered (weight-shared) Linear / Conv1D layers during training, and the codebook + indices format on disk.

Training: the layer's class is swapped for a subclass whose forward uses

    weight = centroids.reshape(-1)[index]          index = k * group + assignment  (int64, W's shape)

a parametrisation: autograd's backward of that gather is a scatter-add, so each centroid's gradient is the
sum of its members' gradients. `clustering_centroids` ([G, k]) is a registered Parameter (gradient clipping
and `model.parameters()` see it); the assignments are a non-persistent buffer. Before the assignments are
frozen the forward value is the same clustered weight, but the gradient goes to the dense `weight` (straight
through), which is re-clustered on a schedule; once frozen only the centroids train. The state_dict keeps
the plain model's keys (`weight`: the dense latent before freezing, the clustered values after; no centroid
key), so every checkpoint loads into the unclustered model and a resume rebuilds the rest from the callback's
state.

On disk (after `convert`): a clustered weight ``NAME`` ([rows, cols]) is saved as

    NAME.codebook   the weight's dtype, [G, 2^b]: each group's shared values (sorted, padded with the last)
    NAME.indices    uint8 [ceil(rows * cols * b / 8)]: the b-bit indices, group-major, packed (kmeans.pack)

written by a ``state_dict`` post-hook and read back by a ``load_state_dict`` pre-hook (every save and load path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import out_axis
from .kmeans import group_index, grouped, kmeans, pack, packed_bytes, ungrouped, unpack

PARTS = ("codebook", "indices")


class ClusteredMixin:
    """Forward of a clustered Linear (or GPT-2 Conv1D, whose weight is [in, out])."""

    hfc_base: type
    hfc_axis: int
    hfc_groups: int
    hfc_bits: int
    hfc_frozen: bool

    def clustered_weight(self) -> torch.Tensor:
        w = self.clustering_centroids.reshape(-1)[self.hfc_index]
        if not self.hfc_frozen:  # value: the clustered weight; gradient: to the dense weight (straight through)
            latent = self.weight
            w = w.detach().to(latent.dtype) + (latent - latent.detach())
        return w.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.clustered_weight()
        if self.hfc_axis == 1:  # Conv1D: y = x @ W + b
            w = w.t()
        return F.linear(x, w, self.bias)

    def assignments(self) -> torch.Tensor:
        """int64 [G, n]: each entry's index into its group's codebook."""
        k = 2 ** self.hfc_bits
        return grouped(self.hfc_index, self.hfc_groups, self.hfc_axis) % k


_CLASSES: dict[type, type] = {}


def _clustered_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Clustered{cls.__name__}", (ClusteredMixin, cls), {"hfc_base": cls})
    return _CLASSES[cls]


def is_clustered(module: nn.Module) -> bool:
    return isinstance(module, ClusteredMixin)


def clustered_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_clustered(m)}


def _train_save_hook(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "clustering_centroids", None)
    if module.hfc_frozen and prefix + "weight" in state_dict:
        state_dict[prefix + "weight"] = module.clustered_weight().detach()


def _train_load_post_hook(module, incompatible):
    key = [k for k in incompatible.missing_keys if k.endswith("clustering_centroids")]
    for k in key:
        incompatible.missing_keys.remove(k)


def saved_weight(module: nn.Module) -> torch.Tensor:
    """What the state_dict holds as `weight` now (the clustered values once frozen, else the dense weight)."""
    if is_clustered(module) and module.hfc_frozen:
        with torch.no_grad():
            return module.clustered_weight().detach()
    return module.weight.detach()


@torch.no_grad()
def cluster_layer(module: nn.Module, groups: int, bits: int, centroids: torch.Tensor | None = None,
                  assignments: torch.Tensor | None = None, frozen: bool = True, init: str = "linear",
                  iters: int = 20) -> nn.Module:
    """Make `module` clustered in place: k-means of its weight (or the given centroids [G, k] and assignments
    [G, n]); `frozen`: only the centroids train. Returns the module."""
    axis = out_axis(module)
    w = module.weight
    k = 2 ** bits
    if centroids is None:
        centroids, assignments = kmeans(grouped(w, groups, axis), k, iters, init)
    index = group_index(tuple(w.shape), groups, k, axis, w.device) + ungrouped(assignments.to(w.device).long(), tuple(w.shape), axis)
    if not is_clustered(module):
        module.__class__ = _clustered_class(type(module))
        module._hfc_train_hooks = (module.register_state_dict_post_hook(_train_save_hook),
                                   module.register_load_state_dict_post_hook(_train_load_post_hook))
    module.hfc_axis, module.hfc_groups, module.hfc_bits = axis, groups, bits
    module.register_buffer("hfc_index", index, persistent=False)
    old = module._parameters.get("clustering_centroids")
    data = centroids.to(device=w.device, dtype=w.dtype).contiguous()
    if old is None:
        module.clustering_centroids = nn.Parameter(data, requires_grad=frozen)
    else:  # keep the Parameter object (the optimizer may hold it)
        old.data = data
        old.requires_grad_(frozen)
    set_frozen(module, frozen)
    return module


def set_frozen(module: nn.Module, frozen: bool) -> None:
    module.hfc_frozen = frozen
    module.clustering_centroids.requires_grad_(frozen)
    module.weight.requires_grad_(not frozen)
    if frozen:
        module.weight.grad = None
    else:
        module.clustering_centroids.grad = None


@torch.no_grad()
def refresh(module: nn.Module, iters: int = 20) -> None:
    """Re-cluster the dense weight, warm-started from the current centroids (before freezing)."""
    k = 2 ** module.hfc_bits
    c, a = kmeans(grouped(module.weight, module.hfc_groups, module.hfc_axis), k, iters, module.clustering_centroids)
    cluster_layer(module, module.hfc_groups, module.hfc_bits, c, a, frozen=module.hfc_frozen)


@torch.no_grad()
def bake(module: nn.Module, keep_weight: bool = False) -> nn.Module:
    """The layer back to its own class with `weight` = the clustered values (exact), or, `keep_weight`, the
    dense weight it holds; returns it."""
    if not is_clustered(module):
        return module
    w = module.weight.detach().clone() if keep_weight else module.clustered_weight().detach().clone()
    for h in module._hfc_train_hooks:
        h.remove()
    del module._parameters["clustering_centroids"]
    del module._buffers["hfc_index"]
    module.__class__ = module.hfc_base
    module.weight.data = w
    module.weight.requires_grad_(True)
    module.weight.grad = None
    return module


# ----------------------------------------------------------------------------- codebook + indices on disk


def distinct_per_group(w: torch.Tensor, groups: int, axis: int) -> int:
    x = grouped(w, groups, axis)
    return max(int(torch.unique(row).numel()) for row in x)


def encode(w: torch.Tensor, groups: int, bits: int, axis: int) -> dict[str, torch.Tensor]:
    """{"codebook", "indices"} of a weight with at most 2^bits distinct values per group."""
    k = 2 ** bits
    x = grouped(w, groups, axis)
    books, idx = [], []
    for row in x:
        values, inverse = torch.unique(row, sorted=True, return_inverse=True)
        if values.numel() > k:
            raise ValueError(f"a group holds {values.numel()} distinct values, more than 2^{bits}={k}: the weight was "
                             "changed after clustering. Run hf_compress.clustering.convert again.")
        books.append(torch.cat([values, values[-1:].expand(k - values.numel())]))
        idx.append(inverse)
    return {"codebook": torch.stack(books).contiguous(), "indices": pack(torch.stack(idx), bits)}


def decode(parts: dict[str, torch.Tensor], shape: tuple[int, int], groups: int, bits: int, axis: int,
           name: str = "weight") -> torch.Tensor:
    """The dense weight; ValueError when the parts do not fit `shape` / groups / bits."""
    k = 2 ** bits
    book, packed = parts["codebook"], parts["indices"]
    n = shape[0] * shape[1]
    if not book.is_floating_point() or tuple(book.shape) != (groups, k):
        raise ValueError(f"{name}.codebook is {book.dtype} {list(book.shape)}, not a float [{groups}, {k}] codebook.")
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (packed_bytes(n, bits),):
        raise ValueError(f"{name}.indices is {packed.dtype} {list(packed.shape)}, not uint8 [{packed_bytes(n, bits)}] "
                         f"({n} entries of {bits} bits).")
    a = unpack(packed, bits, n).view(groups, -1)
    return ungrouped(torch.gather(book, 1, a), shape, axis)


def _export_save_hook(module, state_dict, prefix, local_metadata):
    key = prefix + "weight"
    w = state_dict.get(key)
    if not isinstance(w, torch.Tensor) or type(w.detach()) is not torch.Tensor or w.dim() != 2:
        return
    groups, bits, axis = module._hfc_export
    del state_dict[key]
    for part, t in encode(w.detach(), groups, bits, axis).items():
        state_dict[f"{key}.{part}"] = t


def _export_load_hook(module, state_dict, prefix, *args):
    key = prefix + "weight"
    found = {p: f"{key}.{p}" in state_dict for p in PARTS}
    if not any(found.values()):
        return  # stored dense
    if not all(found.values()):
        raise ValueError(f"{key}: {[p for p, f in found.items() if not f]} missing beside the clustered parts.")
    groups, bits, axis = module._hfc_export
    parts = {p: state_dict.pop(f"{key}.{p}") for p in PARTS}
    state_dict[key] = decode(parts, tuple(module.weight.shape), groups, bits, axis, key)


def attach_export(module: nn.Module, groups: int, bits: int) -> None:
    """Save `module.weight` as codebook + packed indices and read it back on load (idempotent)."""
    module._hfc_export = (groups, bits, out_axis(module))
    if getattr(module, "_hfc_cluster_hooks", None) is None:
        module._hfc_cluster_hooks = (module.register_state_dict_post_hook(_export_save_hook),
                                     module.register_load_state_dict_pre_hook(_export_load_hook))


def detach_export(module: nn.Module) -> None:
    for h in getattr(module, "_hfc_cluster_hooks", None) or ():
        h.remove()
    module._hfc_cluster_hooks = None
