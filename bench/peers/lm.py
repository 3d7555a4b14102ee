"""Shared pieces of the causal-LM distillation comparison (ours vs TRL), importable from any venv that
has hf_compress installed (the peer venvs install it editable with --no-deps).

Setting = configs/tinyshakespeare_causal.yaml, read with hf_compress's own recipe loader so both sides
see the same numbers: the character tokenizer, 128-character blocks of ../shared/data/tinyshakespeare
(all ~7,900 training blocks, the first 200 validation blocks), a 4-layer Llama-style teacher (hidden
128) trained from scratch with the recipe's teacher settings (1500 steps, lr 2e-3, batch 16), and a
2-layer student initialised from teacher blocks 0 and 3 (`student_from_teacher`).

The teacher is trained ONCE and cached (safetensors) in bench/.cache/peers/lm-teacher-<key>: every
side distils from the same weights. Evaluation: mean next-token cross-entropy over the validation
blocks (`hf_compress.metrics.evaluate_model`), and its perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
RECIPE = ROOT / "configs" / "tinyshakespeare_causal.yaml"
CACHE = BENCH / ".cache" / "peers"

# --quick: a few steps and blocks (proves the scripts run; numbers meaningless)
QUICK = {"teacher_steps": 30, "steps": 8, "train_blocks": 256, "eval_blocks": 32}


def data_dir() -> Path:
    sys.path.insert(0, str(BENCH))
    from common import data_dir as dd

    return dd()


def recipe(quick: bool = False):
    """The recipe, with --quick overrides applied through the recipe's own override syntax."""
    from hf_compress.cli.recipes import load_recipe

    overrides = [f"data_dir={data_dir()}"]
    if quick:
        overrides += [f"teacher.train.max_steps={QUICK['teacher_steps']}", f"data.train_samples={QUICK['train_blocks']}",
                      f"data.eval_samples={QUICK['eval_blocks']}", "teacher.train.warmup_steps=2"]
    return load_recipe(RECIPE, overrides)


def setup(quick: bool = False):
    """(recipe, tokenizer, splits) — identical on both sides."""
    from hf_compress.cli.data import load_datasets
    from hf_compress.cli.recipes import build_tokenizer

    r = recipe(quick)
    tok = build_tokenizer(r.model.tokenizer, r.model.name)
    splits = load_datasets(r.data, tok, r.model.task, r.data_dir)
    return r, tok, splits


def _teacher_key(r) -> str:
    import dataclasses
    import hashlib

    from hf_compress.cli.recipes import fingerprint

    return hashlib.sha1(fingerprint({"model": dataclasses.asdict(r.model), "teacher": r.teacher.train, "training": r.training,
                        "data": dataclasses.asdict(r.data), "seed": r.seed}).encode()).hexdigest()[:12]


def teacher(r, tok, splits, log=print):
    """The recipe's teacher: trained once with the stock Trainer, then loaded from bench/.cache/peers."""
    from transformers import AutoModelForCausalLM, Trainer, default_data_collator, set_seed

    from hf_compress.cli.recipes import build_model

    path = CACHE / f"lm-teacher-{_teacher_key(r)}"
    if not (path / "model.safetensors").exists():
        args = r.teacher_training_args()
        args.output_dir = str(path / "run")
        args.disable_tqdm = True
        log(f"[peers] training the teacher ({args.max_steps} steps, {len(splits.train)} blocks) -> {path}")
        t0 = time.time()
        set_seed(r.seed)
        model = build_model(r.model.name, r.model.task, tok, None, r.model.config, seed=r.seed)
        Trainer(model=model, args=args, train_dataset=splits.train, processing_class=tok,
                data_collator=default_data_collator).train()
        model.save_pretrained(path)
        (path / "teacher_minutes.txt").write_text(f"{(time.time() - t0) / 60:.2f}\n")
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), path


def student(r, teacher_model):
    from hf_compress.distillation.student import student_from_teacher

    return student_from_teacher(teacher_model, layers=r.student.layers)


def evaluate(model, splits, r) -> dict:
    from transformers import default_data_collator

    from hf_compress.metrics import evaluate_model

    return evaluate_model(model, splits.eval, "causal-lm", default_data_collator,
                          r.training.get("per_device_eval_batch_size", 32))


def student_training(r, quick: bool = False, steps: int | None = None) -> dict:
    """The student's TrainingArguments values (the recipe's `training` section), for either trainer."""
    values = dict(r.training)
    values.update(output_dir=str(CACHE / "lm-runs"), report_to=[], seed=r.seed, data_seed=r.seed, use_cpu=True,
                  save_strategy="no", disable_tqdm=True)
    if quick:
        values.update(max_steps=QUICK["steps"], warmup_steps=2, logging_steps=4)
    if steps:
        values["max_steps"] = steps
    return values


def step_timer():
    """bench/common.StepTimer (median wall time per optimizer step after the 3rd)."""
    sys.path.insert(0, str(BENCH))
    from common import StepTimer

    return StepTimer()


def parse_args(description: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few steps and blocks: proves the script runs")
    p.add_argument("--steps", type=int, default=None, help="student steps (default: the recipe's 400)")
    p.add_argument("--out", default=None, help="JSON file for this side's rows")
    p.add_argument("--extra", action="store_true", help="also the extra rows (TRL: GKD with its default beta=0.5)")
    return p.parse_args(argv)


def versions(*names) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in ("torch", "transformers", "accelerate", *names):
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def dump(out: str | None, payload: dict) -> None:
    payload = {"python": sys.executable, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}",
               **payload}
    text = json.dumps(payload, indent=1, default=str)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)


def median(xs):
    return statistics.median(xs) if xs else float("nan")
