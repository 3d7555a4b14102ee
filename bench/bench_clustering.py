"""Weight clustering vs uniform QAT at the same bit width: MiniLM-L6 on SST-2 (issue 15, part 2).

Both runs of a pair store b bits per block weight: clustering as indices into one codebook of 2^b shared values
per layer (`ClusteringCallback`: k-means at step 0, re-clustered every `refresh` steps while the dense weights
train straight through, assignments frozen at 60% of the steps, then only the centroids train); uniform QAT as
b-bit integer codes on a per-output-channel symmetric grid (`QATCallback(weight_bits=b)`, fake quantisation from
step 0, weights baked onto the grid at the end). Same targets (every Linear inside the transformer blocks).

Short budget (every run identical): all-MiniLM-L6-v2 (the packaged copy, not fine-tuned on SST-2) fine-tuned for
`steps` steps on a fixed `train`-row subset of SST-2 train while the callback compresses it, batch 16, lr 1e-4,
max length 64, seed 42; accuracy on the full SST-2 validation split (872 rows). The clustered exports are saved
and reloaded (`hf_compress.load_pretrained`), their block weights' bytes measured from the safetensors headers.

    nice python bench/bench_clustering.py          # 2,000 rows, 80 steps, 4 runs (<= 15 min on 2 shared CPU cores)
    nice python bench/bench_clustering.py --dense  # + the uncompressed control run
    python bench/bench_clustering.py --quick       # proves it runs; numbers meaningless
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import SEED, accuracy, minilm_path, parse_args, sst2, table, tokenizer, train, training_args, write  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import hf_compress  # noqa: E402
from hf_compress import ClusteringCallback, ClusteringConfig, QATCallback, QATConfig  # noqa: E402
from hf_compress.storage import disk_size_by_part  # noqa: E402

SHORT = dict(train=2000, steps=80, eval_rows=None)
LR, BATCH = 1e-4, 16
BITS = (4, 3)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    dense = "--dense" in argv
    argv = [x for x in argv if x != "--dense"]
    a = parse_args("Weight clustering vs uniform QAT at the same bit width (MiniLM-L6, SST-2).", argv)
    sizes = dict(a.sizes) if a.quick else dict(SHORT)
    if a.steps:
        sizes["steps"] = a.steps
    steps = sizes["steps"]
    freeze, refresh = max(1, int(0.6 * steps)), max(1, steps // 10)
    tok = tokenizer()
    train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])
    tmp = Path(tempfile.mkdtemp(prefix="bench_clustering_"))
    print(f"[bench] {len(train_ds)} train rows, {len(val_ds)} validation rows, {steps} steps per run", flush=True)

    def run(name, bits, callback):
        torch.manual_seed(SEED)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        t0 = time.time()
        trainer, step_s = train(model, train_ds, training_args(str(tmp / name.replace(" ", "_")), steps=steps, lr=LR,
                                                               batch=BATCH), tok, callbacks=[callback] if callback else [])
        model = trainer.model.eval()
        acc = accuracy(model, val_ds, tok)
        out = tmp / f"export_{name.replace(' ', '_')}"
        model.save_pretrained(out)
        parts = disk_size_by_part(out)
        row = {"run": name, "bits": bits, "accuracy": acc, "blocks_MB": parts["blocks"] / 1e6,
               "file_MB": parts["total"] / 1e6, "step_s": step_s, "minutes": (time.time() - t0) / 60}
        if isinstance(callback, ClusteringCallback):
            back = hf_compress.load_pretrained(out)
            batch = tok([r for r in ["a gripping, well acted film", "dull and far too long"]], return_tensors="pt",
                        padding=True)
            with torch.no_grad():
                row["reload_logits_equal"] = bool(torch.equal(back(**batch).logits, model(**batch).logits))
            row["max_distinct_per_layer"] = max(int(torch.unique(m.weight).numel())
                                                for n, m in model.named_modules() if n in callback.plan)
        shutil.rmtree(out, ignore_errors=True)
        print(f"[bench] {name}: accuracy {acc:.4f}, blocks {row['blocks_MB']:.2f} MB, {row['minutes']:.1f} min", flush=True)
        return row

    rows = [run("dense (no compression)", 32, None)] if dense else []
    for b in BITS:
        rows.append(run(f"QAT int{b} per-channel", b, QATCallback(QATConfig(weight_bits=b))))
        rows.append(run(f"clustering {b}-bit", b, ClusteringCallback(ClusteringConfig(
            clustering_bits=b, clustering_freeze_step=freeze, refresh_interval=refresh))))
    by = {r["run"]: r for r in rows}
    comparison = {f"{b}-bit": {"clustering": by[f"clustering {b}-bit"]["accuracy"],
                               "uniform_qat": by[f"QAT int{b} per-channel"]["accuracy"],
                               "difference_points": 100 * (by[f"clustering {b}-bit"]["accuracy"]
                                                           - by[f"QAT int{b} per-channel"]["accuracy"])} for b in BITS}
    print(table(rows, ["run", "bits", "accuracy", "blocks_MB", "file_MB", "step_s", "minutes"]))
    for k, v in comparison.items():
        print(f"  {k}: clustering {v['clustering']:.4f} vs uniform QAT {v['uniform_qat']:.4f} ({v['difference_points']:+.2f} points)")
    shutil.rmtree(tmp, ignore_errors=True)
    write("clustering", {
        "quick": a.quick, "sizes": sizes, "lr": LR, "batch": BATCH, "max_length": 64,
        "init": "all-MiniLM-L6-v2 (packaged), not fine-tuned on SST-2; every run the same seed",
        "clustering": {"codebook": "one per layer", "freeze_step": freeze, "refresh_interval": refresh, "init": "linear"},
        "qat": {"grid": "symmetric per output channel", "export": "float weights on the grid (no packed int<8 storage)"},
        "note": f"short budget: one seed, {steps} steps of batch {BATCH} on {sizes['train']} rows; differences under "
                "~1 point are within seed noise. QAT's blocks_MB are float32 (its baked export stores floats).",
        "rows": rows, "comparison": comparison,
    }, a.out)


if __name__ == "__main__":
    main()
