"""int4 on CPU (issue 16): our int4 models through ONNX Runtime, against fp32 and the peers (protocol in
bench/common.py and BENCHMARKS.md).

Models (all from the cached fine-tuned MiniLM teacher; every latency measured interleaved in one process, so the
ratios hold on a loaded machine):

* teacher fp32: PyTorch, and ONNX Runtime (hf_compress.export_onnx);
* ours int4 g64 (group-wise): PTQ of the teacher (`quantize_model`, weight_bits=4, group_size=64, symmetric
  'restricted' grid: the numerics QAT exports), written by `export_onnx` (int4='matmulnbits') as com.microsoft
  MatMulNBits carrying our codes and scales, at accuracy_level 0 (the default: float32 input, exact
  dequantisation) and 4 (the kernel quantises each 64-wide block of its input to int8); and a short int4 g64 QAT
  run (accuracy only: its structure, hence its latency, is the PTQ one's);
* ours int4 per channel for ONNX Runtime's int8 GEMM: PTQ with weight_bits=4, activation_bits=8,
  observer='dynamic', export='torch-int8' (4-bit codes, one scale per channel, inputs quantised per tensor at
  run time), written with int4='int8-gemm': the file holds the codes packed two per byte, ONNX Runtime unpacks
  them once at load into its DynamicQuantizeMatMul kernel; and the same trained by a short QAT run (accuracy);
* the peer in the same process: ONNX Runtime's own `MatMulNBitsQuantizer` (RTN, its defaults: asymmetric, with
  block_size=64 as ours) applied to the teacher's fp32 ONNX file, at the same two accuracy levels;
* torchao's int4 (IntxWeightOnlyConfig, g64): torchao cannot be imported in this venv, so its numbers are the ones
  bench/peers/torchao_qat.py measured in its own venv and process (bench/results/peers.json), shown beside ours
  and labelled so: their latency ratios are against fp32 PyTorch in that process, at that time.

Reported: latency at batch 1 and 32 (sequence 32) and its ratio to fp32 PyTorch and fp32 ORT, bytes of the
quantised linear weights against fp32 (packed codes + scales + zero points; biases stay fp32 in every model and
are left out of both sides), whole-file size, and SST-2 validation accuracy. Goals printed met / NOT met.

    python bench/bench_int4_cpu.py            # full: 30 interleaved repeats, all of SST-2 validation, 2 x 60 QAT steps
    python bench/bench_int4_cpu.py --quick    # proves it runs; numbers meaningless
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_onnx import OrtModel, interleaved_latency, ort_accuracy  # noqa: E402
from common import RESULTS, SEED, accuracy, goal, parse_args, sst2, table, teacher, tokenizer, train, training_args, write  # noqa: E402

from hf_compress import QATCallback, QATConfig, export_onnx, quantize_model  # noqa: E402

warnings.filterwarnings("ignore")
SEQ_LEN = 32  # as bench/common.latency
INT4 = dict(weight_bits=4, group_size=64)  # symmetric, weight_range='restricted' (the QATConfig defaults)
# per channel, calibrated / trained for exactly what ONNX Runtime's int8 GEMM computes (torch-int8's numerics)
INT4_PC = dict(weight_bits=4, activation_bits=8, observer="dynamic", export="torch-int8")
QAT_LR = 2e-5  # as bench/bench_qat.py (continued fine-tuning of the teacher)
QAT_STEPS = 60  # as the int4 QAT rows of bench/results/peers.json (torchao's QAT ran as many)
GOAL_SMALLER = 6.0


def linear_bytes(path: Path) -> dict:
    """Bytes of the 4-bit linear weights of an ONNX file and of the same weights in fp32: MatMulNBits (B + scales +
    zero points), and int8-gemm layers (the packed [K/2, N] codes that a BitShift unpacks, + one fp32 scale and one
    int8 zero point per output channel)."""
    import onnx

    g = onnx.load(str(path / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.graph.initializer}
    fp32 = packed = nodes = 0
    for n in g.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            fp32 += 4 * a["K"] * a["N"]
            packed += sum(inits[i].nbytes for i in n.input[1:4] if i)
            nodes += 1
        elif n.op_type == "BitShift" and n.input[0] in inits:
            half, n_out = inits[n.input[0]].shape
            fp32 += 4 * 2 * half * n_out
            packed += inits[n.input[0]].nbytes + 5 * n_out
            nodes += 1
    return {"nodes": nodes, "fp32_bytes": fp32, "int4_bytes": packed, "smaller_x": fp32 / packed if packed else None}


def onnx_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("model.onnx*")) / 1e6


def ort_rtn(src: Path, out: Path, level: int) -> None:
    """ONNX Runtime's own int4 weight-only quantisation of an fp32 ONNX file (round to nearest, its defaults)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(str(src / "model.onnx"), block_size=64, accuracy_level=level)
    q.process()
    out.mkdir(parents=True)
    q.model.save_model_to_file(str(out / "model.onnx"), False)


