"""Our side of the causal-LM distillation comparison: hf_compress.DistillationTrainer on the
tiny-shakespeare recipe (bench/peers/lm.py). Run with the project venv:

    .venv/bin/python bench/peers/ours_kd.py [--quick] [--steps N] [--out FILE]

Rows: the teacher; the 2-layer student distilled with the recipe's loss (forward KL, T=1, α=0.5:
half CE, half KD); the same with α=1 (pure forward KL = the objective of TRL's GKD with beta=0,
lmbda=0); with --extra also the student trained with CE alone (no teacher) for reference. Same
steps, batch, lr, schedule and seed for every row.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lm  # noqa: E402


def main(argv=None):
    a = lm.parse_args("hf_compress DistillationTrainer on tiny-shakespeare (causal LM)", argv)
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    from hf_compress import DistillationConfig, DistillationTrainer

    r, tok, splits = lm.setup(a.quick)
    t0 = time.time()
    teacher, tpath = lm.teacher(r, tok, splits)
    teacher_min = (time.time() - t0) / 60
    rows = [{"run": "teacher (4 layers)", "side": "shared", **lm.evaluate(teacher, splits, r),
             "params_M": sum(p.numel() for p in teacher.parameters()) / 1e6}]
    print(f"[ours] teacher {tpath}: {rows[0]}", flush=True)

    runs = [
        ("hf_compress DistillationTrainer, fwd KL T=1 α=0.5 (recipe)", dict(temperature=1.0, alpha=0.5, kd_loss="forward_kl")),
        ("hf_compress DistillationTrainer, fwd KL T=1 α=1 (pure KD)", dict(temperature=1.0, alpha=1.0, kd_loss="forward_kl")),
    ]
    if a.extra:
        runs.append(("student, CE only (no KD, stock Trainer)", None))
    for name, kd in runs:
        set_seed(r.seed)
        model = lm.student(r, teacher)
        args = TrainingArguments(**lm.student_training(r, a.quick, a.steps))
        timer = lm.step_timer()
        common = dict(model=model, args=args, train_dataset=splits.train, processing_class=tok,
                      data_collator=default_data_collator, callbacks=[timer])
        if kd is None:
            trainer = Trainer(**common)
        else:
            trainer = DistillationTrainer(teacher_model=teacher, distillation_config=DistillationConfig(**kd), **common)
        t1 = time.time()
        trainer.train()
        minutes = (time.time() - t1) / 60
        row = {"run": name, "side": "ours", **lm.evaluate(trainer.model, splits, r), "steps": args.max_steps,
               "batch": args.per_device_train_batch_size, "step_s": timer.median, "train_minutes": minutes,
               "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
        print(f"[ours] {row}", flush=True)
        rows.append(row)

    lm.dump(a.out, {"side": "ours", "quick": a.quick, "teacher_path": str(tpath), "teacher_minutes_this_run": teacher_min,
                    "train_blocks": len(splits.train), "eval_blocks": len(splits.eval), "versions": lm.versions(), "rows": rows})


if __name__ == "__main__":
    main()
