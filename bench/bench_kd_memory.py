"""Causal-LM KD memory and step time (issue 16, training cost): plain cross-entropy vs our KD loss unchunked
(`kd_chunk_size=0`) vs chunked (the default) vs TRL's chunked divergence, at vocabularies 32k and 128k.

Every number comes from a fresh subprocess per configuration (so one run's allocations cannot hide another's):
peak memory is the process's peak resident set (VmHWM, reset through /proc/self/clear_refs right before the
measured call) minus its resident set just before, with glibc's mmap threshold pinned at 64 KiB
(MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the OS and the resident set follows torch's live
memory; the gradients of the warm-up call are freed at the start of the measured one, as in a training loop.
Times: the median of `--repeats` calls in another fresh process with the allocator left as it is. One thread
(torch.set_num_threads(1)).

Two measurements per method:
- `loss`: the loss alone, forward + backward, on logits that already exist (student logits requiring grad, the
  teacher's without) — what the loss adds on top of the models. TRL's loss takes the final hidden states and
  the lm_head weights instead of logits (it projects them itself, tile by tile), so its inputs are those.
- `step`: one whole training step on tiny random Llama decoders (student 1 block, teacher 2, hidden 64):
  forward(s), loss, backward, after one warm-up step. `ce` = the student's own loss; ours = the
  DistillationTrainer's `compute_loss` (alpha 0.5: the model's CE + KD, temperature 2, forward KL);
  `trl` = the two backbones + TRL's `_chunked_divergence_loss` (beta 0 = forward KL, temperature 2; KD only,
  no CE term, as TRL's trainer computes it).

    python bench/bench_kd_memory.py      # both vocabularies, writes bench/results/training_cost/kd_memory.json
    # (a subfolder: bench/run_all.py --render reads only bench/results/*.json into its generated tables)
    nice -n 5 python bench/bench_kd_memory.py --vocab 32000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ce", "unchunked", "chunked", "trl")


# ---- the worker: one (vocabulary, method, measurement) per process -----------------------------------------


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]


def _measure(fn, repeats: int) -> dict:
    """repeats = 0: peak memory of one call after a warm-up; else the median time of `repeats` calls."""
    fn()  # warm-up: thread pools, autograd's first allocations, lazily built things
    if not repeats:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before, _ = _rss()
        fn()
        _, peak = _rss()
        return {"peak_extra_mb": (peak - before) / 2**20}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "times_s": times}


def _llama(vocab: int, layers: int, length: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # the tiny model of hf_compress.cli.models.tiny_llama, with the vocabulary asked for
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=128, max_position_embeddings=length, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def worker(vocab: int, method: str, part: str, batch: int, length: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from hf_compress.distillation import losses as L

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(3, vocab, (batch, length), generator=g)
    labels[:, : length // 4] = -100  # a prompt that does not count
    T = 2.0
    if method == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

    if part == "loss":
        if method == "trl":
            hs = torch.randn(batch, length, 64, generator=g).requires_grad_()
            ht = torch.randn(batch, length, 64, generator=g)
            ws = (torch.randn(vocab, 64, generator=g) * 0.1).requires_grad_()
            wt = torch.randn(vocab, 64, generator=g) * 0.1
            mask = labels[:, 1:] != -100

            def fn():
                hs.grad = ws.grad = None
                loss, _, _ = _chunked_divergence_loss(hs[:, :-1], ht[:, :-1], ws, wt, mask, beta=0.0, temperature=T)
                loss.backward()
        else:
            s = (torch.randn(batch, length, vocab, generator=g) * 2).requires_grad_()
            t = torch.randn(batch, length, vocab, generator=g) * 2

            def fn():
                s.grad = None
                if method == "ce":
                    from transformers.loss.loss_utils import ForCausalLMLoss

                    loss = ForCausalLMLoss(s, labels, vocab)
                elif method == "unchunked":
                    shifted, mask = L.causal_shift(s, labels, None)
                    loss = L.kd_loss(shifted, L.teacher_log_probs(t, T)[:, :-1], "forward_kl", T, mask=mask)
                else:
                    loss = L.chunked_kd_loss(s, t, "forward_kl", T, mask=L.causal_mask_full(labels, None, labels.shape))
                loss.backward()

        return _measure(fn, repeats)

    student, teacher = _llama(vocab, 1, length, 2), _llama(vocab, 2, length, 1)
    ids = labels.clamp_min(3)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if method == "ce":
        def fn():
            student.zero_grad(set_to_none=True)
            student(**inputs).loss.backward()
    elif method == "trl":
        teacher.eval()
        mask = labels[:, 1:] != -100

        def fn():
            student.zero_grad(set_to_none=True)
            hs = student.model(input_ids=ids, attention_mask=inputs["attention_mask"]).last_hidden_state
            with torch.no_grad():
                ht = teacher.model(input_ids=ids, attention_mask=inputs["attention_mask"]).last_hidden_state
            loss, _, _ = _chunked_divergence_loss(hs[:, :-1], ht[:, :-1], student.lm_head.weight, teacher.lm_head.weight,
                                                  mask, beta=0.0, temperature=T)
            loss.backward()
    else:
        from transformers import TrainingArguments

        from hf_compress import DistillationConfig, DistillationTrainer

        cfg = DistillationConfig(alpha=0.5, temperature=T, kd_loss="forward_kl",
                                 kd_chunk_size=0 if method == "unchunked" else None, check_finite=False)
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], disable_tqdm=True)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, distillation_config=cfg)
        trainer.model.train()
        for t in trainer.teachers:
            t.eval()

        def fn():
            trainer.model.zero_grad(set_to_none=True)
            trainer.compute_loss(trainer.model, inputs).backward()
    student.train()
    return _measure(fn, repeats)


# ---- the driver ----------------------------------------------------------------------------------------------


def run_one(vocab, method, part, args) -> dict:
    """Two fresh processes: memory with glibc's mmap threshold pinned, time with the allocator as it is
    (pinned, every chunk-sized allocation would be a fresh mmap with its page faults, which is not what a run sees)."""
    out = {}
    for repeats in (0, args.repeats):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
               "PYTHONWARNINGS": "ignore"}
        if not repeats:
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        cmd = [sys.executable, __file__, "--worker", json.dumps([vocab, method, part, args.batch, args.length, repeats])]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
        lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
        if run.returncode or not lines:
            tail = (run.stderr or run.stdout)[-600:]
            return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {run.returncode}"}
        out.update(json.loads(lines[-1][len("RESULT "):]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 131072])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--parts", nargs="+", default=["loss", "step"], choices=["loss", "step"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "training_cost" / "kd_memory.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        vocab, method, part, batch, length, repeats = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(vocab, method, part, batch, length, repeats)), flush=True)
        return

    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    rows = []
    for vocab in args.vocab:
        for part in args.parts:
            for method in args.methods:
                if method == "trl" and trl_version is None:
                    rows.append({"vocab": vocab, "part": part, "method": method, "error": "trl not installed"})
                    continue
                r = {"vocab": vocab, "part": part, "method": method, **run_one(vocab, method, part, args)}
                rows.append(r)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "times_s"}), flush=True)
    unit = {v: args.batch * args.length * v * 4 / 2**20 for v in args.vocab}
    summary = []
    for vocab in args.vocab:
        for part in args.parts:
            got = {r["method"]: r for r in rows if r["vocab"] == vocab and r["part"] == part and "error" not in r}
            if "ce" in got and "chunked" in got:
                entry = {"vocab": vocab, "part": part,
                         "chunked_memory_vs_ce": got["chunked"]["peak_extra_mb"] / got["ce"]["peak_extra_mb"]}
                if "unchunked" in got:
                    entry["chunked_time_vs_unchunked"] = got["chunked"]["time_s"] / got["unchunked"]["time_s"]
                    entry["unchunked_memory_vs_ce"] = got["unchunked"]["peak_extra_mb"] / got["ce"]["peak_extra_mb"]
                summary.append(entry)
    out = {
        "what": "causal-LM KD: peak extra resident memory (MB) and median time (s) per loss / per training step",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (timings noisy), 1 torch thread",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
        "batch": args.batch, "length": args.length, "repeats": args.repeats,
        "fp32_logits_mb": unit, "rows": rows, "summary": summary,
        "targets": {"loss memory vs plain CE": 1.2, "step time vs unchunked": 1.1},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for s in summary:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
