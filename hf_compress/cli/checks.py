"""Checks that need no training, run by `--dry-run` and by `run` before its first training step.

The teacher(s) and the student are built on the meta device (shapes, no weights, no memory), so the
recipe's numbers are checked against the real model: `data.max_length` against its positions,
`student.layers` against its blocks, pruning / QAT targets, `layer_bits` patterns, `group_size` and
N:M divisibility against its Linear layers, `model.config` / `student.config` keys against its config.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from pathlib import Path

import torch
from torch import nn

from . import models
from .owned import EXPORT_MARKER, TEACHER_MARKER, check_folder
from .recipes import TINY, Recipe, _auto_class, _packaged_minilm, build_model, refuse_missing_folder, resolve_spec, MINILM_HUB_ID

TINY_CONFIGS = {"bert": "BertConfig", "llama": "LlamaConfig", "gpt2": "GPT2Config"}


def teacher_dirs(r: Recipe) -> list[Path]:
    n = len(r.teacher.names)
    return [Path(r.out_dir) / ("teacher" if n == 1 else f"teacher-{i}") for i in range(n)]


def check_folders(r: Recipe) -> None:
    """The folders the run saves models into hold nothing it did not write (it would delete or overwrite it)."""
    if r.teacher.train is not None:
        for folder in teacher_dirs(r):
            check_folder(folder, TEACHER_MARKER, "teacher folder", model_files_only=False)
    check_folder(Path(r.export_dir), EXPORT_MARKER, "export.dir", model_files_only=True)


# ----------------------------------------------------------------------------- config keys


def _valid_config_keys(spec: str) -> set[str] | None:
    import transformers

    if spec.startswith("tiny:"):
        family = spec.split(":", 1)[1]
        if family not in TINY:
            return None
        builder = getattr(models, f"tiny_{family}")
        params = {p for p, v in inspect.signature(builder).parameters.items() if v.kind != v.VAR_KEYWORD}
        cfg_cls = getattr(transformers, TINY_CONFIGS[family])
        return (params - {"seed", "num_labels"}) | _config_keys(cfg_cls)
    if spec.startswith("config:"):
        from transformers import AutoConfig

        try:
            cfg_cls = type(AutoConfig.for_model(spec.split(":", 1)[1]))
        except ValueError:
            return None  # build_model names the bad model_type
        return _config_keys(cfg_cls)
    return set()


def _config_keys(cfg_cls) -> set[str]:
    keys = set(cfg_cls().to_dict()) | set(getattr(cfg_cls, "attribute_map", {}))
    for klass in cfg_cls.__mro__:
        if "__init__" in vars(klass):
            keys |= {p for p, v in inspect.signature(klass.__init__).parameters.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
    return keys - {"self"}


def check_config_keys(spec: str, config: dict, where: str) -> None:
    if not config:
        return
    valid = _valid_config_keys(spec)
    if valid is None:
        return
    if not valid:
        raise ValueError(f"recipe: `{where}` applies to tiny:/config: specs only; {spec!r} is loaded as saved, "
                         f"so `{where}` would be ignored: remove it.")
    from .recipes import unknown_key_message

    for key in config:
        if key not in valid:
            raise ValueError(unknown_key_message(where, key, sorted(valid), f"the {spec} config"))


# ----------------------------------------------------------------------------- meta models


def meta_model(spec: str, task: str, tokenizer, num_labels: int | None, config: dict | None, seed: int) -> nn.Module:
    """The model `spec` names, built on the meta device (no weights read or allocated) where possible."""
    from transformers import AutoConfig

    if spec.startswith(("tiny:", "config:")):
        with torch.device("meta"):
            return build_model(spec, task, tokenizer, num_labels, config, seed=seed)
    target = resolve_spec(spec)
    path = Path(target)
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()).get("hf_compress"):
        # a compressed model: its structure lives in its config, rebuilt by load_pretrained (small: load it)
        return build_model(spec, task, tokenizer, num_labels, config, seed=seed)
    label_kw = {"num_labels": num_labels} if task != "causal-lm" and num_labels else {}
    try:
        cfg = AutoConfig.from_pretrained(target, **label_kw)
    except (OSError, ValueError) as e:
        fallback = _packaged_minilm() if target == MINILM_HUB_ID else None
        if fallback is None:
            refuse_missing_folder(target, "model")
            raise ValueError(f"model {target!r} could not be loaded ({str(e).splitlines()[0][:200]}). Offline? Pass a "
                             "local folder, or `packaged:minilm`.") from None
        cfg = AutoConfig.from_pretrained(fallback, **label_kw)
    with torch.device("meta"):
        model = _auto_class(task).from_config(cfg)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(
            f"model {spec!r} has {model.get_input_embeddings().num_embeddings} token embeddings but the tokenizer "
            f"has {len(tokenizer)} tokens: use the model's own tokenizer (model.tokenizer: null)."
        )
    return model


def _positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _num_blocks(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    return None


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def preflight(r: Recipe, tokenizer, splits) -> dict:
    """Every check of the recipe against its data and (meta-device) models that needs no training.

    Raises ValueError naming the recipe key. Returns what it checked (for --dry-run's summary).
    """
    task = r.model.task
    num_labels = r.model.num_labels or splits.num_labels
    check_config_keys(r.model.name, r.model.config, "model.config")
    if r.student.name is not None:
        check_config_keys(r.student.name, r.student.config, "student.config")
    elif r.student.config:
        raise ValueError("recipe: `student.config` is only used with `student.name` (a separate student model): "
                         "set student.name, or remove student.config.")
    if r.model.num_labels is not None and splits.num_labels and task != "causal-lm" and r.model.num_labels < splits.num_labels:
        raise ValueError(f"model.num_labels={r.model.num_labels} but the data has {splits.num_labels} classes.")

    teachers = []
    for i, name in enumerate(r.teacher.names):
        spec = name or r.model.name
        key = "model.name" if name is None else ("teacher.name" + (f"[{i}]" if isinstance(r.teacher.name, list) else ""))
        # like the run: the teacher is built with model.config (the model's own settings)
        t = meta_model(spec, task, tokenizer, num_labels, r.model.config, r.seed + i)
        pos = _positions(t.config)
        if pos is not None and r.data.max_length > pos:
            raise ValueError(f"data.max_length={r.data.max_length} exceeds the {pos} positions of {key} {spec!r} "
                             f"(config max_position_embeddings): set data.max_length <= {pos}.")
        teachers.append(t)
    teacher = teachers[0]

    s = r.student
    if s.layers is not None:
        n = _num_blocks(teacher.config)
        for v in s.layers:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"student.layers: {v!r} is not a block index (an integer).")
            if n is not None and not 0 <= v < n:
                raise ValueError(f"student.layers: index {v} is out of range: the teacher has {n} blocks (0..{n - 1}).")
        if len(set(s.layers)) != len(s.layers):
            raise ValueError(f"student.layers={s.layers}: an index repeats.")
        from ..distillation.student import student_from_teacher

        with torch.device("meta"):
            student = student_from_teacher(teacher, layers=s.layers)
    elif s.name is not None:
        student = meta_model(s.name, task, tokenizer, num_labels, s.config, r.seed)
        pos = _positions(student.config)
        if pos is not None and r.data.max_length > pos:
            raise ValueError(f"data.max_length={r.data.max_length} exceeds the {pos} positions of student.name {s.name!r}.")
    else:
        student = teacher

    args = types.SimpleNamespace(max_steps=r.training_args().max_steps)
    prunes = r.pruning_configs()
    if prunes:
        from ..callbacks.pruning import PruningCallback

        for i, p in enumerate(prunes):
            where = "pruning" if len(prunes) == 1 else f"pruning.{i}"
            _on_meta(lambda: PruningCallback(p).on_init_end(args, None, None, model=student), where)
    qat = r.quantization_config()
    if qat is not None:
        from ..callbacks.qat import QATCallback

        names = _linear_names(student)
        for pattern in (getattr(qat, "layer_bits", None) or {}):
            if not any(re.search(pattern, x) for x in names):
                raise ValueError(f"quantization.layer_bits: pattern {pattern!r} matches no Linear module of the student "
                                 f"({type(student).__name__}); Linear modules look like {names[:5]}.")
        _on_meta(lambda: QATCallback(qat).on_init_end(args, None, None, model=student), "quantization")
    return {"teachers": len(teachers), "student": type(student).__name__, "num_labels": num_labels}


def _on_meta(fn, where: str) -> None:
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(("recipe", where)) else f"recipe `{where}`: {msg}") from None
    except (NotImplementedError, RuntimeError):
        pass  # an operation meta tensors do not support: checked again on the real model before training
