"""Physical removal of heads / FFN neurons / layers (BERT and Llama) and reloading the result."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments

from hf_compress import PruningCallback, PruningConfig, load_pretrained
from hf_compress.pruning import Pruner, remove_pruned, structure
from hf_compress.pruning.structured import bert, llama
from helpers import TokenDataset, tiny_bert, tiny_gpt2, tiny_llama

MODELS = {
    "bert": lambda: tiny_bert(layers=4, hidden=32, heads=4, ffn=64),
    "llama": lambda: tiny_llama(layers=3, hidden=32, heads=4, kv_heads=2, ffn=64),
    "gpt2": lambda: tiny_gpt2(layers=3, hidden=32, heads=4),
}


def _batch():
    ds = TokenDataset(6, 12, seed=3)
    return {"input_ids": ds.ids, "attention_mask": ds.mask}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("granularity", ["heads", "neurons", "layers"])
def test_removal_shrinks_and_keeps_masked_logits(arch, granularity):
    model = MODELS[arch]()
    batch = _batch()
    p = Pruner(model, granularity=granularity)
    p.update(0.5)
    masked = _logits(model, batch)
    before, shape = _params(model), structure(model)
    removed = remove_pruned(model)
    after = _params(model)
    assert after < before and removed["parameters"] == before - after
    torch.testing.assert_close(_logits(model, batch), masked, rtol=1e-5, atol=1e-5)
    s = structure(model)
    if granularity == "heads":
        assert sum(s["heads"]) == sum(shape["heads"]) - round(0.5 * sum(shape["heads"]))
        assert model.get_submodule(p.names[0]).weight.numel() < p.weights[0].numel()
    elif granularity == "neurons":
        assert sum(s["ffn"]) == sum(shape["ffn"]) // 2
    else:
        assert len(s["ffn"]) == len(shape["ffn"]) - round(0.5 * len(shape["ffn"]))
        assert model.config.num_hidden_layers == len(s["ffn"])
    assert model.config.hf_compress["pruning"]["removed"][{"layers": "layers"}.get(granularity, granularity)] > 0


def test_bert_nonuniform_heads_run_with_sdpa_and_eager():
    model = tiny_bert(layers=3, heads=4)
    batch = _batch()
    bert.remove_heads(model, 0, [0, 2, 3])
    bert.remove_heads(model, 2, [1])
    assert structure(model)["heads"] == [1, 4, 3]
    out = {}
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        out[impl] = _logits(model, batch)
    torch.testing.assert_close(out["eager"], out["sdpa"], rtol=1e-5, atol=1e-5)
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 1


def test_llama_removed_heads_follow_kv_groups_and_generate():
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    llama.remove_heads(model, 1, [0])
    att = model.model.layers[1].self_attn
    assert att.q_proj.out_features == 2 * att.head_dim and att.k_proj.out_features == att.head_dim
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)  # uses the KV cache with uneven layers
    assert out.shape == (1, 7)


def test_removing_too_many_units_is_an_error():
    model = tiny_bert(layers=2, heads=4)
    with pytest.raises(ValueError, match="leave none"):
        bert.remove_heads(model, 0, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"has 4 heads; cannot remove heads \[7\]"):
        bert.remove_heads(model, 0, [7])
    with pytest.raises(ValueError, match="FFN neurons"):
        bert.remove_neurons(model, 1, [64])
    with pytest.raises(ValueError, match="leave none"):
        llama.remove_layers(tiny_llama(layers=2), [0, 1])
    with pytest.raises(ValueError, match="remove 4 of the 4 heads, but at most 2 can go"):
        Pruner(tiny_bert(layers=2, heads=2), granularity="heads").check_target(0.9)
    with pytest.raises(ValueError, match="every layer keeps at least one"):
        Pruner(tiny_bert(layers=2, heads=2), granularity="neurons", scope="local").check_target(0.999)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match="BERT-family encoders .* Llama-style decoders .* OPTForCausalLM is none"):
        Pruner(opt, granularity="heads")
    # unstructured pruning still works on it
    p = Pruner(opt, granularity="unstructured")
    p.update(0.5)
    assert abs(p.sparsity() - 0.5) < 1e-3


def test_gpt2_fused_qkv_heads_and_conv1d_nm():
    model = tiny_gpt2(layers=2, hidden=32, heads=4)
    batch = _batch()
    p = Pruner(model, granularity="heads", scope="local")
    p.update(0.5)
    qkv = p.masks[p.index["transformer.h.0.attn.c_attn"]].bool()  # Conv1D (in, 3*hidden): the q, k, v runs agree
    q, k, v = qkv.split(32, dim=1)
    assert torch.equal(q, k) and torch.equal(q, v) and int((~q[0]).sum()) == 16
    masked = _logits(model, batch)
    remove_pruned(model)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32, 48)
    torch.testing.assert_close(_logits(model, batch), masked, rtol=1e-5, atol=1e-5)
    # N:M along the input dim of a transposed Conv1D weight (in, out): groups run down dim 0
    nm = Pruner(tiny_gpt2(), granularity="n:m")
    nm.update(0.5)
    w = nm.weights[0].detach()
    assert ((w.T.reshape(w.shape[1], -1, 4) == 0).sum(-1) >= 2).all()


def _train(model, tmp_path, config, steps=6, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=8,
        logging_steps=steps, save_strategy="no", disable_tqdm=True, learning_rate=1e-3, **kw,
    )
    cb = PruningCallback(config)
    causal = not hasattr(model, "classifier")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(48, causal=causal), callbacks=[cb])
    trainer.train()
    return trainer, cb


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_save_model_load_pretrained_nonuniform(arch, tmp_path):
    model = MODELS[arch]()
    batch = _batch()
    before = _params(model)
    cfg = PruningConfig(granularity="heads", target_sparsity=0.5, scope="global", frequency=1, pruning_end_step=3)
    trainer, cb = _train(model, tmp_path, cfg)
    cb_neurons = Pruner(model, granularity="neurons")  # a second, non-uniform cut of the trained model
    cb_neurons.update(0.4)
    remove_pruned(model)
    assert _params(model) < before
    s = structure(model)
    assert len(set(s["ffn"])) > 1  # non-uniform widths per layer
    trainer.save_model(str(tmp_path / "out"))
    reloaded = load_pretrained(tmp_path / "out")
    assert structure(reloaded) == s
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)
    meta = reloaded.config.hf_compress["pruning"]
    assert meta["runs"][0]["granularity"] == "heads" and meta["heads"] == s["heads"]


@pytest.mark.parametrize("arch,granularity,auto", [
    ("bert", "neurons", AutoModelForSequenceClassification),
    ("bert", "layers", AutoModelForSequenceClassification),
    ("llama", "heads", AutoModelForCausalLM),
    ("gpt2", "neurons", AutoModelForCausalLM),
])
def test_uniform_shapes_reload_with_auto_class(arch, granularity, auto, tmp_path):
    model = MODELS[arch]()
    batch = _batch()
    p = Pruner(model, granularity=granularity, scope="global" if granularity == "layers" else "local")
    p.update(0.5)
    remove_pruned(model)
    model.save_pretrained(tmp_path)
    again = auto.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(again, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)
    assert _params(again) == _params(model)


def test_heads_pruned_then_int8_export_reloads(tmp_path):
    """PruningCallback before QATCallback: units are removed, then the remaining layers are exported."""
    qat = pytest.importorskip("hf_compress.callbacks.qat")
    from hf_compress.quantization.config import QATConfig

    model = MODELS["bert"]()
    batch = _batch()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=5,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True)
    prune = PruningCallback(PruningConfig(granularity="neurons", target_sparsity=0.5, pruning_end_step=3, frequency=1))
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(32),
                      callbacks=[prune, qat.QATCallback(QATConfig(weight_bits=8, export="torch-int8"))])
    trainer.train()
    assert prune.removed["neurons"] == 128 and sum(structure(model)["ffn"]) == 128
    trainer.save_model(str(tmp_path / "out"))
    reloaded = load_pretrained(tmp_path / "out")
    assert set(reloaded.config.hf_compress) >= {"pruning", "quantization"}
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)


def _pruned_and_quantised(tmp_path, order, granularity, export, qat_start, best=False):
    from hf_compress import QATCallback, QATConfig

    torch.manual_seed(0)
    model = MODELS["bert"]()
    extra = dict(eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss") if best else dict(save_strategy="no")
    args = TrainingArguments(output_dir=str(tmp_path / order), use_cpu=True, report_to=[], max_steps=6, learning_rate=1e-3,
                             per_device_train_batch_size=8, disable_tqdm=True, seed=0, **extra)
    prune = PruningCallback(PruningConfig(granularity=granularity, target_sparsity=0.5, pruning_end_step=3, frequency=1))
    qat = QATCallback(QATConfig(weight_bits=8, activation_bits=8, observer="minmax", export=export, qat_start_step=qat_start))
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(32), eval_dataset=TokenDataset(8, seed=5) if best else None,
                      callbacks=[prune, qat] if order == "pq" else [qat, prune])
    trainer.train()
    trainer.save_model(str(tmp_path / order / "out"))
    return model, prune


@pytest.mark.parametrize("granularity, export, qat_start, best", [
    ("unstructured", None, 0, False), ("heads", "torch-int8", 0, False), ("heads", None, 2, False),
    ("neurons", "torch-int8", 2, True),
])
def test_pruning_and_qat_give_the_same_model_in_either_list_order(tmp_path, granularity, export, qat_start, best):
    """[QATCallback, PruningCallback] used to be refused at train begin (QAT starting at step 0), or, with QAT
    starting later, to convert before the pruned units were removed: a failure after training (torch-int8) or
    a saved model whose recorded layer shapes no longer matched (export=None). Now either order gives the
    model of the documented order, bit for bit, and it reloads."""
    batch = _batch()
    ref, _ = _pruned_and_quantised(tmp_path, "pq", granularity, export, qat_start, best)
    got, prune = _pruned_and_quantised(tmp_path, "qp", granularity, export, qat_start, best)
    assert prune.removed is not None if granularity != "unstructured" else prune.pruner is not None
    assert got.config.hf_compress == ref.config.hf_compress
    torch.testing.assert_close(got.state_dict(), ref.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(_logits(got, batch), _logits(ref, batch), rtol=0, atol=0)
    reloaded = load_pretrained(tmp_path / "qp" / "out")
    torch.testing.assert_close(_logits(reloaded, batch), _logits(ref, batch), rtol=0, atol=0)


@pytest.mark.parametrize("order", [("heads", "neurons"), ("neurons", "heads")])
def test_two_structured_callbacks_each_record_their_own_sparsity(order, tmp_path):
    """The first callback's removal takes every all-zero unit out, the other run's too: the second run must
    still record what it pruned (it used to record 0.0, or a mix of both runs' zeros), measured against the
    widths before the run."""
    model = MODELS["bert"]()
    before = structure(model)
    targets = {"heads": 0.5, "neurons": 0.25}
    cbs = [PruningCallback(PruningConfig(granularity=g, target_sparsity=targets[g], scope="local", frequency=1,
                                         pruning_end_step=3)) for g in order]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=5,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    Trainer(model=model, args=args, train_dataset=TokenDataset(48), callbacks=cbs).train()
    after = structure(model)
    gone = {"heads": 1 - sum(after["heads"]) / sum(before["heads"]), "neurons": 1 - sum(after["ffn"]) / sum(before["ffn"])}
    assert gone == pytest.approx(targets)  # both were removed, whatever the order
    runs = {r["granularity"]: r["sparsity"] for r in model.config.hf_compress["pruning"]["runs"]}
    assert runs == pytest.approx(gone, abs=1e-6)


@pytest.mark.parametrize("order", [("heads", "layers"), ("layers", "heads")])
def test_overlapping_structured_runs_record_their_own_units(order, tmp_path):
    """A `layers` unit holds every Linear of its block, the attention projections a heads run prunes too: each
    run records the fraction of its own units (zeros in the weights would count the other run's)."""
    model = MODELS["bert"]()
    n_layers = model.config.num_hidden_layers
    targets = {"heads": 0.5, "layers": 0.5}
    cbs = [PruningCallback(PruningConfig(granularity=g, target_sparsity=targets[g], scope="global" if g == "layers"
                                         else "local", frequency=1, pruning_end_step=3)) for g in order]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=5,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    Trainer(model=model, args=args, train_dataset=TokenDataset(48), callbacks=cbs).train()
    assert model.config.num_hidden_layers == n_layers - round(0.5 * n_layers)
    runs = {r["granularity"]: r["sparsity"] for r in model.config.hf_compress["pruning"]["runs"]}
    assert runs == pytest.approx(targets, abs=1e-6)


@pytest.mark.parametrize("order", [("heads", "layers"), ("layers", "heads")])
def test_best_model_reload_with_overlapping_structured_runs_removes_the_best_checkpoints_units(order, tmp_path):
    """load_best_model_at_end with a heads run and a layers run: which blocks are skipped is not in the weights
    (a forward hook), so it comes back only when the layers run restores its masks. With the heads run listed
    first, its removal used to run before that restore and deleted the blocks skipped at the *end* of training,
    not those of the best checkpoint (a different model than the one evaluated, or an IndexError). Every run
    now restores before any removes: the shipped model is the best checkpoint's, in either order."""
    from safetensors.torch import load_file

    from hf_compress.pruning.structured.common import find_blocks, set_layer_skip

    torch.manual_seed(0)
    model = MODELS["bert"]()
    n_layers = model.config.num_hidden_layers
    calls = []

    def metrics(_):
        calls.append(1)
        return {"score": 1.0 / len(calls)}  # the first evaluation (step 2) is the best

    cbs = [PruningCallback(PruningConfig(granularity=g, target_sparsity=0.5, scope="global" if g == "layers" else "local",
                                         frequency=1, pruning_start_step=0, pruning_end_step=6)) for g in order]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=8, learning_rate=1e-3,
                             per_device_train_batch_size=8, disable_tqdm=True, seed=0, eval_strategy="steps",
                             eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="score", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(64), eval_dataset=TokenDataset(8, seed=5),
                      callbacks=cbs, compute_metrics=metrics)
    trainer.train()
    best = tmp_path / "run" / "checkpoint-2"
    assert trainer.state.best_model_checkpoint == str(best)
    # the reference, computed without hf_compress' end of training: the best checkpoint's weights with its
    # skipped blocks (the layers run's saved unit masks) passed through
    ref = AutoModelForSequenceClassification.from_pretrained(best)
    layer_units = load_file(best / "hf_compress" / "pruning_layers.safetensors")
    kept = [bool(layer_units[f"units.{i}"].all()) for i in range(n_layers)]
    assert 0 < n_layers - sum(kept) < round(0.5 * n_layers)  # the best checkpoint skipped fewer blocks than the end
    for block, keep in zip(find_blocks(ref)[1], kept):
        set_layer_skip(block, not keep)
    batch = _batch()
    assert model.config.num_hidden_layers == sum(kept)
    torch.testing.assert_close(_logits(model, batch), _logits(ref, batch), rtol=1e-5, atol=1e-5)
    trainer.save_model(str(tmp_path / "out"))
    torch.testing.assert_close(_logits(load_pretrained(tmp_path / "out"), batch), _logits(ref, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["heads", "neurons", "layers"])
def test_converting_a_removed_model_again_keeps_its_recorded_sparsity(granularity):
    """`convert` is idempotent: a second call on the shrunk model (its zeros are gone with the removed units)
    used to record sparsity 0.0 over the first call's measured figure."""
    from hf_compress.pruning import convert, prepare

    model = MODELS["bert"]()
    c = PruningConfig(granularity=granularity, target_sparsity=0.5, method="magnitude",
                      scope="global" if granularity == "layers" else "local")
    prepare(model, c).update(0.5)
    assert convert(model, c)["parameters"] > 0
    first = [dict(r) for r in model.config.hf_compress["pruning"]["runs"]]
    assert first[0]["sparsity"] == pytest.approx(0.5, abs=0.02)
    shape = structure(model)
    again = convert(model, c)
    assert again["parameters"] == 0 and structure(model) == shape
    assert model.config.hf_compress["pruning"]["runs"] == first


@pytest.mark.parametrize("second", ["qat", "best"])
def test_a_refused_run_leaves_no_pending_end_for_the_next_run(second, tmp_path):
    """A run refused at train begin (after a PruningCallback registered its end on the model) used to leave that
    callback pending: the next run's QATCallback ran its end (a bogus second pruning record, sparsity 0.0), or the
    next run's pruning end restored it and failed (no state in the checkpoint). Pending ends belong to their run."""
    from hf_compress import QATCallback, QATConfig

    torch.manual_seed(0)
    model = MODELS["bert"]()

    def heads():
        return PruningCallback(PruningConfig(granularity="heads", target_sparsity=0.5, scope="local", frequency=1,
                                             pruning_start_step=0, pruning_end_step=3))

    def args(out, **kw):
        return TrainingArguments(output_dir=str(tmp_path / out), use_cpu=True, report_to=[], learning_rate=1e-3,
                                 per_device_train_batch_size=8, disable_tqdm=True, seed=0, **kw)

    refused = Trainer(model=model, args=args("r1", num_train_epochs=1, save_strategy="no"), train_dataset=TokenDataset(64),
                      callbacks=[heads(), QATCallback(QATConfig(weight_bits=8, qat_start_step=100))])
    with pytest.raises(ValueError, match="qat_start_step=100"):
        refused.train()
    if second == "qat":
        cbs, kw, ev = [heads(), QATCallback(QATConfig(weight_bits=8))], dict(max_steps=6, save_strategy="no"), None
    else:
        cbs, ev = [heads()], TokenDataset(8, seed=5)
        kw = dict(max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                  load_best_model_at_end=True, metric_for_best_model="loss")
    Trainer(model=model, args=args("r2", **kw), train_dataset=TokenDataset(64), eval_dataset=ev, callbacks=cbs).train()
    runs = model.config.hf_compress["pruning"]["runs"]
    assert len(runs) == 1 and runs[0]["granularity"] == "heads"
    assert runs[0]["sparsity"] == pytest.approx(1 - sum(structure(model)["heads"]) / (4 * 4))
    assert runs[0]["sparsity"] > 0


@pytest.mark.parametrize("order", [("heads", "unstructured"), ("unstructured", "heads")])
def test_unstructured_run_beside_a_heads_run_records_its_own_masks(order, tmp_path):
    """An unstructured run listed after a heads run measured the weights after the heads were removed (their
    zeros gone with them): its recorded sparsity depended on the list order. It now records its masks' figure
    (after a best-model reload, the best checkpoint's), in either order."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = MODELS["bert"]()
    calls = []

    def metrics(_):
        calls.append(1)
        return {"score": 1.0 / len(calls)}  # the first evaluation (step 2) is the best

    cbs = [PruningCallback(PruningConfig(granularity=g, target_sparsity=0.5, scope="local", frequency=1,
                                         pruning_start_step=0, pruning_end_step=6)) for g in order]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=8, learning_rate=1e-3,
                             per_device_train_batch_size=8, disable_tqdm=True, seed=0, eval_strategy="steps",
                             eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="score", greater_is_better=True)
    Trainer(model=model, args=args, train_dataset=TokenDataset(64), eval_dataset=TokenDataset(8, seed=5),
            callbacks=cbs, compute_metrics=metrics).train()
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "hf_compress" / "pruning_unstructured.safetensors")
    masks = [v for k, v in saved.items() if k.startswith("mask.")]
    want = sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0 < want < 0.5  # the best checkpoint's, not the schedule's final 0.5
    runs = {r["granularity"]: r["sparsity"] for r in model.config.hf_compress["pruning"]["runs"]}
    assert runs["unstructured"] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("qat_first", [True, False])
def test_qat_plan_follows_the_blocks_a_layers_run_removes(qat_first, tmp_path):
    """QATCallback names its layers when training starts; a layers run renames the blocks after the ones it removes.
    QAT used to convert by the old names: a block excluded from QAT (qat_exclude) shipped quantised under its new
    index, and with a best-model reload its checkpoint check failed on a block that no longer exists. The plan now
    follows the blocks, and the best checkpoint is checked before anything is removed."""
    from safetensors.torch import load_file

    from hf_compress import QATCallback, QATConfig
    from hf_compress.modules import find_blocks

    torch.manual_seed(0)
    model = MODELS["bert"]()
    blocks = list(find_blocks(model)[1])
    calls = []

    def metrics(_):
        calls.append(1)
        return {"score": 1.0 / len(calls)}  # the first evaluation (step 2) is the best

    layers = PruningCallback(PruningConfig(granularity="layers", target_sparsity=0.5, frequency=1, pruning_start_step=0,
                                           pruning_end_step=6))
    qat = QATCallback(QATConfig(weight_bits=4, group_size=16, qat_exclude=[r"encoder\.layer\.3\."]))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=8, learning_rate=1e-3,
                             per_device_train_batch_size=8, disable_tqdm=True, seed=0, eval_strategy="steps",
                             eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="score", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(64), eval_dataset=TokenDataset(8, seed=5),
                      callbacks=[qat, layers] if qat_first else [layers, qat], compute_metrics=metrics)
    trainer.train()
    best = tmp_path / "run" / "checkpoint-2"
    units = load_file(best / "hf_compress" / "pruning_layers.safetensors")
    kept = [i for i in range(len(blocks)) if bool(units[f"units.{i}"].all())]
    now = list(find_blocks(model)[1])
    assert [blocks.index(b) for b in now] == kept and 3 in kept and len(kept) < len(blocks)
    quantised = model.config.hf_compress["quantization"]["layers"]
    new3 = now.index(blocks[3])
    assert not any(f"encoder.layer.{new3}." in n for n in quantised)  # the excluded block, under its new index
    assert {int(n.split(".")[3]) for n in quantised if ".layer." in n} == set(range(len(now))) - {new3}
    ref = AutoModelForSequenceClassification.from_pretrained(best)  # the best weights, float: block 3 untouched
    torch.testing.assert_close(blocks[3].output.dense.weight, ref.bert.encoder.layer[3].output.dense.weight, rtol=0, atol=0)
    trainer.save_model(str(tmp_path / "out"))
    batch = _batch()
    torch.testing.assert_close(_logits(load_pretrained(tmp_path / "out"), batch), _logits(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("granularity, group, refused", [("neurons", 8, True), ("heads", 16, True), ("heads", 8, False)])
def test_group_wise_qat_with_removed_input_features(granularity, group, refused, tmp_path):
    """Removing pruned neurons / heads takes input features out of the FFN down / attention output projection. With
    group-wise QAT the groups after removal used to hold other weights than QAT trained with: the shipped model was
    not the one evaluated, silently. Refused before the first step unless each unit fills whole groups (a head of
    8 features, groups of 8); then the shipped model computes what the trained one did."""
    from transformers import TrainerCallback

    from hf_compress import QATCallback, QATConfig

    torch.manual_seed(0)
    model = MODELS["bert"]()  # 4 heads of 8 features
    batch = _batch()
    seen = {}

    class Before(TrainerCallback):  # listed first: the model as trained, before any end of training
        def on_train_end(self, args, state, control, **kw):
            seen["logits"] = _logits(model, batch)

    prune = PruningCallback(PruningConfig(granularity=granularity, target_sparsity=0.5, scope="local", frequency=1,
                                          pruning_end_step=3))
    qat = QATCallback(QATConfig(weight_bits=4, group_size=group))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=5,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(48), callbacks=[Before(), qat, prune])
    if refused:
        with pytest.raises(ValueError, match=rf"group_size={group} with pruning_{granularity} .*do not fill whole"):
            trainer.train()
        assert trainer.state.global_step == 0
        return
    trainer.train()
    assert sum(structure(model)["heads"]) == 8
    torch.testing.assert_close(_logits(model, batch), seen["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lowrank_first", [True, False])
def test_lowrank_record_follows_the_blocks_a_layers_run_removes(lowrank_first, tmp_path):
    """LowRankCallback records its factorised layers by name; a layers run renames the blocks after the ones it
    removes. The record kept the old names (listed first: the saved model did not load) or LowRank's end looked up
    a removed block (listed last: AttributeError after training). Both ends now agree, in either order."""
    from hf_compress import LowRankCallback, LowRankConfig
    from hf_compress.lowrank.factorize import is_lowrank
    from hf_compress.modules import find_blocks

    torch.manual_seed(0)
    model = MODELS["bert"]()
    blocks = list(find_blocks(model)[1])
    lowrank = LowRankCallback(LowRankConfig(lowrank_targets=[r"attention\.self\.(query|key)"], lowrank_ranks={
        r"layer\.0\.": 2, r"layer\.1\.": 3, r"layer\.2\.": 5, r"layer\.3\.": 6}))
    layers = PruningCallback(PruningConfig(granularity="layers", target_sparsity=0.5, frequency=1, pruning_start_step=0,
                                           pruning_end_step=4))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=6, learning_rate=1e-3,
                             per_device_train_batch_size=8, disable_tqdm=True, seed=0, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(64),
                      callbacks=[lowrank, layers] if lowrank_first else [layers, lowrank])
    ranks = [b.attention.self.query.rank for b in blocks]  # factorised when the Trainer was built
    trainer.train()
    now = list(find_blocks(model)[1])
    assert len(now) == 2 and [blocks.index(b) for b in now] != [0, 1]  # blocks after a removed one were renamed
    actual = {n: m.rank for n, m in model.named_modules() if is_lowrank(m)}
    recorded = {n: d["rank"] for n, d in model.config.hf_compress["lowrank"]["layers"].items()}
    assert recorded == actual
    assert [actual[f"bert.encoder.layer.{j}.attention.self.query"] for j in range(2)] == [ranks[blocks.index(b)] for b in now]
    trainer.save_model(str(tmp_path / "out"))
    batch = _batch()
    torch.testing.assert_close(_logits(load_pretrained(tmp_path / "out"), batch), _logits(model, batch), rtol=0, atol=0)


def test_heads_removal_beside_a_factorised_ffn(tmp_path):
    """Removing pruned heads also looks for all-zero FFN neurons; an FFN LowRankCallback factorised has no single
    weight to read, and the end of training failed (AttributeError). Factorised groups are left as they are."""
    from hf_compress import LowRankCallback, LowRankConfig

    torch.manual_seed(0)
    model = MODELS["bert"]()
    cbs = [LowRankCallback(LowRankConfig(lowrank_targets=[r"intermediate\.dense|output\.dense$"],
                                         lowrank_exclude=[r"attention"], lowrank_rank_fraction=0.5)),
           PruningCallback(PruningConfig(granularity="heads", target_sparsity=0.5, scope="local", frequency=1,
                                         pruning_end_step=3))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=5, learning_rate=1e-3,
                             per_device_train_batch_size=8, disable_tqdm=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=TokenDataset(48), callbacks=cbs).train()
    assert structure(model)["heads"] == [2, 2, 2, 2]
    model.save_pretrained(tmp_path / "out")
    batch = _batch()
    torch.testing.assert_close(_logits(load_pretrained(tmp_path / "out"), batch), _logits(model, batch), rtol=0, atol=0)
