"""FSDP2 on CPU (2 ranks over gloo, `fully_shard` directly): the pruner on sharded (DTensor) weights.

The Trainer cannot shard on CPU (accelerate runs FSDP on GPUs only), so this checks the part that carries
the risk — global thresholds and masks computed across shards — at the Pruner level, which the callback
drives unchanged. The GPU run through `accelerate launch` is in tests/test_gpu.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import _free_port

WORKER = Path(__file__).with_name("fsdp_worker.py")
RESULTS: list[Path] = []  # the workers' output folder


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2 (fully_shard)")
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    RESULTS[:] = [out]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_weights_really_sharded(ranks):
    for setting, r in ranks[0].items():
        assert r["weight_types"] == ["DTensor"], setting
        assert r["local_shape"][0] * 2 == r["full_shape"][0], setting  # masks live on this rank's half


def test_masks_equal_the_unsharded_run_after_every_step(ranks):
    # the global threshold (and unit ranking) saw every shard: same masks as one process with the whole model
    for rank in ranks:
        for setting, r in rank.items():
            for i, step in enumerate(r["steps"]):
                assert step["masks_equal"], (setting, i)
                assert step["weights_close"] < 1e-6, (setting, i)
                assert step["sparsity"][0] == step["sparsity"][1], (setting, i)  # counted over all shards
            assert [s["sparsity"][1] for s in r["steps"]] == [0.0, 0.25, 0.25, 0.5, 0.5], setting


def test_pruned_weights_stay_zero_through_adamw(ranks):
    for rank in ranks:
        for setting, r in rank.items():
            assert all(s["zeros_kept"] for s in r["steps"]), setting


def test_checkpoint_state_is_full_and_reloads_into_shards(ranks):
    for rank in ranks:
        for setting, r in rank.items():
            assert r["state_equals_reference"], setting  # full tensors: the checkpoint fits any sharding
            assert r["reload_equal"], setting


def test_qat_and_structured_pruning_finish_under_fsdp2_like_an_unsharded_run(ranks):
    """convert needs the full model: on shards it refuses clearly; a gathered copy converts to exactly what
    the unsharded run ships (heads removed, int8 layers, same metadata, same logits) on every rank."""
    for r in (0, 1):
        c = json.loads((RESULTS[0] / f"rank{r}_convert.json").read_text())
        assert "FSDP2 shards" in c["refused"] and "full_state_dict" in c["refused"]
        assert c["ref"]["removed"]["heads"] > 0
        assert c["gathered"]["removed"] == c["ref"]["removed"]
        assert c["gathered"]["meta"] == c["ref"]["meta"]
        assert c["gathered"]["shapes"] == c["ref"]["shapes"]
        assert c["ref"]["meta"]["quantization"]["backend"] == "torch-int8"
        got, want = torch.tensor(c["gathered"]["logits"]), torch.tensor(c["ref"]["logits"])
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
