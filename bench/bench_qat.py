"""QAT benchmark: MiniLM-L6 on SST-2 (protocol in bench/common.py and BENCHMARKS.md).

Every run starts from the same fine-tuned float MiniLM (the cached teacher). QAT runs keep
fine-tuning it for `steps` steps with QATCallback; PTQ runs quantise it directly with
`hf_compress.quantize_model` (same numerics, same config). Retention = accuracy / float accuracy.
A float control run fine-tunes the same number of steps with no callback: its accuracy shows what
extra training alone gives. The QAT step-time overhead is measured with training steps of the plain
and the fake-quantised models interleaved in one process (load on a shared machine drifts between
whole runs); the ratio of the runs' own median step times is reported beside it.

Runs: int8 (per-channel symmetric weights, activations quantised per tensor with their own range as
the kernels do; exported to torch-int8: int8 CPU kernels), int4 weights with
uniform group-wise (g=64) scales (accuracy of the fake-quantised float model: no int4 CPU kernel
here), and NF4 (g=64) exported to bitsandbytes Linear4bit; QAT and PTQ for each. For the exported
models: on-disk size (whole file, and the quantised layers alone) and CPU latency at batch 1 and 32
against the float model, interleaved in one process.

    python bench/bench_qat.py            # full protocol (~25 min on 2 CPU cores)
    python bench/bench_qat.py --quick    # proves it runs; numbers meaningless
"""

from __future__ import annotations

import copy
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    SEED, accuracy, disk_mb, goal, latency, parse_args, sst2, table, teacher, tokenizer, train, training_args, write,
)
from safetensors import safe_open  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

from hf_compress import QATCallback, QATConfig, quantize_model  # noqa: E402

warnings.filterwarnings("ignore", message=".*kernels.*")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

LR = 2e-5  # continued fine-tuning: the same for the float control and every QAT run

CONFIGS = {
    # the int8 kernels quantise activations per tensor at run time: QAT trains with the same ("dynamic")
    "int8": dict(weight_bits=8, activation_bits=8, observer="dynamic", export="torch-int8"),
    "int4 g64": dict(weight_bits=4, group_size=64),
    "nf4 g64": dict(weight_bits=4, export="bnb-nf4"),
}


def layer_mb(model, names, tmp: Path) -> float:
    """Bytes on disk (safetensors) of the tensors of the named layers, in MB."""
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    total = 0
    for f in tmp.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if any(k.startswith(n + ".") for n in names):
                    t = st.get_slice(k)
                    total += _nbytes(t.get_shape(), t.get_dtype())
    shutil.rmtree(tmp, ignore_errors=True)
    return total / 1e6


def _nbytes(shape, dtype: str) -> int:
    size = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "BOOL": 1}[dtype]
    n = 1
    for s in shape:
        n *= s
    return n * size


