"""Low-rank factorisation (issue 15 part 1): the factors are the truncated SVD at factorisation time, rank rules,
layers that would not shrink stay dense, the optimizer trains the factors (AdamW state) after a mid-run
factorisation, gradual shrinking, composition with QAT (factors quantised) and KD, exact resume, exact reload
through load_pretrained and the Auto classes, and plain transformers refuses the export."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import hf_compress
from hf_compress import (DistillationConfig, DistillationTrainer, LowRankCallback, LowRankConfig, QATCallback, QATConfig,
                         load_pretrained)
from hf_compress.lowrank import LowRankLinear, convert, energy_rank, prepare
from hf_compress.lowrank.factorize import rank_at
from hf_compress.lowrank.optim import torch_optimizer
from helpers import TokenDataset, tiny_bert

Q = "bert.encoder.layer.0.attention.self.query"
FFN = "bert.encoder.layer.0.intermediate.dense"  # 32 -> 64


def truncated(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def product(m: LowRankLinear) -> torch.Tensor:
    return m[1].weight.detach().double() @ m[0].weight.detach().double()


def args(out, **kw):
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=6, per_device_train_batch_size=8,
                learning_rate=1e-3, save_strategy="no", disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def trainer(out, callbacks, model=None, **kw):
    return Trainer(model=model or tiny_bert(), args=args(out, **kw), train_dataset=TokenDataset(64, seed=3), callbacks=callbacks)


class Probe(TrainerCallback):
    """Copies of one layer's weights at on_step_begin of `step` (list it before or after LowRankCallback)."""

    def __init__(self, step, name=Q):
        self.step, self.name, self.seen = step, name, None

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            m = model.get_submodule(self.name)
            self.seen = [p.detach().clone() for p in m.parameters()] if isinstance(m, LowRankLinear) else m.weight.detach().clone()
            self.module = m


# ----------------------------------------------------------------------------- the factorisation itself


def test_factorised_layer_equals_truncated_svd_at_factorisation_time(tmp_path):
    before, after = Probe(3), Probe(3)
    t = trainer(tmp_path, [before, LowRankCallback(LowRankConfig(lowrank_rank_fraction=0.25, lowrank_start_step=3)), after])
    t.train()
    w = before.seen  # the dense weight as training left it after 3 steps
    assert isinstance(after.module, LowRankLinear) and after.module.rank == 8
    a, b = after.seen[0], after.seen[1]
    assert a.shape == (8, 32) and b.shape == (32, 8)
    assert torch.allclose(b.double() @ a.double(), truncated(w, 8), atol=1e-5)
    assert after.module[1].bias is before.module.bias  # the bias Parameter is kept (its optimizer state too)


def test_convert_without_training_is_svd_and_records(tmp_path):
    model = tiny_bert()
    w = model.get_submodule(FFN).weight.detach().clone()
    meta = convert(model, LowRankConfig(lowrank_ranks={"intermediate": 4}, lowrank_rank_fraction=None))
    m = model.get_submodule(FFN)
    assert isinstance(m, LowRankLinear) and m.rank == 4
    assert torch.allclose(product(m), truncated(w, 4), atol=1e-5)
    assert set(meta["layers"]) == {f"bert.encoder.layer.{i}.intermediate.dense" for i in range(4)}
    assert meta["layers"][FFN] == {"in_features": 32, "out_features": 64, "rank": 4, "bias": True}
    assert model.config.hf_compress["lowrank"] == meta
    assert convert(model, LowRankConfig(lowrank_ranks={"intermediate": 4}, lowrank_rank_fraction=None)) == meta  # idempotent


