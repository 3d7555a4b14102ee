"""Peer side of the QAT comparison: torchao's QAT on MiniLM-L6 + SST-2, with the protocol of
bench/bench_qat.py (the cached fine-tuned teacher from bench/.cache, the same 8,000-row SST-2 subset,
the same steps / lr / batch / seed, all 872 validation rows). Run with the torchao venv made by
bench/peers/setup.sh:

    /tmp/hf_compress_peers/torchao/bin/python bench/peers/torchao_qat.py --steps 60 [--out FILE]
    /tmp/hf_compress_peers/torchao/bin/python bench/peers/torchao_qat.py --quick

torchao flow: ``quantize_(model, QATConfig(base, step="prepare"))`` → train with the stock Trainer →
``quantize_(model, QATConfig(base, step="convert"))``; PTQ = ``quantize_(model, base)`` on the float
model. The same Linear layers as ours are quantised (those inside the transformer blocks, picked
with hf_compress.modules.select_modules; the pooler and classifier stay float).

Configs (torchao 0.18 infers QAT fake-quantisation for these base configs):
- int8: ``Int8DynamicActivationIntxWeightConfig(weight_dtype=int8, weight_granularity=PerAxis(0))``:
  int8 dynamic per-token asymmetric activations, int8 per-channel symmetric weights.
  (``Int8DynamicActivationInt8WeightConfig``, the CPU/inductor int8 path, has no QAT mapping in 0.18.)
- int4 g64: ``IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(64))``: int4 weights with a
  scale per group of 64, activations float (like our "int4 g64" row).

Size: bytes of the quantised layers' state_dict written with torch.save (torchao's tensor
subclasses do not go through safetensors here); latency: bench/common.latency (random ids, sequence
32, median of repeats, interleaved in one process) as a ratio to the float model, with our
torch-int8 export (hf_compress.quantize_model, the kernels our QAT int8 export uses) measured in the
same process for a like-for-like ratio.
"""

from __future__ import annotations

import copy
import io
import os
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

import torch  # noqa: E402
from common import SEED, accuracy, latency, parse_args, sst2, teacher, tokenizer, train, training_args  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

warnings.filterwarnings("ignore")
LR = 2e-5  # bench_qat.py's LR


def configs(extra: bool):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    out = {
        "int8": (8, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))),
        "int4 g64": (4, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))),
    }
    if extra:
        out["8da4w g64"] = (4, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(64)))
    return out


def layer_names(model) -> list[str]:
    from hf_compress.modules import select_modules

    return list(select_modules(model))


def state_bytes(model, names) -> int:
    """torch.save size of the named modules' state_dicts (tensor subclasses included)."""
    mods = dict(model.named_modules())
    buf = io.BytesIO()
    torch.save({n: mods[n].state_dict() for n in names}, buf)
    return buf.getbuffer().nbytes


