"""Training cost on a quiet machine (issue 16): the online-KD step against its budget (student step +
teacher forward + 5%), and the QAT step against plain fine-tuning (≤ 1.25×).

Every step is a real `Trainer` step (forward, backward, AdamW, callbacks, our `compute_loss`), timed from
`on_step_begin` to `on_step_end` by `common.StepTimer`; the teacher forward is timed on the same collated
batches under `torch.no_grad()`. The kinds are interleaved in rounds (each round: a few steps of every
kind, the same data order and seed in every round) and the medians over all rounds are compared as ratios, so a drift
of the machine's load between kinds cancels. Quiet check: the 1-minute load average and the other
processes using CPU are recorded before and after (`quiet` in the JSON).

Models: teacher = the cached fine-tuned MiniLM-L6 (bench/common.py); student = its blocks [0, 2, 4].
KD = DistillationTrainer(T=2, α=0.5), logits only (the recipe's setting). QAT = QATCallback from step 0,
int8 (weights per channel + dynamic per-tensor activations, the shipped recipe's setting) and int4 g64
weight-only, on the teacher-sized model against the same model without the callback.

    OMP_NUM_THREADS=2 python bench/bench_training_cost.py          # ~10 min, alone on the machine
    python bench/bench_training_cost.py --quick                    # proves it runs; numbers meaningless
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import StepTimer, goal, parse_args, sst2, teacher, tokenizer, training_args, write  # noqa: E402
from transformers import DataCollatorWithPadding, Trainer  # noqa: E402

from hf_compress import DistillationConfig, DistillationTrainer, QATCallback, QATConfig, student_from_teacher  # noqa: E402

warnings.filterwarnings("ignore")
BATCH, LR = 32, 1e-4
QAT = {
    "int8": dict(weight_bits=8, activation_bits=8, observer="dynamic"),
    "int4 g64": dict(weight_bits=4, group_size=64),
}


def load_snapshot() -> dict:
    """The 1-minute load average and the processes (other than this one) using more than 5% CPU."""
    load = os.getloadavg()[0]
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
        busy = [line.split(None, 2) for line in ps.splitlines()[1:]]
        busy = [f"{c} {p}%" for pid, p, c in busy if float(p) > 5 and int(pid) != os.getpid()]
    except (OSError, ValueError):
        busy = None
    return {"load_1min": round(load, 2), "busy_processes": busy}


def run_steps(make_trainer, steps: int) -> list[float]:
    timer = StepTimer()
    timer.skip = 1  # the first step of every round warms up (allocations, the optimizer's state)
    trainer = make_trainer(steps)
    trainer.add_callback(timer)
    trainer.train()
    return timer.times


@torch.no_grad()
def teacher_forward_times(model, train_ds, tok, steps: int) -> list[float]:
    """The teacher's forward on the batches a Trainer round sees (same sampler seed, same collation)."""
    model.eval()
    args = training_args(tempfile.mkdtemp(prefix="cost_fwd_"), steps=steps, batch=BATCH)
    loader = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                     data_collator=DataCollatorWithPadding(tok)).get_train_dataloader()
    times = []
    for i, batch in enumerate(loader):
        if i >= steps:
            break
        batch = {k: v for k, v in batch.items() if k != "labels"}
        t = time.perf_counter()
        model(**batch)
        if i >= 1:
            times.append(time.perf_counter() - t)
    return times


def main(argv=None):
    a = parse_args("Training cost: online-KD step vs student step + teacher forward, QAT step vs plain, "
                   "interleaved on a quiet machine.", argv)
    sizes = a.sizes
    rounds, steps = (2, 3) if a.quick else (8, 8)
    tok = tokenizer()
    train_ds, _ = sst2(tok, sizes["train"], sizes["eval_rows"])
    base = teacher(sizes, tok)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cost_"))
    before = load_snapshot()
    print(f"[bench] {rounds} rounds x {steps} steps per kind; before: {before}", flush=True)

    def args_for(name, n, r):
        return training_args(str(tmp / f"{name}-{r}"), steps=n, lr=LR, batch=BATCH)

    times: dict[str, list[float]] = {}
    t0 = time.time()
    for r in range(rounds):
        student0 = student_from_teacher(base, [0, 2, 4])
        kinds = {
            "student step (stock Trainer)": lambda n: Trainer(
                model=copy.deepcopy(student0).train(), args=args_for("plain", n, r), train_dataset=train_ds,
                processing_class=tok, data_collator=DataCollatorWithPadding(tok)),
            "KD step (DistillationTrainer)": lambda n: DistillationTrainer(
                model=copy.deepcopy(student0).train(), teacher_model=base, args=args_for("kd", n, r),
                distillation_config=DistillationConfig(temperature=2.0, alpha=0.5), train_dataset=train_ds,
                processing_class=tok, data_collator=DataCollatorWithPadding(tok)),
            "teacher-size step (stock Trainer)": lambda n: Trainer(
                model=copy.deepcopy(base).train(), args=args_for("big", n, r), train_dataset=train_ds,
                processing_class=tok, data_collator=DataCollatorWithPadding(tok)),
        }
        for label, kw in QAT.items():
            kinds[f"QAT {label} step"] = lambda n, kw=kw, label=label: Trainer(
                model=copy.deepcopy(base).train(), args=args_for(label.replace(" ", ""), n, r), train_dataset=train_ds,
                processing_class=tok, data_collator=DataCollatorWithPadding(tok),
                callbacks=[QATCallback(QATConfig(**kw, qat_start_step=0))])
        order = list(kinds)
        order = order[r % len(order):] + order[:r % len(order)]  # rotated each round: no kind always runs first
        for name in order:
            times.setdefault(name, []).extend(run_steps(kinds[name], steps))
        times.setdefault("teacher forward", []).extend(teacher_forward_times(base, train_ds, tok, steps))
        print(f"[bench] round {r + 1}/{rounds}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} ms" for k, v in times.items()),
              flush=True)
    after = load_snapshot()
    med = {k: statistics.median(v) for k, v in times.items()}
    budget = med["student step (stock Trainer)"] + med["teacher forward"]
    kd_ratio = med["KD step (DistillationTrainer)"] / budget
    qat_ratio = {k: med[f"QAT {k} step"] / med["teacher-size step (stock Trainer)"] for k in QAT}
    goals = {
        "online KD step <= (student step + teacher forward) x 1.05": goal(kd_ratio <= 1.05),
        **{f"QAT {k} step <= 1.25x plain": goal(v <= 1.25) for k, v in qat_ratio.items()},
    }
    print(f"\n[bench] medians (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in med.items()))
    print(f"[bench] KD step / (student step + teacher forward) = {kd_ratio:.3f}")
    print(f"[bench] QAT step / plain step: " + ", ".join(f"{k} {v:.3f}" for k, v in qat_ratio.items()))
    print(f"[bench] after: {after}")
    for k, v in goals.items():
        print(f"  - {k}: {v}")
    write("training_cost/step_time", {
        "quick": a.quick, "batch": BATCH, "rounds": rounds, "steps_per_round": steps, "sizes": sizes,
        "protocol": "real Trainer steps (on_step_begin -> on_step_end), first step of each round dropped; kinds "
                    "interleaved in rounds with the same data order; medians over all rounds",
        "median_s": med, "samples": {k: len(v) for k, v in times.items()},
        "kd_step_over_budget": kd_ratio, "kd_budget_s": budget, "qat_step_ratio": qat_ratio,
        "quiet": {"before": before, "after": after}, "goals": goals, "minutes": (time.time() - t0) / 60,
    }, a.out)


if __name__ == "__main__":
    main()