def test_asvd_and_fwsvd_are_the_weighted_truncations():
    model = tiny_bert()
    w = model.get_submodule(Q).weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    for method in ("asvd", "fwsvd"):
        m2 = tiny_bert()
        lr = prepare(m2, LowRankConfig(lowrank_method=method, lowrank_start_step=1, lowrank_rank_fraction=0.25))
        st = lr.stats[Q]
        if method == "asvd":
            st["abs_sum"].copy_(torch.rand(32, generator=g, dtype=torch.float64) * 5 + 0.1)
            st["count"].fill_(5)
            s = (st["abs_sum"] / 5) ** 0.5
            want = truncated(w.double() * s[None, :], 8) / s[None, :]
        else:
            st["grad_sq"].copy_(torch.rand(32, generator=g, dtype=torch.float64) + 0.01)
            d = st["grad_sq"].sqrt()
            want = truncated(d[:, None] * w.double(), 8) / d[:, None]
        lr.factorise()
        got = product(m2.get_submodule(Q))
        assert torch.allclose(got, want, atol=1e-5), method
        assert not torch.allclose(got, truncated(w, 8), atol=1e-4)  # the weighting changed the choice


def test_rank_rules():
    model = tiny_bert()
    lr = prepare(model, LowRankConfig(lowrank_ranks={"query": 3, "attention": 5}, lowrank_rank_fraction=0.125))
    lr.factorise()
    ranks = {n: m.rank for n, m in lr.modules().items() if isinstance(m, LowRankLinear)}
    assert ranks[Q] == 3  # the first matching pattern wins
    assert ranks["bert.encoder.layer.0.attention.self.key"] == 5
    assert ranks["bert.encoder.layer.0.attention.output.dense"] == 5
    assert ranks[FFN] == 4  # fraction: round(0.125 * min(32, 64))
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert [energy_rank(s, e) for e in (0.5, 16 / 22, 0.8, 0.95, 1.0)] == [1, 1, 2, 3, 4]
    e = tiny_bert()
    lr = prepare(e, LowRankConfig(lowrank_energy=0.5, lowrank_targets=["query"]))
    w = e.get_submodule(Q).weight.detach().double()
    sv = torch.linalg.svdvals(w)
    lr.factorise()
    r = e.get_submodule(Q).rank
    kept = (sv[:r] ** 2).sum() / (sv ** 2).sum()
    assert kept >= 0.5 and (sv[:r - 1] ** 2).sum() / (sv ** 2).sum() < 0.5
    # gradual: full rank at the start, the final rank at the end, never increasing
    seq = [rank_at(t, 4, 32, 2, 10, 1, "cubic") for t in range(2, 12)]
    assert seq[0] == 32 and seq[-1] == 4 and seq[8] == 4 and all(a >= b for a, b in zip(seq, seq[1:]))


def test_layers_that_would_not_shrink_stay_dense_with_a_warning():
    model = tiny_bert()
    with pytest.warns(UserWarning, match=r"left dense because rank r >= in\*out/\(in\+out\).*query.*rank 16 >= 16.0"):
        lr = prepare(model, LowRankConfig(lowrank_ranks={"query": 16, "key": 15}, lowrank_targets=["query", "key"]))
        lr.factorise()
    assert type(model.get_submodule(Q)) is nn.Linear
    assert model.get_submodule("bert.encoder.layer.0.attention.self.key").rank == 15  # 15 * 64 < 32 * 32
    assert lr.final[Q] is None


# ----------------------------------------------------------------------------- training


class OptimizerProbe(TrainerCallback):
    def on_train_end(self, args, state, control, optimizer=None, model=None, **kw):
        self.optimizer = torch_optimizer(optimizer)
        self.model = model


def test_mid_run_factorisation_trains_the_factors_with_adamw(tmp_path):
    after, opt = Probe(2), OptimizerProbe()
    t = trainer(tmp_path, [LowRankCallback(LowRankConfig(lowrank_rank_fraction=0.25, lowrank_start_step=2)), after, opt])
    dense_w = t.model.get_submodule(Q).weight
    t.train()
    o = opt.optimizer
    in_groups = [p for g in o.param_groups for p in g["params"]]
    assert not any(p is dense_w for p in in_groups) and dense_w not in o.state
    model_params = [p for p in t.model.parameters() if p.requires_grad]
    assert {id(p) for p in in_groups} == {id(p) for p in model_params} and len(in_groups) == len(model_params)
    m = t.model.get_submodule(Q)
    for p, start in zip((m[0].weight, m[1].weight), after.seen[:2]):
        assert p.shape == start.shape and not torch.equal(p, start)  # 4 steps of AdamW moved them
        st = o.state[p]
        assert st["exp_avg"].shape == p.shape and float(st["step"]) == 4.0
    # the factors sit where create_optimizer would put them: weight-decay group, named_parameters order
    decay = next(g for g in o.param_groups if any(p is m[0].weight for p in g["params"]))
    names = {id(p): n for n, p in t.model.named_parameters()}
    order = [names[id(p)] for p in decay["params"]]
    assert order == [n for n, _ in t.model.named_parameters() if n in order]


