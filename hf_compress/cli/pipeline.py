"""What `hf-compress run` does with a recipe, phase by phase.

tokenizer → data → teacher(s) (fine-tuned first when the recipe asks; reused when an earlier run with
the same settings saved one) → teacher evaluation → student build → training (DistillationTrainer when
the recipe has a `distillation` section, else the stock Trainer; PruningCallback before QATCallback) →
evaluation → export (`trainer.save_model`, reloaded with `load_pretrained` as a check) → latency and the
report. Under `accelerate launch` / `torchrun` every rank trains; only the main process writes files,
evaluates and measures.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from functools import partial
from pathlib import Path

import torch

from ..callbacks._logs import report_to_integrations
from ..integration import write_model_card
from ..metadata import get_metadata
from ..metrics import classification_metrics, collator_for, evaluate_model
from ..report import compression_report, quiet_progress
from .checks import check_folders, preflight, teacher_dirs
from .data import load_datasets
from .owned import EXPORT_MARKER, TEACHER_MARKER, clear_owned, mark, present, read_marker
from .recipes import Recipe, build_model, build_tokenizer, content_hash, fingerprint
from .report import markdown_table, write_report

FINGERPRINT = TEACHER_MARKER
# TrainingArguments that do not change the fine-tuned teacher's weights (ignored when deciding reuse)
NO_EFFECT = {
    "output_dir", "logging_steps", "logging_strategy", "logging_first_step", "disable_tqdm", "report_to", "run_name",
    "save_strategy", "save_steps", "save_total_limit", "eval_strategy", "eval_steps", "per_device_eval_batch_size",
    "log_level", "dataloader_num_workers", "resume_from_checkpoint",
}


def training_args(recipe: Recipe, **extra):
    """The run's TrainingArguments with the (distributed) state set up, the recipe's ddp_timeout honoured."""
    args = recipe.training_args(**extra)  # starts the process group with ddp_timeout (recipes.init_distributed)
    _ = args.device  # sets up the (distributed) state; PartialState() then shares it
    return args


def prepare(recipe: Recipe, say=print):
    """Tokenizer and data, then every check that needs no training; returns (tokenizer, splits)."""
    r = recipe
    check_folders(r)
    tokenizer = build_tokenizer(r.model.tokenizer, r.model.name)
    splits = load_datasets(r.data, tokenizer, r.model.task, r.data_dir, num_labels=r.model.num_labels)
    preflight(r, tokenizer, splits)
    return tokenizer, splits


def data_hash(splits) -> str:
    """Hash of the training rows actually used (tokens and labels): a changed file means a new teacher."""
    return content_hash(splits.train["input_ids"], splits.train["labels"])


class Run:
    """One recipe run; `phase` prints a short line (main process only) and times the phase."""

    def __init__(self, recipe: Recipe, args):
        from accelerate import PartialState

        self.recipe = recipe
        _ = args.device  # TrainingArguments sets up the (distributed) state; PartialState() then shares it
        self.state = PartialState()
        self.main = self.state.is_main_process
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        if self.main:
            print(f"[hf-compress] {msg}", flush=True)

    def phase(self, name: str, msg: str = ""):
        self.say(f"{name}{': ' + msg if msg else ''}")
        return _Timer(self.timings, name)

    def barrier(self) -> None:
        self.state.wait_for_everyone()


class _Timer:
    def __init__(self, timings, name):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.t


def _fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items())


def _millions(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"


def _teacher_dir(recipe: Recipe, i: int, n: int) -> Path:
    return teacher_dirs(recipe)[i]


def _train(model, args, splits, tokenizer, task, trainer_cls=None, **kw):
    from transformers import Trainer

    metrics = partial(classification_metrics, num_labels=splits.num_labels) if task != "causal-lm" else None
    trainer = (trainer_cls or Trainer)(
        model=model, args=args, train_dataset=splits.train, eval_dataset=splits.eval, processing_class=tokenizer,
        data_collator=collator_for(task, tokenizer), compute_metrics=metrics, **kw,
    )
    report_to_integrations(trainer)  # the compression callbacks' log keys reach training.report_to's dashboards
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return trainer


def _load_teachers(run: Run, tokenizer, splits) -> list:
    """Teacher models, fine-tuned first when `teacher.train` is set (and saved for reuse)."""
    r = run.recipe
    names = [n or r.model.name for n in r.teacher.names]
    num_labels = r.model.num_labels or splits.num_labels
    teachers = []
    for i, spec in enumerate(names):
        folder = _teacher_dir(r, i, len(names))
        train = {k: v for k, v in {**r.training, **(r.teacher.train or {})}.items() if k not in NO_EFFECT}
        key = fingerprint({"spec": spec, "model": dataclasses.asdict(r.model), "train": train,
                           "data": dataclasses.asdict(r.data), "source": splits.source,
                           "num_labels": num_labels, "seed": r.seed, "data_sha256": data_hash(splits)})
        marker = read_marker(folder, TEACHER_MARKER) if r.teacher.train is not None else None
        if r.teacher.train is not None and r.teacher.reuse and marker and marker.get("fingerprint") == key:
            with run.phase("teacher", f"reusing {folder} (fine-tuned by an earlier run with the same settings)"):
                teacher = build_model(str(folder), r.model.task, tokenizer, num_labels, seed=r.seed)
            teachers.append(teacher)
            continue
        with run.phase("teacher", f"loading {spec}"):
            teacher = build_model(spec, r.model.task, tokenizer, num_labels, r.model.config, seed=r.seed + i)
        if r.teacher.train is not None:
            args = r.teacher_training_args()
            steps = args.max_steps if args.max_steps > 0 else f"{args.num_train_epochs} epoch(s)"
            unit = "blocks" if r.model.task == "causal-lm" else "examples"
            with run.phase("teacher fine-tuning", f"{spec}, {steps} steps, {len(splits.train)} {unit}"):
                trainer = _train(teacher, args, splits, tokenizer, r.model.task)
                teacher = trainer.model
                if run.main:
                    clear_owned(folder, TEACHER_MARKER)  # only the files an earlier run wrote (checked before training)
                    before = present(folder)
                    with quiet_progress():
                        teacher.save_pretrained(folder)
                    tokenizer.save_pretrained(folder)
                    mark(folder, TEACHER_MARKER, before, fingerprint=key)
                run.barrier()
        teachers.append(teacher)
    return teachers


def _build_student(run: Run, teacher, tokenizer, num_labels):
    from ..distillation.student import student_from_teacher

    r = run.recipe
    s = r.student
    if s.layers is not None:
        return student_from_teacher(teacher, layers=s.layers), f"teacher blocks {s.layers}"
    if s.name is not None:
        return build_model(s.name, r.model.task, tokenizer, num_labels, s.config, seed=r.seed), s.name
    return copy.deepcopy(teacher), "a copy of the teacher"


def _describe(r: Recipe, student_desc: str, dist, prunes, qat) -> tuple[str, dict]:
    """A short label for the plot and the settings recorded in the report."""
    parts = []
    if r.student.layers is not None:
        parts.append(f"{len(r.student.layers)}L")
    if dist is not None:
        parts.append("KD")
    for prune in prunes:
        sparsity = getattr(prune, "target_sparsity", None)
        gran = getattr(prune, "granularity", "pruned")
        parts.append(f"{gran} {sparsity:.0%}" if isinstance(sparsity, float) else str(gran))
    if qat is not None:
        bits = getattr(qat, "weight_bits", None)
        export = getattr(qat, "export", None)
        parts.append(f"int{bits}" + (f" ({export})" if export else " QAT") if bits else "QAT")
    settings = {"student": student_desc}
    for name, cfg in (("distillation", dist), ("pruning", prunes or None), ("quantization", qat)):
        if cfg is not None:
            settings[name] = [_as_dict(c) for c in cfg] if isinstance(cfg, list) else _as_dict(cfg)
    return "student " + " + ".join(parts) if parts else "student", settings


def _as_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)


def _reload_check(run: Run, model, export_dir: str, splits, tokenizer, task) -> dict:
    """Reload the export with load_pretrained and compare its logits on one eval batch to the trained model."""
    from ..loading import load_pretrained

    try:
        reloaded = load_pretrained(export_dir)
    except Exception as e:  # a broken export is reported, not hidden
        run.say(f"WARNING export reload failed: {type(e).__name__}: {e}")
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    rows = [splits.eval[i] for i in range(min(8, len(splits.eval)))]
    batch = collator_for(task, tokenizer)(rows)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    reloaded.to(device)
    model.eval()
    with torch.inference_mode():
        a = model(**batch).logits.float()
        b = reloaded(**batch).logits.float()
    diff = (a - b).abs().max().item()
    ok = diff <= 1e-3 * max(1.0, a.abs().max().item())
    run.say(f"export: reloaded with load_pretrained, max |Δlogit| = {diff:.2e}" + ("" if ok else "  WARNING: differs"))
    return {"ok": ok, "max_abs_logit_diff": diff}


def run_recipe(recipe: Recipe, command: str | None = None) -> dict:
    """Run a validated recipe end to end; returns ``{"rows": ..., "paths": ...}`` (paths on the main process)."""
    from transformers import set_seed

    r = recipe
    args = training_args(r)
    run = Run(recipe, args)
    task = r.model.task
    set_seed(r.seed)
    dist, prunes, qat = r.distillation_config(), r.pruning_configs(), r.quantization_config()

    with run.phase("data", f"loading ({r.data.train_file or r.data.local or r.data.hub})"):
        tokenizer, splits = prepare(r)  # data, then every check that needs no training
    unit = "blocks" if task == "causal-lm" else "examples"
    run.say(f"data: {len(splits.train)} training / {len(splits.eval)} evaluation {unit} from {splits.source}")
    num_labels = r.model.num_labels or splits.num_labels

    teachers = _load_teachers(run, tokenizer, splits)
    metrics = {}
    teacher_names = ["teacher"] if len(teachers) == 1 else [f"teacher-{i}" for i in range(len(teachers))]
    with run.phase("teacher evaluation", f"{len(splits.eval)} {unit}"):
        if run.main:
            for name, t in zip(teacher_names, teachers):
                metrics[name] = evaluate_model(t, splits.eval, task, collator_for(task, tokenizer), r.report.eval_batch_size)
                run.say(f"{name}: {_fmt_metrics(metrics[name])} ({_millions(t)})")

    with run.phase("student build"):
        student, student_desc = _build_student(run, teachers[0], tokenizer, num_labels)
    run.say(f"student: {student_desc}, {_millions(student)}")
    label, settings = _describe(r, student_desc, dist, prunes, qat)

    callbacks = []
    if prunes:
        from ..callbacks.pruning import PruningCallback

        callbacks += [PruningCallback(p) for p in prunes]
    if qat is not None:  # after pruning: structural removal first, then the low-bit export
        from ..callbacks.qat import QATCallback

        callbacks.append(QATCallback(qat))
    kw = {"callbacks": callbacks}
    trainer_cls = None
    if dist is not None:
        from ..trainers.distillation_trainer import DistillationTrainer

        trainer_cls = DistillationTrainer
        held = teachers
        if r.teacher.low_bit:
            from ..distillation.teacher import to_low_bit

            held = [to_low_bit(copy.deepcopy(t), r.teacher.low_bit) for t in teachers]
        kw.update(teacher_model=held[0] if len(held) == 1 else held, distillation_config=dist)
    steps = args.max_steps if args.max_steps > 0 else f"{args.num_train_epochs} epoch(s) of"
    what = " + ".join(p for p, c in (("distillation", dist), ("pruning", prunes or None), ("QAT", qat)) if c is not None) or "fine-tuning"
    with run.phase("training", f"{what}, {steps} steps"):
        trainer = _train(student, args, splits, tokenizer, task, trainer_cls, **kw)
    from ..modules import unwrap

    compressed = unwrap(trainer.model)

    with run.phase("export", r.export_dir):
        if run.main:  # stale files of an earlier export (a shard index...) go; files the run did not write stay
            clear_owned(Path(r.export_dir), EXPORT_MARKER)
            before = present(Path(r.export_dir))
        run.barrier()
        with quiet_progress():
            trainer.save_model(r.export_dir)
        run.barrier()
        if run.main:
            mark(Path(r.export_dir), EXPORT_MARKER, before)
        reload = _reload_check(run, compressed, r.export_dir, splits, tokenizer, task) if run.main and r.export.check_reload else None

    result = {"rows": None, "paths": {}}
    if run.main:
        with run.phase("student evaluation", f"{len(splits.eval)} {unit}"):
            metrics[label] = evaluate_model(compressed, splits.eval, task, collator_for(task, tokenizer), r.report.eval_batch_size)
        run.say(f"{label}: {_fmt_metrics(metrics[label])}")
        models = dict(zip(teacher_names, teachers))
        models[label] = compressed
        lat = f"batch {r.report.batch_sizes}, {r.report.seq_len} tokens, median of {r.report.repeats}" if r.report.latency else "off"
        with run.phase("latency measurement", lat):
            teacher_settings = {"model": r.model.name, "fine-tuned": r.teacher.train}
            settings_all = {n: {**teacher_settings, "model": spec or r.model.name} for n, spec in zip(teacher_names, r.teacher.names)}
            settings_all[label] = settings
            rows = compression_report(models, task=task, metrics=metrics, settings=settings_all, config=r.report)
        total = time.perf_counter() - run._t0
        meta = {
            "recipe": r.source,
            "command": command,
            "data_source": splits.source,
            "train_examples": len(splits.train),
            "eval_examples": len(splits.eval),
            "export_dir": r.export_dir,
            "export_reload": reload,
            "timings_s": {k: round(v, 1) for k, v in run.timings.items()},
            "wall_time_s": round(total, 1),
            "resolved_recipe": r.to_dict(),
        }
        paths = write_report(r.out_dir, rows, title=r.name or Path(r.source or "run").stem, meta=meta, plot=r.report.plot)
        if get_metadata(compressed):  # the export's model card gets the measured numbers
            write_model_card(r.export_dir, unwrap(compressed).config, report=paths["json"])
        print("\n" + markdown_table(rows) + "\n", flush=True)
        run.say(f"report: {', '.join(str(p) for p in paths.values())} (total {total / 60:.1f} min)")
        result = {"rows": rows, "paths": paths, "export_reload": reload}
    run.barrier()
    return result
