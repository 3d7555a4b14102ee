"""ONNX Runtime benchmark: CPU latency of the MiniLM teacher and our compressed models through ONNX Runtime
(protocol in bench/common.py and BENCHMARKS.md).

Models (all from the cached fine-tuned teacher; every latency measured interleaved in one process, so the
ratios hold on a loaded machine):

* teacher fp32, PyTorch and ONNX Runtime (hf_compress.export_onnx);
* teacher + ONNX Runtime's own dynamic int8 quantisation (onnxruntime.quantization.quantize_dynamic with its
  defaults: QInt8 weights, per tensor) — the peer a user tries first;
* ours int8: torch-int8 layers (per-channel int8 weights, activations quantised per tensor at run time),
  PyTorch (fbgemm) and ONNX Runtime (DynamicQuantizeLinear -> MatMulInteger with our scales);
* ours combined structure: the recipe's 3-layer student (teacher blocks 0, 2, 4) + int8, and the same with
  half of the attention heads and FFN neurons removed (non-uniform, global magnitude) + int8.

The int8 models here are produced by PTQ (`quantize_model`, the same layers and numerics QAT exports) and the
students are not trained: latency depends on structure only, so accuracy is measured for the teacher-sized
models (teacher, ORT dynamic int8, ours int8) and NOT for the untrained students (reported as null).

    python bench/bench_onnx.py            # full: 30 interleaved repeats, whole SST-2 validation (~10 min)
    python bench/bench_onnx.py --quick    # proves it runs; numbers meaningless
"""

from __future__ import annotations

import copy
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import accuracy, goal, parse_args, sst2, table, teacher, tokenizer, write  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

from hf_compress import QATConfig, export_onnx, quantize_model, student_from_teacher  # noqa: E402
from hf_compress.onnx import ort_session  # noqa: E402
from hf_compress.pruning import Pruner, remove_pruned  # noqa: E402

warnings.filterwarnings("ignore")
SEQ_LEN = 32  # as bench/common.latency
INT8 = dict(weight_bits=8, activation_bits=8, observer="dynamic", export="torch-int8")


class OrtModel:
    """Callable like a transformers model for latency and accuracy: returns an object with .logits."""

    def __init__(self, path, threads: int):
        self.sess = ort_session(path, threads=threads)
        self.names = [i.name for i in self.sess.get_inputs()]

    def __call__(self, **inputs):
        feed = {}
        for n in self.names:
            t = inputs.get(n)
            if t is None:  # token_type_ids when the caller has none
                t = torch.zeros_like(inputs["input_ids"])
            feed[n] = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        return type("Out", (), {"logits": torch.from_numpy(self.sess.run(None, feed)[0])})()

    def eval(self):
        return self

    def parameters(self):
        return iter(())


def ort_accuracy(model: OrtModel, ds, tok, batch_size: int = 64) -> float:
    collate = DataCollatorWithPadding(tok)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in ds.column_names]
    correct = 0
    for i in range(0, len(ds), batch_size):
        batch = collate([{c: ds[j][c] for c in cols} for j in range(i, min(i + batch_size, len(ds)))])
        logits = model(**batch).logits
        correct += (logits.argmax(-1) == torch.tensor(ds["label"][i:i + batch_size])).sum().item()
    return correct / len(ds)


@torch.no_grad()
def interleaved_latency(models: dict, batch_sizes, seq_len: int, repeats: int, warmup: int = 3) -> dict:
    out = {name: {} for name in models}
    for bs in batch_sizes:
        ids = torch.randint(1000, 20000, (bs, seq_len))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        times = {name: [] for name in models}
        for m in models.values():
            for _ in range(warmup):
                m(**inputs)
        for _ in range(repeats):
            for name, m in models.items():
                t = time.perf_counter()
                m(**inputs)
                times[name].append(time.perf_counter() - t)
        for name in models:
            out[name][f"b{bs}"] = statistics.median(times[name])
    return out


def pruned(model, amount: float = 0.5):
    for kind in ("heads", "neurons"):
        Pruner(model, granularity=kind, scope="global").update(amount)
    remove_pruned(model)
    return model