def test_gradual_schedule_reaches_the_final_rank(tmp_path):
    seen = {}

    class Ranks(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):  # after LowRankCallback's
            seen[state.global_step] = getattr(model.get_submodule(FFN), "rank", "dense")

    opt = OptimizerProbe()
    cb = LowRankCallback(LowRankConfig(lowrank_rank_fraction=0.25, lowrank_schedule="linear", lowrank_start_step=1,
                                       lowrank_end_step=5, lowrank_frequency=1))
    trainer(tmp_path, [cb, Ranks(), opt], max_steps=7).train()
    assert seen[0] == "dense" and seen[1] == 32 and seen[2] == 26 and seen[5] == 8 and seen[6] == 8
    ranks = [seen[t] for t in range(1, 7)]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) > 3
    o = opt.optimizer
    for p in opt.model.parameters():
        if p in o.state:
            assert o.state[p]["exp_avg"].shape == p.shape
    assert opt.model.config.hf_compress["lowrank"]["layers"][FFN]["rank"] == 8


def test_composes_with_qat_factors_quantised(tmp_path):
    lr = LowRankCallback(LowRankConfig(lowrank_rank_fraction=0.25))
    qat = QATCallback(QATConfig(weight_bits=8))
    t = trainer(tmp_path / "run", [lr, qat])
    t.train()
    meta = t.model.config.hf_compress
    assert f"{Q}.0" in meta["quantization"]["layers"] and f"{Q}.1" in meta["quantization"]["layers"]
    assert Q in meta["lowrank"]["layers"]
    from hf_compress.quantization import fake_quantize_weight
    from hf_compress.quantization.plan import scheme_for_bits

    scheme = scheme_for_bits(8, QATConfig(weight_bits=8))
    for w in (t.model.get_submodule(Q)[0].weight, t.model.get_submodule(Q)[1].weight):
        w = w.detach()
        assert torch.equal(fake_quantize_weight(w, scheme), w)  # baked onto the 8-bit per-channel grid
    t.save_model(str(tmp_path / "out"))
    batch = torch.stack([TokenDataset(4, seed=9)[i]["input_ids"] for i in range(4)])
    t.model.eval()
    ref = t.model(input_ids=batch).logits
    assert torch.equal(load_pretrained(tmp_path / "out")(input_ids=batch).logits, ref)


@pytest.mark.parametrize("qat_start", [0, 2])
def test_qat_planned_before_a_mid_run_factorisation_is_refused_before_training(tmp_path, qat_start):
    """QAT chooses its layers when the Trainer is built; a factorisation at step 1 replaces them. With QAT from
    step 2 that failed at step 2 (after training had started); with QAT from step 0 the factorised layers were
    silently left unquantised (no int8 layer shipped). Now: refused at train begin, before any step."""
    lr = LowRankCallback(LowRankConfig(lowrank_rank_fraction=0.25, lowrank_start_step=1))
    qat = QATCallback(QATConfig(weight_bits=8, activation_bits=8, qat_start_step=qat_start, export="torch-int8"))
    t = trainer(tmp_path, [lr, qat])
    with pytest.raises(ValueError, match=r"factorised by LowRankCallback at step 1.*list LowRankCallback before QATCallback"):
        t.train()
    assert t.state.global_step == 0
    assert not any(isinstance(m, LowRankLinear) for m in t.model.modules())
    from hf_compress.quantization import fake_quant_layers

    assert not fake_quant_layers(t.model)  # refused at train begin, before QAT changed the model


