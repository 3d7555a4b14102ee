"""The low-rank life cycle on a bare model: `prepare` → (statistics, factorisation, rank reductions while
training; `LowRankCallback` drives them) → `convert`. `rebuild_lowrank` gives a saved model its factorised
layers back before the weights load (hf_compress.loading and the Auto-class quantizer)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..metadata import get_metadata, record
from ..modules import local_name as _local, out_axis, replace_module, select_modules, unwrap
from .factorize import (LowRankLinear, break_even, decompose, dense_weight, energy_rank, factorise_layer, is_lowrank,
                        rank_at, rule_rank, saves_parameters, shape_of, shrink_layer, weighting)
from .optim import replace_parameters

FORMAT_VERSION = 1


class LowRank:
    """The targeted layers of one model, their statistics (asvd / fwsvd) and ranks; does every step of the
    technique on the model it was prepared for. `final` ({name: rank or None = left dense}) is decided when
    the layers are factorised (the energy rule needs their spectrum)."""

    def __init__(self, model: nn.Module, config):
        self.model = unwrap(model)
        self.config = c = config
        chosen = select_modules(self.model, c.lowrank_targets, c.lowrank_exclude, field="lowrank_targets")
        self.names = list(chosen)
        self.shapes = {n: shape_of(m) for n, m in chosen.items()}
        self._check_rank_rules()
        self.final: dict[str, int | None] | None = None
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        if c.lowrank_method == "asvd":
            self.stats = {n: {"abs_sum": torch.zeros(self.shapes[n][0], dtype=torch.float64), "count": torch.zeros((), dtype=torch.float64)}
                          for n in self.names}
        elif c.lowrank_method == "fwsvd":
            self.stats = {n: {"grad_sq": torch.zeros(self.shapes[n][1], dtype=torch.float64)} for n in self.names}
        self._hooks: list = []
        self.skipped_warned = False

    # ------------------------------------------------------------------ checks
    def _check_rank_rules(self) -> None:
        import re

        c = self.config
        for pattern, r in (c.lowrank_ranks or {}).items():
            matched = [n for n in self.names if re.search(pattern, n)]
            if not matched:
                raise ValueError(
                    f"LowRankConfig.lowrank_ranks: pattern {pattern!r} matches none of the {len(self.names)} targeted "
                    f"layers (e.g. {self.names[:3]}): fix the regex or drop it."
                )
            for n in matched:
                full = min(self.shapes[n])
                if rule_rank(n, *self.shapes[n], c.lowrank_ranks, None) == r and r > full:
                    raise ValueError(
                        f"LowRankConfig.lowrank_ranks: rank {r} for {pattern!r} exceeds the full rank of {n} "
                        f"(min(in, out) = {full}): use a rank in [1, {full}]."
                    )

    def same_model(self, model: nn.Module) -> bool:
        return unwrap(model) is self.model

    # ------------------------------------------------------------------ statistics
    def modules(self) -> dict[str, nn.Module]:
        return {n: self.model.get_submodule(n) for n in self.names}

    def start_statistics(self) -> None:
        """asvd: forward pre-hooks add mean |x| per input channel (training forwards only). fwsvd: see `accumulate`."""
        self.stop_statistics()
        if self.config.lowrank_method != "asvd":
            return
        for n, m in self.modules().items():
            st = self.stats[n]

            def hook(module, args, st=st):
                if module.training and args and isinstance(args[0], torch.Tensor):
                    with torch.no_grad():
                        x = args[0].detach()
                        x = x.reshape(-1, x.shape[-1])
                        st["abs_sum"] += x.abs().sum(0).to(st["abs_sum"].device, torch.float64)
                        st["count"] += x.shape[0]

            self._hooks.append(m.register_forward_pre_hook(hook))

    def stop_statistics(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def accumulate(self) -> None:
        """fwsvd: add the squared gradients of each dense weight, summed per output row (gradients final)."""
        if self.config.lowrank_method != "fwsvd":
            return
        for n, m in self.modules().items():
            g = getattr(getattr(m, "weight", None), "grad", None)
            if g is None:
                continue
            rows = (g.detach().double() ** 2).sum(1 - out_axis(m))  # per output row (Conv1D keeps W transposed)
            self.stats[n]["grad_sq"] += rows.to(self.stats[n]["grad_sq"].device)

    def weights_of(self, name: str):
        c = self.config
        return weighting(c.lowrank_method, self.stats.get(name), c.lowrank_asvd_alpha)

    # ------------------------------------------------------------------ factorisation
    def factorised(self) -> bool:
        return any(is_lowrank(m) for m in self.modules().values())

    def _final_rank(self, name: str, sv: torch.Tensor) -> int:
        c = self.config
        r = rule_rank(name, *self.shapes[name], c.lowrank_ranks, c.lowrank_rank_fraction)
        if r is None:
            r = energy_rank(sv, c.lowrank_energy) if c.lowrank_energy is not None else None
        return r

    @torch.no_grad()
    def factorise(self, optimizer=None, step: int = 0, end: int | None = None) -> dict[str, int | None]:
        """Factorise every targeted dense layer: the rank its rule gives (one_shot), or full rank min(in, out) for a
        gradual schedule (exact); layers whose final rank would not save parameters stay dense, with one warning.
        With `optimizer` (training already started), each dense weight is replaced in its param group by the two
        factors (at its position; its optimizer state dropped); the bias Parameter is kept. Returns `final`."""
        c = self.config
        self.stop_statistics()
        final, skipped = {}, []
        for n, m in self.modules().items():
            if is_lowrank(m):
                final[n] = m.rank if self.final is None else self.final.get(n, m.rank)
                continue
            in_f, out_f = self.shapes[n]
            s, d = self.weights_of(n)
            u, sv, vh = decompose(dense_weight(m), s, d)
            r = self._final_rank(n, sv)
            if r is None or not saves_parameters(in_f, out_f, r):
                final[n] = None
                if r is not None:
                    skipped.append(f"{n} ({out_f}x{in_f}: rank {r} >= {break_even(in_f, out_f):.1f})")
                continue
            final[n] = r
            now = rank_at(step, r, min(in_f, out_f), c.lowrank_start_step, end if end is not None else c.lowrank_start_step,
                          c.lowrank_frequency, c.lowrank_schedule)
            new = factorise_layer(m, now, u, sv, vh, s, d)
            old = m.weight
            replace_module(self.model, n, new)
            if optimizer is not None:
                replace_parameters(optimizer, old, [new[0].weight, new[1].weight])
        if skipped and not self.skipped_warned:
            warnings.warn(
                f"LowRank: {len(skipped)} layer(s) left dense because rank r >= in*out/(in+out) would not save "
                f"parameters: {skipped[:6]}{' ...' if len(skipped) > 6 else ''}. Lower their rank to factorise them.",
                stacklevel=2,
            )
            self.skipped_warned = True
        self.final = final
        return final

    @torch.no_grad()
    def shrink(self, step: int, end: int, optimizer=None) -> int:
        """Gradual schedules: lower each factorised layer to the schedule's rank after `step` steps (in place;
        the optimizer state of the reshaped factors is dropped). Returns the number of layers changed."""
        c = self.config
        changed = 0
        for n, m in self.modules().items():
            r = (self.final or {}).get(n)
            if not is_lowrank(m) or r is None:
                continue
            want = rank_at(step, r, min(self.shapes[n]), c.lowrank_start_step, end, c.lowrank_frequency, c.lowrank_schedule)
            s, d = self.weights_of(n)
            params = shrink_layer(m, want, s, d)
            if params:
                changed += 1
                if optimizer is not None:
                    for p in params:
                        replace_parameters(optimizer, p, [p])
        return changed

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": v for n, st in self.stats.items() for k, v in st.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, st in self.stats.items():
            for k in st:
                st[k].copy_(tensors[f"{k}.{n}"])

    def weights(self) -> list[torch.Tensor]:
        out = []
        for m in self.modules().values():
            out += [m[0].weight, m[1].weight] if is_lowrank(m) else [m.weight]
        return out

    def summary(self) -> dict:
        ranks = {n: m.rank for n, m in self.modules().items() if is_lowrank(m)}
        dense = sum(self.shapes[n][0] * self.shapes[n][1] for n in self.names)
        now = sum(m.rank * (m.in_features + m.out_features) if is_lowrank(m) else self.shapes[n][0] * self.shapes[n][1]
                  for n, m in self.modules().items())
        return {"layers_factorised": len(ranks), "rank_mean": (sum(ranks.values()) / len(ranks)) if ranks else 0.0,
                "weight_ratio": now / dense if dense else 1.0, "ranks": ranks}


def prepare(model: nn.Module, config) -> LowRank:
    """The `LowRank` of the layers `config` (a LowRankConfig) targets; checks targets and per-layer ranks."""
    return LowRank(model, config)


def convert(model: nn.Module, config=None, lowrank: LowRank | None = None) -> dict:
    """Make the factorised model what ships, and record it in ``config.hf_compress["lowrank"]``; idempotent.

    The factorised layers already are real smaller Linears; they are recorded as they are now (ranks measured
    on the modules: after a best-model reload, the reloaded checkpoint's). On a model with no factorised layer
    and a `config` (e.g. one you loaded yourself), the targeted layers are factorised first (one shot, plain
    SVD unless `lowrank` holds collected statistics). Returns the recorded entry."""
    model = unwrap(model)
    if lowrank is None and config is not None and not any(is_lowrank(m) for m in model.modules()):
        lowrank = prepare(model, config)
        if config.data_aware:
            raise ValueError(
                f"lowrank.convert: lowrank_method={config.lowrank_method!r} needs statistics from training steps; "
                "without training use lowrank_method='svd' (or run LowRankCallback)."
            )
    if lowrank is not None and not lowrank.factorised() and lowrank.final is None:
        lowrank.factorise()
    layers = {}
    saved = 0
    for name, m in model.named_modules():
        if is_lowrank(m):
            layers[name] = {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                            "bias": getattr(m[1], "bias", None) is not None}
            saved += m.in_features * m.out_features - m.rank * (m.in_features + m.out_features)
    before = get_metadata(model).get("lowrank") or {}
    entry = {"version": FORMAT_VERSION, "method": getattr(config, "lowrank_method", None) or before.get("method", "svd"),
             "layers": layers, "parameters_saved": saved}
    if hasattr(model, "config"):
        record(model, "lowrank", entry if layers else None)
    return entry


def rebuild_lowrank(model: nn.Module, meta: dict) -> nn.Module:
    """Replace each recorded layer by an empty LowRankLinear of its recorded rank, on the layer's device and dtype
    (a meta-device skeleton stays on meta), before the weights load. Check the record first
    (`hf_compress.storage.check_lowrank_record`); layers already factorised are left as they are."""
    modules = dict(model.named_modules())
    for name, d in (meta.get("layers") or {}).items():
        local = _local(model, name, modules)
        if local is None or is_lowrank(modules[local]):
            continue
        old = modules[local]
        w = old.weight
        new = LowRankLinear(d["in_features"], d["out_features"], d["rank"], bias=bool(d.get("bias")), device=w.device, dtype=w.dtype)
        replace_module(model, local, new)
    return model


def restructure_to_fit(model: nn.Module, names: list[str], state_dict: dict, prefix: str = "") -> list[str]:
    """Make each of `names` (dense Linear or LowRankLinear) the structure `state_dict` stores for it: factors of the
    stored rank (keys ``NAME.0.weight`` / ``NAME.1.weight``), or dense again (``NAME.weight``). Used by the
    load_state_dict pre-hook that lets a Trainer resume (or reload its best checkpoint) after factorisation."""
    changed = []
    for n in names:
        key = f"{prefix}{n}"
        m = model.get_submodule(n)
        a = state_dict.get(f"{key}.0.weight")
        if isinstance(a, torch.Tensor) and a.dim() == 2:
            if is_lowrank(m):
                if m.rank != a.shape[0]:
                    for lin, shape in ((m[0], (a.shape[0], m.in_features)), (m[1], (m.out_features, a.shape[0]))):
                        lin.weight.data = torch.empty(shape, device=lin.weight.device, dtype=lin.weight.dtype)
                    m[0].out_features = m[1].in_features = a.shape[0]
                    changed.append(n)
                continue
            in_f, out_f = shape_of(m)
            w = m.weight
            new = LowRankLinear(in_f, out_f, a.shape[0], bias=getattr(m, "bias", None) is not None, device=w.device, dtype=w.dtype)
            if getattr(m, "bias", None) is not None:
                new[1].bias = m.bias
            new.train(m.training)
            replace_module(model, n, new)
            changed.append(n)
        elif f"{key}.weight" in state_dict and is_lowrank(m):
            w = m[1].weight
            dense = nn.Linear(m.in_features, m.out_features, bias=m[1].bias is not None, device=w.device, dtype=w.dtype)
            if m[1].bias is not None:
                dense.bias = m[1].bias
            dense.train(m.training)
            replace_module(model, n, dense)
            changed.append(n)
    return changed