def torchao_rows() -> tuple[list[dict], dict]:
    """torchao's int4 g64 as bench/peers/torchao_qat.py measured it (another venv, another process)."""
    path = RESULTS / "peers.json"
    if not path.exists():
        return [], {"source": None}
    d = json.loads(path.read_text())
    acc = {r["run"]: r["accuracy"] for r in d.get("qat", []) if r.get("side") == "torchao"}
    exp = next((r for r in d.get("qat_exports", []) if r.get("model") == "torchao int4 g64"), None)
    src = {"source": "bench/results/peers.json", "date": d.get("date"), "command": d.get("command"),
           "machine": d.get("machine"), "versions": (d.get("notes") or {}).get("torchao_versions"),
           "float_accuracy_there": (d.get("notes") or {}).get("torchao_float_accuracy")}
    if exp is None:
        return [], src
    rows = []
    for run in ("torchao PTQ int4 g64", "torchao QAT int4 g64"):
        rows.append({
            "model": f"{run} (PyTorch, measured in another process)", "accuracy": acc.get(run),
            "speedup_vs_torch_fp32_b1": exp.get("speedup_b1"), "speedup_vs_torch_fp32_b32": exp.get("speedup_b32"),
            "linear_smaller_x": exp.get("layers_smaller_x"), "size_method": exp.get("size_method"),
            "measured_in": f"{exp.get('measured_in')}, bench/results/peers.json ({d.get('date')})",
        })
    return rows, src


