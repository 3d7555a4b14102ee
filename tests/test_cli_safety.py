"""Issue 13: the command never loses a user's file, catches bad input before training (and in --dry-run)
with one-line errors, reuses a fine-tuned teacher only for the same data, and honours ddp_timeout."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hf_compress.cli import main

ROOT = Path(__file__).resolve().parents[1]
WORDS = "good great fine nice bad awful poor dull".split()


def write_data(folder: Path, n_train=32, n_eval=8, suffix=".jsonl") -> Path:
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    for split, n in (("train", n_train), ("validation", n_eval)):
        with open(folder / f"{split}{suffix}", "w") as f:
            for _ in range(n):
                ws = rnd.choices(WORDS, k=4)
                f.write(json.dumps({"sentence": " ".join(ws), "label": int(sum(w in WORDS[:4] for w in ws) > 2)}) + "\n")
    return folder


def write_recipe(tmp_path: Path, data: Path, **changes) -> Path:
    d = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": "tiny:bert", "config": {"layers": 2}},
        "data": {"local": str(data), "text_column": "sentence", "max_length": 24},
        "training": {"max_steps": 1, "per_device_train_batch_size": 8, "disable_tqdm": True},
        "report": {"latency": False, "plot": False},
    }
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "toy")


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- 1. the teacher folder


def test_teacher_folder_with_user_files_is_refused_not_deleted(tmp_path, data, capsys):
    path = write_recipe(tmp_path, data, teacher={"train": {"max_steps": 1}})
    mine = tmp_path / "run" / "teacher" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("my notes")
    for extra in (["--dry-run"], []):
        rc, out, err = run(["run", str(path), *extra], capsys)
        assert rc == 2 and "teacher folder" in err and "notes.txt" in err and "did not write" in err, err
        assert "teacher fine-tuning" not in out
        assert mine.read_text() == "my notes"


# ----------------------------------------------------------------------------- 2. export over a source model


def test_export_inside_the_source_model_folder_is_refused(tmp_path, data, capsys):
    from hf_compress.cli.models import tiny_bert

    src = tmp_path / "my_model"
    tiny_bert(layers=2).save_pretrained(src)
    weights = (src / "model.safetensors").read_bytes()
    for export in (src, src / "compressed"):
        path = write_recipe(tmp_path, data, model={"name": str(src), "tokenizer": "char"}, export={"dir": str(export)})
        rc, out, err = run(["run", str(path)], capsys)
        assert rc == 2 and "would overwrite model.name's folder" in err, err
    path = write_recipe(tmp_path, data, teacher={"name": str(src)}, export={"dir": str(src)})
    rc, _, err = run(["run", str(path), "--dry-run"], capsys)
    assert rc == 2 and "teacher.name's folder" in err, err
    assert (src / "model.safetensors").read_bytes() == weights


# ----------------------------------------------------------------------------- 3. teacher reuse follows the data


def test_cached_teacher_is_refit_when_the_training_rows_change(tmp_path, data, capsys):
    path = write_recipe(tmp_path, data, teacher={"train": {"max_steps": 1}})
    rc, out, _ = run(["run", str(path)], capsys)
    assert rc == 0 and "teacher fine-tuning" in out
    rc, out, _ = run(["run", str(path)], capsys)
    assert rc == 0 and "reusing" in out  # same settings, same rows
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"sentence": "awful awful awful awful", "label": 0})  # same settings, other contents
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    rc, out, _ = run(["run", str(path)], capsys)
    assert rc == 0 and "teacher fine-tuning" in out and "reusing" not in out
    marker = json.loads((tmp_path / "run" / "teacher" / "hf_compress_teacher.json").read_text())
    assert "model.safetensors" in marker["files"] and "data_sha256" in marker["fingerprint"]


# ----------------------------------------------------------------------------- 4. the export and its reload


def test_failed_reload_check_exits_non_zero(tmp_path, data, capsys, monkeypatch):
    import hf_compress.loading

    def broken(*a, **k):
        raise RuntimeError("simulated broken export")

    monkeypatch.setattr(hf_compress.loading, "load_pretrained", broken)
    rc, _, err = run(["run", str(write_recipe(tmp_path, data))], capsys)
    assert rc == 1 and "did not reload" in err and "simulated broken export" in err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["export_reload"]["ok"] is False


def test_stale_weight_files_of_an_earlier_export_are_removed_foreign_ones_refused(tmp_path, data, capsys):
    path = write_recipe(tmp_path, data)
    assert run(["run", str(path)], capsys)[0] == 0
    model = tmp_path / "run" / "model"
    # an earlier export was sharded: its index (and shard) are listed as the run's own files
    index = {"metadata": {}, "weight_map": {"classifier.weight": "model-00001-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    marker = json.loads((model / "hf_compress_export.json").read_text())
    marker["files"] += ["model.safetensors.index.json", "model-00001-of-00002.safetensors"]
    (model / "hf_compress_export.json").write_text(json.dumps(marker))
    rc, out, err = run(["run", str(path)], capsys)
    assert rc == 0, err
    assert not (model / "model.safetensors.index.json").exists() and not (model / "model-00001-of-00002.safetensors").exists()
    assert "max |Δlogit| = 0.00e+00" in out or "WARNING" not in out
    # a weight file the command did not write: refused before training, left alone
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, out, err = run(["run", str(path)], capsys)
    assert rc == 2 and "export.dir" in err and "model.safetensors.index.json" in err and "training:" not in out
    assert (model / "model.safetensors.index.json").exists()


# ----------------------------------------------------------------------------- 5. --dry-run checks without training


@pytest.mark.parametrize("overrides, words", [
    (["data.max_length=128"], "data.max_length=128 exceeds the 64 positions"),
    (["student.layers=[0,5]"], "student.layers: index 5 is out of range: the teacher has 2 blocks"),
    (["pruning.granularity=n:m", "pruning.m=5", "pruning.n=2"], "divisible by m=5"),
    (["quantization.weight_bits=4", "quantization.group_size=24"], "`group_size`=24 does not divide the input width 32"),
    (["quantization.layer_bits=nomatch=4"], "layer_bits: pattern 'nomatch' matches no Linear module"),
    (["model.config.layerz=3"], "unknown key `model.config.layerz`. Did you mean `model.config.layers`?"),
    (["student.name=config:bert", "student.config.hidden_sise=32"], "unknown key `student.config.hidden_sise`"),
    (["model.num_labels=1"], "model.num_labels=1 (one output: regression)"),
])
def test_dry_run_checks_the_recipe_against_data_and_meta_models(tmp_path, data, capsys, overrides, words):
    path = write_recipe(tmp_path, data)
    rc, out, err = run(["run", str(path), *overrides, "--dry-run"], capsys)
    assert rc == 2 and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_dry_run_builds_models_on_the_meta_device(tmp_path, data, capsys, monkeypatch):
    import torch

    from hf_compress.cli import checks

    built = []
    real = checks.meta_model

    def spy(*a, **k):
        m = real(*a, **k)
        built.append(next(m.parameters()).device)
        return m

    monkeypatch.setattr(checks, "meta_model", spy)
    rc, out, err = run(["run", str(write_recipe(tmp_path, data, student={"layers": [1]})), "--dry-run"], capsys)
    assert rc == 0, err
    assert built == [torch.device("meta")] and "models checked on the meta device" in out


# ----------------------------------------------------------------------------- 6. one-line errors


def _one_line(rc, err, *words):
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def test_bad_values_and_paths_are_one_line_errors(tmp_path, data, capsys, monkeypatch):
    path = write_recipe(tmp_path, data)
    for overrides, words in [
        (["seed=abc"], ["`seed`='abc' must be an integer"]),
        (["training.max_steps=abc"], ["`training.max_steps`='abc' must be an integer"]),
        (["data.train_samples=10.5"], ["`data.train_samples`=10.5 must be an integer"]),
        ([f"output_dir={path}"], ["output_dir", "is a file"]),
        ([f"output_dir={path}/sub"], ["is under", "which is a file"]),
    ]:
        _one_line(*run(["run", str(path), *overrides, "--dry-run"], capsys)[::2], *words)
    _one_line(*run(["run", str(tmp_path), "--dry-run"], capsys)[::2], "is a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real_access(p, mode, **k))
    _one_line(*run(["run", str(path), f"output_dir={ro}/out", "--dry-run"], capsys)[::2], "read-only", str(ro))


def test_bad_rows_name_the_file_and_row(tmp_path, capsys):
    cases = [
        ('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0\n', "train.jsonl line 2: not valid JSON"),
        ('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 7}\n', "train.jsonl row 2: label 7 is out of range for model.num_labels=2"),
        ('{"sentence": "good", "label": 1}\n{"sentence": "bad"}\n', "train.jsonl row 2 has no label"),
        ('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": null}\n', "train.jsonl row 2 has no label"),
    ]
    for i, (text, words) in enumerate(cases):
        folder = write_data(tmp_path / f"d{i}")
        (folder / "train.jsonl").write_text(text)
        path = write_recipe(tmp_path, folder, model={"name": "tiny:bert", "num_labels": 2, "config": {"layers": 2}})
        _one_line(*run(["run", str(path), "--dry-run"], capsys)[::2], words, str(folder))


def test_json_lines_in_a_json_file_are_read(tmp_path, capsys):
    folder = write_data(tmp_path / "j", suffix=".json")
    rc, out, err = run(["run", str(write_recipe(tmp_path, folder)), "--dry-run"], capsys)
    assert rc == 0 and "32 training / 8 evaluation rows" in out, err


def test_duplicate_keys_and_alias_bombs_are_refused(tmp_path, capsys):
    dup = tmp_path / "dup.yaml"
    dup.write_text("model: {name: 'tiny:bert'}\ndata: {local: x}\ntraining:\n  max_steps: 3\n  max_steps: 5\n")
    _one_line(*run(["run", str(dup), "--dry-run"], capsys)[::2], "duplicate key `max_steps`", "line 5")
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nmodel: {name: 'tiny:bert'}\ndata: {local: x}\nname: *a8\n")
    import time

    t = time.perf_counter()
    _one_line(*run(["run", str(bomb), "--dry-run"], capsys)[::2], "expands to more than")
    assert time.perf_counter() - t < 5


def test_teacher_fine_tuning_does_not_resume_the_runs_checkpoint(tmp_path, data):
    from hf_compress.cli.recipes import load_recipe

    path = write_recipe(tmp_path, data, teacher={"train": {"max_steps": 1}},
                        training={"max_steps": 1, "resume_from_checkpoint": str(tmp_path / "run" / "checkpoints" / "checkpoint-1")})
    r = load_recipe(path)
    assert r.training_args().resume_from_checkpoint is not None
    assert r.teacher_training_args().resume_from_checkpoint is None


# ----------------------------------------------------------------------------- 7. ddp_timeout


WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from hf_compress.cli.recipes import load_recipe
    from hf_compress.cli.pipeline import training_args
    args = training_args(load_recipe(sys.argv[1]))
    assert args.use_cpu and dist.is_initialized() and dist.get_world_size() == 2
    timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    dist.barrier()
    if dist.get_rank() == 0:
        print("TIMEOUT", int(timeout.total_seconds()), flush=True)
    dist.destroy_process_group()  # as every torch program should
    sys.stdout.flush(); os._exit(0)  # the DDP wrapper still holds the group: gloo's teardown at interpreter exit can abort (torch#190489)
""")


def test_ddp_timeout_reaches_the_gloo_process_group(tmp_path, data):
    path = write_recipe(tmp_path, data, training={"max_steps": 1, "ddp_timeout": 321})
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
                          str(tmp_path / "worker.py"), str(path)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TIMEOUT 321" in out.stdout
