"""`Pruner`: the masks and scores of one model, and the operations a training loop needs.

Framework-free (bare `nn.Module` + tensors): the Trainer callback, the CLI and tests drive it. Every
per-step operation is a fused foreach op over the targeted weights; nothing loops over elements and
nothing syncs with the host except reading the sparsity for logs.

Under FSDP2 (DTensor parameters) masks and scores are this rank's shards and the per-step ops stay local;
a mask update gathers the full scores, computes the same masks an unsharded run would (one global
threshold over every shard), and keeps this rank's shard of them (`hf_compress.sharding`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..modules import find_blocks, is_plain_linear, out_axis, select_modules, unwrap
from ..sharding import full, local, shard, sum_shards
from . import scores as S
from .masks import GRANULARITIES, STRUCTURED, apply_masks, nm_masks, spread, unit_masks, unit_sum, unstructured_masks
from .structured import set_layer_skip, unit_groups


def check_plain(selected: dict[str, nn.Module]) -> None:
    """Pruning masks float weights: plain Linear layers, or ones QAT fake-quantises while training (their
    float weight is what the mask zeroes, and 0.0 is on every grid)."""
    for name, module in selected.items():
        if not is_plain_linear(module):
            raise ValueError(
                f"`{name}` is a {type(module).__name__}, not a plain Linear: it was already converted "
                "(by a quantized export, quantize_model, low-rank factorisation or clustering). Pruning sets its "
                "masks up on float Linear layers: prune the model before converting it (PruningCallback and "
                "QATCallback in one Trainer work in either order), or start from the float model."
            )


def unit_layers(model: nn.Module, granularity: str, selected) -> tuple[list, list[str]]:
    """The `granularity` units (heads, neurons, layers) whose every Linear is in `selected`, and the names of
    those Linears: what a structured run prunes (the attention projections for heads, the FFN for neurons)."""
    groups = [g for g in unit_groups(model, granularity) if all(p in selected for p, _ in g.parts)]
    return groups, list(dict.fromkeys(p for g in groups for p, _ in g.parts))


class Pruner:
    """Masks (1 = kept, 0 = pruned, in the weights' dtype) over the weights of the targeted Linear layers of `model`."""

    def __init__(
        self,
        model: nn.Module,
        method: str = "magnitude",
        granularity: str = "unstructured",
        scope: str = "global",
        n: int = 2,
        m: int = 4,
        targets=None,
        exclude=None,
    ):
        if granularity not in GRANULARITIES:
            raise ValueError(f"`granularity`={granularity!r} is not one of {GRANULARITIES}.")
        self.model = unwrap(model)
        self.method, self.granularity, self.scope, self.n, self.m = method, granularity, scope, n, m
        selected = select_modules(self.model, targets, exclude, field="pruning_targets")
        check_plain(selected)
        self.groups = []
        if granularity in STRUCTURED and any(".base_layer" in x for x in selected):
            raise ValueError(
                f"`granularity`={granularity!r} on a PEFT model is not supported: removing units would have to "
                "shrink the adapters too. Prune the plain model (before get_peft_model, or after merge_and_unload), "
                "or use granularity='unstructured' / 'n:m' with method='magnitude'."
            )
        if granularity in STRUCTURED:
            self.groups, names = unit_layers(self.model, granularity, selected)
            if not self.groups:
                raise ValueError(
                    f"`pruning_targets`={targets!r} / `pruning_exclude`={exclude!r} cover no complete {granularity} unit: "
                    f"structured pruning needs every Linear of a unit selected (e.g. all of a layer's attention "
                    f"projections for heads). Selected: {list(selected)[:6]}..."
                )
        else:
            names = list(selected)
        self.names = names
        self.modules = [self.model.get_submodule(x) for x in names]
        self.weights = [mod.weight for mod in self.modules]
        self.index = {x: i for i, x in enumerate(names)}
        self.in_dims = [1 - out_axis(mod) for mod in self.modules]
        if granularity == "n:m":
            bad = [x for x, w, d in zip(names, self.weights, self.in_dims) if w.shape[d] % m]
            if bad:
                raise ValueError(f"N:M pruning needs input sizes divisible by m={m}; these are not: {bad[:5]}. Exclude them.")
        # masks in the weights' dtype: a fused float multiply is ~2x faster than one with bool masks
        self.masks = [torch.ones_like(w) for w in self._local()]
        self.active = False  # nothing pruned yet: the per-step multiplies are skipped
        self.units = [torch.ones(g.n_units, dtype=torch.bool, device=self.weights[0].device) for g in self.groups]
        self.scores = S.init_scores(self._local(), method, self.names)
        self.layer_sparsity, self.target = None, 1.0  # sensitivity: per-module targets (set_layer_sparsity)

    def set_layer_sparsity(self, per_module: list[float | None], target: float) -> None:  # sensitivity
        """Unstructured: module i is pruned (alone) to per_module[i] when the schedule reaches `target`, to
        per_module[i] x sparsity / target before; modules with None share the scheduled sparsity (by scope)."""
        if self.granularity != "unstructured" or len(per_module) != len(self.names):
            raise ValueError("per-layer sparsity needs unstructured pruning and one entry per targeted module.")
        self.layer_sparsity, self.target = list(per_module), float(target)

    def _local(self) -> list[torch.Tensor]:
        """This rank's piece of each targeted weight (the weight itself unless FSDP2 sharded it)."""
        return [local(w) for w in self.weights]

    def gather(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full tensors from per-weight local pieces (masks, scores, snapshots); collective under FSDP2."""
        return [full(x, w) for x, w in zip(pieces, self.weights)]

    def scatter(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's pieces of full per-weight tensors."""
        return [shard(x.to(w.device), w) for x, w in zip(tensors, self.weights)]

    # ------------------------------------------------------------------ checks
    def bound(self) -> int | None:
        """Most units that may go in total (structured), None otherwise."""
        if not self.groups:
            return None
        total = sum(g.n_units for g in self.groups)
        return total - (1 if self.granularity == "layers" else len(self.groups))

    def check_target(self, target: float) -> None:
        """ValueError when `target` would remove more units than exist (every layer keeps one head/neuron,
        the model keeps one layer)."""
        if not self.groups:
            return
        kind = self.granularity
        if self.scope == "local" and kind != "layers":
            for g in self.groups:
                if round(target * g.n_units) >= g.n_units:
                    raise ValueError(
                        f"target_sparsity={target} would remove {round(target * g.n_units)} of the {g.n_units} {kind} "
                        f"of layer {g.layer}, but every layer keeps at least one: lower target_sparsity."
                    )
            return
        total = sum(g.n_units for g in self.groups)
        k = round(target * total)
        if k > self.bound():
            keep = "the model keeps at least one layer" if kind == "layers" else f"each of the {len(self.groups)} layers keeps at least one"
            raise ValueError(
                f"target_sparsity={target} would remove {k} of the {total} {kind}, but at most {self.bound()} "
                f"can go ({keep}): lower target_sparsity."
            )

    @property
    def needs_grads(self) -> bool:
        return self.method in S.NEEDS_GRADS

    def same_model(self, model: nn.Module) -> bool:
        """True while the targeted weights are still the model's (no module was replaced since);
        follows the model to another device."""
        model = unwrap(model)
        try:
            same = all(model.get_submodule(x).weight is w for x, w in zip(self.names, self.weights))
        except AttributeError:
            return False
        dev = self.weights[0].device
        if same and self.masks[0].device != dev:
            self.masks = [mk.to(dev) for mk in self.masks]
            self.scores = [s.to(dev) for s in self.scores]
            self.units = [u.to(dev) for u in self.units]
        return same

    # ------------------------------------------------------------------ per step
    def accumulate(self) -> None:
        """Add this step's gradient contribution to the scores (movement / taylor)."""
        if self.needs_grads:
            S.accumulate(self.scores, self._local(), self.method, [local(w.grad) for w in self.weights])

    def mask_grads(self) -> None:
        if self.active:
            apply_masks([local(w.grad) for w in self.weights], self.masks)

    def apply(self) -> None:
        if self.active:
            apply_masks(self._local(), self.masks)

    def _set(self, masks: list[torch.Tensor], active: bool) -> None:
        """Full masks in; this rank's pieces kept, in the weights' dtype."""
        self.masks = [m.to(w.dtype) for m, w in zip(self.scatter(masks), self._local())]
        self.active = active

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        """Recompute the masks for `sparsity` from the current scores, and apply them."""
        sc = self.gather(S.current(self.scores, self._local(), self.method))
        if self.granularity == "unstructured" and self.layer_sparsity is not None:  # sensitivity: per-layer targets
            masks, free = [None] * len(sc), [i for i, s in enumerate(self.layer_sparsity) if s is None]
            p = sparsity / self.target if self.target > 0 else 0.0  # where the schedule is, as a fraction of its end
            for i, s in enumerate(self.layer_sparsity):
                if s is not None:
                    masks[i] = unstructured_masks([sc[i]], s * p, "local")[0]
            for i, mk in zip(free, unstructured_masks([sc[i] for i in free], sparsity, self.scope) if free else []):
                masks[i] = mk
            self._set(masks, sparsity > 0)
        elif self.granularity == "unstructured":
            self._set(unstructured_masks(sc, sparsity, self.scope), sparsity > 0)
        elif self.granularity == "n:m":
            zeros = min(self.n, math.floor(sparsity * self.m + 1e-6))  # gradual: 0, 1, ..., n zeros per group
            self._set(nm_masks(sc, zeros, self.m, self.in_dims), zeros > 0)
        else:
            unit_scores = [
                sum(unit_sum(sc[self.index[x]], d, g.n_units, g.segments.get(x, 1)) for x, d in g.parts)
                for g in self.groups
            ]
            layers = self.granularity == "layers"
            self.units = unit_masks(unit_scores, sparsity, "global" if layers else self.scope, keep_one=not layers)
            self._spread()
        self.apply()

    def _spread(self) -> None:
        masks = [None] * len(self.weights)  # every targeted weight belongs to some unit group
        for g, keep in zip(self.groups, self.units):
            for x, d in g.parts:
                i = self.index[x]
                shape = torch.empty((), device=keep.device).expand(self.weights[i].shape)  # the full shape
                masks[i] = spread(keep, d, shape, g.segments.get(x, 1))
        self._set(masks, not all(bool(u.all()) for u in self.units))
        if self.granularity == "layers":
            blocks = find_blocks(self.model)[1]
            for g, keep in zip(self.groups, self.units):
                set_layer_skip(blocks[g.layer], not bool(keep.all()))

    # ------------------------------------------------------------------ reading
    @torch.no_grad()
    def sparsity(self, per_module: bool = False):
        """Fraction of exact zeros kept by the masks (overall, or {module: fraction})."""
        # under FSDP2: this rank's count plus the other shards'
        pruned = torch.stack([sum_shards((mk == 0).sum(), w) for mk, w in zip(self.masks, self.weights)]).cpu()
        sizes = torch.tensor([w.numel() for w in self.weights])
        if per_module:
            return {x: float(p / s) for x, p, s in zip(self.names, pruned, sizes)}
        return float(pruned.sum() / sizes.sum())

    def units_removed(self) -> int:
        return int(sum((~u).sum() for u in self.units)) if self.units else 0

    def unit_sparsity(self) -> float | None:
        """Structured: the fraction of its units (heads, neurons, layers) its masks removed; None otherwise."""
        total = sum(int(u.numel()) for u in self.units)
        return self.units_removed() / total if total else None

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors (gathered under FSDP2: call it on every rank), so a checkpoint fits any sharding."""
        masks = self.gather([mk.to(torch.uint8) for mk in self.masks])  # uint8: gloo gathers no bool
        state = {f"mask.{x}": mk.bool() for x, mk in zip(self.names, masks)}
        state.update({f"score.{x}": s for x, s in zip(self.names, self.gather(self.scores))})
        state.update({f"units.{i}": u for i, u in enumerate(self.units)})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.state_dict() if k not in state]
        if missing:
            raise ValueError(f"The saved pruning state does not fit this model (missing {missing[:3]}).")
        dev = self.weights[0].device
        masks = [state[f"mask.{x}"].to(dev, torch.bool) for x in self.names]
        self._set(masks, not all(bool(m.all()) for m in masks))
        if self.scores:  # magnitude keeps none
            for s, saved in zip(self.scores, self.scatter([state[f"score.{x}"] for x in self.names])):
                s.copy_(saved)
        self.units = [state[f"units.{i}"].to(dev, torch.bool) for i in range(len(self.units))]
        if self.granularity == "layers":
            self._spread()
        self.apply()

    # ------------------------------------------------------------------ lottery ticket
    def snapshot(self) -> list[torch.Tensor]:
        """This rank's pieces of the weights, copied (`gather` makes full tensors of them)."""
        return [w.detach().clone() for w in self._local()]

    @torch.no_grad()
    def rewind(self, snapshot: list[torch.Tensor], optimizer=None) -> None:
        """Surviving weights back to `snapshot` (Frankle & Carbin); their optimizer state restarts."""
        for w, s in zip(self._local(), snapshot):
            w.copy_(s)
        self.apply()
        if optimizer is not None:
            for w in self.weights:
                optimizer.state.pop(w, None)
