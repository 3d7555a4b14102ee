"""Per-layer sensitivity: the loss change when only one layer is pruned, quantised or factorised.

Every perturbation reuses the technique's own numerics on one layer and is undone exactly:

- pruning: magnitude scores and the unstructured mask of `hf_compress.pruning` (`scores.current`,
  `masks.unstructured_masks` with scope "local", `apply_masks`) — the layer's lowest |w| go;
- quantization: `quantization.numerics.fake_quantize_weight` with the scheme `plan.scheme_for_bits` gives for
  that bit width (the weight as QAT's forward and every export see it);
- lowrank: the layer is swapped for `lowrank.factorise_layer`'s LowRankLinear (truncated SVD) and back.

Weights are copied before and written back after (pruning, quantization), and the original module object is
put back (lowrank), so the model is bit-identical after the analysis (tested).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..lowrank.factorize import factorise_layer, saves_parameters, shape_of
from ..modules import out_axis, replace_module, select_modules, unwrap
from ..pruning.masks import apply_masks, unstructured_masks
from ..pruning.scores import current
from ..quantization.numerics import fake_quantize_weight
from ..quantization.plan import scheme_for_bits
from .config import SensitivityConfig

AXIS_OF = {"prune": "pruning", "bits": "quantization", "rank": "lowrank"}
PREFIX = {v: k for k, v in AXIS_OF.items()}


def setting_name(axis: str, value) -> str:
    """'prune:0.5', 'bits:4', 'rank:0.25' (rank as a fraction of min(in, out))."""
    return f"{PREFIX[axis]}:{value:g}"


def parse_setting(setting: str) -> tuple[str, float]:
    prefix, _, value = setting.partition(":")
    if prefix not in AXIS_OF:
        raise ValueError(f"setting {setting!r}: use prune:<sparsity>, bits:<bits> or rank:<fraction>.")
    v = float(value)
    return AXIS_OF[prefix], (int(v) if prefix == "bits" else v)


def rank_for(fraction: float, in_features: int, out_features: int) -> int:
    return max(1, round(fraction * min(in_features, out_features)))


def settings_for(config: SensitivityConfig) -> list[str]:
    out = []
    if "pruning" in config.sensitivity_axes:
        out += [setting_name("pruning", s) for s in config.sparsities]
    if "quantization" in config.sensitivity_axes:
        out += [setting_name("quantization", b) for b in config.bits]
    if "lowrank" in config.sensitivity_axes:
        out += [setting_name("lowrank", f) for f in config.rank_fractions]
    return out


def applicable(layer: dict, setting: str) -> bool:
    """Low rank only where the factors hold fewer weights than the layer (else LowRankCallback leaves it dense)."""
    axis, v = parse_setting(setting)
    if axis != "lowrank":
        return True
    return saves_parameters(layer["in"], layer["out"], rank_for(v, layer["in"], layer["out"]))


@contextmanager
def perturbed(model: nn.Module, name: str, setting: str, qat_config=None):
    """Inside the block only layer `name` of `model` carries `setting`; afterwards it is exactly as before."""
    axis, value = parse_setting(setting)
    module = model.get_submodule(name)
    if axis == "lowrank":
        in_f, out_f = shape_of(module)
        replace_module(model, name, factorise_layer(module, rank_for(value, in_f, out_f)))
        try:
            yield
        finally:
            replace_module(model, name, module)
        return
    w = module.weight
    saved = w.detach().clone()
    try:
        if axis == "pruning":  # (apply_masks and the copies below work on detached tensors: no autograd)
            mask = unstructured_masks(current([], [w], "magnitude"), value, "local")[0]
            apply_masks([w], [mask.to(w.dtype)])
        else:
            scheme = scheme_for_bits(int(value), qat_config or {})
            if scheme.group_size and module.weight.shape[1 - out_axis(module)] % scheme.group_size:
                scheme = scheme_for_bits(int(value), {**_fields(qat_config), "group_size": None})
            w.detach().copy_(fake_quantize_weight(w.detach(), scheme, out_axis(module)))
        yield
    finally:
        w.detach().copy_(saved)


def _fields(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    return {k: getattr(config, k) for k in ("weight_format", "group_size", "symmetric", "per_channel", "weight_range") if hasattr(config, k)}


# ----------------------------------------------------------------------------- evaluation on a held-out slice


def dataset_loss_fn(dataset, task: str = "sequence-classification", collator=None, batch_size: int = 64) -> Callable:
    """eval_fn(model) -> {"loss", metric}: mean cross-entropy over the rows (classification) or over the predicted
    tokens (causal LM), and accuracy / perplexity. Batches are collated once."""
    if collator is None:
        from transformers import default_data_collator as collator
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    batches = []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batches.append({k: v for k, v in collator(rows).items() if k in keys})

    @torch.inference_mode()
    def evaluate(model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        loss_sum, count, correct = 0.0, 0, 0
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            y = b.pop("labels")
            logits = model(**b).logits.float()
            if task == "causal-lm":
                lg, yy = logits[:, :-1], y[:, 1:]
                keep = yy != -100
                loss_sum += float(nn.functional.cross_entropy(lg[keep], yy[keep], reduction="sum"))
                count += int(keep.sum())
            else:
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
                count += int(y.numel())
        model.train(was)
        mean = loss_sum / max(count, 1)
        if task == "causal-lm":
            return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}
        return {"loss": mean, "accuracy": correct / max(count, 1)}

    return evaluate


def _as_scores(out) -> dict[str, float]:
    if isinstance(out, dict):
        if "loss" not in out:
            raise ValueError(f"eval_fn returned {sorted(out)}: it must return the loss (a float) or a dict with 'loss'.")
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}
    return {"loss": float(out)}


# ----------------------------------------------------------------------------- the table


@dataclass
class SensitivityTable:
    """Loss (and metric) of the model with one layer perturbed, for every analysed layer x setting."""

    baseline: dict[str, float]
    layers: list[dict]  # {"name", "in", "out", "bias"}
    settings: list[str]
    loss: dict[str, dict[str, float | None]]  # layer -> setting -> loss (None: not applicable)
    metric: dict[str, dict[str, float | None]] = field(default_factory=dict)
    metric_name: str | None = None
    config: dict = field(default_factory=dict)
    seconds: float = 0.0

    def delta(self, layer: str, setting: str) -> float | None:
        """Loss increase of `setting` on `layer` alone (None when not applicable)."""
        v = self.loss[layer].get(setting)
        return None if v is None else v - self.baseline["loss"]

    def layer(self, name: str) -> dict:
        return next(x for x in self.layers if x["name"] == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline, "layers": self.layers, "settings": self.settings, "loss": self.loss,
            "delta_loss": {x["name"]: {s: self.delta(x["name"], s) for s in self.settings} for x in self.layers},
            "metric_name": self.metric_name, "metric": self.metric, "config": self.config, "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        return cls(d["baseline"], d["layers"], d["settings"], d["loss"], d.get("metric", {}), d.get("metric_name"),
                   d.get("config", {}), d.get("seconds", 0.0))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def heatmap(self, path: str | Path, title: str | None = None) -> Path:
        """PNG: layers (rows) x settings (columns), colour = loss increase (blank: not applicable)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        data = np.array([[np.nan if (d := self.delta(x["name"], s)) is None else d for s in self.settings] for x in self.layers])
        h = max(3.0, 0.28 * len(self.layers) + 1.5)
        w = max(5.0, 0.75 * len(self.settings) + 4.0)
        fig, ax = plt.subplots(figsize=(w, h))
        finite = data[np.isfinite(data)]
        vmax = float(np.percentile(np.abs(finite), 98)) if finite.size else 1.0
        im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-vmax or -1e-9, vmax=vmax or 1e-9)
        ax.set_xticks(range(len(self.settings)), self.settings, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(self.layers)), [x["name"] for x in self.layers], fontsize=7)
        if len(self.layers) * len(self.settings) <= 400:
            for i in range(data.shape[0]):
                for j in range(data.shape[1]):
                    if np.isfinite(data[i, j]):
                        ax.text(j, i, f"{data[i, j]:.2g}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, label=f"loss increase (baseline {self.baseline['loss']:.4g})")
        ax.set_title(title or "Sensitivity: loss increase with only that layer perturbed", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def analyze_sensitivity(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], Any] | None = None,
    *,
    dataset=None,
    task: str | None = None,
    collator=None,
    settings: SensitivityConfig | None = None,
    qat_config=None,
    say: Callable[[str], None] | None = None,
) -> SensitivityTable:
    """For each targeted Linear of `model`, the loss when ONLY that layer is pruned (magnitude) to each of
    `settings.sparsities`, fake-quantised to each of `settings.bits`, or factorised (truncated SVD) to each of
    `settings.rank_fractions` — each perturbation undone exactly before the next.

    `eval_fn(model)` returns the loss (float) or a dict with "loss" (and metrics); or pass a tokenised
    `dataset` (+ `task`, `collator`): mean cross-entropy and accuracy / perplexity on it. `qat_config` (a
    QATConfig or dict) sets the quantisation grid (group size, symmetry, NF4...) as QAT would use it.
    """
    cfg = settings or SensitivityConfig()
    if (eval_fn is None) == (dataset is None):
        raise ValueError("analyze_sensitivity: pass either eval_fn (model -> loss) or dataset (a tokenised held-out slice).")
    base_model = unwrap(model)
    if eval_fn is None:
        from ..report import _infer_task

        task = task or _infer_task(base_model)
        eval_fn = dataset_loss_fn(dataset, task, collator, cfg.eval_batch_size)
    chosen = select_modules(base_model, cfg.sensitivity_targets, cfg.sensitivity_exclude, field="sensitivity_targets")
    layers = []
    for name, m in chosen.items():
        in_f, out_f = shape_of(m)
        layers.append({"name": name, "in": int(in_f), "out": int(out_f), "bias": getattr(m, "bias", None) is not None})
    names = [s for s in settings_for(cfg)]
    t0 = time.perf_counter()
    base = _as_scores(eval_fn(model))
    metric_name = next((k for k in base if k != "loss"), None)
    loss: dict[str, dict] = {}
    metric: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        loss[layer["name"]], metric[layer["name"]] = {}, {}
        for s in names:
            if not applicable(layer, s):
                loss[layer["name"]][s] = metric[layer["name"]][s] = None
                continue
            with perturbed(base_model, layer["name"], s, qat_config):
                r = _as_scores(eval_fn(model))
            loss[layer["name"]][s] = r["loss"]
            metric[layer["name"]][s] = r.get(metric_name) if metric_name else None
        if say:
            worst = max((v for v in loss[layer["name"]].values() if v is not None), default=base["loss"])
            say(f"sensitivity {i + 1}/{len(layers)} {layer['name']}: worst loss {worst:.4g} (baseline {base['loss']:.4g})")
    return SensitivityTable(base, layers, names, loss, metric, metric_name, cfg.to_dict(), time.perf_counter() - t0)