def main(argv=None):
    a = parse_args("int4 on CPU: our int4 models through ONNX Runtime vs fp32 and the peers.", argv)
    sizes = a.sizes
    repeats = 3 if a.quick else 30
    qat_steps = a.steps or (sizes["steps"] if a.quick else QAT_STEPS)
    threads = torch.get_num_threads()
    tok = tokenizer()
    train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])
    base = teacher(sizes, tok).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_int4_"))
    t0 = time.time()

    # ours: PTQ of the teacher (the numerics QAT exports), and short QAT runs
    ptq = quantize_model(copy.deepcopy(base), QATConfig(**INT4)).eval()
    ptq_pc = quantize_model(copy.deepcopy(base), QATConfig(**INT4_PC)).eval()
    qat, qat_step_s = {}, {}
    for label, kw in (("g64", INT4), ("per-channel", INT4_PC)):
        torch.manual_seed(SEED)
        trainer, qat_step_s[label] = train(copy.deepcopy(base).train(), train_ds,
                                           training_args(str(tmp / f"qat_{label}"), steps=qat_steps, lr=QAT_LR), tok,
                                           callbacks=[QATCallback(QATConfig(**kw))])
        qat[label] = trainer.model.eval()
        print(f"[bench] int4 {label} QAT: {qat_steps} steps, {qat_step_s[label]:.3f} s/step", flush=True)

    exports = {"teacher fp32": export_onnx(base, tmp / "teacher")}
    for level in (0, 4):
        exports[f"ptq g64 L{level}"] = export_onnx(ptq, tmp / f"ptq_l{level}", accuracy_level=level)
    exports["ptq per-channel int8-gemm"] = export_onnx(ptq_pc, tmp / "ptq_pc", int4="int8-gemm")
    exports["qat g64 L0"] = export_onnx(qat["g64"], tmp / "qat_l0")
    exports["qat per-channel int8-gemm"] = export_onnx(qat["per-channel"], tmp / "qat_pc", int4="int8-gemm")
    for k, v in exports.items():
        print(f"[bench] exported {k}: {v['layers']}, verification {v['verification']}", flush=True)
    for level in (0, 4):
        ort_rtn(tmp / "teacher", tmp / f"rtn_l{level}", level)

    ours = {
        "ours int4 g64 PTQ (ORT MatMulNBits, accuracy_level=0)": tmp / "ptq_l0",
        "ours int4 g64 PTQ (ORT MatMulNBits, accuracy_level=4)": tmp / "ptq_l4",
        "ours int4 per-channel PTQ (ORT int8 GEMM, int4='int8-gemm')": tmp / "ptq_pc",
    }
    dirs = {
        "teacher fp32 (ORT)": tmp / "teacher", **ours,
        "ORT MatMulNBitsQuantizer RTN int4 g64 (accuracy_level=0)": tmp / "rtn_l0",
        "ORT MatMulNBitsQuantizer RTN int4 g64 (accuracy_level=4)": tmp / "rtn_l4",
    }
    models = {"teacher fp32 (PyTorch)": base, **{k: OrtModel(p, threads) for k, p in dirs.items()}}
    lat = interleaved_latency(models, (1, 32), SEQ_LEN, repeats)
    torch_ref, ort_ref = lat["teacher fp32 (PyTorch)"], lat["teacher fp32 (ORT)"]

    rows = []
    for name, m in models.items():
        acc = ort_accuracy(m, val_ds, tok) if isinstance(m, OrtModel) else accuracy(m, val_ds, tok)
        lb = linear_bytes(dirs[name]) if name in dirs else {}
        rows.append({
            "model": name, "accuracy": acc, "onnx_MB": onnx_mb(dirs[name]) if name in dirs else None,
            "int4_linears": lb.get("nodes"), "linear_smaller_x": lb.get("smaller_x"),
            "latency_b1_ms": 1e3 * lat[name]["b1"], "latency_b32_ms": 1e3 * lat[name]["b32"],
            **{f"speedup_vs_{ref}_fp32_b{bs}": r[f"b{bs}"] / lat[name][f"b{bs}"]
               for ref, r in (("torch", torch_ref), ("ort", ort_ref)) for bs in (1, 32)},
            "measured_in": "this process, interleaved",
        })
        print(f"[bench] {name}: b1 {rows[-1]['latency_b1_ms']:.2f} ms, b32 {rows[-1]['latency_b32_ms']:.2f} ms, "
              f"accuracy {acc:.4f}", flush=True)
    # accuracy only (the same structure as a PTQ export above: the same latency)
    extra = {
        "ours int4 g64 PTQ (PyTorch, weights on the grid as floats)": accuracy(ptq, val_ds, tok),
        f"ours int4 g64 QAT {qat_steps} steps (PyTorch, weights on the grid as floats)": accuracy(qat["g64"], val_ds, tok),
        f"ours int4 g64 QAT {qat_steps} steps (ORT MatMulNBits, accuracy_level=0)":
            ort_accuracy(OrtModel(tmp / "qat_l0", threads), val_ds, tok),
        "ours int4 per-channel PTQ (PyTorch torch-int8)": accuracy(ptq_pc, val_ds, tok),
        f"ours int4 per-channel QAT {qat_steps} steps (PyTorch torch-int8)": accuracy(qat["per-channel"], val_ds, tok),
        f"ours int4 per-channel QAT {qat_steps} steps (ORT int8 GEMM, int4='int8-gemm')":
            ort_accuracy(OrtModel(tmp / "qat_pc", threads), val_ds, tok),
    }
    for name, acc in extra.items():
        rows.append({"model": name, "accuracy": acc, "measured_in": "this process (accuracy only)"})
        print(f"[bench] {name}: accuracy {acc:.4f}", flush=True)
    ao_rows, ao_source = torchao_rows()
    rows += ao_rows

    row = {r["model"]: r for r in rows}
    ao = {r["model"]: r for r in ao_rows}
    ao_ptq = ao.get("torchao PTQ int4 g64 (PyTorch, measured in another process)")
    goals, met = {}, {}
    for name in ours:
        small = (row[name]["linear_smaller_x"] or 0) >= GOAL_SMALLER
        faster = []
        for ref_name, ref in (("PyTorch", torch_ref), ("ORT", ort_ref)):
            for bs in (1, 32):
                ok = lat[name][f"b{bs}"] < ref[f"b{bs}"]
                goals[f"{name} faster than fp32 {ref_name} at batch {bs}"] = goal(ok)
                faster.append(ok)
        goals[f"{name} linear weights >= {GOAL_SMALLER:g}x smaller than fp32"] = goal(small)
        met[name] = all(faster) and small
        if ao_ptq is not None:
            for bs in (1, 32):
                goals[f"{name} speed-up over fp32 PyTorch above torchao int4's at batch {bs} (torchao: other process)"] = goal(
                    row[name][f"speedup_vs_torch_fp32_b{bs}"] > (ao_ptq[f"speedup_vs_torch_fp32_b{bs}"] or float("inf")))
    winners = [n for n, v in met.items() if v]
    goals[f"issue 16: an int4 path of ours faster than fp32 (PyTorch and ORT) at batch 1 and 32, linears >= "
          f"{GOAL_SMALLER:g}x smaller"] = goal(bool(winners)) + (f" ({'; '.join(winners)})" if winners else "")

    print(table(rows, ["model", "accuracy", "linear_smaller_x", "onnx_MB", "latency_b1_ms", "latency_b32_ms",
                       "speedup_vs_torch_fp32_b1", "speedup_vs_torch_fp32_b32", "speedup_vs_ort_fp32_b1",
                       "speedup_vs_ort_fp32_b32"]))
    for k, v in goals.items():
        print(f"  goal {k}: {v}")
    write("int4_cpu", {
        "quick": a.quick, "sizes": sizes, "repeats": repeats, "seq_len": SEQ_LEN, "threads": threads,
        "qat_steps": qat_steps, "qat_step_s": qat_step_s, "int4_configs": {"g64": INT4, "per-channel": INT4_PC},
        "latency_input": f"random token ids, sequence {SEQ_LEN}, no padding; models interleaved in one process",
        "notes": ("int4 g64 = weight-only, symmetric [-7, 7] codes, one fp32 scale per 64 input features, exported by "
                  "hf_compress.export_onnx as com.microsoft MatMulNBits (bits=4, block_size=64) with the model's own "
                  "codes and scales; accuracy_level=0: float32 input, 4: the kernel quantises each 64-wide block of "
                  "its input to int8. int4 per-channel = [-8, 7] codes, one scale and zero point per output channel, "
                  "inputs quantised per tensor at run time (export='torch-int8' numerics); int4='int8-gemm' stores the "
                  "codes packed two per byte and ONNX Runtime unpacks them once at load for DynamicQuantizeMatMul. "
                  "The peer RTN is onnxruntime.quantization.MatMulNBitsQuantizer with its defaults (asymmetric) and "
                  "block_size=64. linear_smaller_x = fp32 bytes of the int4 linears' weights / their packed codes + "
                  "scales + zero points (biases are fp32 everywhere). ORT sessions: CPUExecutionProvider, "
                  f"intra_op_num_threads={threads}, all graph optimisations. torchao rows: measured by "
                  "bench/peers/torchao_qat.py in its own venv (torchao is not importable here); their speed-ups are "
                  "against fp32 PyTorch in that process and their size is torch.save of the layers."),
        "torchao_source": ao_source,
        "exports": {k: {"layers": v["layers"], "verification": v.get("verification")} for k, v in exports.items()},
        "rows": rows, "goals": goals, "minutes": (time.time() - t0) / 60,
    }, a.out)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