def test_a_trainer_built_and_never_trained_leaves_no_refusal_behind(tmp_path):
    """A Trainer with a mid-run factorisation, built and dropped (a notebook cell run again without it): QAT on
    the same model in the next Trainer used to be refused by that stale announcement. Only the Trainer that
    announces a change counts; in the same Trainer the refusal stays (the test above)."""
    model = tiny_bert()
    trainer(tmp_path / "dropped", [LowRankCallback(LowRankConfig(lowrank_rank_fraction=0.25, lowrank_start_step=1))],
            model=model)
    t = trainer(tmp_path / "qat", [QATCallback(QATConfig(weight_bits=8, export="torch-int8"))], model=model)
    t.train()
    assert t.state.global_step == 6 and not any(isinstance(m, LowRankLinear) for m in t.model.modules())
    assert Q in t.model.config.hf_compress["quantization"]["layers"]


def test_mid_run_factorisation_is_refused_for_a_model_init_model_and_a_callback_added_later(tmp_path):
    """Two ways QAT could miss the announcement made when the Trainer was built: the model is built in train()
    by model_init (the announcement named the init model), or the QATCallback is added after the Trainer was
    built (never saw its on_init_end; here one used by an earlier Trainer). Refused at the first step, before
    any optimizer step."""
    def lowrank():
        return LowRankCallback(LowRankConfig(lowrank_rank_fraction=0.25, lowrank_start_step=2))

    def qat():
        return QATCallback(QATConfig(weight_bits=8, activation_bits=8, qat_start_step=3, export="torch-int8"))

    t = Trainer(model_init=lambda: tiny_bert(), args=args(tmp_path / "init"), train_dataset=TokenDataset(64, seed=3),
                callbacks=[qat(), lowrank()])
    with pytest.raises(ValueError, match=r"factorised by LowRankCallback at step 2"):
        t.train()
    assert t.state.global_step == 0
    used = qat()
    trainer(tmp_path / "a", [used]).train()
    t = trainer(tmp_path / "b", [lowrank()])
    t.add_callback(used)
    with pytest.raises(ValueError, match=r"factorised by LowRankCallback at step 2"):
        t.train()
    assert t.state.global_step == 0


def test_composes_with_kd(tmp_path):
    after = Probe(2)
    cb = LowRankCallback(LowRankConfig(lowrank_rank_fraction=0.25, lowrank_start_step=2))
    teacher = tiny_bert(layers=4, hidden=48, ffn=96, seed=1)
    t = DistillationTrainer(model=tiny_bert(layers=2, seed=2), teacher_model=teacher,
                            args=args(tmp_path), distillation_config=DistillationConfig(alpha=0.5, hidden_loss_weight=1.0),
                            train_dataset=TokenDataset(64, seed=3), callbacks=[cb, after])
    out = t.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    m = t.model.get_submodule(Q)
    assert isinstance(m, LowRankLinear) and not torch.equal(m[0].weight, after.seen[0])
    assert not any(isinstance(x, LowRankLinear) for x in teacher.modules())


# ----------------------------------------------------------------------------- resume


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def _run(out, stop=None, resume=None, method="asvd"):
    cb = LowRankCallback(LowRankConfig(lowrank_method=method, lowrank_rank_fraction=0.25, lowrank_start_step=3,
                                       lowrank_schedule="cubic", lowrank_end_step=6, lowrank_frequency=1))
    t = trainer(out, [cb] + ([StopAt(stop)] if stop else []), model=tiny_bert(seed=0 if resume is None else 99),
                max_steps=8, save_strategy="steps", save_steps=2)
    t.train(resume_from_checkpoint=resume)
    return t, cb


@pytest.mark.parametrize("stop", [2, 4])  # before the factorisation (statistics only) and in the middle of the shrinking
def test_resume_is_bit_identical(tmp_path, stop):
    full, cb = _run(tmp_path / "a")
    _run(tmp_path / "b", stop=stop)
    resumed, cb2 = _run(tmp_path / "b", resume=str(tmp_path / "b" / f"checkpoint-{stop}"))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    sa, sb = cb.lowrank.state_dict(), cb2.lowrank.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and cb.lowrank.final == cb2.lowrank.final
    oa, ob = torch_optimizer(full.optimizer), torch_optimizer(resumed.optimizer)
    pa = dict(zip((n for n, _ in full.model.named_parameters()), full.model.parameters()))
    pb = dict(zip((n for n, _ in resumed.model.named_parameters()), resumed.model.parameters()))
    for n in pa:
        if pa[n] in oa.state:
            assert torch.equal(oa.state[pa[n]]["exp_avg_sq"], ob.state[pb[n]]["exp_avg_sq"]), n


