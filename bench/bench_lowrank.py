"""Low-rank factorisation during fine-tuning: plain SVD vs data-aware SVD at the same rank (issue 15 part 1).

all-MiniLM-L6-v2 (the packaged copy) is first fine-tuned dense on a fixed SST-2 subset for `warm` steps (once,
cached in bench/.cache). From that model each method trains on with LowRankCallback, which factorises every
Linear of the transformer blocks at step `start` to the same rank, and the factors train on to `steps`:

- svd: truncated SVD of W;
- asvd (Yuan et al. 2023): SVD of W diag(s), s_j = mean|x_j|^0.5 over the inputs of the first `start` steps;
- fwsvd (Hsu et al. 2022): SVD of diag(d) W, d_i = sqrt(sum of squared gradients of row i) over those steps.

The first `start` steps are identical for the three methods (same seed, same batches), so at the factorisation
they see the same weights. Accuracy on the full SST-2 validation split (872 rows) right after the factorisation
(no recovery) and after recovery, rank fraction 0.25 (r = 96 of 384). Short budget (the machine's 2 cores are
shared): 60 dense steps, 6 steps of statistics, 10 of recovery, batch 16, one seed.

    nice python bench/bench_lowrank.py           # ~15 min on 2 CPU cores shared with other jobs
    python bench/bench_lowrank.py --quick        # proves it runs; numbers meaningless
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (CACHE, SEED, accuracy, disk_mb, minilm_path, parse_args, sst2, table, tokenizer, train,  # noqa: E402
                    training_args, write)
from transformers import AutoModelForSequenceClassification, TrainerCallback  # noqa: E402

from hf_compress import LowRankCallback, LowRankConfig  # noqa: E402

SHORT = dict(train=2000, warm=60, steps=16, start=6, eval_rows=None)
LR, BATCH = 1e-4, 16
METHODS = ("svd", "asvd", "fwsvd")


class EvalAfterFactorisation(TrainerCallback):
    """Accuracy right after LowRankCallback factorised (listed after it), then optionally stop."""

    def __init__(self, start, val_ds, tok, stop: bool):
        self.start, self.val_ds, self.tok, self.stop, self.acc = start, val_ds, tok, stop, None

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step == self.start and self.acc is None:
            self.acc = accuracy(model, self.val_ds, self.tok)
            model.train()
            if self.stop:
                control.should_training_stop = True

    def on_step_end(self, args, state, control, **kw):
        if self.stop and self.acc is not None:
            control.should_training_stop = True


def block_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".layer." in n)


def main(argv=None):
    a = parse_args("Plain SVD vs ASVD vs FWSVD at equal rank during fine-tuning (MiniLM-L6, SST-2).", argv)
    sizes = dict(train=256, warm=4, steps=8, start=3, eval_rows=64) if a.quick else dict(SHORT)
    if a.steps:
        sizes["steps"] = a.steps
    tok = tokenizer()
    train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])
    tmp = Path(tempfile.mkdtemp(prefix="bench_lowrank_"))
    warm_dir = CACHE / f"lowrank-warm-{sizes['train']}-{sizes['warm']}"
    if not (warm_dir / "model.safetensors").exists():
        print(f"[bench] dense fine-tuning for {sizes['warm']} steps -> {warm_dir}", flush=True)
        torch.manual_seed(SEED)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        t, _ = train(model, train_ds, training_args(str(tmp / "warm"), steps=sizes["warm"], lr=LR, batch=BATCH), tok)
        t.model.save_pretrained(warm_dir)

    def warm():
        return AutoModelForSequenceClassification.from_pretrained(warm_dir)

    base = warm()
    base_acc = accuracy(base, val_ds, tok)
    base_params, base_blocks, base_disk = sum(p.numel() for p in base.parameters()), block_params(base), disk_mb(base, tmp / "d")
    print(f"[bench] dense MiniLM after {sizes['warm']} steps: accuracy {base_acc:.4f}, {base_params / 1e6:.2f}M params", flush=True)

    def run(method, fraction, recover: bool):
        torch.manual_seed(SEED)
        model = warm()
        cfg = LowRankConfig(lowrank_method=method, lowrank_rank_fraction=fraction, lowrank_start_step=sizes["start"])
        probe = EvalAfterFactorisation(sizes["start"], val_ds, tok, stop=not recover)
        t0 = time.time()
        trainer, step_s = train(model, train_ds, training_args(str(tmp / f"{method}-{fraction}"), steps=sizes["steps"],
                                                                lr=LR, batch=BATCH), tok,
                                callbacks=[LowRankCallback(cfg), probe])
        model = trainer.model.eval()
        row = {"method": method, "rank_fraction": fraction, "accuracy_at_factorisation": probe.acc,
               "accuracy_after_recovery": accuracy(model, val_ds, tok) if recover else None,
               "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
               "block_params_ratio": block_params(model) / base_blocks, "minutes": (time.time() - t0) / 60}
        if recover:
            row["disk_mb"] = disk_mb(model, tmp / "d")
        print(f"[bench] {method} {fraction}: at factorisation {probe.acc:.4f}, after recovery "
              f"{row['accuracy_after_recovery']}, block params x{row['block_params_ratio']:.3f}, {row['minutes']:.1f} min",
              flush=True)
        return row

    rows = [run(m, 0.25, True) for m in METHODS]
    print(table(rows, ["method", "rank_fraction", "accuracy_at_factorisation", "accuracy_after_recovery", "params_M",
                       "block_params_ratio", "minutes"]))
    by = {(r["method"], r["rank_fraction"]): r for r in rows}
    comparison = {
        f"{m} vs svd at {f}": {
            "at_factorisation_points": 100 * (by[(m, f)]["accuracy_at_factorisation"] - by[("svd", f)]["accuracy_at_factorisation"]),
            "after_recovery_points": (100 * (by[(m, f)]["accuracy_after_recovery"] - by[("svd", f)]["accuracy_after_recovery"])
                                      if by[(m, f)]["accuracy_after_recovery"] is not None else None)}
        for m in METHODS[1:] for f in (0.25,)
    }
    for k, v in comparison.items():
        print(f"  {k}: {v}")
    write("lowrank", {
        "quick": a.quick, "sizes": sizes, "lr": LR, "batch": BATCH, "max_length": 64, "seed": SEED,
        "init": f"all-MiniLM-L6-v2 (packaged) fine-tuned dense for {sizes['warm']} steps on the {sizes['train']}-row subset",
        "dense": {"accuracy": base_acc, "params_M": base_params / 1e6, "disk_mb": base_disk},
        "note": f"one seed; {sizes['start']} steps of statistics then factorisation of every block Linear, "
                f"{sizes['steps'] - sizes['start']} recovery steps (0.25 only); differences under ~1 point are within seed noise",
        "rows": rows, "comparison": comparison,
    }, a.out)


if __name__ == "__main__":
    main()