def interleaved_step_times(base, configs: dict, batches: list, repeats: int) -> dict:
    """Median seconds of one training step (forward + backward + AdamW) per model, plain and under fake
    quantisation, steps interleaved model by model in one process: ratios immune to machine load drift."""
    from hf_compress.quantization import build_plan, insert_fake_quant

    models = {"plain": copy.deepcopy(base).train()}
    for label, kw in configs.items():
        m = copy.deepcopy(base).train()
        insert_fake_quant(m, build_plan(m, QATConfig(**kw)))
        models[label] = m
    opts = {k: torch.optim.AdamW(m.parameters(), lr=LR) for k, m in models.items()}
    times = {k: [] for k in models}
    for i in range(repeats + 2):
        batch = batches[i % len(batches)]
        for k, m in models.items():
            t = time.perf_counter()
            m(**batch).loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            if i >= 2:  # warm-up
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    a = parse_args("QAT: accuracy retention of int8 / int4 QAT vs PTQ, size and CPU latency of the exports.", argv)
    sizes, steps = a.sizes, a.sizes["steps"]
    tok = tokenizer()
    train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])
    base = teacher(sizes, tok).eval()
    float_acc = accuracy(base, val_ds, tok)
    tmp = Path(tempfile.mkdtemp(prefix="bench_qat_"))
    print(f"[bench] float accuracy {float_acc:.4f}; {steps} QAT steps per run", flush=True)

    rows, models = [], {}

    def row_for(name, method, bits, model, t0, step_s=None):
        model.eval()
        acc = accuracy(model, val_ds, tok)
        row = {"run": name, "method": method, "bits": bits, "accuracy": acc, "retention": acc / float_acc,
               "step_s": step_s, "minutes": (time.time() - t0) / 60}
        print(f"[bench] {name}: accuracy {acc:.4f} (retention {row['retention']:.4f}), {row['minutes']:.1f} min", flush=True)
        rows.append(row)
        models[name] = model
        return row

    # float control: the same continued fine-tuning, no callback (baseline of the step-time overhead)
    t0 = time.time()
    torch.manual_seed(SEED)
    trainer, plain_step = train(copy.deepcopy(base).train(), train_ds, training_args(str(tmp / "float"), steps=steps, lr=LR), tok)
    row_for("float (continued)", "none", 32, trainer.model, t0, plain_step)

    plan_names = None
    for label, kw in CONFIGS.items():
        cfg = QATConfig(**kw)
        t0 = time.time()
        torch.manual_seed(SEED)
        cb = QATCallback(cfg)
        trainer, step_s = train(copy.deepcopy(base).train(), train_ds,
                                training_args(str(tmp / label), steps=steps, lr=LR), tok, callbacks=[cb])
        plan_names = list(cb.plan)
        row_for(f"QAT {label}", "qat", kw["weight_bits"], trainer.model, t0, step_s)["export"] = cfg.export
        t0 = time.time()
        ptq = quantize_model(copy.deepcopy(base), QATConfig(**kw))
        row_for(f"PTQ {label}", "ptq", kw["weight_bits"], ptq, t0)["export"] = cfg.export

    # size and latency of what ships
    shipped = {"float": base, "int8 (torch-int8)": models["QAT int8"], "nf4 (bnb-nf4)": models["QAT nf4 g64"]}
    lat = latency(shipped, tok, batch_sizes=(1, 32))
    export_rows = []
    for name, m in shipped.items():
        export_rows.append({
            "model": name,
            "disk_MB": disk_mb(m, tmp / "disk"),
            "quantised_layers_MB": layer_mb(m, plan_names, tmp / "layers"),
            "latency_b1_ms": 1e3 * lat[name]["b1"], "latency_b32_ms": 1e3 * lat[name]["b32"],
        })
    f = export_rows[0]
    for r in export_rows:
        r["layers_smaller_x"] = f["quantised_layers_MB"] / r["quantised_layers_MB"]
        r["disk_smaller_x"] = f["disk_MB"] / r["disk_MB"]
        r["speedup_b1"] = f["latency_b1_ms"] / r["latency_b1_ms"]
        r["speedup_b32"] = f["latency_b32_ms"] / r["latency_b32_ms"]

    # QAT step-time overhead, interleaved (observers of activation_bits=8 runs included)
    collate = DataCollatorWithPadding(tok)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids", "label") if c in train_ds.column_names]
    batches = [collate([{c: train_ds[j][c] for c in cols} for j in range(i, i + 32)]) for i in range(0, 32 * 4, 32)]
    step_times = interleaved_step_times(base, CONFIGS, batches, repeats=4 if a.quick else 12)
    overhead = {f"QAT {k}": step_times[k] / step_times["plain"] for k in CONFIGS}

    get = {r["run"]: r for r in rows}
    int8_ship = export_rows[1]
    goals = {
        "int8 QAT retention >= 0.997": goal(get["QAT int8"]["retention"] >= 0.997),
        "int8 export >= 1.5x faster (batch 1 and 32)": goal(min(int8_ship["speedup_b1"], int8_ship["speedup_b32"]) >= 1.5),
        "int8 quantised layers >= 3.5x smaller on disk": goal(int8_ship["layers_smaller_x"] >= 3.5),
        "int4 g64 QAT retention >= 0.985": goal(get["QAT int4 g64"]["retention"] >= 0.985),
        "int4 g64 QAT better than int4 g64 PTQ": goal(get["QAT int4 g64"]["accuracy"] > get["PTQ int4 g64"]["accuracy"]),
        "QAT step time <= 1.4x plain (every QAT run)": goal(max(overhead.values()) <= 1.4),
    }
    print(table(rows, ["run", "bits", "accuracy", "retention", "step_s", "minutes"]))
    print()
    print(table(export_rows, ["model", "disk_MB", "quantised_layers_MB", "layers_smaller_x", "latency_b1_ms",
                              "latency_b32_ms", "speedup_b1", "speedup_b32"]))
    print("\nQAT step time / plain step time (interleaved, batch 32):", {k: round(v, 3) for k, v in overhead.items()})
    print("the same from the training runs' medians:",
          {r["run"]: round(r["step_s"] / plain_step, 3) for r in rows if r["method"] == "qat"})
    for k, v in goals.items():
        print(f"  goal {k}: {v}")
    write("qat", {
        "quick": a.quick, "sizes": sizes, "float_accuracy": float_acc, "lr": LR,
        "init": "fine-tuned float MiniLM (the cached teacher)", "configs": CONFIGS,
        "rows": rows, "exports": export_rows, "goals": goals,
        "step_time_ratio": overhead, "step_times_interleaved_s": step_times,
        "step_time_ratio_from_runs": {r["run"]: r["step_s"] / plain_step for r in rows if r["method"] == "qat"},
        "latency_input": "random token ids, sequence 32 (bench/common.latency)",
    }, a.out)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