# ----------------------------------------------------------------------------- export and reload


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank")
    dense = tiny_bert(hidden=64, ffn=128, heads=4, layers=2)
    dense.save_pretrained(root / "dense")
    model = tiny_bert(hidden=64, ffn=128, heads=4, layers=2)
    t = Trainer(model=model, args=args(root / "run", max_steps=3), train_dataset=TokenDataset(32, seed=3),
                callbacks=[LowRankCallback(LowRankConfig(lowrank_rank_fraction=0.25, lowrank_start_step=1))])
    t.train()
    t.save_model(str(root / "out"))
    return root, t.model.eval()


def _batch():
    ds = TokenDataset(4, seed=7)
    return {"input_ids": torch.stack([ds[i]["input_ids"] for i in range(4)]),
            "attention_mask": torch.stack([ds[i]["attention_mask"] for i in range(4)])}


def test_export_is_smaller_and_reloads_exactly_through_both_loaders(exported):
    root, model = exported
    from hf_compress.storage import disk_size_by_part

    dense = AutoModelForSequenceClassification.from_pretrained(root / "dense")
    n_dense, n_low = sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in model.parameters())
    saved = model.config.hf_compress["lowrank"]["parameters_saved"]
    assert n_low == n_dense - saved and saved > 0
    blocks_dense, blocks_low = disk_size_by_part(root / "dense")["blocks"], disk_size_by_part(root / "out")["blocks"]
    assert blocks_low < 0.6 * blocks_dense
    ref = model(**_batch()).logits
    a = load_pretrained(root / "out")
    b = AutoModelForSequenceClassification.from_pretrained(root / "out").eval()
    for m in (a, b):
        assert isinstance(m.get_submodule(Q), LowRankLinear) and m.get_submodule(Q).rank == 16
        assert torch.equal(m(**_batch()).logits, ref)
    assert "low-rank factorised layers" in (root / "out" / "README.md").read_text()


PLAIN = """
import sys
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
out = []
for cls in (AutoModelForSequenceClassification, BertForSequenceClassification):
    try:
        cls.from_pretrained(sys.argv[1])
        out.append("loaded")
    except Exception as e:
        out.append(str(e))
import json; print("RESULT" + json.dumps(out))
"""


def test_plain_transformers_refuses_the_export(exported):
    root, _ = exported
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(root / "out")], capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert line, proc.stderr[-2000:]
    for err in json.loads(line[0][len("RESULT"):]):
        assert "import hf_compress" in err and "pip install hf_compress" in err, err
    assert "hf_compress" not in sys.modules or hf_compress  # this process did import it; the subprocess did not


def test_one_argument_parser_takes_lowrank_config_with_the_others():
    from transformers import HfArgumentParser

    from hf_compress import PruningConfig

    parser = HfArgumentParser((TrainingArguments, DistillationConfig, PruningConfig, QATConfig, LowRankConfig))
    *_, c = parser.parse_args_into_dataclasses(["--output_dir", "x", "--lowrank_ranks", '{"query": 4}',
                                                "--lowrank_energy", "0.9", "--lowrank_targets", "query", "key"])
    assert c.lowrank_ranks == {"query": 4} and c.lowrank_energy == 0.9 and c.lowrank_targets == ["query", "key"]


def test_example_runs_on_tiny_settings(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "lowrank_text_classification.py"
    spec = importlib.util.spec_from_file_location("lowrank_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from helpers import data_dir

    # the data folder explicitly: the example's own default assumes ../shared beside the checkout
    out = example.main(["--tiny", "--output-dir", str(tmp_path), "--data", str(data_dir() / "sst2")])
    assert out["params"] < out["dense_params"] and out["reloaded_accuracy"] == out["accuracy"]
