"""Two processes on CPU (DDP over gloo): compression must behave exactly as on one.

The worker (tests/ddp_worker.py) trains DistillationTrainer + movement pruning + QAT with activation
observers on tiny models; here we compare what each rank saw and wrote.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_compress import load_pretrained

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def test_masks_and_quant_state_identical_on_every_rank(ddp_run):
    s0, s1 = load_file(ddp_run / "state0.safetensors"), load_file(ddp_run / "state1.safetensors")
    assert s0.keys() == s1.keys()
    masks = [k for k in s0 if ".mask." in k]
    assert masks and any(".qat." in k for k in s0)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    # the masks really changed during training (movement scores from synchronised gradients)
    last = max(int(k.split(".")[0]) for k in masks)
    pruned = sum((s0[k] == 0).sum().item() for k in masks if k.startswith(f"{last}."))
    total = sum(s0[k].numel() for k in masks if k.startswith(f"{last}."))
    assert abs(pruned / total - 0.5) < 0.01


def test_weights_identical_and_saved_model_is_rank0(ddp_run):
    w0, w1 = load_file(ddp_run / "weights0.safetensors"), load_file(ddp_run / "weights1.safetensors")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks"
    saved = load_pretrained(ddp_run / "final").state_dict()
    for k, v in saved.items():
        assert torch.equal(v, w0[k]), k


def test_only_main_process_writes_state(ddp_run):
    import json

    r0 = json.loads((ddp_run / "rank0.json").read_text())
    r1 = json.loads((ddp_run / "rank1.json").read_text())
    assert r0["world"] == 2
    assert len(r0["writes"]) == 6 and all(r0["writes"])  # 2 checkpoints x (pruning, QAT, projections)
    assert not r1["writes"]  # rank 1 wrote nothing
    state = ddp_run / "run" / "checkpoint-4" / "hf_compress"
    assert {p.name for p in state.glob("*.json")} >= {"qat.json"}
    assert not list(state.glob("*.tmp-*"))
