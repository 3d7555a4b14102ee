"""Why is our int8 ONNX file a few % slower than ORT's quantize_dynamic of the same teacher at batch 1?

PTQ variants of the cached fine-tuned teacher (no training; accuracy not measured), each exported with
hf_compress.export_onnx, beside ORT quantize_dynamic (QInt8, its defaults) of the teacher's float export, all
timed in ONNX Runtime in one process (batch 1 and 32, sequence 32, interleaved, median of --repeats, two
passes), and the op counts of each graph as ORT optimises it (what actually runs):

* ours: the transformer-block Linears (QATCallback's default targets), dynamic per-tensor uint8 activations,
  per-channel int8 weights (torch-int8 numerics);
* + the int8 word embedding (embedding_bits=8); + the pooler; + the pooler and the classifier
  (ORT quantises every MatMul and Gather).

    OMP_NUM_THREADS=1 python bench/bench_int8_graph.py          # ~3 min, alone on the machine
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from common import FULL, QUICK, teacher, tokenizer, write  # noqa: E402

from hf_compress import QATConfig, export_onnx, quantize_model  # noqa: E402
from hf_compress.modules import BLOCK_PATTERN  # noqa: E402

INT8 = dict(weight_bits=8, activation_bits=8, observer="dynamic", export="torch-int8")
VARIANTS = {
    "ours: block Linears": {},
    "ours: + int8 word embedding": dict(embedding_bits=8),
    "ours: + int8 word embedding + pooler": dict(embedding_bits=8, qat_targets=[BLOCK_PATTERN, r"pooler\.dense$"]),
    "ours: + pooler + classifier": dict(qat_targets=[BLOCK_PATTERN, r"pooler\.dense$", r"classifier$"]),
}


def optimised_ops(path: Path, work: Path) -> dict[str, int]:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(work / f"{path.parent.name}-optimised.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    keep = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeLinear", "MatMul",
            "Gather", "DequantizeLinear")
    return {k: ops[k] for k in keep if ops.get(k)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per pass (default 60; --quick 3)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    sizes = dict(QUICK if a.quick else FULL)
    repeats = a.repeats or (3 if a.quick else 60)

    from bench_onnx import OrtModel, interleaved_latency
    from onnxruntime.quantization import QuantType, quantize_dynamic

    base = teacher(sizes, tokenizer()).eval()
    work = Path(tempfile.mkdtemp(prefix="int8-graph-"))
    dirs = {}
    for name, kw in VARIANTS.items():
        m = quantize_model(teacher(sizes, tokenizer()).eval(), QATConfig(**INT8, **kw))
        d = work / f"v{len(dirs)}"
        export_onnx(m, d, verify=False)
        dirs[name] = d
    export_onnx(base, work / "float", verify=False)
    (work / "ort").mkdir()
    quantize_dynamic(str(work / "float" / "model.onnx"), str(work / "ort" / "model.onnx"), weight_type=QuantType.QInt8)
    dirs["ORT quantize_dynamic (QInt8)"] = work / "ort"

    rows = {name: {"ops_optimised": optimised_ops(d / "model.onnx", work),
                   "file_MB": (d / "model.onnx").stat().st_size / 1e6} for name, d in dirs.items()}
    models = {name: OrtModel(d, torch.get_num_threads()) for name, d in dirs.items()}
    passes = [interleaved_latency(models, (1, 32), 32, repeats) for _ in range(2)]
    ref = "ORT quantize_dynamic (QInt8)"
    for name, r in rows.items():
        for b in ("b1", "b32"):
            r[f"latency_{b}_ms"] = [1e3 * lat[name][b] for lat in passes]
            r[f"ratio_to_ort_{b}"] = [lat[name][b] / lat[ref][b] for lat in passes]
        print(f"{name}: b1 {[round(x, 3) for x in r['latency_b1_ms']]} ms (x ORT {[round(x, 3) for x in r['ratio_to_ort_b1']]}), "
              f"b32 {[round(x, 1) for x in r['latency_b32_ms']]} ms (x ORT {[round(x, 3) for x in r['ratio_to_ort_b32']]}); "
              f"{r['ops_optimised']}", flush=True)
    write("int8_graph", {"quick": a.quick, "sizes": sizes, "repeats": repeats, "passes": 2, "seq_len": 32,
                         "rows": [{"variant": name, **r} for name, r in rows.items()]}, a.out)


if __name__ == "__main__":
    main()
