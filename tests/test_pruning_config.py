"""Every bad pruning input is a clear ValueError before training starts."""

import pytest
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_compress import PruningCallback, PruningConfig
from hf_compress.pruning import Pruner
from helpers import TokenDataset, tiny_bert


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_sparsity=1.0), r"target_sparsity=1.0 must be a number in \[0, 1\)"),
    (dict(target_sparsity=-0.1), "target_sparsity"),
    (dict(target_sparsity="0.5"), "target_sparsity"),
    (dict(method="random"), "method='random' is unknown"),
    (dict(granularity="blocks"), "granularity='blocks' is unknown"),
    (dict(granularity="n:m", n=4, m=4), "0 < n < m"),
    (dict(granularity="6:4"), "0 < n < m"),
    (dict(granularity="2:4", target_sparsity=0.7), "contradicts n:m=2:4"),
    (dict(scope="per-layer"), "scope"),
    (dict(scope="local", granularity="layers"), "scope='local' does not apply"),
    (dict(schedule="exp"), "schedule='exp' is unknown"),
    (dict(pruning_start_step=10, pruning_end_step=5), "pruning_end_step=5 is before pruning_start_step=10"),
    (dict(pruning_start_step=-1), "pruning_start_step"),
    (dict(frequency=0), "frequency"),
    (dict(method="movement", schedule="one_shot"), "pruning_start_step >= 1"),
    (dict(rewind_step=20, pruning_end_step=10), "rewind_step=20"),
    (dict(granularity="layers", remove_pruned=False), "remove_pruned=True"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


def test_defaults_and_shorthands():
    assert PruningConfig().target_sparsity == 0.5
    c = PruningConfig(granularity="1:4")
    assert (c.granularity, c.n, c.m, c.target_sparsity) == ("n:m", 1, 4, 0.25)
    assert PruningConfig(schedule="one_shot", pruning_start_step=3).resolve_end(10) == 3
    assert PruningConfig(pruning_start_step=0).resolve_end(100) == 70  # the stated default: 70% of the steps


def test_usable_with_hf_argument_parser():
    (cfg,) = HfArgumentParser(PruningConfig).parse_args_into_dataclasses(
        ["--target_sparsity", "0.8", "--granularity", "heads", "--pruning_targets", "layer\\.[01]\\.", "--pruning_end_step", "40"]
    )
    assert cfg.target_sparsity == 0.8 and cfg.granularity == "heads" and cfg.pruning_targets == ["layer\\.[01]\\."]


def _trainer(tmp_path, cfg, steps=10, model=None):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=steps,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True)
    return Trainer(model=model or tiny_bert(), args=args, train_dataset=TokenDataset(16), callbacks=[PruningCallback(cfg)])


@pytest.mark.parametrize("cfg,match", [
    (PruningConfig(pruning_targets=["decoder\\.nothing"]), "matches no Linear module"),
    (PruningConfig(pruning_end_step=50), "end_step=50 is after the last training step"),
    (PruningConfig(granularity="heads", target_sparsity=0.9), "remove 14 of the 16 heads, but at most 12 can go"),
    (PruningConfig(granularity="neurons", scope="local", target_sparsity=0.995), "every layer keeps at least one"),
    (PruningConfig(granularity="layers", target_sparsity=0.9), "the model keeps at least one layer"),
    (PruningConfig(granularity="heads", pruning_targets=["attention\\.self\\.query"]), "cover no complete heads unit"),
])
def test_bad_input_fails_when_the_trainer_is_built(tmp_path, cfg, match):
    # tiny_bert: 4 layers x 4 heads, FFN 64
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, cfg)


def test_a_model_already_converted_is_refused_when_the_trainer_is_built(tmp_path):
    """Fake-quantised layers (QATCallback in the same run) are fine in either order (test_pruning_structured.py);
    layers already converted (here clustered; int8 exports have no Linear left to target) have no float weight to mask."""
    from hf_compress.clustering import ClusteringConfig, prepare

    model = tiny_bert()
    prepare(model, ClusteringConfig(clustering_bits=2))  # the Linears now hold centroids, not free float weights
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True)
    with pytest.raises(ValueError, match="not a plain Linear: it was already converted"):
        Trainer(model=model, args=args, train_dataset=TokenDataset(16), callbacks=[PruningCallback(PruningConfig())])


def test_pruner_rejects_bad_inputs_directly():
    with pytest.raises(ValueError, match="granularity"):
        Pruner(tiny_bert(), granularity="rows")
    with pytest.raises(ValueError, match="method"):
        Pruner(tiny_bert(), method="l0")
    with pytest.raises(ValueError, match="divisible by m=5"):
        Pruner(tiny_bert(), granularity="n:m", n=2, m=5)
