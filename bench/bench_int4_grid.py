"""int4 weight grid: [-7, 7] ("restricted", 15 levels) vs [-8, 7] ("full", torchao's / torch.ao's), PTQ and QAT.

Protocol: bench/bench_qat.py's "int4 g64" rows (bench/common.py: the cached fine-tuned MiniLM teacher,
the 8,000-row SST-2 subset, lr 2e-5, batch 32, all 872 validation rows), once per `QATConfig.weight_range`:

* PTQ: `quantize_model(teacher, QATConfig(weight_bits=4, group_size=64, weight_range=grid))` (no training;
  deterministic, so one run per grid);
* QAT: `QATCallback` with the same config, `--steps` steps of continued fine-tuning, once per seed;
* torchao's int4 g64 QAT and PTQ (``IntxWeightOnlyConfig(int4, PerGroup(64))``, the config of
  bench/peers/torchao_qat.py, imported from there) on the same seeds, when torchao is importable
  (run this script with a python that has it, e.g. the torchao venv of bench/peers/setup.sh; the row
  says why when not).

Also per grid: the relative error of the quantised weights, ||ŵ - w|| / ||w|| over the targeted layers.

    python bench/bench_int4_grid.py                           # 60 steps (bench_qat's int4 rows), seed 42
    python bench/bench_int4_grid.py --seeds 42 43 44 --steps 60
    python bench/bench_int4_grid.py --quick                   # proves it runs; numbers meaningless
    python bench/bench_int4_grid.py --kd --no-plain --no-torchao --grids full --seeds 42 43 44 --out F
                                                              # QAT + KD from the float model only
    python bench/bench_int4_grid.py --proxy                   # no training (minutes): PTQ weight and embedding
                                                              # error of the pretrained MiniLM, per grid

`--proxy` needs no fine-tuned teacher: the pretrained MiniLM (sentence-transformers, mean pooling) embeds
the SST-2 validation sentences in float and after PTQ with each grid; it reports the weights' relative
error, the embeddings' relative error and cosine to float, and the accuracy on the 872 validation rows
of a logistic-regression probe fitted on the float embeddings of the protocol's first 4,000 training
rows (frozen encoder: a PTQ accuracy, not the fine-tuned protocol's) (bench/results/int4_grid_proxy.json).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "peers"))

import torch  # noqa: E402
from common import accuracy, parse_args, sst2, table, teacher, tokenizer, train, training_args, write  # noqa: E402

from hf_compress import DistillationConfig, DistillationTrainer, QATCallback, QATConfig, quantize_model  # noqa: E402
from hf_compress.quantization import build_plan, fake_quantize_weight  # noqa: E402
from hf_compress.quantization.numerics import WEIGHT_RANGES  # noqa: E402

warnings.filterwarnings("ignore")
LR = 2e-5  # bench_qat.py's
STEPS = 60  # the steps of bench_qat.py's recorded int4 rows (bench/results/qat.json) and of bench_peers.py
BASE = dict(weight_bits=4, group_size=64)  # bench_qat.py's "int4 g64"
KD = dict(temperature=4.0, alpha=0.9)  # --kd: the float model distils into its own QAT copy (bench_protocol's best)


def weight_error(model, config) -> float:
    """||fake_quant(w) - w|| / ||w|| over the layers the config targets (float model in)."""
    num = den = 0.0
    with torch.no_grad():
        for name, lp in build_plan(model, config).items():
            w = model.get_submodule(name).weight
            num += (fake_quantize_weight(w, lp.weight) - w).pow(2).sum().item()
            den += w.pow(2).sum().item()
    return (num / den) ** 0.5


def _args(tmp: Path, label: str, steps: int, seed: int):
    args = training_args(str(tmp / label), steps=steps, lr=LR)
    args.seed = args.data_seed = seed
    return args


def torchao_runs(base, train_ds, val_ds, tok, seeds, steps, tmp, float_acc) -> list[dict]:
    """torchao int4 g64 QAT (prepare → Trainer → convert) per seed, and its PTQ, as in bench/peers/torchao_qat.py."""
    try:
        import torchao
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig as AoQAT
        from torchao_qat import configs, layer_names  # bench/peers/torchao_qat.py: the peer's config and layers
    except Exception as e:  # reported as the row's note
        return [{"run": "torchao int4 g64", "note": f"torchao not importable here ({type(e).__name__}: {e})"}]
    _, cfg = configs(False)["int4 g64"]
    keep = set(layer_names(base))

    def only_blocks(module, fqn):
        return fqn in keep

    rows = []
    for seed in seeds:
        t0 = time.time()
        torch.manual_seed(seed)
        m = copy.deepcopy(base).train()
        quantize_(m, AoQAT(cfg, step="prepare"), filter_fn=only_blocks)
        trainer, step_s = train(m, train_ds, _args(tmp, f"torchao-{seed}", steps, seed), tok)
        m = trainer.model.eval()
        quantize_(m, AoQAT(cfg, step="convert"), filter_fn=only_blocks)
        acc = accuracy(m, val_ds, tok)
        rows.append({"run": f"torchao QAT int4 g64 seed {seed}", "method": "qat", "grid": "torchao", "seed": seed,
                     "accuracy": acc, "retention": acc / float_acc, "step_s": step_s, "minutes": (time.time() - t0) / 60,
                     "torchao": torchao.__version__, "config": type(cfg).__name__})
        print(f"[bench] {rows[-1]['run']}: {acc:.4f}", flush=True)
    t0 = time.time()
    p = copy.deepcopy(base).eval()
    quantize_(p, cfg, filter_fn=only_blocks)
    acc = accuracy(p, val_ds, tok)
    rows.append({"run": "torchao PTQ int4 g64", "method": "ptq", "grid": "torchao", "accuracy": acc,
                 "retention": acc / float_acc, "minutes": (time.time() - t0) / 60, "torchao": torchao.__version__,
                 "config": type(cfg).__name__})
    print(f"[bench] {rows[-1]['run']}: {acc:.4f}", flush=True)
    return rows


@torch.no_grad()
def embeddings(model, tok, sentences, batch: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states (sentence-transformers' pooling of all-MiniLM-L6-v2)."""
    from common import MAX_LEN

    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i:i + batch], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


