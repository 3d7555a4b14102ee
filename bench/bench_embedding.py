"""int8 word embeddings (`QATConfig.embedding_bits=8`): what they cost in accuracy and save on disk.

The cached fine-tuned teacher (bench/common.py) quantised by `quantize_model` to torch-int8 (per-channel int8
weights, dynamic int8 activations) without and with `embedding_bits=8`; accuracy on all 872 SST-2 validation
sentences and the size of the saved safetensors. No training: one minute once the teacher is cached.

    python bench/bench_embedding.py
    python bench/bench_embedding.py --quick     # proves it runs; numbers meaningless
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import accuracy, parse_args, sst2, teacher, tokenizer, write  # noqa: E402

from hf_compress import QATConfig, quantize_model  # noqa: E402

INT8 = dict(weight_bits=8, activation_bits=8, observer="dynamic", export="torch-int8")


def safetensors_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def main(argv=None):
    a = parse_args("int8 word embeddings: accuracy and disk size of the int8 teacher without / with them.", argv)
    tok = tokenizer()
    _, val = sst2(tok, 8, a.sizes["eval_rows"])
    base = teacher(a.sizes, tok).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_embedding_"))
    rows = []
    for name, extra in (("fp32", None), ("int8", {}), ("int8 + int8 embeddings", {"embedding_bits": 8})):
        m = base if extra is None else quantize_model(copy.deepcopy(base), QATConfig(**INT8, **extra)).eval()
        out = tmp / name.replace(" ", "_").replace("+", "and")
        m.save_pretrained(out)
        rows.append({"model": name, "accuracy": accuracy(m, val, tok), "safetensors_MB": safetensors_mb(out)})
        print(f"[bench] {name}: accuracy {rows[-1]['accuracy']:.4f}, {rows[-1]['safetensors_MB']:.1f} MB", flush=True)
    by = {r["model"]: r for r in rows}
    write("embedding", {
        "quick": a.quick, "sizes": a.sizes, "config": INT8, "rows": rows,
        "accuracy_change_points": 100 * (by["int8 + int8 embeddings"]["accuracy"] - by["int8"]["accuracy"]),
        "size_ratio": by["int8"]["safetensors_MB"] / by["int8 + int8 embeddings"]["safetensors_MB"],
    }, a.out)


if __name__ == "__main__":
    main()
