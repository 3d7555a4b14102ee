"""`DistillationConfig.distill_unlabeled`: unlabelled rows (label −100) as a KD transfer set (issue 16).

Each gradient test compares the weights after one SGD step (lr 1, no clipping, no weight decay) with one
full-batch loss written out here: (1 − α)·CE mean over the labelled rows + α·T²·KL mean over the rows the KD
term counts. Sequential sampling fixes which rows share a micro-batch, so one micro-batch holds no label at all.
"""

import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

from hf_compress import DistillationConfig, DistillationTrainer, cache_teacher_logits
from helpers import tiny_bert, tiny_llama
from test_distillation_borders import _args, _assert_close, _sgd_expected, _step

T, ALPHA = 2.0, 0.5
# 8 rows in micro-batches of 3, 3 and 2: the second micro-batch is all unlabelled, the last half so
UNLABELLED = {3, 4, 5, 7}


def _rows(n=8, length=10, unlabelled=UNLABELLED):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (n, length), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": torch.tensor(-100 if i in unlabelled else int(ids[i, 0] % 2))} for i in range(n)]


def _models():
    student, teacher = tiny_bert(layers=2, seed=2), tiny_bert(layers=4, seed=1)
    with torch.no_grad():
        teacher.classifier.weight.mul_(30.0)  # a confident teacher: the KD term is far from zero
    return student, teacher


def _expected(student, teacher, rows, kd_rows):
    """Weights after one SGD step on the full-batch loss; `kd_rows`: the rows the KD term averages over."""
    ref = copy.deepcopy(student)
    b = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    labelled = b["labels"] != -100
    ce = F.cross_entropy(logits[labelled], b["labels"][labelled])
    kl = F.kl_div(F.log_softmax(logits / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1)
    return _sgd_expected(ref, (1 - ALPHA) * ce + ALPHA * T**2 * kl[kd_rows].mean())


def _trainer(tmp_path, student, teacher, data, distill_unlabeled=True, batch=3, **kw):
    return DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher, train_dataset=data,
        args=_args(tmp_path, per_device_train_batch_size=batch, train_sampling_strategy="sequential", **kw),
        distillation_config=DistillationConfig(alpha=ALPHA, temperature=T, distill_unlabeled=distill_unlabeled),
    )


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cached_logits"])
def test_unlabelled_rows_get_the_kd_term_under_uneven_accumulation(tmp_path, cached):
    student, teacher = _models()
    rows = _rows()
    if cached:
        from datasets import Dataset

        data = cache_teacher_logits(teacher, Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows]), k=2)
    else:
        data = rows
    tr = _trainer(tmp_path, student, None if cached else teacher, data)
    got = _step(tr)
    assert all(torch.isfinite(p).all() for p in got.values())
    _assert_close(got, _expected(student, teacher, rows, kd_rows=torch.ones(8, dtype=torch.bool)))
    # the all-unlabelled micro-batch logged a CE share of 0, not NaN
    assert tr.state.log_history[0]["hard_loss"] == pytest.approx(
        F.cross_entropy(*_labelled_logits(student, rows)).item(), rel=1e-4)


def _labelled_logits(student, rows):
    keep = [r for r in rows if int(r["labels"]) != -100]
    with torch.no_grad():
        logits = student(input_ids=torch.stack([r["input_ids"] for r in keep])).logits
    return logits, torch.stack([r["labels"] for r in keep])


def test_default_ignores_unlabelled_rows_in_both_terms(tmp_path):
    """distill_unlabeled=False: −100 rows count in neither term, with and without the Trainer's item count."""
    student, teacher = _models()
    rows = _rows(unlabelled={3, 7})  # no all-unlabelled micro-batch: the model's own CE mean stays defined
    want = _expected(student, teacher, rows, kd_rows=torch.tensor([i not in {3, 7} for i in range(8)]))
    _assert_close(_step(_trainer(tmp_path / "a", student, teacher, rows, distill_unlabeled=False)), want)
    # one micro-batch of all 8 rows, and no count from the Trainer (per-micro-batch means): the same rows count
    tr = _trainer(tmp_path / "b", student, teacher, rows, distill_unlabeled=False, batch=8, gradient_accumulation_steps=1)
    tr.model_accepts_loss_kwargs = False
    _assert_close(_step(tr), want)


def test_unlabelled_rows_without_the_trainers_count(tmp_path):
    """No num_items_in_batch from the Trainer: one micro-batch of 8 rows, the same full-batch loss."""
    student, teacher = _models()
    rows = _rows()
    tr = _trainer(tmp_path, student, teacher, rows, batch=8, gradient_accumulation_steps=1)
    tr.model_accepts_loss_kwargs = False
    _assert_close(_step(tr), _expected(student, teacher, rows, kd_rows=torch.ones(8, dtype=torch.bool)))


# ---- refusals, before any training -----------------------------------------------------------------


def test_causal_lm_refused(tmp_path):
    with pytest.raises(ValueError, match=r"distill_unlabeled=True applies to sequence classification.*LlamaForCausalLM"):
        DistillationTrainer(model=tiny_llama(layers=1, seed=2), teacher_model=tiny_llama(layers=2, seed=1),
                            train_dataset=[{"input_ids": torch.arange(3, 11), "labels": torch.arange(3, 11)}],
                            args=_args(tmp_path), distillation_config=DistillationConfig(distill_unlabeled=True))


def test_alpha_zero_refused(tmp_path):
    student, teacher = _models()
    with pytest.raises(ValueError, match=r"distill_unlabeled=True with alpha=0.*Set alpha > 0"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=_rows(), args=_args(tmp_path),
                            distillation_config=DistillationConfig(alpha=0.0, distill_unlabeled=True))


def test_label_smoothing_refused(tmp_path):
    student, teacher = _models()
    with pytest.raises(ValueError, match=r"label_smoothing_factor > 0 would replace"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=_rows(),
                            args=_args(tmp_path, label_smoothing_factor=0.1),
                            distillation_config=DistillationConfig(distill_unlabeled=True))


def test_config_field_parses_and_refuses_non_bool():
    (cfg,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(["--distill_unlabeled", "true"])
    assert cfg.distill_unlabeled is True
    with pytest.raises(ValueError, match=r"`distill_unlabeled`='yes' must be True or False"):
        DistillationConfig(distill_unlabeled="yes")


# ---- 2 ranks ---------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent('''
    import os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from hf_compress import DistillationConfig, DistillationTrainer
    from test_distill_unlabeled import ALPHA, T, _models, _rows
    from test_distillation_borders import _args

    out = sys.argv[1]
    student, teacher = _models()
    # 2 ranks x 2 rows x 2 micro-batches = the 8 rows in one step, however they are dealt
    tr = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=_rows(),
                             args=_args(out, per_device_train_batch_size=2, gradient_accumulation_steps=2),
                             distillation_config=DistillationConfig(alpha=ALPHA, temperature=T, distill_unlabeled=True))
    tr.train()
    save_file({k: v.contiguous() for k, v in tr.model.state_dict().items()}, f"{out}/rank{dist.get_rank()}.safetensors")
    dist.destroy_process_group()  # as every torch program should
    sys.stdout.flush(); os._exit(0)  # the DDP wrapper still holds the group: gloo's teardown at interpreter exit can abort (torch#190489)
''')


def test_two_ranks_equal_the_full_batch_loss(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_unlabelled.py"
    script.write_text(SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    student, teacher = _models()
    want = _expected(student, teacher, _rows(), kd_rows=torch.ones(8, dtype=torch.bool))
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        _assert_close({n: got[n] for n in want}, want)