def proxy(grids, quick: bool, out: str | None) -> None:
    """No training: PTQ of the pretrained MiniLM with each grid, weight and embedding error against float."""
    from common import minilm_path, read_jsonl, data_dir
    from transformers import AutoModel

    from sklearn.linear_model import LogisticRegression

    tok = tokenizer()
    rows_in = read_jsonl(data_dir() / "sst2" / "validation.jsonl", limit=128 if quick else None)
    sentences, labels = [r["sentence"] for r in rows_in], [r["label"] for r in rows_in]
    train_ds, _ = sst2(tok, 256 if quick else 4000)  # the protocol's subset (first rows of its permutation)
    base = AutoModel.from_pretrained(minilm_path()).eval()
    t0 = time.time()
    train_rows = [tok.decode(ids, skip_special_tokens=True) for ids in train_ds["input_ids"]]
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(embeddings(base, tok, train_rows).numpy(), train_ds["label"])

    def probe_acc(e):
        return float((probe.predict(e.numpy()) == labels).mean())

    ref = embeddings(base, tok, sentences)
    float_acc = probe_acc(ref)
    print(f"[bench] float probe accuracy {float_acc:.4f}", flush=True)
    rows = []
    for grid in grids:
        cfg = QATConfig(**BASE, weight_range=grid)
        e = embeddings(quantize_model(copy.deepcopy(base), cfg).eval(), tok, sentences)
        rows.append({"run": f"PTQ int4 g64 {grid} (pretrained MiniLM)", "grid": grid,
                     "weight_rel_error": weight_error(base, cfg),
                     "embedding_rel_error": ((e - ref).norm(dim=1) / ref.norm(dim=1)).mean().item(),
                     "embedding_cosine": torch.nn.functional.cosine_similarity(e, ref, dim=1).mean().item(),
                     "probe_accuracy": probe_acc(e), "probe_retention": probe_acc(e) / float_acc})
        print(f"[bench] {rows[-1]}", flush=True)
    print(table(rows, ["run", "weight_rel_error", "embedding_rel_error", "embedding_cosine", "probe_accuracy"]))
    write("int4_grid_proxy", {"quick": quick, "model": "all-MiniLM-L6-v2, pretrained (no fine-tuning)", "config": BASE,
                              "sentences": f"SST-2 validation, {len(sentences)} sentences", "rows": rows,
                              "probe": f"logistic regression (C=1) on float embeddings of {len(train_rows)} protocol "
                                       f"training rows; float probe accuracy {float_acc:.4f}",
                              "float_probe_accuracy": float_acc,
                              "total_minutes": (time.time() - t0) / 60}, out)


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--proxy", action="store_true", help="no training: PTQ weight / embedding error of the pretrained MiniLM")
    pre.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds of the QAT runs")
    pre.add_argument("--grids", nargs="+", default=list(WEIGHT_RANGES), choices=WEIGHT_RANGES)
    pre.add_argument("--no-torchao", action="store_true", help="skip torchao's rows")
    pre.add_argument("--kd", action="store_true", help="also QAT + KD from the float model (DistillationTrainer, "
                                                       f"{KD}) per grid and seed: what torchao's QAT has no hook for")
    pre.add_argument("--no-plain", action="store_true", help="skip the plain QAT rows (with --kd: only QAT + KD)")
    pre.add_argument("--group-size", type=int, default=BASE["group_size"],
                     help="int4 group size of our rows; 0 = one scale per output channel (torchao's rows stay g64)")
    known, rest = pre.parse_known_args(argv)
    a = parse_args("int4 g64 weight grid [-7, 7] vs [-8, 7]: PTQ and QAT, beside torchao's int4 QAT", rest)
    if known.proxy:
        return proxy(known.grids, a.quick, a.out)
    sizes = a.sizes
    steps = a.steps or (sizes["steps"] if a.quick else STEPS)
    tok = tokenizer()
    train_ds, val_ds = sst2(tok, sizes["train"], sizes["eval_rows"])
    base = teacher(sizes, tok).eval()
    float_acc = accuracy(base, val_ds, tok)
    tmp = Path(tempfile.mkdtemp(prefix="bench_int4_grid_"))
    t_all = time.time()
    print(f"[bench] float accuracy {float_acc:.4f}; {steps} QAT steps; seeds {known.seeds}; grids {known.grids}", flush=True)

    base_cfg = dict(BASE, group_size=known.group_size or None)
    tag = f"g{known.group_size}" if known.group_size else "per-channel"
    rows = []
    for grid in known.grids:
        cfg = QATConfig(**base_cfg, weight_range=grid)
        t0 = time.time()
        ptq = quantize_model(copy.deepcopy(base), cfg)
        acc = accuracy(ptq, val_ds, tok)
        rows.append({"run": f"PTQ int4 {tag} {grid}", "method": "ptq", "grid": grid, "accuracy": acc,
                     "retention": acc / float_acc, "weight_rel_error": weight_error(base, cfg),
                     "minutes": (time.time() - t0) / 60})
        print(f"[bench] {rows[-1]['run']}: {acc:.4f} (weight error {rows[-1]['weight_rel_error']:.4f})", flush=True)
    kinds = ([] if known.no_plain else ["qat"]) + (["qat+kd"] if known.kd else [])
    for seed in known.seeds:
        for grid in known.grids:
            for kind in kinds:
                cfg = QATConfig(**base_cfg, weight_range=grid)
                t0 = time.time()
                torch.manual_seed(seed)
                kw = dict(trainer_cls=DistillationTrainer, teacher_model=base,
                          distillation_config=DistillationConfig(**KD)) if kind == "qat+kd" else {}
                trainer, step_s = train(copy.deepcopy(base).train(), train_ds, _args(tmp, f"{kind}-{grid}-{seed}", steps, seed),
                                        tok, callbacks=[QATCallback(cfg)], **kw)
                acc = accuracy(trainer.model, val_ds, tok)
                rows.append({"run": f"{kind.upper()} int4 {tag} {grid} seed {seed}", "method": kind, "grid": grid, "seed": seed,
                             "accuracy": acc, "retention": acc / float_acc, "step_s": step_s,
                             "minutes": (time.time() - t0) / 60})
                print(f"[bench] {rows[-1]['run']}: {acc:.4f}", flush=True)
    if not known.no_torchao:
        rows += torchao_runs(base, train_ds, val_ds, tok, known.seeds, steps, tmp, float_acc)

    summary = []
    for method in ("ptq", "qat", "qat+kd"):
        for grid in [*known.grids, "torchao"]:
            accs = [r["accuracy"] for r in rows if r.get("method") == method and r.get("grid") == grid]
            if accs:
                summary.append({"method": method, "grid": grid, "runs": len(accs), "mean_accuracy": statistics.mean(accs),
                                "min": min(accs), "max": max(accs), "mean_retention": statistics.mean(accs) / float_acc})
    print(table(rows, ["run", "accuracy", "retention", "weight_rel_error", "step_s", "minutes"]))
    print()
    print(table(summary, ["method", "grid", "runs", "mean_accuracy", "min", "max", "mean_retention"]))
    write("int4_grid", {
        "quick": a.quick, "sizes": sizes, "steps": steps, "lr": LR, "seeds": known.seeds, "float_accuracy": float_acc,
        "kd": KD if known.kd else None,
        "config": base_cfg, "grids": {g: {"restricted": "[-(2^(b-1)-1), 2^(b-1)-1], S = max|w|/qmax",
                                      "full": "[-2^(b-1), 2^(b-1)-1], S = max|w|/((qmax-qmin)/2) (torchao SYMMETRIC)",
                                      "full_no_clip": "[-2^(b-1), 2^(b-1)-1], S = max(-min/2^(b-1), max/qmax) "
                                                      "(torchao SYMMETRIC_NO_CLIPPING_ERR)"}[g] for g in known.grids},
        "init": "fine-tuned float MiniLM (the cached teacher)", "rows": rows, "summary": summary,
        "total_minutes": (time.time() - t_all) / 60,
        "noise": "872 validation sentences: one sentence = 0.115 points; differences of a few tenths are within seed noise",
    }, a.out)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
