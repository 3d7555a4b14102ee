"""Peers on the same work as hf_compress, side by side (issue 7): each peer library runs in its own
throwaway venv (made by bench/peers/setup.sh, default /tmp/hf_compress_peers/<name>), our equivalent
runs in this (the project's) venv on the identical setting, and the rows land in
bench/results/peers.json (rendered into BENCHMARKS.md by bench/run_all.py --render).

    python bench/bench_peers.py                      # all works (~30 min on the 2-CPU machine)
    python bench/bench_peers.py --quick              # minutes: proves every script runs (numbers meaningless)
    python bench/bench_peers.py --only kd torchao    # some works: kd, torchao, modelopt
    bash bench/peers/setup.sh                        # first: the peer venvs (trl, torchao, modelopt)

Works:
1. kd — causal-LM distillation, configs/tinyshakespeare_causal.yaml (char tokenizer, 4-layer Llama teacher
   trained once and cached, 2-layer student from teacher blocks 0 and 3): ours = bench/peers/ours_kd.py
   (DistillationTrainer), peer = bench/peers/trl_gkd.py (TRL GKDTrainer, lmbda=0). Same steps, batch,
   lr, schedule, seed, evaluation (200 validation blocks).
2. torchao — QAT on MiniLM + SST-2 with bench/bench_qat.py's protocol and --qat-steps (default 60, the
   steps of bench/results/qat.json): peer = bench/peers/torchao_qat.py; ours = the rows of
   bench/results/qat.json when they were measured with the same steps (else bench_qat.py is run here).
3. modelopt — the same QAT protocol with NVIDIA ModelOpt's QATTrainer: bench/peers/modelopt_qat.py.

A peer whose venv is missing, or whose script fails, gets a row saying so (with the error's first line)
instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import write  # noqa: E402

PEERS = BENCH / "peers"
WORK = BENCH / ".cache" / "peers" / "results"
DEFAULT_VENVS = os.environ.get("PEERS_DIR", "/tmp/hf_compress_peers")


def _load() -> str:
    try:
        return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # the exception line of the last traceback
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or head in ("AssertionError", "KeyError"):
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


REUSE = False  # --reuse: take a side's JSON from an earlier run of the same (unchanged) script


def run_script(name: str, python: str, script: Path, args: list[str], out: Path, timeout_min: float) -> dict:
    """Run one side's script; returns {status, minutes, load, data | note}."""
    # one result file per script and arguments, so --reuse never takes a run made with other settings
    suffix = "".join(c if c.isalnum() else "-" for c in "_".join(x.lstrip("-") for x in args))
    out = out.with_name(f"{out.stem}{'_' + suffix if suffix else ''}.json")
    log = WORK / f"{out.stem}.log"
    WORK.mkdir(parents=True, exist_ok=True)
    if REUSE and out.exists() and out.stat().st_mtime > script.stat().st_mtime:
        data = json.loads(out.read_text())
        if data.get("quick") == ("--quick" in args):
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(out.stat().st_mtime))
            print(f"[peers] {name}: reusing {out} (written {when})", flush=True)
            return {"status": "ok", "minutes": None, "data": data, "log": str(log),
                    "note": f"reused the JSON of an earlier run of the unchanged script, written {when}"}
    if not Path(python).exists():
        return {"status": "skipped", "note": f"no venv python at {python} (run: bash bench/peers/setup.sh)", "minutes": 0.0}
    failed = Path(python).parent.parent.with_name(Path(python).parent.parent.name + ".FAILED")
    if failed.exists():
        return {"status": "skipped", "note": f"install failed: {failed.read_text().strip()}", "minutes": 0.0}
    out.unlink(missing_ok=True)
    cmd = [python, str(script), *args, "--out", str(out)]
    print(f"[peers] {name}: {' '.join(cmd)}  (load {_load()})", flush=True)
    t0, load0 = time.time(), _load()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_min * 60, env=env,
                                  cwd=str(BENCH.parent))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    minutes = (time.time() - t0) / 60
    res = {"status": "ok", "minutes": minutes, "load_start": load0, "load_end": _load(), "log": str(log)}
    if rc != 0 or not out.exists():
        res.update(status="failed", note=f"exit {rc}: {_first_error(log.read_text(errors='replace'))}")
    else:
        res["data"] = json.loads(out.read_text())
    print(f"[peers] {name}: {res['status']} in {minutes:.1f} min {res.get('note', '')}", flush=True)
    return res


def venv_python(venvs: str, name: str) -> str:
    return str(Path(venvs) / name / "bin" / "python")


