"""Does removing heads and FFN neurons slow the 3-layer int8 student down through ONNX Runtime?

bench/bench_onnx.py (2026-11-30 10:04, a `pip install` overlapping its last minutes) timed the 3-layer
student with half its heads and FFN neurons removed *slower* than the unpruned one at batch 32 (57.8 →
64.9 ms). This script re-checks that alone, with the shapes separated: the unpruned student, FFN
widths cut to an aligned 768, cut to the pruned model's own odd widths, and the pruned model itself
(heads + neurons, `bench_onnx.pruned`), all int8 (`quantize_model`, bench_onnx's INT8) and exported with
`export_onnx`; every session's optimised graph is read back to count its operators (does ORT fuse
attention in one and not the other?). Latency: batch 32 (and 1), sequence 32, interleaved, median of
`--repeats` after 3 warm-ups, at 1 and 2 intra-op threads.

    python bench/bench_onnx_shapes.py            # ~3 min after the cached teacher
    python bench/bench_onnx_shapes.py --quick    # proves it runs
"""

from __future__ import annotations

import collections
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_onnx import INT8, pruned  # noqa: E402
from common import parse_args, teacher, tokenizer, write  # noqa: E402

from hf_compress import QATConfig, export_onnx, quantize_model, student_from_teacher  # noqa: E402


def ffn_widths(model, widths):
    """Keep the first `widths[i]` FFN neurons of block i (shape only: latency does not read the values)."""
    for layer, keep in zip(model.bert.encoder.layer, widths):
        up, down = layer.intermediate.dense, layer.output.dense
        up.weight = torch.nn.Parameter(up.weight[:keep].clone())
        up.bias = torch.nn.Parameter(up.bias[:keep].clone())
        up.out_features = keep
        down.weight = torch.nn.Parameter(down.weight[:, :keep].clone())
        down.in_features = keep
    return model


def main(argv=None):
    import onnx
    import onnxruntime as ort

    a = parse_args(__doc__.split("\n")[0], argv)
    repeats = 4 if a.quick else 30
    base = teacher(a.sizes, tokenizer()).eval()
    student = student_from_teacher(base, layers=(0, 2, 4)).eval()
    cut = pruned(copy.deepcopy(student))
    widths = [layer.intermediate.dense.out_features for layer in cut.bert.encoder.layer]
    heads = [layer.attention.self.num_attention_heads for layer in cut.bert.encoder.layer]
    variants = {
        "3-layer (12 heads, FFN 1536)": copy.deepcopy(student),
        "FFN 768 (aligned), 12 heads": ffn_widths(copy.deepcopy(student), [768] * 3),
        f"FFN {'/'.join(map(str, widths))} (the pruned widths), 12 heads": ffn_widths(copy.deepcopy(student), widths),
        f"heads {'/'.join(map(str, heads))} + FFN {'/'.join(map(str, widths))} (bench_onnx's pruned)": cut,
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_shapes_"))
    paths, ops = {}, {}
    for i, (name, m) in enumerate(variants.items()):
        d = tmp / f"v{i}"
        export_onnx(quantize_model(m, QATConfig(**INT8)).eval(), d)
        paths[name] = next(d.rglob("*.onnx"))
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp / f"v{i}_optimised.onnx")
        ort.InferenceSession(str(paths[name]), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        ops[name] = dict(collections.Counter(n.op_type for n in graph.node).most_common())

    rng = np.random.default_rng(0)
    results = {}
    for threads in (1, 2):
        sessions = {}
        for name, path in paths.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for batch in (1, 32):
            ids = rng.integers(1000, 20000, (batch, 32)).astype(np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            times = {n: [] for n in sessions}
            for r in range(repeats + 3):
                for n, s in sessions.items():
                    f = {i.name: feed[i.name] for i in s.get_inputs()}
                    t = time.perf_counter()
                    s.run(None, f)
                    if r >= 3:
                        times[n].append(time.perf_counter() - t)
            for n in sessions:
                results.setdefault(n, {})[f"threads{threads}_b{batch}_ms"] = 1000 * statistics.median(times[n])
    for n, r in results.items():
        print(f"{n:70s} " + "  ".join(f"{k} {v:6.1f}" for k, v in r.items()))
    same_ops = len({tuple(sorted(o.items())) for o in ops.values()}) == 1
    write("onnx_shapes", dict(quick=a.quick, repeats=repeats, seq_len=32, heads_kept=heads, ffn_kept=widths,
                              latency=results, optimised_graph_ops=ops, same_optimised_ops=same_ops), a.out)


if __name__ == "__main__":
    main()
