"""transformers integration: compressed models load with the Auto classes and `pipeline`, or are refused.

Top layer beside `loading` (imports the technique packages' rebuild functions; nothing below imports it).
`import hf_compress` calls `register()`, which uses transformers' public registration hooks:

* ``AutoConfig.register(MODEL_TYPE, CompressedConfig)``: a compressed model whose structure or weight
  format a stock config cannot describe (low-bit layers, per-layer head / FFN counts the config cannot
  express, static activation quantisation) is saved with ``"model_type": MODEL_TYPE``. Stock transformers
  refuses that directory (unknown model type; the model type string itself says what to do); with
  hf_compress imported, `CompressedConfig.from_dict` returns the base architecture's config, as a
  subclass that keeps writing MODEL_TYPE (so re-saves stay refused) and whose class name is the base
  config's (``BertConfig``), so every Auto class and the tokenizer mapping resolve the stock classes.
* ``register_quantization_config`` / ``register_quantizer`` for ``quant_method: "hf_compress"``: its
  `_process_model_before_weight_loading` shrinks the meta-device skeleton to the recorded pruned shapes
  and parks the low-bit layers; transformers then loads every float weight; its
  `_process_model_after_weight_loading` builds the low-bit layers (`rebuild_quantized`, the same code as
  `load_pretrained`) and loads their tensors from the checkpoint's safetensors files.

Saving needs no hook of ours in the Trainer: every `metadata.record` (pruning removal, QAT/PTQ finalize)
calls `mark_compressed`, which switches the live config to that subclass, so `save_pretrained`,
`trainer.save_model`, Trainer checkpoints and `push_to_hub` all write the refusing ``model_type`` plus
``quantization_config``; the subclass's `save_pretrained` also writes a model card (README.md).
A compressed model that stock transformers rebuilds exactly (unstructured / N:M zeros, uniform widths
the config describes, removed layers) keeps its stock ``model_type`` and only gains the model card.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .metadata import META_KEY, get_metadata, on_record
from .modules import local_name, replace_module, unwrap
from .storage import (  # hf_compress.storage (issue 14): checks before allocating; sparse-bitmask weights
    attach_listed,
    check_pruning_record,
    check_skeleton_before_loading,
    load_sparse_weights,
    sparse_ignore_patterns,
    stored_sparse,
)

QUANT_METHOD = "hf_compress"
# The model type a refusing directory is saved with. Stock transformers prints it in its error:
# "The checkpoint you are trying to load has model type `<MODEL_TYPE>` but Transformers does not recognize
# this architecture ..." — so the string says what to do.
MODEL_TYPE = "hf_compress (pip install hf_compress, then import hf_compress before from_pretrained)"
BASE_KEY = "base_model_type"  # in the saved hf_compress section: the architecture's own model_type
# A concrete class (`BertForSequenceClassification.from_pretrained`) does not check model_type (a warning
# only) and would load int8 codes as float weights. So a refusing directory also saves one integer field of
# the architecture's config (its FFN width, see `_refusal_field`) as this string: the concrete config class
# validates its typed fields and raises "Field 'intermediate_size' expected int, got str (value: '<this>')"
# before any weight is read. The base PreTrainedConfig (which the Trainer reads when resuming) does not
# check that field. The real value is kept in the hf_compress section and put back when hf_compress loads
# through AutoConfig (so with the import a concrete class needs config=AutoConfig.from_pretrained(dir)).
FIELD_REFUSAL = ("hf_compress (this model needs `pip install hf_compress`, then `import hf_compress` and "
                 "AutoModelFor...from_pretrained / pipeline / hf_compress.load_pretrained; a concrete class such as "
                 "BertForSequenceClassification.from_pretrained(dir) cannot read it, or pass config=AutoConfig.from_pretrained(dir))")
FIELD_KEY = "refusal_field"  # in the saved hf_compress section: {field: real value}
CARD_MARK = "<!-- written by hf_compress -->"

_REGISTERED = False


# ----------------------------------------------------------------------------- what needs hf_compress


def reasons(model_or_config, model: nn.Module | None = None) -> list[str]:
    """Why stock transformers would not rebuild this model (empty: a stock directory loads it right).

    Low-bit layers, static activation quantisation and pruned shapes the config cannot describe
    (checked by building the stock skeleton on the meta device when `model` is given).
    """
    meta = get_metadata(model_or_config)
    out = []
    q = meta.get("quantization") or {}
    if q.get("backend"):
        out.append(f"low-bit layers ({q['backend']})")
        if isinstance(q.get("embedding"), dict) and q["embedding"].get("stored") == "int8":
            out.append("int8 word embedding (codes + per-row scales)")
    elif any(isinstance(d, dict) and d.get("input_quant") for d in (q.get("layers") or {}).values()):
        out.append("static activation quantisation")
    if stored_sparse(meta):
        out.append("sparse-bitmask weights")
    if isinstance(meta.get("lowrank"), dict) and meta["lowrank"].get("layers"):  # lowrank
        out.append("low-rank factorised layers")  # lowrank
    if meta.get("clustering"):  # clustering
        out.append("clustered weights (codebook + packed indices)")
    if meta.get("sharing"):  # clustering (cross-layer sharing)
        out.append("cross-layer shared blocks (stored once)")
    p = meta.get("pruning") or {}
    if "heads" in p or "ffn" in p:
        if model is None or not _stock_builds(model, p):
            out.append("per-layer pruned shapes")
    return out


def _stock_builds(model: nn.Module, pruning: dict) -> bool:
    """Whether the model class built from the stock config has the recorded heads / FFN widths."""
    from transformers import PreTrainedModel

    from .pruning.structured import structure

    model = unwrap(model)
    if not isinstance(model, PreTrainedModel):
        return False
    config = copy.deepcopy(model.config)
    config.__class__ = base_config_class(type(config))
    setattr(config, META_KEY, None)
    try:
        with torch.device("meta"):
            skeleton = type(model)(config)
        built = structure(skeleton)
    except Exception:
        return False
    return all(pruning.get(k) in (None, built.get(k)) for k in ("heads", "ffn"))


# ----------------------------------------------------------------------------- configs


class _CompressedMixin:
    """Mixed into a copy of the architecture's config class (same class name, so Auto mappings resolve)."""

    _hfc_base: type = None
    _hfc_refuse: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        meta = dict(out.get(META_KEY) or {})
        if self._hfc_refuse:
            meta[BASE_KEY] = self._hfc_base.model_type
            field = _refusal_field(self._hfc_base)
            if field is not None and field in out and out[field] != FIELD_REFUSAL:
                meta[FIELD_KEY] = {field: out[field]}
                out[field] = FIELD_REFUSAL
            out[META_KEY] = meta
            if not out.get("quantization_config"):
                out["quantization_config"] = {"quant_method": QUANT_METHOD}
        else:
            meta.pop(BASE_KEY, None)
            meta.pop(FIELD_KEY, None)
            out[META_KEY] = meta or None
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if get_metadata(self):
            write_model_card(save_directory, self)

    def __reduce__(self):
        # the state too: to_dict() leaves out private attributes such as _attn_implementation, without which a
        # deepcopy (student_from_teacher, copy.deepcopy(model)) would dispatch attention with None
        return (_restore_config, (self._hfc_base.model_type, self._hfc_refuse, self.to_dict()), dict(self.__dict__))


