"""Loading and tokenising the data of a compression run (one home: the CLI, bench/ and examples use it).

Sources, tried in this order: explicit files (`train_file` / `eval_file`), a local folder (`local`,
absolute or relative to the run's data folder) holding ``<split>.jsonl|json|csv|txt``, then a Hub
dataset (`hub`). Local rows are read with the standard library; the Hub is only contacted when no local
file is found. Classification rows become ``input_ids``/``attention_mask``/``labels`` (padding happens in
the collator); causal-LM text is tokenised, concatenated and cut into blocks of `max_length` tokens.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


@dataclass
class DataConfig:
    """The ``data`` section of a recipe."""

    hub: str | None = field(default=None, metadata={"help": "Hub dataset id, used when no local file is found: 'glue/sst2', 'dair-ai/emotion', 'nyu-mll/glue:sst2' (':' names the config)."})
    local: str | None = field(default=None, metadata={"help": "Local folder with <split>.jsonl|json|csv|txt: absolute, or relative to data_dir."})
    train_file: str | None = field(default=None, metadata={"help": "Explicit training file (jsonl/json/csv/txt); wins over `local` and `hub`."})
    eval_file: str | None = field(default=None, metadata={"help": "Explicit evaluation file (jsonl/json/csv/txt)."})
    train_split: str = field(default="train", metadata={"help": "Split (or file stem) used for training."})
    eval_split: str = field(default="validation", metadata={"help": "Split (or file stem) used for evaluation."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for sentence-pair tasks."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label (int, or a name listed in `labels`)."})
    labels: list[str] | None = field(default=None, metadata={"help": "Label names in id order, when the label column holds names."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example (classification: truncation; causal LM: block size)."})
    train_samples: int | None = field(default=None, metadata={"help": "Use this many training examples (a seeded random subset); causal LM: blocks."})
    eval_samples: int | None = field(default=None, metadata={"help": "Use the first N evaluation examples; causal LM: blocks."})
    seed: int = field(default=0, metadata={"help": "Seed of the training subset permutation."})

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length!r} must be >= 2.")
        for name in ("train_samples", "eval_samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"data.{name}={v!r} must be >= 1, or null for all rows.")
        if not (self.hub or self.local or self.train_file):
            raise ValueError("data: give `local` (a folder under data_dir), `train_file`/`eval_file`, or `hub` (a Hub dataset id).")


# ----------------------------------------------------------------------------- tokenizers


def char_tokenizer():
    """A character-level tokenizer over printable ASCII + newline/tab (102 ids), built offline.

    Fits the tiny test models (vocabulary 128) and small decoders built from a config; saves and
    reloads with ``AutoTokenizer``. Single sequences get ``[CLS] ... [SEP]``; pass
    ``add_special_tokens=False`` for language modelling.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", eos_token="[SEP]", bos_token="[CLS]", model_max_length=4096,
    )


# ----------------------------------------------------------------------------- reading rows