def kd_rows(res: dict, side: str) -> list[dict]:
    data = res.get("data") or {}
    out = []
    for r in data.get("rows", []):
        if r.get("side") == "shared" and side != "ours":
            continue  # the teacher row once (ours evaluates the same cached teacher)
        out.append({"side": "shared" if r.get("side") == "shared" else side, "run": r["run"], "val_loss": r.get("loss"),
                    "perplexity": r.get("perplexity"), "steps": r.get("steps"), "batch": r.get("batch"),
                    "step_s": r.get("step_s"), "train_minutes": r.get("train_minutes"), "params_M": r.get("params_M")})
    return out


def ours_qat(steps: int, quick: bool, timeout_min: float) -> tuple[dict, dict]:
    """Our QAT rows for `steps`: bench/results/qat.json when it was measured with these steps, else run bench_qat.py."""
    saved = BENCH / "results" / "qat.json"
    if not quick and saved.exists():
        data = json.loads(saved.read_text())
        if not data.get("quick") and data.get("sizes", {}).get("steps") == steps:
            return data, {"status": "ok", "minutes": None, "note": f"bench/results/qat.json ({data.get('command')}, {data.get('date')})"}
    out = WORK / ("qat-ours-quick.json" if quick else f"qat-ours-{steps}.json")
    args = ["--quick"] if quick else []
    args += ["--steps", str(steps)]
    res = run_script("ours_qat", sys.executable, BENCH / "bench_qat.py", args, out, timeout_min)
    return res.get("data") or {}, res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps and rows; written to bench/results/quick/peers.json")
    p.add_argument("--only", nargs="*", default=None, choices=["kd", "torchao", "modelopt"])
    p.add_argument("--kd-steps", type=int, default=None, help="student steps of the KD work (default: the recipe's 400)")
    p.add_argument("--qat-steps", type=int, default=60, help="QAT steps (default 60: the steps of bench/results/qat.json)")
    p.add_argument("--venvs", default=DEFAULT_VENVS, help="folder holding the peer venvs (trl, torchao, modelopt)")
    p.add_argument("--timeout", type=float, default=25, help="minutes per script before it is stopped")
    p.add_argument("--modelopt-steps", type=int, default=None, help="QAT steps of the ModelOpt run (default: --qat-steps)")
    p.add_argument("--modelopt-configs", nargs="*", default=None, help="ModelOpt configs to run: int8 int4g64 (default both)")
    p.add_argument("--extra", action="store_true", help="extra rows: TRL GKD with its default beta=0.5, our student trained with CE only")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a side's result JSON (bench/.cache/peers/results) when it is newer than its script")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    global REUSE
    REUSE = a.reuse
    works = a.only or ["kd", "torchao", "modelopt"]
    q = ["--quick"] if a.quick else []
    tag = "quick-" if a.quick else ""
    runs, kd, qat, exports, notes, kd_steps = [], [], [], [], {}, []
    t_all = time.time()

    def log_run(work, side, script, res):
        runs.append({"work": work, "side": side, "script": script, "status": res["status"], "minutes": res.get("minutes"),
                     "load_start": res.get("load_start"), "load_end": res.get("load_end"), "note": res.get("note")})

    if "kd" in works:
        steps = ["--steps", str(a.kd_steps)] if a.kd_steps else []
        res = run_script("ours_kd", sys.executable, PEERS / "ours_kd.py", q + steps + (["--extra"] if a.extra else []), WORK / f"{tag}ours_kd.json", a.timeout)
        log_run("kd", "ours", "bench/peers/ours_kd.py", res)
        kd += kd_rows(res, "ours")
        res = run_script("trl_gkd", venv_python(a.venvs, "trl"), PEERS / "trl_gkd.py", q + steps + (["--extra"] if a.extra else []), WORK / f"{tag}trl_gkd.json", a.timeout)
        log_run("kd", "trl", "bench/peers/trl_gkd.py", res)
        if res["status"] == "ok":
            kd += kd_rows(res, "trl")
            notes["trl_versions"] = res["data"].get("versions")
            st = res["data"].get("step_times_interleaved_s") or {}
            plain = st.get("stock Trainer (CE only)")
            kd_steps = [{"trainer": k, "step_s": v, "ratio_to_stock_trainer": v / plain if plain else None,
                         "measured_in": "trl_gkd.py process, interleaved"} for k, v in st.items()]
        else:
            kd.append({"side": "trl", "run": "TRL GKDTrainer", "note": res.get("note")})

    if "torchao" in works or "modelopt" in works:
        data, res = ours_qat(a.qat_steps, a.quick, a.timeout)
        log_run("qat", "ours", "bench/bench_qat.py", res)
        for r in data.get("rows", []):
            qat.append({"side": "ours", "run": f"hf_compress {r['run']}", "method": r.get("method"), "bits": r.get("bits"),
                        "accuracy": r.get("accuracy"), "retention": r.get("retention"), "step_s": r.get("step_s"),
                        "step_ratio_interleaved": (data.get("step_time_ratio") or {}).get(r["run"]), "steps": data.get("sizes", {}).get("steps")})
        for r in data.get("exports", []):
            exports.append({"side": "ours", "model": r["model"], "quantised_layers_MB": r.get("quantised_layers_MB"),
                            "size_method": "safetensors (save_pretrained)", "layers_smaller_x": r.get("layers_smaller_x"),
                            "speedup_b1": r.get("speedup_b1"), "speedup_b32": r.get("speedup_b32"),
                            "measured_in": "bench_qat.py process"})

    if "torchao" in works:
        args = q + ["--steps", str(a.qat_steps)]
        res = run_script("torchao_qat", venv_python(a.venvs, "torchao"), PEERS / "torchao_qat.py", args, WORK / f"{tag}torchao.json", a.timeout)
        log_run("qat", "torchao", "bench/peers/torchao_qat.py", res)
        if res["status"] == "ok":
            d = res["data"]
            ratio = d.get("step_time_ratio_interleaved") or {}
            for r in d["rows"]:
                qat.append({"side": "torchao", "run": r["run"], "method": r["method"], "bits": r["bits"], "accuracy": r["accuracy"],
                            "retention": r["retention"], "step_s": r.get("step_s"), "step_ratio_interleaved": ratio.get(r["run"]),
                            "steps": d["steps"], "config": r.get("config")})
            for r in d["exports"]:
                exports.append({"side": "ours" if r["model"].startswith("ours") else "torchao", "model": r["model"],
                                "quantised_layers_MB": r.get("quantised_layers_MB_torch_save"), "size_method": "torch.save",
                                "layers_smaller_x": r.get("layers_smaller_x"), "speedup_b1": r["speedup_b1"],
                                "speedup_b32": r["speedup_b32"], "measured_in": "torchao_qat.py process"})
            notes["torchao_versions"] = d.get("versions")
            notes["torchao_float_accuracy"] = d.get("float_accuracy")
        else:
            qat.append({"side": "torchao", "run": "torchao QAT", "note": res.get("note")})

    if "modelopt" in works:
        args = q + ["--steps", str(a.modelopt_steps or a.qat_steps)]
        if a.modelopt_configs:
            args += ["--configs", *a.modelopt_configs]
        res = run_script("modelopt_qat", venv_python(a.venvs, "modelopt"), PEERS / "modelopt_qat.py", args, WORK / f"{tag}modelopt.json", a.timeout)
        log_run("qat", "modelopt", "bench/peers/modelopt_qat.py", res)
        if res["status"] == "ok":
            d = res["data"]
            for r in d["rows"]:
                qat.append({"side": "modelopt", "run": r["run"], "method": r["method"], "bits": r["bits"], "accuracy": r["accuracy"],
                            "retention": r["retention"], "step_s": r.get("step_s"), "steps": d["steps"], "config": r.get("config")})
            for r in d["exports"]:
                if r["model"] == "float":
                    continue
                exports.append({"side": "modelopt", "model": r["model"], "model_MB_compressed": r.get("compressed_model_MB_torch_save"),
                                "size_method": "mtq.compress + torch.save (whole model)", "speedup_b1": r["speedup_b1"],
                                "speedup_b32": r["speedup_b32"], "measured_in": "modelopt_qat.py process",
                                "note": r.get("compress_note")})
            for label, note in (d.get("notes") or {}).items():
                qat.append({"side": "modelopt", "run": f"ModelOpt {label}", "note": note})
            notes["modelopt_versions"] = d.get("versions")
        else:
            qat.append({"side": "modelopt", "run": "ModelOpt QAT", "note": res.get("note")})

    payload = {"quick": a.quick, "works": works, "qat_steps": a.qat_steps, "kd_steps": a.kd_steps or "recipe (400)",
               "venvs": a.venvs, "total_minutes": (time.time() - t_all) / 60,
               "distillation": kd, "distillation_step_times": kd_steps, "qat": qat, "qat_exports": exports, "runs": runs, "notes": notes}
    out = a.out or (str(BENCH / "results" / "quick" / "peers.json") if a.quick else None)
    write("peers", payload, out)
    return 0 if all(r["status"] != "failed" for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
