"""Peer side of the causal-LM distillation comparison: TRL's GKDTrainer on the same tiny-shakespeare
setting as bench/peers/ours_kd.py (same recipe, teacher weights, student init, blocks, steps, batch,
lr, schedule, seed, evaluation). Run with the TRL venv made by bench/peers/setup.sh:

    /tmp/hf_compress_peers/trl/bin/python bench/peers/trl_gkd.py [--quick] [--steps N] [--out FILE]

GKD settings: lmbda=0 (never generates on-policy: supervised KD on the dataset's blocks), seq_kd=False,
beta=0 (generalized JSD at beta=0 is forward KL(teacher‖student)), temperature=1. TRL's GKD loss is
pure KD (no CE term), so its like-for-like row on our side is DistillationTrainer with α=1.
TRL's SFTConfig defaults that differ from a plain Trainer (bf16=True, gradient_checkpointing=True,
lr 2e-5, logging 10) are set to the recipe's values / off so both sides train the same way.
TRL 1.16's stable `trl.DistillationTrainer` is on-policy only (it generates completions from prompts),
so it is not the same supervised KD and is not run here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lm  # noqa: E402


def gkd_classes():
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # older TRL: top level
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def interleaved_steps(r, teacher, splits, tok, GKDConfig, GKDTrainer, quick: bool) -> dict:
    """Median seconds of one training step (compute_loss + backward + AdamW) of the three trainers, steps
    interleaved trainer by trainer on the same batches in this one process (ratios immune to load drift)."""
    import statistics

    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_compress import DistillationConfig, DistillationTrainer

    values = lm.student_training(r, quick)
    common = dict(train_dataset=splits.train, processing_class=tok, data_collator=default_data_collator)
    trainers = {
        "stock Trainer (CE only)": Trainer(model=lm.student(r, teacher), args=TrainingArguments(**values), **common),
        "hf_compress DistillationTrainer α=1": DistillationTrainer(
            model=lm.student(r, teacher), teacher_model=teacher, args=TrainingArguments(**values),
            distillation_config=DistillationConfig(temperature=1.0, alpha=1.0, kd_loss="forward_kl"), **common),
        "TRL GKDTrainer beta=0": GKDTrainer(
            model=lm.student(r, teacher), teacher_model=teacher, processing_class=tok, train_dataset=splits.train,
            data_collator=default_data_collator,
            args=GKDConfig(**{**values, "bf16": False, "gradient_checkpointing": False, "lmbda": 0.0, "seq_kd": False,
                              "temperature": 1.0, "beta": 0.0, "max_length": r.data.max_length})),
    }
    bs = values["per_device_train_batch_size"]
    batches = [default_data_collator([splits.train[j] for j in range(i, i + bs)]) for i in range(0, bs * 4, bs)]
    opts = {k: torch.optim.AdamW(t.model.parameters(), lr=values["learning_rate"]) for k, t in trainers.items()}
    times = {k: [] for k in trainers}
    repeats = 4 if quick else 30
    for i in range(repeats + 3):
        for k, t in trainers.items():
            t.model.train()
            batch = dict(batches[i % len(batches)])
            t0 = time.perf_counter()
            loss = t.compute_loss(t.model, batch)
            loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    a = lm.parse_args("TRL GKDTrainer (lmbda=0, beta=0) on tiny-shakespeare (causal LM)", argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers import default_data_collator, set_seed

    GKDConfig, GKDTrainer = gkd_classes()
    r, tok, splits = lm.setup(a.quick)
    teacher, tpath = lm.teacher(r, tok, splits)
    rows = [{"run": "teacher (4 layers)", "side": "shared", **lm.evaluate(teacher, splits, r)}]
    print(f"[trl] teacher {tpath}: {rows[0]}", flush=True)

    runs = [("TRL GKDTrainer, lmbda=0 beta=0 (fwd KL, pure KD)", dict(beta=0.0))]
    if a.extra:
        runs.append(("TRL GKDTrainer, lmbda=0 beta=0.5 (JSD, TRL default beta)", dict(beta=0.5)))
    for name, kw in runs:
        set_seed(r.seed)
        model = lm.student(r, teacher)
        values = lm.student_training(r, a.quick, a.steps)
        values.update(bf16=False, gradient_checkpointing=False, lmbda=0.0, seq_kd=False, temperature=1.0,
                      max_length=r.data.max_length, **kw)
        args = GKDConfig(**values)
        timer = lm.step_timer()
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=splits.train,
                             processing_class=tok, data_collator=default_data_collator, callbacks=[timer])
        t1 = time.time()
        trainer.train()
        minutes = (time.time() - t1) / 60
        row = {"run": name, "side": "trl", **lm.evaluate(trainer.model, splits, r), "steps": args.max_steps,
               "batch": args.per_device_train_batch_size, "step_s": timer.median, "train_minutes": minutes,
               "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
        print(f"[trl] {row}", flush=True)
        rows.append(row)

    st = interleaved_steps(r, teacher, splits, tok, GKDConfig, GKDTrainer, a.quick)
    print(f"[trl] interleaved step times: {st}", flush=True)
    lm.dump(a.out, {"side": "trl", "step_times_interleaved_s": st, "quick": a.quick, "teacher_path": str(tpath), "train_blocks": len(splits.train),
                    "eval_blocks": len(splits.eval), "versions": lm.versions("trl"), "rows": rows})


if __name__ == "__main__":
    main()
