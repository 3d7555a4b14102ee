"""SIGKILL at random moments of a run that saves every step with save_total_limit=1 (issue 13): after every
kill a checkpoint the Trainer finished is there, and resuming from it — kill after kill — ends with the
same weights as the uninterrupted run, bit for bit. Complements the three deterministic kill points of
tests/test_lifecycle_borders.py with kills the test does not choose (seeded, so a failure reproduces)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = str(Path(__file__).with_name("kill_worker.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(out, kill_after_step=None, delay=0.0):
    """Run the worker; with `kill_after_step`, SIGKILL it `delay` s after it prints that step."""
    proc = subprocess.Popen([sys.executable, WORKER, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_after_step is not None and line.strip() == f"step {kill_after_step}":
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines)


@pytest.mark.integration
def test_random_sigkills_never_leave_the_run_without_a_resumable_checkpoint(tmp_path):
    rc, log = _run(tmp_path / "reference")
    assert rc == 0, log[-3000:]
    reference = load_file(str(tmp_path / "reference" / "final.safetensors"))

    out = tmp_path / "killed"
    rng = random.Random(13)
    kills, step = 0, 3  # from step 3 on, checkpoint-1 or -2 was finished before any kill
    while step <= 10:
        delay = rng.uniform(0.0, 0.25)  # lands anywhere between this step's end and the next ones' saves
        rc, log = _run(out, kill_after_step=step, delay=delay)
        if rc == 0:
            break  # the run finished before the kill
        assert rc == -signal.SIGKILL, log[-3000:]
        kills += 1
        finished = [d for d in os.listdir(out) if d.startswith("checkpoint-") and (out / d / "trainer_state.json").exists()]
        assert finished, f"kill {kills} (after step {step} + {delay:.3f}s) left no finished checkpoint: {os.listdir(out)}"
        step = max(int(d.split("-")[1]) for d in finished) + rng.randint(1, 2)
    if not (out / "final.safetensors").exists():
        rc, log = _run(out)
        assert rc == 0, log[-3000:]
    assert kills >= 4, kills
    final = load_file(str(out / "final.safetensors"))
    different = [k for k in reference if not torch.equal(reference[k], final[k])]
    assert not different, different[:5]