def main(argv=None):
    a = parse_args("ONNX Runtime: CPU latency of the teacher, ORT's dynamic int8 and our compressed models.", argv)
    sizes = a.sizes
    repeats = 3 if a.quick else 30
    threads = torch.get_num_threads()
    tok = tokenizer()
    _, val_ds = sst2(tok, 8, sizes["eval_rows"])
    base = teacher(sizes, tok).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    t0 = time.time()

    # what ships, in PyTorch
    int8 = quantize_model(copy.deepcopy(base), QATConfig(**INT8)).eval()
    student = student_from_teacher(base, layers=(0, 2, 4)).eval()
    student_int8 = quantize_model(copy.deepcopy(student), QATConfig(**INT8)).eval()
    student_pruned_int8 = quantize_model(pruned(copy.deepcopy(student)), QATConfig(**INT8)).eval()

    # ONNX exports (ours) and ORT's own dynamic quantisation of the teacher export
    exports = {}
    for name, m in (("teacher", base), ("int8", int8), ("student3 int8", student_int8),
                    ("student3 pruned int8", student_pruned_int8)):
        out = tmp / name.replace(" ", "_")
        exports[name] = export_onnx(m, out)
        print(f"[bench] exported {name}: verification {exports[name]['verification']}", flush=True)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ort_q = tmp / "teacher_ort_dynamic"
    ort_q.mkdir()
    quantize_dynamic(str(tmp / "teacher" / "model.onnx"), str(ort_q / "model.onnx"), weight_type=QuantType.QInt8)

    def onnx_mb(path):
        return sum(f.stat().st_size for f in Path(path).glob("model.onnx*")) / 1e6

    models = {
        "teacher fp32 (PyTorch)": base,
        "teacher fp32 (ORT)": OrtModel(tmp / "teacher", threads),
        "teacher ORT quantize_dynamic int8 (ORT)": OrtModel(ort_q, threads),
        "ours int8 (PyTorch torch-int8)": int8,
        "ours int8 (ORT)": OrtModel(tmp / "int8", threads),
        "ours 3-layer int8 (PyTorch)": student_int8,
        "ours 3-layer int8 (ORT)": OrtModel(tmp / "student3_int8", threads),
        "ours 3-layer heads+FFN -50% int8 (PyTorch)": student_pruned_int8,
        "ours 3-layer heads+FFN -50% int8 (ORT)": OrtModel(tmp / "student3_pruned_int8", threads),
    }
    files = {"teacher fp32 (ORT)": tmp / "teacher", "teacher ORT quantize_dynamic int8 (ORT)": ort_q,
             "ours int8 (ORT)": tmp / "int8", "ours 3-layer int8 (ORT)": tmp / "student3_int8",
             "ours 3-layer heads+FFN -50% int8 (ORT)": tmp / "student3_pruned_int8"}
    trained = {"teacher fp32 (PyTorch)", "teacher fp32 (ORT)", "teacher ORT quantize_dynamic int8 (ORT)",
               "ours int8 (PyTorch torch-int8)", "ours int8 (ORT)"}
    lat = interleaved_latency(models, (1, 32), SEQ_LEN, repeats)
    ref = lat["teacher fp32 (ORT)"]
    rows = []
    for name, m in models.items():
        acc = None
        if name in trained:
            acc = ort_accuracy(m, val_ds, tok) if isinstance(m, OrtModel) else accuracy(m, val_ds, tok)
        rows.append({
            "model": name, "accuracy": acc,
            "onnx_MB": onnx_mb(files[name]) if name in files else None,
            "latency_b1_ms": 1e3 * lat[name]["b1"], "latency_b32_ms": 1e3 * lat[name]["b32"],
            "speedup_vs_ort_fp32_b1": ref["b1"] / lat[name]["b1"],
            "speedup_vs_ort_fp32_b32": ref["b32"] / lat[name]["b32"],
        })
        print(f"[bench] {name}: b1 {rows[-1]['latency_b1_ms']:.2f} ms, b32 {rows[-1]['latency_b32_ms']:.2f} ms, "
              f"accuracy {acc}", flush=True)

    best = "ours 3-layer heads+FFN -50% int8 (ORT)"
    others = [n for n in models if n != best and not n.startswith("ours 3-layer")] + ["ours 3-layer int8 (PyTorch)",
                                                                                        "ours 3-layer heads+FFN -50% int8 (PyTorch)"]
    goals = {
        f"{best} faster than every other model at batch {bs}": goal(all(lat[best][f"b{bs}"] < lat[o][f"b{bs}"] for o in others))
        for bs in (1, 32)
    }
    print(table(rows, ["model", "accuracy", "onnx_MB", "latency_b1_ms", "latency_b32_ms", "speedup_vs_ort_fp32_b1",
                       "speedup_vs_ort_fp32_b32"]))
    for k, v in goals.items():
        print(f"  goal {k}: {v}")
    write("onnx", {
        "quick": a.quick, "sizes": sizes, "repeats": repeats, "seq_len": SEQ_LEN, "threads": threads,
        "latency_input": f"random token ids, sequence {SEQ_LEN}, no padding; models interleaved in one process",
        "notes": ("int8 models by PTQ (quantize_model, the layers and numerics QAT exports); the 3-layer students are "
                  "untrained (structure only: latency, no accuracy). ORT sessions: CPUExecutionProvider, "
                  f"intra_op_num_threads={threads}, all graph optimisations."),
        "exports": {k: v.get("verification") for k, v in exports.items()},
        "rows": rows, "goals": goals, "minutes": (time.time() - t0) / 60,
    }, a.out)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