def read_rows(path: str | Path, text_column: str = "text") -> list[dict]:
    """Rows of a jsonl / json / csv file; a .txt file is one row ``{text_column: whole text}``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist.")
    if path.suffix == ".txt":
        return [{text_column: path.read_text(encoding="utf-8")}]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise ValueError(f"data file {path} line {e.lineno}: not valid JSON ({e.msg}).") from None
            return _json_lines(path)  # JSON lines in a .json file (as `datasets` reads them)
        if isinstance(data, dict):  # {"data": [...]} or columns {"text": [...], "label": [...]}
            data = data.get("data", data)
            if isinstance(data, dict):
                keys = list(data)
                data = [dict(zip(keys, vals)) for vals in zip(*data.values())]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"data file {path}: expected a list of rows (objects), or JSON lines.")
        return list(data)
    if path.suffix == ".jsonl":
        return _json_lines(path)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {SUFFIXES}.")


def _json_lines(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data file {path} line {n}: not valid JSON ({e.msg}, column {e.colno}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"data file {path} line {n}: expected a JSON object per line, got {type(row).__name__}.")
            rows.append(row)
    return rows


def _find_split(folder: Path, split: str) -> Path | None:
    for suffix in SUFFIXES:
        if (folder / f"{split}{suffix}").exists():
            return folder / f"{split}{suffix}"
    return None


def _resolve(p: str, data_dir: Path | None) -> Path:
    path = Path(os.path.expanduser(p))
    if not path.is_absolute() and data_dir is not None and not path.exists():
        path = data_dir / path
    return path


def default_data_dir() -> Path:
    """Where relative ``data.local`` paths are looked up without ``data_dir=``: $HF_COMPRESS_DATA, else the
    working directory."""
    return Path(os.environ.get("HF_COMPRESS_DATA") or ".")


def _hub_rows(cfg: DataConfig, split: str) -> list[dict]:
    from datasets import load_dataset

    name, _, conf = cfg.hub.partition(":")
    try:
        ds = load_dataset(name, conf or None, split=split)
    except Exception:
        if conf or name.count("/") != 1:
            raise
        # "glue/sst2": a canonical dataset and its configuration
        repo, conf = name.split("/")
        ds = load_dataset(repo, conf, split=split)
    return [dict(r) for r in ds]


def load_rows(cfg: DataConfig, data_dir: str | Path | None = None) -> tuple[list[dict], list[dict], str]:
    """(train rows, eval rows, where they came from), following the order in the module docstring."""
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    tried = []
    if cfg.train_file:
        train_path = _resolve(cfg.train_file, data_dir)
        if not cfg.eval_file:
            raise ValueError("data.train_file is set: set data.eval_file too (the report evaluates on it).")
        eval_path = _resolve(cfg.eval_file, data_dir)
        for p in (train_path, eval_path):
            if not p.exists():
                raise FileNotFoundError(f"data file {p} does not exist (data.train_file / data.eval_file).")
        return read_rows(train_path, cfg.text_column), read_rows(eval_path, cfg.text_column), f"{train_path}, {eval_path}"
    if cfg.local:
        folder = _resolve(cfg.local, data_dir)
        tr, ev = _find_split(folder, cfg.train_split), _find_split(folder, cfg.eval_split)
        if tr and ev:
            return read_rows(tr, cfg.text_column), read_rows(ev, cfg.text_column), str(folder)
        tried.append(f"no {cfg.train_split}/{cfg.eval_split} {{{'|'.join(s[1:] for s in SUFFIXES)}}} files in {folder}")
    if cfg.hub:
        try:
            return _hub_rows(cfg, cfg.train_split), _hub_rows(cfg, cfg.eval_split), f"hub:{cfg.hub}"
        except Exception as e:
            tried.append(f"the Hub dataset {cfg.hub!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    local = cfg.local or "<name>"
    raise FileNotFoundError(
        "data: " + "; ".join(tried) + ". Pass the folder that holds the data: "
        f"`data_dir=DIR` with DIR/{local}/{cfg.train_split}.jsonl and DIR/{local}/{cfg.eval_split}.jsonl "
        "(e.g. data_dir=../shared/data), or the files themselves: "
        "`data.train_file=PATH data.eval_file=PATH`, or a reachable Hub id `data.hub=NAME`."
    )


# ----------------------------------------------------------------------------- tokenising


def _check_columns(rows: list[dict], columns: list[str], where: str) -> None:
    if not rows:
        raise ValueError(f"data: {where} has no rows.")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(
            f"data: {where} has no column(s) {missing}; its columns are {sorted(rows[0])}. "
            "Set data.text_column / data.label_column (and data.text_pair_column) to the right names."
        )


def check_rows(rows: list[dict], cfg: DataConfig, where: str, num_labels: int | None = None) -> None:
    """Every row has its text and a label, labels are class ids within `num_labels` (or names); one-line
    errors name the data and the row (1-based, in file order)."""
    cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    _check_columns(rows, cols + [cfg.label_column], where)
    for i, r in enumerate(rows, 1):
        for c in cols:
            if r.get(c) is None:
                raise ValueError(f"data: {where} row {i} has no `{c}` (data.text_column / data.text_pair_column).")
        v = r.get(cfg.label_column)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"data: {where} row {i} has no label (column `{cfg.label_column}`, data.label_column).")
        if cfg.labels and v in cfg.labels:
            continue
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"data: {where} row {i}: label {v!r} is not a class id (an integer) or name.")
        as_int = v if isinstance(v, (int, float)) else (int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else None)
        if as_int is None:
            if cfg.labels:
                raise ValueError(f"data: {where} row {i}: label {v!r} is not one of data.labels={cfg.labels}.")
            continue  # label names: ids in sorted order
        as_int = int(as_int)
        if as_int < 0:
            raise ValueError(f"data: {where} row {i}: label {v!r} is negative; class ids are 0..num_labels-1.")
        if cfg.labels and as_int >= len(cfg.labels):
            raise ValueError(
                f"data: {where} row {i}: label {v!r} is not one of data.labels={cfg.labels} "
                f"(nor a class id 0..{len(cfg.labels) - 1})."
            )
        if num_labels is not None and num_labels > 1 and as_int >= num_labels:
            raise ValueError(
                f"data: {where} row {i}: label {v!r} is out of range for model.num_labels={num_labels} (ids 0..{num_labels - 1})."
            )
    if num_labels == 1:
        raise ValueError(
            f"model.num_labels=1 (one output: regression) but {where} holds class labels in `{cfg.label_column}`: "
            "set model.num_labels to the number of classes (or null to count them)."
        )


def _label_ids(rows: list[dict], cfg: DataConfig) -> tuple[list[int], list[str] | None]:
    values = [r[cfg.label_column] for r in rows]
    if cfg.labels:
        index = {name: i for i, name in enumerate(cfg.labels)}
        out = []
        for v in values:
            if v in index:
                out.append(index[v])
            elif isinstance(v, int) and 0 <= v < len(index):
                out.append(v)
            else:
                raise ValueError(f"data: label {v!r} is not one of data.labels={cfg.labels}.")
        return out, list(cfg.labels)
    try:
        return [int(v) for v in values], None
    except (TypeError, ValueError):
        names = sorted({str(v) for v in values})
        return [names.index(str(v)) for v in values], names


def classification_dataset(rows: list[dict], tokenizer, cfg: DataConfig, where: str):
    """(tokenised `datasets.Dataset` with input_ids, attention_mask (token_type_ids), labels; label names or None)."""
    from datasets import Dataset

    cols = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    _check_columns(rows, cols, where)
    labels, names = _label_ids(rows, cfg)
    texts = [str(r[cfg.text_column]) for r in rows]
    pairs = [str(r[cfg.text_pair_column]) for r in rows] if cfg.text_pair_column else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
    data = {k: list(v) for k, v in enc.items()}
    data["labels"] = labels
    return Dataset.from_dict(data), names


def lm_blocks(rows: list[dict], tokenizer, cfg: DataConfig, where: str, limit: int | None = None):
    """Text tokenised and concatenated, cut into `max_length`-token blocks (labels = input_ids)."""
    from datasets import Dataset

    _check_columns(rows, [cfg.text_column], where)
    size = cfg.max_length
    need = None if limit is None else (limit * size)
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if len(rows) > 1 and tokenizer.eos_token_id is not None else []
    for r in rows:
        lines = str(r[cfg.text_column]).splitlines(keepends=True)
        for start in range(0, len(lines), 2000):
            for chunk in tokenizer(lines[start:start + 2000], add_special_tokens=False)["input_ids"]:
                ids.extend(chunk)
            if need is not None and len(ids) >= need:
                break
        ids.extend(sep)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // size
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise ValueError(f"data: {where} holds {len(ids)} tokens, fewer than one block of data.max_length={size}.")
    blocks = np.asarray(ids[: n * size], dtype=np.int64).reshape(n, size)
    return Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": np.ones_like(blocks).tolist(), "labels": blocks.tolist()})


def _subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    pick = np.random.RandomState(seed).permutation(len(rows))[:n]
    return [rows[i] for i in sorted(pick)]


@dataclass
class Splits:
    train: Any
    eval: Any
    source: str
    num_labels: int | None = None
    label_names: list[str] | None = None


def split_names(cfg: DataConfig, source: str) -> tuple[str, str]:
    """How errors name the train and eval data: the file when it is one, else source (split)."""
    if cfg.train_file and ", " in source:
        a, b = source.split(", ", 1)
        return a, b
    if not source.startswith("hub:"):
        folder = Path(source)
        tr, ev = _find_split(folder, cfg.train_split), _find_split(folder, cfg.eval_split)
        if tr and ev:
            return str(tr), str(ev)
    return f"{source} ({cfg.train_split})", f"{source} ({cfg.eval_split})"


def load_datasets(cfg: DataConfig, tokenizer, task: str, data_dir: str | Path | None = None,
                  num_labels: int | None = None) -> Splits:
    """The train and eval splits tokenised for `task`, where they came from, and the label set.

    Classification: a seeded random subset of `train_samples` rows and the first `eval_samples` eval
    rows; string labels get ids in sorted order (or `labels` order) shared by both splits.
    Causal LM: the first `train_samples` / `eval_samples` blocks.
    """
    train_rows, eval_rows, source = load_rows(cfg, data_dir)
    if task == "causal-lm":
        if len(train_rows) > 1 and cfg.train_samples is not None:
            train_rows = _subset(train_rows, cfg.train_samples, cfg.seed)  # blocks come from the subset's text
        return Splits(
            lm_blocks(train_rows, tokenizer, cfg, f"{source} ({cfg.train_split})", cfg.train_samples),
            lm_blocks(eval_rows, tokenizer, cfg, f"{source} ({cfg.eval_split})", cfg.eval_samples),
            source,
        )
    train_where, eval_where = split_names(cfg, source)
    check_rows(train_rows, cfg, train_where, num_labels)
    check_rows(eval_rows, cfg, eval_where, num_labels)
    train_rows = _subset(train_rows, cfg.train_samples, cfg.seed)
    eval_rows = eval_rows[: cfg.eval_samples] if cfg.eval_samples else eval_rows
    train, names = classification_dataset(train_rows, tokenizer, cfg, f"{source} ({cfg.train_split})")
    if names and not cfg.labels:  # the eval split reuses the training label names so ids agree
        cfg = replace(cfg, labels=names)
    ev, _ = classification_dataset(eval_rows, tokenizer, cfg, f"{source} ({cfg.eval_split})")
    num_labels = len(names) if names else int(max(max(train["labels"]), max(ev["labels"]))) + 1
    return Splits(train, ev, source, num_labels, names)
