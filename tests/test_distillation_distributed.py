"""check_finite under DDP (2 CPU processes over gloo): a NaN on one rank stops every rank, promptly, with the message."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent('''
    import os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from transformers import TrainingArguments
    from hf_compress import DistillationTrainer
    from helpers import TokenDataset, tiny_bert

    out = sys.argv[1]
    teacher = tiny_bert(layers=2, seed=1)
    # rank 1's teacher turns NaN from the second step on; rank 0 never sees a NaN
    calls = []
    def poison(module, inputs, output):
        calls.append(1)
        return output * float("nan") if dist.get_rank() == 1 and len(calls) > 1 else output
    teacher.classifier.register_forward_hook(poison)
    args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], max_steps=5, per_device_train_batch_size=4,
                             save_strategy="no", disable_tqdm=True, seed=0)
    trainer = DistillationTrainer(model=tiny_bert(layers=1, seed=2), teacher_model=teacher, args=args,
                                  train_dataset=TokenDataset(64))
    try:
        trainer.train()
        message = "finished"
    except FloatingPointError as e:
        message = str(e)
    with open(f"{out}/rank{dist.get_rank()}.txt", "w") as f:
        f.write(message)
    dist.destroy_process_group()
    # The trainer (its DDP wrapper) still holds the group, and gloo's threads can hold work objects whose
    # teardown at interpreter finalisation aborts the process (SIGABRT, "terminate called without an active
    # exception"; pytorch/pytorch#190489): about 1 run in 25 here after a training loop left by an exception.
    # That exit is torch's, not what this test checks, so skip finalisation once the rank's result is written.
    os._exit(0)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nan_on_one_rank_stops_every_rank_with_the_message(tmp_path):
    script = tmp_path / "ddp_nan.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(tmp_path)]
    start = time.monotonic()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"a rank hung after the other saw a NaN: {(e.stderr or b'')[-3000:]!r}")
    took = time.monotonic() - start
    files = {i: tmp_path / f"rank{i}.txt" for i in (0, 1)}
    assert all(f.exists() for f in files.values()), run.stdout[-2000:] + run.stderr[-4000:]
    for i, f in files.items():
        text = f.read_text()
        assert "soft loss part is NaN/Inf at step 2 on rank 1 of 2" in text, (i, text)
        assert "check_finite=False" in text
    assert run.returncode == 0, run.stderr[-3000:]
    assert took < 120
