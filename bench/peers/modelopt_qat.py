"""Peer side of the QAT comparison: NVIDIA ModelOpt (`nvidia-modelopt`) on CPU, MiniLM-L6 + SST-2 with
the protocol of bench/bench_qat.py (cached fine-tuned teacher, same 8,000-row subset, same steps / lr /
batch / seed, all 872 validation rows). Run with the modelopt venv made by bench/peers/setup.sh:

    /tmp/hf_compress_peers/modelopt/bin/python bench/peers/modelopt_qat.py --steps 60 [--out FILE]
    /tmp/hf_compress_peers/modelopt/bin/python bench/peers/modelopt_qat.py --quick

ModelOpt flow: ``mtq.quantize(model, CFG, forward_loop)`` (inserts fake quantisers and calibrates them
on the first 512 training rows, as its QATTrainer's default calib_size does) → accuracy = ModelOpt
PTQ → training with ModelOpt's HF Trainer plugin ``QATTrainer`` → accuracy = ModelOpt QAT. Configs are
ModelOpt's presets ``INT8_DEFAULT_CFG`` (int8 per-channel weights, int8 per-tensor *static*
activations) and ``INT4_BLOCKWISE_WEIGHT_ONLY_CFG`` with the block size set to 64, restricted to the
Linear layers inside the transformer blocks (pooler, classifier and LayerNorm quantisers disabled) so
the same layers as ours are quantised. ModelOpt's real low-bit export targets TensorRT-LLM / vLLM on
GPU; on CPU the models stay fake-quantised, so this script reports accuracy and step time, and tries
``mtq.compress`` (real low-bit weights) for size, recording the error when it fails.
"""

from __future__ import annotations

import copy
import io
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(Path(__file__).resolve().parent))

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from common import SEED, accuracy, latency, parse_args, sst2, teacher, tokenizer, train, training_args  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

LR = 2e-5  # bench_qat.py's LR
CALIB = 512
OFF = [{"quantizer_name": p, "enable": False} for p in ("*pooler*", "*classifier*", "*LayerNorm*")]


def configs():
    import modelopt.torch.quantization as mtq

    int8 = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    int8["quant_cfg"] = list(int8["quant_cfg"]) + OFF
    int4 = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    for rule in int4["quant_cfg"]:
        if rule.get("quantizer_name") == "*weight_quantizer" and "cfg" in rule:
            rule["cfg"]["block_sizes"] = {**rule["cfg"]["block_sizes"], -1: 64}
            rule["cfg"]["block_sizes"].pop("-1", None)
    int4["quant_cfg"] = list(int4["quant_cfg"]) + OFF
    return {"int8": (8, "INT8_DEFAULT_CFG", int8), "int4 g64": (4, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG (block 64)", int4)}


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def main(argv=None):
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--configs", nargs="*", default=None, help="some of: int8, int4g64 (default both)")
    known, rest = pre.parse_known_args(argv)
    a = parse_args("NVIDIA ModelOpt PTQ + QAT (QATTrainer) on MiniLM + SST-2, CPU", rest)
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.plugins.transformers_trainer import QATTrainer

    sizes, steps = a.sizes, a.sizes["steps"]
    tok = tokenizer()
    train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])
    base = teacher(sizes, tok).eval()
    float_acc = accuracy(base, val_ds, tok)
    print(f"[modelopt] modelopt {modelopt.__version__}; float accuracy {float_acc:.4f}; {steps} QAT steps", flush=True)
    collate = DataCollatorWithPadding(tok)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in train_ds.column_names]
    n_calib = min(CALIB, len(train_ds))
    calib = [collate([{c: train_ds[j][c] for c in cols} for j in range(i, min(i + 32, n_calib))]) for i in range(0, n_calib, 32)]

    def forward_loop(model):
        with torch.no_grad():
            for batch in calib:
                model(**batch)

    tmp = Path(tempfile.mkdtemp(prefix="peer_modelopt_"))
    rows, notes, shipped = [], {}, {"float": base}
    for label, (bits, cfg_name, cfg) in configs().items():
        if known.configs and label.replace(" ", "") not in known.configs:
            continue
        t0 = time.time()
        torch.manual_seed(SEED)
        m = copy.deepcopy(base).eval()
        try:
            mtq.quantize(m, cfg, forward_loop)
        except Exception as e:
            notes[label] = f"mtq.quantize failed: {first_line(e)}"
            print(f"[modelopt] {label}: {notes[label]}", flush=True)
            continue
        n_q = sum(1 for n, mod in m.named_modules() if n.endswith("weight_quantizer") and getattr(mod, "is_enabled", False))
        acc = accuracy(m, val_ds, tok)
        rows.append({"run": f"ModelOpt PTQ {label}", "method": "ptq", "bits": bits, "config": cfg_name, "accuracy": acc,
                     "retention": acc / float_acc, "quantised_layers": n_q, "minutes": (time.time() - t0) / 60})
        print(f"[modelopt] {rows[-1]}", flush=True)
        t0 = time.time()
        try:
            trainer, step_s = train(m.train(), train_ds, training_args(str(tmp / label), steps=steps, lr=LR), tok,
                                    trainer_cls=QATTrainer)
        except Exception as e:
            notes[label] = f"QATTrainer failed: {first_line(e)}"
            print(f"[modelopt] {label}: {notes[label]}", flush=True)
            continue
        m = trainer.model.eval()
        train_min = (time.time() - t0) / 60
        acc = accuracy(m, val_ds, tok)
        rows.append({"run": f"ModelOpt QAT {label} (QATTrainer)", "method": "qat", "bits": bits, "config": cfg_name,
                     "accuracy": acc, "retention": acc / float_acc, "step_s": step_s, "train_minutes": train_min,
                     "minutes": (time.time() - t0) / 60})
        print(f"[modelopt] {rows[-1]}", flush=True)
        shipped[f"ModelOpt {label} (fake-quant)"] = m

    # what ships on CPU: the fake-quantised model (latency), and mtq.compress for real low-bit weights (size)
    lat = latency(shipped, tok, batch_sizes=(1, 32), repeats=5 if a.quick else 9)
    exports = []
    for name, m in shipped.items():
        r = {"model": name, "latency_b1_ms": 1e3 * lat[name]["b1"], "latency_b32_ms": 1e3 * lat[name]["b32"],
             "speedup_b1": lat["float"]["b1"] / lat[name]["b1"], "speedup_b32": lat["float"]["b32"] / lat[name]["b32"]}
        if name != "float":
            try:
                c = copy.deepcopy(m)
                mtq.compress(c)
                buf = io.BytesIO()
                torch.save(c.state_dict(), buf)
                r["compressed_model_MB_torch_save"] = buf.getbuffer().nbytes / 1e6
            except Exception as e:
                r["compress_note"] = f"mtq.compress failed on CPU: {first_line(e)}"
        exports.append(r)
        print(f"[modelopt] {r}", flush=True)

    import lm

    lm.dump(a.out, {"side": "modelopt", "quick": a.quick, "sizes": sizes, "steps": steps, "lr": LR, "calib_rows": n_calib,
                    "float_accuracy": float_acc, "rows": rows, "exports": exports, "notes": notes,
                    "versions": lm.versions("nvidia-modelopt")})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
