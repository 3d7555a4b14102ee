"""Weight clustering (issue 15, part 2): k-means weight sharing with trained centroids.

- the clustered forward is a parametrisation weight = centroids[assignments]: each centroid's gradient is the
  explicit scatter-add of its members' gradients;
- through the Trainer: assignments refreshed on a schedule, then frozen; the centroids replace the dense weights
  in the optimizer's param groups and receive AdamW updates;
- export: codebook + b-bit packed indices on disk, reload exact (load_pretrained, Auto classes after
  `import hf_compress`), refused by plain transformers (subprocess); resume mid-run bit-identical.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, HfArgumentParser, Trainer,
                          TrainerCallback, TrainingArguments)

import hf_compress
from hf_compress import ClusteringCallback, ClusteringConfig
from hf_compress.clustering import clustered_layers, convert, kmeans, pack, prepare, unpack
from hf_compress.clustering.kmeans import packed_bytes
from helpers import TokenDataset, tiny_bert, tiny_gpt2


def test_centroid_gradient_is_the_sum_of_its_members_gradients():
    model = tiny_bert(layers=1)
    prepare(model, ClusteringConfig(clustering_bits=3, clustering_group_size=8))
    layer = model.bert.encoder.layer[0].intermediate.dense
    ids = torch.randint(3, 100, (4, 10))
    model(input_ids=ids).logits.square().sum().backward()
    g_c = layer.clustering_centroids.grad.clone()
    # explicit: dL/dW (W a leaf with the clustered values), scatter-added into each member's centroid
    model.zero_grad()
    dense = tiny_bert(layers=1)
    dense.load_state_dict(model.state_dict())  # weight = the clustered values (frozen: state_dict writes them)
    dense(input_ids=ids).logits.square().sum().backward()
    g_w = dense.bert.encoder.layer[0].intermediate.dense.weight.grad
    a = layer.assignments()  # [G, n]
    explicit = torch.zeros_like(g_c).scatter_add_(1, a, g_w.reshape(a.shape[0], -1))
    torch.testing.assert_close(g_c, explicit, rtol=1e-5, atol=1e-7)
    assert g_c.abs().sum() > 0


@pytest.mark.parametrize("bits", range(1, 9))
def test_b_bit_indices_pack_into_ceil_n_b_over_8_bytes(bits):
    idx = torch.randint(0, 2 ** bits, (7, 13))
    packed = pack(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(idx.numel(), bits) == -(-91 * bits // 8)
    assert torch.equal(unpack(packed, bits, idx.numel()).view(7, 13), idx)
    if bits in (1, 2, 4):  # each byte holds 8 / bits whole indices, the first in the low bits
        assert int(packed[0]) == sum(int(idx.view(-1)[j]) << (bits * j) for j in range(8 // bits))


def test_kmeans_is_lloyd_and_deterministic():
    x = torch.cat([torch.randn(1, 500) * 0.1 - 2, torch.randn(1, 500) * 0.1 + 3], 1)
    c, a = kmeans(x, 2)
    assert torch.allclose(c.sort().values, torch.tensor([[x[0, :500].mean(), x[0, 500:].mean()]]), atol=1e-5)
    c2, a2 = kmeans(x, 2)
    assert torch.equal(c, c2) and torch.equal(a, a2)


class Probe(TrainerCallback):
    """After each optimizer step: centroids, assignments, and which tensors the optimizer holds."""

    def __init__(self, name):
        self.name, self.steps = name, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        layer = model.get_submodule(self.name)
        if not hasattr(layer, "clustering_centroids"):
            return
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        c = layer.clustering_centroids
        self.steps[state.global_step] = dict(
            centroids=c.detach().clone(), assign=layer.assignments().clone(), weight=layer.weight.detach().clone(),
            centroids_in_opt=id(c) in held, weight_in_opt=id(layer.weight) in held,
            adam=sorted(opt.state.get(c, {})), frozen=layer.hfc_frozen, groups=len(opt.param_groups),
            n_params=sum(len(g["params"]) for g in opt.param_groups),
        )


NAME = "bert.encoder.layer.0.intermediate.dense"


def _train(out, cfg, steps=6, callbacks=(), resume=None, save_steps=None, stop=None, seed=2, **kw):
    model = tiny_bert(layers=2, seed=seed if resume is None else 99)
    cb = ClusteringCallback(cfg)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            if state.global_step == stop:
                control.should_training_stop = True

    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=8,
        learning_rate=1e-2, weight_decay=0.01, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_steps=2, disable_tqdm=True, seed=0, **kw,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=96, seed=3),
                      callbacks=[cb, *callbacks, *([Stop()] if stop else [])])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


def test_refresh_then_freeze_and_centroids_get_adamw_updates(tmp_path):
    probe = Probe(NAME)
    cfg = ClusteringConfig(clustering_bits=3, clustering_start_step=1, clustering_freeze_step=3, refresh_interval=1)
    trainer, cb = _train(tmp_path, cfg, steps=6, callbacks=[probe])
    s = probe.steps
    n_model = sum(1 for p in tiny_bert(layers=2).parameters())
    assert 1 not in s  # clustered at the beginning of step 2 (global_step 1)
    # before freezing: the dense weights train (straight through), the centroids are not in the optimizer
    for k in (2, 3):
        assert not s[k]["frozen"] and s[k]["weight_in_opt"] and not s[k]["centroids_in_opt"]
    assert not torch.equal(s[2]["weight"], s[3]["weight"])
    # frozen at step 3: the centroids took the dense weights' places (same groups, same count)
    for k in (4, 5, 6):
        assert s[k]["frozen"] and s[k]["centroids_in_opt"] and not s[k]["weight_in_opt"]
        assert s[k]["n_params"] == n_model and s[k]["groups"] == s[2]["groups"]
        assert s[k]["adam"] == ["exp_avg", "exp_avg_sq", "step"]
    # centroids move every step after freezing (AdamW), assignments never do
    assert not torch.equal(s[4]["centroids"], s[5]["centroids"]) and not torch.equal(s[5]["centroids"], s[6]["centroids"])
    assert torch.equal(s[4]["assign"], s[6]["assign"])
    # refreshed while not frozen (global steps 2 and 3): the assignments follow the trained dense weights
    assert not torch.equal(s[2]["assign"], s[4]["assign"])
    assert cb.result["layers"][NAME] == {"bits": 3, "groups": 1}
    assert not clustered_layers(trainer.model)
    logs = [h for h in trainer.state.log_history if "clustering/frozen" in h]
    assert logs and logs[-1]["clustering/frozen"] == 1.0


def test_one_adamw_step_on_centroids_matches_torch_adamw():
    """The centroids are ordinary leaves for the optimizer: one AdamW step equals AdamW on a copy given the
    scatter-added gradient."""
    model = tiny_bert(layers=1)
    prepare(model, ClusteringConfig(clustering_bits=2))
    layer = model.bert.encoder.layer[0].output.dense
    opt = torch.optim.AdamW([layer.clustering_centroids], lr=1e-2, weight_decay=0.1)
    before = layer.clustering_centroids.detach().clone()
    model(input_ids=torch.randint(3, 100, (2, 6))).logits.sum().backward()
    grad = layer.clustering_centroids.grad.clone()
    opt.step()
    ref = before.clone().requires_grad_(True)
    ref.grad = grad
    torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1).step()
    assert torch.equal(layer.clustering_centroids.detach(), ref.detach())
    assert not torch.equal(before, ref.detach())


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits, group", [(4, None), (3, 16), (2, 32)])
def test_export_is_codebook_plus_packed_indices_and_reloads_exact(tmp_path, bits, group):
    trainer, cb = _train(tmp_path / "run", ClusteringConfig(clustering_bits=bits, clustering_group_size=group), steps=3)
    model = trainer.model
    ids = torch.randint(3, 100, (3, 9))
    ref = _logits(model, ids)
    out = tmp_path / "export"
    model.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f"{NAME}.weight" not in keys
        book, idx = f.get_slice(f"{NAME}.weight.codebook"), f.get_slice(f"{NAME}.weight.indices")
        groups = 1 if group is None else 64 // group
        assert book.get_shape() == [groups, 2 ** bits] and book.get_dtype() == "F32"
        assert idx.get_dtype() == "U8" and idx.get_shape() == [64 * 32 * bits // 8]
    meta = json.loads((out / "config.json").read_text())["hf_compress"]["clustering"]
    assert meta["layers"][NAME] == {"bits": bits, "groups": groups}
    for loaded in (hf_compress.load_pretrained(out), AutoModelForSequenceClassification.from_pretrained(out)):
        assert torch.equal(_logits(loaded, ids), ref)
        w = loaded.get_submodule(NAME).weight
        assert torch.equal(w, model.get_submodule(NAME).weight)
        assert max(int(torch.unique(r).numel()) for r in w.reshape(groups, -1)) <= 2 ** bits
    # a re-save of the reloaded model stays clustered and equal
    again = tmp_path / "again"
    AutoModelForSequenceClassification.from_pretrained(out).save_pretrained(again)
    with safe_open(str(again / "model.safetensors"), "pt") as f:
        assert f"{NAME}.weight.indices" in set(f.keys())
    assert torch.equal(_logits(hf_compress.load_pretrained(again), ids), ref)


def test_gpt2_conv1d_clusters_per_output_channel_group_and_reloads(tmp_path):
    model = tiny_gpt2()
    cfg = ClusteringConfig(clustering_bits=4, clustering_group_size=32)
    prepare(model, cfg)
    convert(model, cfg)
    w = model.transformer.h[0].mlp.c_fc.weight  # Conv1D [in=32, out=128]: 4 groups of 32 output columns
    for g in range(4):
        assert torch.unique(w[:, 32 * g: 32 * (g + 1)]).numel() <= 16
    ids = torch.randint(3, 100, (2, 7))
    ref = _logits(model, ids)
    model.save_pretrained(tmp_path)
    for loaded in (hf_compress.load_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert torch.equal(_logits(loaded, ids), ref)


def test_convert_is_idempotent_and_clusters_a_dense_model():
    model = tiny_bert(layers=1)
    cfg = ClusteringConfig(clustering_bits=2)
    first = convert(model, cfg)  # never trained: k-means now (post-training clustering)
    w = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in first["layers"]}
    assert all(torch.unique(t).numel() <= 4 for t in w.values())
    assert convert(model, cfg) == first
    assert all(torch.equal(model.get_submodule(n).weight, t) for n, t in w.items())


def test_plain_transformers_refuses_a_clustered_export(tmp_path):
    model = tiny_bert(layers=1)
    convert(model, ClusteringConfig(clustering_bits=4))
    model.save_pretrained(tmp_path)
    code = ("import sys; from transformers import AutoModelForSequenceClassification as A\n"
            "try:\n    A.from_pretrained(sys.argv[1])\nexcept Exception as e:\n    print('REFUSED', e); sys.exit(0)\n"
            "sys.exit(1)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "REFUSED" in r.stdout and "hf_compress" in r.stdout, r.stdout + r.stderr
    card = (tmp_path / "README.md").read_text()
    assert "clustered weights (codebook + packed indices)" in card


@pytest.mark.parametrize("stop, freeze", [(3, 2), (2, 4)])  # resumed in the frozen phase / while refreshing
def test_resume_mid_run_is_bit_identical(tmp_path, stop, freeze):
    cfg = dict(clustering_bits=3, clustering_start_step=1, clustering_freeze_step=freeze, refresh_interval=1,
               clustering_group_size=16)
    full, _ = _train(tmp_path / "a", ClusteringConfig(**cfg), steps=6, save_steps=stop)
    _train(tmp_path / "b", ClusteringConfig(**cfg), steps=6, save_steps=stop, stop=stop)
    resumed, _ = _train(tmp_path / "b", ClusteringConfig(**cfg), steps=6, save_steps=stop,
                        resume=str(tmp_path / "b" / f"checkpoint-{stop}"))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    state = tmp_path / "b" / f"checkpoint-{stop}" / "hf_compress" / "clustering.safetensors"
    with safe_open(str(state), "pt") as f:
        assert f"{NAME}.centroids" in set(f.keys()) and f.get_slice(f"{NAME}.assignments").get_dtype() == "U8"


def test_resume_refuses_damaged_assignments(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = ClusteringConfig(clustering_bits=2, clustering_start_step=1)
    _train(tmp_path, cfg, steps=4, save_steps=2, stop=2)
    path = tmp_path / "checkpoint-2" / "hf_compress" / "clustering.safetensors"
    t = load_file(str(path))
    t[f"{NAME}.assignments"][0, 0] = 9
    save_file(t, str(path))
    with pytest.raises(ValueError, match="assignments >= 4"):
        _train(tmp_path, cfg, steps=4, save_steps=2, resume=str(tmp_path / "checkpoint-2"))


def test_field_names_do_not_clash_in_one_argument_parser():
    from hf_compress import DistillationConfig, PruningConfig, QATConfig

    parser = HfArgumentParser((TrainingArguments, DistillationConfig, PruningConfig, QATConfig, ClusteringConfig))
    *_, c = parser.parse_args_into_dataclasses(["--output_dir", "x", "--clustering_bits", "3",
                                                "--clustering_targets", "dense", "--clustering_freeze_step", "5"])
    assert (c.clustering_bits, c.clustering_targets, c.clustering_freeze_step) == (3, ["dense"], 5)