def _restore_config(base_type: str, refuse: bool, data: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = compressed_config_class(CONFIG_MAPPING[base_type], refuse)
    data = _real_fields({k: v for k, v in data.items() if k not in ("model_type", "transformers_version")})
    if not refuse:
        data.pop("quantization_config", None)
    return cls.from_dict(data)


def _refusal_field(base: type) -> str | None:
    """The integer config field a refusing directory saves as FIELD_REFUSAL: the FFN width, which only the
    architecture's own config class types and checks (not PreTrainedConfig's validators)."""
    fields = getattr(base, "__annotations__", {})
    return next((f for f in ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim") if f in fields), None)


def _real_fields(config_dict: dict) -> dict:
    """The saved dict with the real value back in place of FIELD_REFUSAL."""
    meta = config_dict.get(META_KEY)
    saved = meta.get(FIELD_KEY) if isinstance(meta, dict) else None
    if isinstance(saved, dict):
        config_dict = dict(config_dict)
        for k, v in saved.items():
            if config_dict.get(k) == FIELD_REFUSAL:
                config_dict[k] = v
    return config_dict


_CLASSES: dict[tuple[type, bool], type] = {}


def base_config_class(cls: type) -> type:
    """The stock config class under our subclass (itself when it is stock)."""
    return getattr(cls, "_hfc_base", None) or cls


def compressed_config_class(base: type, refuse: bool) -> type:
    """The subclass of `base` (same __name__) whose saved model_type is MODEL_TYPE (`refuse`) or the
    base's own; both write a model card on save."""
    base = base_config_class(base)
    key = (base, refuse)
    if key not in _CLASSES:
        attrs = {"_hfc_base": base, "_hfc_refuse": refuse, "__module__": __name__,
                 "__qualname__": f"compressed.{base.__name__}"}
        if refuse:
            attrs["model_type"] = MODEL_TYPE
        _CLASSES[key] = type(base.__name__, (_CompressedMixin, base), attrs)
    return _CLASSES[key]


def _compressed_config_dispatch():
    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    class CompressedConfig(PreTrainedConfig):
        """What AutoConfig finds for MODEL_TYPE: dispatches to the base architecture's config."""

        model_type = MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            meta = config_dict.get(META_KEY) or {}
            base_type = meta.get(BASE_KEY) if isinstance(meta, dict) else None
            if not isinstance(base_type, str) or base_type == MODEL_TYPE or base_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"config.json has model_type {MODEL_TYPE!r} but its {META_KEY}.{BASE_KEY} is {base_type!r}, "
                    "not a model type this transformers knows: the directory was edited or saved by a newer setup."
                )
            config_dict = dict(_real_fields(config_dict), model_type=base_type)
            if not config_dict.get("quantization_config"):
                config_dict["quantization_config"] = {"quant_method": QUANT_METHOD}
            target = compressed_config_class(CONFIG_MAPPING[base_type], refuse=True)
            return target.from_dict(config_dict, **kwargs)

    return CompressedConfig


def mark_compressed(model: nn.Module) -> None:
    """Called after each `metadata.record`: give the live config the class that saves it right."""
    from transformers import PreTrainedConfig

    config = getattr(unwrap(model), "config", None) or getattr(model, "config", None)
    if not isinstance(config, PreTrainedConfig):
        return
    base = base_config_class(type(config))
    if not get_metadata(config):
        config.__class__ = base
        return
    config.__class__ = compressed_config_class(base, refuse=bool(reasons(config, model)))


# ----------------------------------------------------------------------------- quantizer


class _Parked(nn.Module):
    """Stands where a low-bit layer goes while transformers loads the float weights (holds no state)."""

    def __init__(self, name: str):
        super().__init__()
        self.parked_name = name
        # empty, never saved: a model's `_init_weights` may touch a child's weight through its parent (GPT-2 re-scales
        # `attn.c_proj.weight` when it visits the attention block) while the layer is parked
        self.register_buffer("weight", torch.empty(0), persistent=False)
        self.register_buffer("bias", torch.empty(0), persistent=False)

    def forward(self, *args, **kwargs):  # pragma: no cover - replaced before the model is returned
        raise RuntimeError(f"{self.parked_name} was not rebuilt after loading (hf_compress quantizer).")


def _deferred_layers(model: nn.Module, meta: dict) -> dict[str, str]:
    """{module name in `model`: recorded name} of the layers the quantizer builds after loading."""
    q = meta.get("quantization") or {}
    layers = q.get("layers") or {}
    out = {}
    for name, d in layers.items():
        if q.get("backend") or (isinstance(d, dict) and d.get("input_quant")):
            local = local_name(model, name)
            if local is not None:
                out[local] = name
    emb = q.get("embedding")
    if q.get("backend") and isinstance(emb, dict) and emb.get("stored") == "int8":  # Int8Embedding, built after loading
        local = local_name(model, emb["name"])
        if local is not None:
            out[local] = emb["name"]
    return out


def _quantizer_classes():
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class HfCompressQuantizationConfig(QuantizationConfigMixin):
        """``quantization_config: {"quant_method": "hf_compress"}``; what to rebuild is in ``config.hf_compress``."""

        def __init__(self, **kwargs):
            self.quant_method = QUANT_METHOD

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD}

    class HfCompressQuantizer(HfQuantizer):
        """Rebuilds what hf_compress changed (pruned shapes, low-bit layers) around transformers' weight loading."""

        requires_calibration = False

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.pre_quantized = True  # the weights on disk are the compressed ones, never quantised at load
            self._files: list[str] = []
            self._deferred: dict[str, str] = {}
            self._meta: dict = {}

        def validate_environment(self, *args, **kwargs):
            return

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from .pruning.structured import apply_structure
            from .quantization import get_backend

            meta = get_metadata(model.config)
            self._meta, self._files = meta, [str(f) for f in (checkpoint_files or [])]
            base = base_config_class(type(model.config))
            model.config.__class__ = compressed_config_class(base, refuse=True)
            q = meta.get("quantization") or {}
            if q.get("backend"):
                get_backend(q["backend"]).require()
            check_pruning_record(meta)  # hf_compress.storage: counts are positive integers before any surgery
            if "pruning" in meta:
                apply_structure(model, meta["pruning"])
            from .lowrank import rebuild_lowrank  # lowrank
            from .storage import check_lowrank_record  # lowrank

            check_lowrank_record(model, meta)  # lowrank: checked, then the skeleton factorised before weights load
            rebuild_lowrank(model, meta.get("lowrank") or {})  # lowrank
            # hf_compress.storage: files, metadata and the meta-device skeleton checked against the headers
            _clustering_before_loading(model, meta, self._files, getattr(model.config, "name_or_path", None))  # clustering
            if meta.get("sharing"):  # clustering (cross-layer sharing): shared blocks stored once
                from .distillation.sharing import apply_sharing

                apply_sharing(model, meta["sharing"])
            check_skeleton_before_loading(model, meta, self._files, getattr(model.config, "name_or_path", None))
            self._deferred = _deferred_layers(model, meta)
            if self._deferred and not all(f.endswith(".safetensors") for f in self._files):
                raise ValueError("hf_compress models load from safetensors only: re-save with save_pretrained(dir).")
            if q.get("backend"):
                for local in self._deferred:
                    replace_module(model, local, _Parked(local))
            # the parked layers' tensors are loaded by us afterwards: not "unexpected" in transformers' report
            patterns = set(type(model)._keys_to_ignore_on_load_unexpected or ())
            patterns |= {rf"(^|\.){re.escape(local)}\." for local in self._deferred}
            # sparse-bitmask weights: their stored parts are read after loading (hf_compress.storage)
            unexpected, missing = sparse_ignore_patterns(model, meta)
            unexpected, missing = _clustering_patterns(model, meta, unexpected, missing)  # clustering
            model._keys_to_ignore_on_load_unexpected = patterns | unexpected
            if missing:
                model._keys_to_ignore_on_load_missing = set(type(model)._keys_to_ignore_on_load_missing or ()) | missing
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from safetensors import safe_open

            from .quantization import rebuild_quantized

            from .clustering import load_clustered_weights  # clustering

            load_clustered_weights(model, self._meta, self._files)  # clustering: codebook + indices decoded
            if self._meta.get("sharing"):  # clustering (cross-layer sharing): tie again after transformers loaded
                from .distillation.sharing import apply_sharing

                apply_sharing(model, self._meta["sharing"])
            q = self._meta.get("quantization")
            if not q or not self._deferred:
                load_sparse_weights(model, self._meta, self._files)  # hf_compress.storage
                return model
            layers = {local: q["layers"][name] for local, name in self._deferred.items() if name in q["layers"]}
            emb = q.get("embedding")  # QATConfig.embedding_bits: the Int8Embedding, under its local name
            emb_local = next((lo for lo, n in self._deferred.items() if isinstance(emb, dict) and n == emb.get("name")), None)
            rest = {k: v for k, v in q.items() if k != "embedding"}
            rebuild_quantized(model, {**rest, "layers": layers, **({"embedding": {**emb, "name": emb_local}} if emb_local else {})})
            attach_listed(model, self._meta)  # sparse low-bit weights decompress in load_state_dict below
            device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
            # checkpoint keys carry the saved model's names, which are the recorded ones
            states: dict[str, dict[str, torch.Tensor]] = {local: {} for local in self._deferred}
            for path in self._files:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        for local, name in self._deferred.items():
                            if key.startswith(name + "."):
                                states[local][key[len(name) + 1:]] = f.get_tensor(key)
                                break
            for local, state in states.items():
                module = model.get_submodule(local)
                result = module.load_state_dict(state, strict=False)
                if result.missing_keys or result.unexpected_keys:
                    raise ValueError(
                        f"{local}: the saved tensors do not fit the rebuilt layer (missing {result.missing_keys[:5]}, "
                        f"unexpected {result.unexpected_keys[:5]}). Was config.json edited?"
                    )
                module.to(device)
            load_sparse_weights(model, self._meta, self._files, skip=self._deferred)  # hf_compress.storage
            model.eval()
            return model

        def is_serializable(self):
            return True

        @property
        def is_trainable(self) -> bool:
            # low-bit layers hold integer codes: train adapters on them, not the layers themselves
            return not (self._meta.get("quantization") or {}).get("backend")

        @property
        def is_qat_trainable(self) -> bool:
            # what the Trainer asks before it accepts a loaded model (fine-tuning or evaluation): a float
            # compressed model (pruned shapes, low-rank, clustered, sparse storage) is an ordinary model
            return self.is_trainable

    return HfCompressQuantizationConfig, HfCompressQuantizer


def _clustering_before_loading(model, meta: dict, files, name_or_path) -> None:  # clustering
    """The clustering record and its stored codebooks / indices against the skeleton and the headers."""
    from .clustering import check_clustering_record
    from .storage import check_loaded_files, read_headers

    if meta.get("clustering") is not None:
        check_clustering_record(model, meta, read_headers(check_loaded_files(files, name_or_path))[0])


def _clustering_patterns(model, meta: dict, unexpected: set, missing: set) -> tuple[set, set]:  # clustering
    from .clustering import clustered_ignore_patterns

    more_unexpected, more_missing = clustered_ignore_patterns(model, meta)
    if meta.get("sharing"):  # cross-layer sharing: the blocks stored once are not missing
        from .distillation.sharing import missing_patterns

        more_missing = more_missing | missing_patterns(model, meta["sharing"])
    return unexpected | more_unexpected, missing | more_missing


# ----------------------------------------------------------------------------- model card


def _report_lines(directory: Path, report: str | Path | None = None) -> list[str]:
    places = [Path(report)] if report is not None else [directory / "report.json", directory.parent / "report.json"]
    for path in places:
        if path.is_file():
            try:
                rows = json.loads(path.read_text()).get("rows") or []
            except (OSError, ValueError):
                return []
            table = [r for r in rows if isinstance(r, dict) and "name" in r]
            if not table:
                return []
            metrics = list(dict.fromkeys(k for r in table for k in (r.get("metrics") or {})))[:3]
            batches = list(dict.fromkeys(k for r in table for k in (r.get("latency_ms") or {})))

            def num(v, fmt):
                return format(v, fmt) if isinstance(v, (int, float)) else ""

            cols = ["model", *metrics, "retention", "parameters", "disk MB", *(f"latency {b} (ms)" for b in batches)]
            lines = ["## Measured (report.json of this run)", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in table:
                cells = [str(r["name"]), *(num((r.get("metrics") or {}).get(m), ".4f") for m in metrics),
                         num(r.get("retention"), ".1%"), num(r.get("params"), ","), num(r.get("disk_mb"), ".2f"),
                         *(num((r.get("latency_ms") or {}).get(b), ".2f") for b in batches)]
                lines.append("| " + " | ".join(cells) + " |")
            return lines + [""]
    return []


def model_card(config, directory: str | Path | None = None, report: str | Path | None = None) -> str:
    """The README.md text: how to load the model, what was compressed, the report's numbers if any
    (`report`: a report.json; by default the one in `directory` or its parent)."""
    meta = get_metadata(config)
    meta.pop(BASE_KEY, None)
    archs = getattr(config, "architectures", None) or ["AutoModel"]
    auto = _auto_class_name(archs[0])
    refuse = getattr(type(config), "_hfc_refuse", False)
    base_type = base_config_class(type(config)).model_type
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- hf_compress",
        "- compressed",
        "---",
        CARD_MARK,
        "",
        f"# Compressed {archs[0]} ({base_type})",
        "",
        "Compressed with [hf_compress](https://pypi.org/project/hf_compress/) while it fine-tuned.",
        "",
        "## Load",
        "",
        "```python",
    ]
    if refuse:
        lines.append("import hf_compress  # registers the loader; pip install hf_compress")
    lines += [
        f"from transformers import {auto}",
        f'model = {auto}.from_pretrained("path/or/repo-id")',
        "```",
        "",
    ]
    if refuse:
        lines += [
            "Without `import hf_compress` transformers refuses this directory (its `model_type` names hf_compress): "
            f"it holds {', '.join(reasons(config))}, which a stock config cannot describe. "
            "`pipeline(task, model=...)` works the same after the import; `hf_compress.load_pretrained(dir)` also loads it.",
            "",
        ]
    else:
        lines += ["Stock transformers loads this directory as it is (no hf_compress needed).", ""]
    lines += ["## What was compressed", ""]
    lines += _describe(meta) or ["- (nothing recorded)"]
    lines += ["", "The full record is the `hf_compress` entry of `config.json`.", ""]
    if directory is not None or report is not None:
        lines += _report_lines(Path(directory or "."), report)
    return "\n".join(lines)


def _auto_class_name(arch: str) -> str:
    for suffix, auto in (("ForSequenceClassification", "AutoModelForSequenceClassification"),
                         ("ForTokenClassification", "AutoModelForTokenClassification"),
                         ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
                         ("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                         ("ForMaskedLM", "AutoModelForMaskedLM")):
        if arch.endswith(suffix):
            return auto
    return "AutoModel"


def _describe(meta: dict) -> list[str]:
    out = []
    p = meta.get("pruning")
    if isinstance(p, dict):
        removed = p.get("removed") or {}
        parts = [f"{removed[k]} {k}" for k in ("layers", "heads", "neurons") if removed.get(k)]
        if parts:
            out.append(f"- Pruning (structured, removed): {', '.join(parts)}; {removed.get('parameters', 0):,} parameters fewer")
        if p.get("heads"):
            out.append(f"- Heads per layer: {p['heads']}")
        if p.get("ffn"):
            out.append(f"- FFN width per layer: {p['ffn']}")
        for run in p.get("runs") or []:
            if isinstance(run, dict):
                bits = [f"{k}={run[k]}" for k in ("granularity", "target_sparsity", "method", "scope") if k in run]
                if bits:
                    out.append(f"- Pruning run: {', '.join(bits)}")
    q = meta.get("quantization")
    if isinstance(q, dict):
        layers = q.get("layers") or {}
        bits = sorted({(d.get("weight") or {}).get("bits") for d in layers.values()
                       if isinstance(d, dict) and isinstance(d.get("weight"), dict)} - {None})
        out.append(f"- Quantisation: {len(layers)} layers, {'/'.join(map(str, bits)) or '?'}-bit weights, stored as "
                   f"{q.get('backend') or 'float values on the quantisation grid'}")
    lr = meta.get("lowrank")  # lowrank
    if isinstance(lr, dict) and lr.get("layers"):  # lowrank
        out.append(f"- Low-rank factorisation ({lr.get('method', 'svd')}): {len(lr['layers'])} layers, "  # lowrank
                   f"{lr.get('parameters_saved', 0):,} parameters fewer")  # lowrank
    d = meta.get("distillation")
    if isinstance(d, dict):
        out.append(f"- Distilled student: teacher blocks {d.get('teacher_blocks')} of {d.get('teacher_num_layers')}")
    return out


def write_model_card(directory: str | Path, config, report: str | Path | None = None) -> Path | None:
    """Write README.md into `directory` unless a README.md that hf_compress did not write is there; with
    `report` (a report.json written after the model was saved), its numbers go into the card."""
    path = Path(directory) / "README.md"
    if path.exists():
        try:
            if CARD_MARK not in path.read_text(errors="replace"):
                return None
        except OSError:
            return None
    path.write_text(model_card(config, directory, report))
    return path


# ----------------------------------------------------------------------------- registration


def register() -> None:
    """Register the config type, the quantizer and the record listener with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    AutoConfig.register(MODEL_TYPE, _compressed_config_dispatch(), exist_ok=True)
    qconfig, quantizer = _quantizer_classes()
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(qconfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(quantizer)
    on_record(mark_compressed)
    _REGISTERED = True
