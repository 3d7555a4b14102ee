"""GPU-only paths: an FSDP2 run of a tiny KD + pruning recipe, bitsandbytes on CUDA (DeepSpeed ZeRO-3 is refused).

They need hardware this CPU suite does not have, so they skip with a reason naming it. Run them on a
machine with 2+ CUDA GPUs: `pytest tests/test_gpu.py`. (Not yet run by the project: see BENCHMARKS.md.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli import classification_recipe, sentiment  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs (sharding across devices); this machine has {GPUS}")
one_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU; this machine has none")


def _launch(config: str, recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate" / config),
           "--num_processes", "2", "-m", "hf_compress", "run", str(recipe), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@two_gpus
@pytest.mark.parametrize("config", ["fsdp2.yaml"])
def test_sharded_kd_pruning_run(tmp_path, sentiment, config):  # noqa: F811
    # QAT and structured removal under FSDP2 are refused at train begin (convert needs the full model)
    recipe = classification_recipe(tmp_path, sentiment)
    proc = _launch(config, recipe, "quantization=null", "training.save_strategy=steps", "training.save_steps=4")
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    student = report["rows"][1]
    assert 0.3 < student["matmul_sparsity"] < 0.5  # the global threshold saw every shard
    assert report["export_reload"]["ok"]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-4" / "hf_compress").is_dir()


@two_gpus
def test_fsdp2_shards_the_teacher_and_prunes_across_shards(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(Path(__file__).with_name("fsdp_gpu_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    for r in (0, 1):
        rank = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert rank["teacher_sharded"] and rank["student_sharded"], rank
        assert rank["pruner_sparsity"] == 0.5  # exact: one threshold over every shard
        assert abs(rank["weight_sparsity"] - 0.5) < 1e-3, rank


@one_gpu
@pytest.mark.parametrize("export", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_export_on_cuda(tmp_path, export):
    from transformers import Trainer, TrainingArguments

    from hf_compress import QATCallback, QATConfig, load_pretrained
    from helpers import TokenDataset, tiny_bert

    model = tiny_bert(hidden=64, ffn=128).cuda()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], max_steps=3, per_device_train_batch_size=8,
                             save_strategy="no", disable_tqdm=True)
    cb = QATCallback(QATConfig(weight_bits=4 if export == "bnb-nf4" else 8, export=export))
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(32), callbacks=[cb])
    trainer.train()
    trainer.save_model(str(tmp_path / "m"))
    back = load_pretrained(tmp_path / "m").cuda()
    batch = TokenDataset(8, seed=4)[0:8]
    inputs = {k: batch[k].cuda() for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, model(**inputs).logits, rtol=1e-2, atol=1e-2)
