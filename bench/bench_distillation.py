"""Distillation benchmark: a 3-layer MiniLM student with and without KD, on SST-2.

Protocol (bench/common.py): teacher = MiniLM-L6 fine-tuned on the SST-2 subset; student = teacher
blocks [0, 2, 4] (`student_from_teacher`), trained for the same steps, data and seed as
(a) plain fine-tuning (`Trainer`), (b) KD on logits (T=2, α=0.5), (c) KD + hidden-state and
attention-map matching, (d) KD from cached top-k teacher logits (the teacher runs once, before training).
Reported: validation accuracy (all 872 rows), retention vs the teacher, median step time and its
ratio to plain fine-tuning of the same student, and the teacher's median forward time on the same
batches (the online-KD budget is student step + teacher forward + 5%).

    python bench/bench_distillation.py            # full protocol (tens of minutes on 2 CPUs)
    python bench/bench_distillation.py --quick    # minutes: proves the script runs, numbers meaningless
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

import common  # noqa: E402
from hf_compress import DistillationConfig, DistillationTrainer, cache_teacher_logits, student_from_teacher  # noqa: E402

LAYERS = [0, 2, 4]
STUDENT_LR = 1e-4  # every student run alike; a 3-of-6-layer copy has to re-adapt within one epoch
VARIANTS = {
    "KD logits": dict(config=DistillationConfig(temperature=2.0, alpha=0.5)),
    "KD + hidden/attention": dict(config=DistillationConfig(temperature=2.0, alpha=0.5, hidden_loss_weight=1.0, attention_loss_weight=1.0)),
    "KD cached top-k logits": dict(config=DistillationConfig(temperature=2.0, alpha=0.5), cached=True),
}


@torch.no_grad()
def teacher_forward_time(teacher, train_ds, tok, batch: int, n: int) -> float:
    """Median teacher forward on training-sized batches (what online KD adds to a step)."""
    teacher.eval()
    collate = DataCollatorWithPadding(tok)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in train_ds.column_names]
    times = []
    for i in range(n + 2):
        start = (i * batch) % max(1, len(train_ds) - batch)
        rows = train_ds[start : start + batch]
        inputs = collate([{c: rows[c][j] for c in cols} for j in range(len(rows[cols[0]]))])
        t = time.perf_counter()
        teacher(**inputs)
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    a = common.parse_args(__doc__.split("\n")[0], argv)
    sizes = a.sizes
    tok = common.tokenizer()
    teacher = common.teacher(sizes, tok)
    train_ds, val_ds = common.sst2(tok, sizes["train"], sizes["eval_rows"])
    work = common.CACHE / "distillation-runs"
    steps = sizes["steps"]

    teacher_acc = common.accuracy(teacher, val_ds, tok)
    print(f"[bench] teacher accuracy {teacher_acc:.4f} on {len(val_ds)} validation rows", flush=True)
    rows = [dict(model="teacher (MiniLM-L6)", accuracy=teacher_acc, retention=1.0, params_M=teacher.num_parameters() / 1e6)]

    def student():
        torch.manual_seed(common.SEED)
        return student_from_teacher(teacher, layers=LAYERS)

    print(f"[bench] student without KD: {steps} steps", flush=True)
    plain = student()
    _, plain_step = common.train(plain, train_ds, common.training_args(str(work / "plain"), steps=steps, lr=STUDENT_LR), tok)
    plain_acc = common.accuracy(plain, val_ds, tok)
    rows.append(dict(model="3-layer student, no KD", accuracy=plain_acc, retention=plain_acc / teacher_acc,
                     params_M=plain.num_parameters() / 1e6, step_s=plain_step, step_ratio=1.0))

    cache_s = None
    for name, spec in VARIANTS.items():
        print(f"[bench] student, {name}: {steps} steps", flush=True)
        model = student()
        data, teacher_model = train_ds, teacher
        if spec.get("cached"):
            t = time.perf_counter()
            data = cache_teacher_logits(teacher, train_ds, k=2, batch_size=64)
            cache_s = time.perf_counter() - t
            teacher_model = None
        trainer, step = common.train(
            model, data, common.training_args(str(work / name.replace(" ", "_").replace("/", "-")), steps=steps, lr=STUDENT_LR), tok,
            trainer_cls=DistillationTrainer, teacher_model=teacher_model, distillation_config=spec["config"],
        )
        acc = common.accuracy(model, val_ds, tok)
        rows.append(dict(model=f"3-layer student, {name}", accuracy=acc, retention=acc / teacher_acc,
                         params_M=model.num_parameters() / 1e6, step_s=step, step_ratio=step / plain_step))

    t_fwd = teacher_forward_time(teacher, train_ds, tok, batch=32, n=10 if a.quick else 30)
    by = {r["model"]: r for r in rows}
    kd = by["3-layer student, KD logits"]
    cached = by["3-layer student, KD cached top-k logits"]
    goals = {
        "KD retention >= 99%": common.goal(kd["retention"] >= 0.99),
        "KD >= no-KD + 1 pt": common.goal(kd["accuracy"] >= plain_acc + 0.01),
        "online KD step <= student step + teacher forward + 5%": common.goal(kd["step_s"] <= 1.05 * (plain_step + t_fwd)),
        "cached-logit KD step <= 1.05x plain": common.goal(cached["step_s"] <= 1.05 * plain_step),
    }
    cols = ["model", "accuracy", "retention", "params_M", "step_s", "step_ratio"]
    print(common.table(rows, cols))
    print(f"teacher forward per batch of 32: {t_fwd:.4f} s; budget for an online KD step: {plain_step + t_fwd:.4f} s"
          + (f"; caching the teacher's logits took {cache_s:.1f} s once" if cache_s is not None else ""))
    for g, v in goals.items():
        print(f"  {g}: {v}")
    common.write("distillation", {
        "quick": a.quick, "sizes": sizes, "student_layers": LAYERS, "student_lr": STUDENT_LR, "eval_rows": len(val_ds),
        "rows": rows, "teacher_forward_s": t_fwd, "online_kd_budget_s": plain_step + t_fwd,
        "cache_seconds": cache_s, "goals": goals,
    }, a.out)
    return rows


if __name__ == "__main__":
    main()
