"""Pruning benchmark: MiniLM-L6 on SST-2 (protocol in bench/common.py and BENCHMARKS.md).

Every run starts from the same fine-tuned dense MiniLM (the cached teacher) and keeps fine-tuning it
for `steps` steps while PruningCallback prunes it — with a plain Trainer, or with DistillationTrainer
distilling from the dense model ("KD"). Retention = accuracy / accuracy of the dense model.

Runs: unstructured magnitude pruning to 50 / 80 / 90% (without and with KD), 2:4 (with KD), and
50% of the attention heads + 50% of the FFN neurons removed (Taylor scores, with KD) — physically
removed at the end, so CPU latency (batch 1 and 32) is measured against the dense model. Callback
overhead: time spent inside the callback's per-step events vs the rest of the same run's step (what the
step costs without it), plus the A/B step-time ratio against the dense run (noisier: separate runs).

    python bench/bench_pruning.py            # full protocol (~40 min on 2 CPU cores)
    python bench/bench_pruning.py --quick    # proves it runs; numbers meaningless
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    SEED, accuracy, disk_mb, goal, latency, parse_args, sst2, table, teacher, tokenizer, train, training_args, write,
)

from hf_compress import DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig  # noqa: E402
from hf_compress.pruning import structure  # noqa: E402


class TimedPruningCallback(PruningCallback):
    """PruningCallback that adds up the wall time spent in its per-step events."""

    def __init__(self, config):
        super().__init__(config)
        self.seconds, self.steps = 0.0, 0

    def _timed(self, fn, *a, **k):
        t = time.perf_counter()
        fn(*a, **k)
        self.seconds += time.perf_counter() - t

    def on_pre_optimizer_step(self, *a, **k):
        self._timed(super().on_pre_optimizer_step, *a, **k)

    def on_optimizer_step(self, *a, **k):
        self._timed(super().on_optimizer_step, *a, **k)

    def on_step_end(self, *a, **k):
        self._timed(super().on_step_end, *a, **k)
        self.steps += 1


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    a = parse_args("Pruning: accuracy retention, physical speed-up and callback overhead on MiniLM-L6 + SST-2.", argv)
    sizes, steps = a.sizes, a.sizes["steps"]
    tok = tokenizer()
    train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])
    dense = teacher(sizes, tok).eval()
    dense_acc = accuracy(dense, val_ds, tok)
    freq = max(1, steps // 25)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pruning_"))
    print(f"[bench] dense accuracy {dense_acc:.4f}; {steps} steps per run, mask updates every {freq}", flush=True)

    def run(name, configs, kd):
        torch.manual_seed(SEED)
        model = copy.deepcopy(dense).train()
        cbs = [TimedPruningCallback(c) for c in configs]
        kw = {}
        if kd:
            kw = dict(trainer_cls=DistillationTrainer, teacher_model=dense,
                      distillation_config=DistillationConfig(temperature=2.0, alpha=0.5))
        t0 = time.time()
        trainer, step_s = train(model, train_ds, training_args(str(tmp / name), steps=steps), tok, callbacks=cbs, **kw)
        model = trainer.model.eval()
        acc = accuracy(model, val_ds, tok)
        sparsity = [c.pruner.sparsity() for c in cbs if c.pruner is not None]
        row = {
            "run": name, "kd": kd, "accuracy": acc, "retention": acc / dense_acc,
            "sparsity": sparsity[0] if sparsity else None, "params_M": n_params(model) / 1e6,
            "step_s": step_s, "callback_ms_per_step": 1e3 * sum(c.seconds for c in cbs) / max(1, cbs[0].steps) if cbs else 0.0,
            "minutes": (time.time() - t0) / 60,
        }
        print(f"[bench] {name}: accuracy {acc:.4f} (retention {row['retention']:.3f}), {row['minutes']:.1f} min", flush=True)
        return row, model, cbs

    rows = []
    # dense control: the same extra fine-tuning with no callback (step-time baseline for the overhead)
    plain, _, _ = run("dense (no pruning)", [], kd=False)
    plain["sparsity"] = 0.0
    rows.append(plain)
    for kd in (False, True):
        for s in (0.5, 0.8, 0.9):
            cfg = PruningConfig(target_sparsity=s, method="magnitude", granularity="unstructured", frequency=freq)
            rows.append(run(f"unstructured {s:.0%}" + (" +KD" if kd else ""), [cfg], kd)[0])
    rows.append(run("2:4 +KD", [PruningConfig(granularity="2:4", frequency=freq)], kd=True)[0])
    structured_cfgs = [
        PruningConfig(granularity=g, target_sparsity=0.5, method="taylor", scope="local", frequency=freq)
        for g in ("heads", "neurons")
    ]
    row, pruned, _ = run("50% heads + 50% neurons +KD", structured_cfgs, kd=True)
    row["structure"] = structure(pruned)
    lat = latency({"dense": dense, "pruned": pruned}, tok, batch_sizes=(1, 32))
    row["latency_s"] = lat
    row["speedup_b1"] = lat["dense"]["b1"] / lat["pruned"]["b1"]
    row["speedup_b32"] = lat["dense"]["b32"] / lat["pruned"]["b32"]
    row["disk_MB"] = {"dense": disk_mb(dense, tmp / "d"), "pruned": disk_mb(pruned, tmp / "p")}
    rows.append(row)

    overhead = {
        r["run"]: {
            "callback_ms_per_step": r["callback_ms_per_step"],
            # the callback's own time against the rest of the same run's step: robust to the machine's
            # load, which moves the A/B ratio below by more than the overhead itself
            "callback_pct_of_step": 100 * r["callback_ms_per_step"] / (1e3 * r["step_s"] - r["callback_ms_per_step"]),
            "step_time_ratio_vs_dense": r["step_s"] / plain["step_s"],
        }
        for r in rows if not r["kd"] and r is not plain
    }
    u90kd = next(r for r in rows if r["run"] == "unstructured 90% +KD")
    goals = {
        "unstructured 90% +KD retention >= 0.98": goal(u90kd["retention"] >= 0.98),
        "50% heads + 50% neurons retention >= 0.97": goal(row["retention"] >= 0.97),
        "50% heads + 50% neurons CPU speed-up >= 1.7x (batch 1 and 32)": goal(min(row["speedup_b1"], row["speedup_b32"]) >= 1.7),
        "callback overhead <= 3% of step time": goal(max(o["callback_pct_of_step"] for o in overhead.values()) <= 3.0),
    }
    cols = ["run", "accuracy", "retention", "sparsity", "params_M", "step_s", "callback_ms_per_step"]
    print(table(rows, cols))
    print(f"\nheads+neurons: speed-up batch 1 {row['speedup_b1']:.2f}x, batch 32 {row['speedup_b32']:.2f}x; "
          f"structure {row['structure']}")
    print("callback overhead:", {k: round(v["callback_pct_of_step"], 2) for k, v in overhead.items()}, "% of the step without it")
    for k, v in goals.items():
        print(f"  goal {k}: {v}")
    write("pruning", {
        "quick": a.quick, "sizes": sizes, "dense_accuracy": dense_acc, "init": "fine-tuned dense MiniLM (the cached teacher)",
        "schedule": {"kind": "cubic", "pruning_start_step": 0, "pruning_end_step": "70% of steps", "frequency": freq},
        "kd": {"temperature": 2.0, "alpha": 0.5, "teacher": "the dense model"},
        "rows": rows, "overhead": overhead, "goals": goals,
    }, a.out)


if __name__ == "__main__":
    main()
