"""One `HfArgumentParser` for TrainingArguments and every hf_compress config (issue 13).

Field names are unique across the four dataclasses: the module-selection and schedule-window fields
carry the technique's prefix (`pruning_targets`, `pruning_exclude`, `pruning_start_step`,
`pruning_end_step`; `qat_targets`, `qat_exclude`, `qat_start_step`).
"""

import argparse
import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_compress import DistillationConfig, PruningConfig, QATConfig

CONFIGS = (DistillationConfig, PruningConfig, QATConfig)
ALL = (TrainingArguments, *CONFIGS)


def _options(cls) -> set[str]:
    """Every option string HfArgumentParser derives from `cls`: --name, --dashed-name, --no_name (bools True)."""
    out = set()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        out |= {f.name, f.name.replace("_", "-")}
        if f.default is True:
            out |= {f"no_{f.name}", f"no-{f.name.replace('_', '-')}"}
    return out


def test_field_names_unique_across_configs_and_training_arguments():
    # the next field added to any config fails here, not in a user's script
    seen = {}
    for cls in ALL:
        for opt in _options(cls):
            assert opt not in seen, f"--{opt} of {cls.__name__} is also an option of {seen[opt]}: prefix it"
            seen[opt] = cls.__name__


def test_every_help_string_formats_under_argparse():
    # argparse %-formats each help text: a bare '%' (e.g. '70%') crashes `--help`
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help")
            assert text, f"{cls.__name__}.{f.name} has no help"
            parser = argparse.ArgumentParser()
            parser.add_argument("--x", help=text)
            assert "".join(text.split()) in "".join(parser.format_help().split()), f"{cls.__name__}.{f.name}"


def test_one_parser_parses_a_realistic_command_line():
    parser = HfArgumentParser(ALL)
    argv = [
        "--output_dir", "out", "--max_steps", "300", "--learning_rate", "5e-5", "--use_cpu", "true",
        "--temperature", "4", "--alpha", "0.9", "--layer_map", '{"0": 1, "1": 3}',
        "--target_sparsity", "0.6", "--granularity", "heads", "--pruning_targets", r"layer\.[01]\.",
        "--pruning_start_step", "10", "--pruning_end_step", "200", "--no_remove_pruned",
        "--weight_bits", "4", "--group_size", "16", "--qat_targets", "query", "value", "--qat_exclude", "output",
        "--qat_start_step", "250", "--export", "none",
    ]
    targs, dist, prune, qat = parser.parse_args_into_dataclasses(argv)
    assert targs.output_dir == "out" and targs.max_steps == 300 and targs.learning_rate == 5e-5
    # each value lands in its own config, exactly as building the config directly
    assert dist == DistillationConfig(temperature=4.0, alpha=0.9, layer_map={0: 1, 1: 3})
    assert prune == PruningConfig(target_sparsity=0.6, granularity="heads", pruning_targets=[r"layer\.[01]\."],
                                  pruning_start_step=10, pruning_end_step=200, remove_pruned=False)
    assert qat == QATConfig(weight_bits=4, group_size=16, qat_targets=["query", "value"], qat_exclude=["output"],
                            qat_start_step=250, export=None)
    # what is not given keeps the config defaults
    assert parser.parse_args_into_dataclasses(["--output_dir", "o"])[1:] == (DistillationConfig(), PruningConfig(), QATConfig())


def test_help_prints_every_config_option_and_its_help():
    text = HfArgumentParser(ALL).format_help()
    flat = "".join(text.split())
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in text, f.name
            assert "".join(f.metadata["help"].split()) in flat, f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("cls, old, new", [
    (PruningConfig, "targets", "pruning_targets"), (PruningConfig, "exclude", "pruning_exclude"),
    (PruningConfig, "start_step", "pruning_start_step"), (PruningConfig, "end_step", "pruning_end_step"),
    (QATConfig, "targets", "qat_targets"), (QATConfig, "exclude", "qat_exclude"),
    (QATConfig, "start_step", "qat_start_step"),
])
def test_old_field_names_are_refused_with_the_new_name(cls, old, new):
    assert new in {f.name for f in dataclasses.fields(cls)} and old not in {f.name for f in dataclasses.fields(cls)}
    with pytest.raises(TypeError, match=rf"`{old}` is now `{new}`.*{old}= to {new}="):
        cls(**{old: 1})
