"""QAT under DDP (2 CPU processes over gloo): every rank quantises with the same activation ranges."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from hf_compress import QATCallback, QATConfig
    from hf_compress.quantization import observers
    from helpers import TokenDataset, tiny_bert

    out, name = sys.argv[1], "bert.encoder.layer.0.attention.self.query"
    local = []  # this rank's own input ranges of one layer, batch by batch

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a: local.append([float(a[0].min()), float(a[0].max())]) if m.training else None)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 3:
                ranges = {n: [float(o.lo), float(o.hi)] for n, o in observers(model).items()}
                with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
                    json.dump({"ranges": ranges, "local": local}, f)

    args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], max_steps=3, per_device_train_batch_size=4,
                             save_strategy="no", disable_tqdm=True, seed=0)
    cb = QATCallback(QATConfig(activation_bits=8, observer="minmax"))
    Trainer(model=tiny_bert(seed=0), args=args, train_dataset=TokenDataset(64, seed=1), callbacks=[cb, Grab()]).train()
    dist.destroy_process_group()  # as every torch program should
    sys.stdout.flush(); os._exit(0)  # the DDP wrapper still holds the group: gloo's teardown at interpreter exit can abort (torch#190489)
''')


def test_observer_ranges_identical_on_every_rank(tmp_path):
    script = tmp_path / "ddp_qat.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if run.returncode != 0:
        pytest.fail(run.stdout[-2000:] + run.stderr[-4000:])
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert len(r0["ranges"]) == 24 and r0["ranges"] == r1["ranges"]
    # the ranks saw different batches, and the committed range is the union of both ranks' ranges
    assert r0["local"] != r1["local"]
    lo, hi = r0["ranges"]["bert.encoder.layer.0.attention.self.query"]
    # steps 1 and 2 are committed by step 3's end, and step 3's batch too: all three batches of both ranks
    both = r0["local"] + r1["local"]
    assert lo == pytest.approx(min(x[0] for x in both), abs=0) and hi == pytest.approx(max(x[1] for x in both), abs=0)