def model_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def interleaved_step_times(models: dict, batches: list, repeats: int) -> dict:
    """Median seconds of one training step (forward + backward + AdamW) per model, interleaved."""
    opts = {k: torch.optim.AdamW(m.parameters(), lr=LR) for k, m in models.items()}
    times = {k: [] for k in models}
    for i in range(repeats + 2):
        batch = batches[i % len(batches)]
        for k, m in models.items():
            m.train()
            t = time.perf_counter()
            m(**batch).loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            if i >= 2:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--extra", action="store_true", help="also 8da4w g64 (int8 activations + int4 g64 weights)")
    known, rest = pre.parse_known_args(argv)
    a = parse_args("torchao QAT (prepare → Trainer → convert) vs PTQ on MiniLM + SST-2", rest)
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    import torchao

    sizes, steps = a.sizes, a.sizes["steps"]
    tok = tokenizer()
    train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])
    base = teacher(sizes, tok).eval()
    names = layer_names(base)
    keep = set(names)

    def only_blocks(module, fqn):
        return fqn in keep

    float_acc = accuracy(base, val_ds, tok)
    print(f"[torchao] torchao {torchao.__version__}; float accuracy {float_acc:.4f}; {steps} QAT steps; {len(names)} layers", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="peer_torchao_"))
    rows, shipped = [], {"float": base}

    for label, (bits, cfg) in configs(known.extra).items():
        # QAT
        t0 = time.time()
        torch.manual_seed(SEED)
        m = copy.deepcopy(base).train()
        quantize_(m, QATConfig(cfg, step="prepare"), filter_fn=only_blocks)
        trainer, step_s = train(m, train_ds, training_args(str(tmp / label), steps=steps, lr=LR), tok)
        m = trainer.model.eval()
        train_min = (time.time() - t0) / 60
        quantize_(m, QATConfig(cfg, step="convert"), filter_fn=only_blocks)
        acc = accuracy(m, val_ds, tok)
        rows.append({"run": f"torchao QAT {label}", "method": "qat", "bits": bits, "config": type(cfg).__name__,
                     "accuracy": acc, "retention": acc / float_acc, "step_s": step_s, "train_minutes": train_min,
                     "minutes": (time.time() - t0) / 60})
        print(f"[torchao] {rows[-1]}", flush=True)
        shipped[f"torchao {label}"] = m
        # PTQ of the float model with the same base config
        t0 = time.time()
        p = copy.deepcopy(base).eval()
        quantize_(p, cfg, filter_fn=only_blocks)
        acc = accuracy(p, val_ds, tok)
        rows.append({"run": f"torchao PTQ {label}", "method": "ptq", "bits": bits, "config": type(cfg).__name__,
                     "accuracy": acc, "retention": acc / float_acc, "minutes": (time.time() - t0) / 60})
        print(f"[torchao] {rows[-1]}", flush=True)
        del p

    # our int8 export (PTQ; the same torch-int8 kernels as our QAT int8 export) for a same-process ratio
    ours_note = None
    try:
        from hf_compress import QATConfig as OurQAT
        from hf_compress import quantize_model

        shipped["ours int8 (torch-int8)"] = quantize_model(
            copy.deepcopy(base), OurQAT(weight_bits=8, activation_bits=8, observer="dynamic", export="torch-int8")).eval()
    except Exception as e:  # reported, not hidden
        ours_note = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"[torchao] our int8 export could not be built here: {ours_note}", flush=True)

    lat = latency(shipped, tok, batch_sizes=(1, 32), repeats=5 if a.quick else 9)
    f_layers, f_model = state_bytes(base, names), model_bytes(base)
    exports = []
    for name, m in shipped.items():
        r = {"model": name, "latency_b1_ms": 1e3 * lat[name]["b1"], "latency_b32_ms": 1e3 * lat[name]["b32"],
             "speedup_b1": lat["float"]["b1"] / lat[name]["b1"], "speedup_b32": lat["float"]["b32"] / lat[name]["b32"]}
        try:
            r["model_MB_torch_save"] = model_bytes(m) / 1e6
            r["quantised_layers_MB_torch_save"] = state_bytes(m, names) / 1e6
            r["layers_smaller_x"] = f_layers / (r["quantised_layers_MB_torch_save"] * 1e6)
            r["model_smaller_x"] = f_model / (r["model_MB_torch_save"] * 1e6)
        except Exception as e:
            r["size_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        exports.append(r)
        print(f"[torchao] {r}", flush=True)

    # QAT training-step overhead vs float, interleaved in one process (as bench_qat.py does)
    collate = DataCollatorWithPadding(tok)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids", "label") if c in train_ds.column_names]
    batches = [collate([{c: train_ds[j][c] for c in cols} for j in range(i, i + 32)]) for i in range(0, 32 * 4, 32)]
    models = {"plain": copy.deepcopy(base)}
    for label, (bits, cfg) in configs(known.extra).items():
        m = copy.deepcopy(base)
        quantize_(m, QATConfig(cfg, step="prepare"), filter_fn=only_blocks)
        models[label] = m
    st = interleaved_step_times(models, batches, repeats=3 if a.quick else 8)
    ratio = {f"torchao QAT {k}": st[k] / st["plain"] for k in st if k != "plain"}
    print(f"[torchao] step time ratio (interleaved): {ratio}", flush=True)

    import lm

    lm.dump(a.out, {"side": "torchao", "quick": a.quick, "sizes": sizes, "steps": steps, "lr": LR,
                    "float_accuracy": float_acc, "layers": len(names), "rows": rows, "exports": exports,
                    "step_time_ratio_interleaved": ratio, "step_times_interleaved_s": st, "ours_export_note": ours_note,
                    "versions": lm.versions("torchao")})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
