"""Every bad input in docs/bad_input.md, one row a case: the error type and the words the user sees.

The docs table and CASES share their ids; `test_docs_table_lists_every_case` keeps them in step.
Cases that need a training run of their own (resume with another config, a cut-short checkpoint)
live in test_resume.py and are listed there in the table.
"""

import re
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_compress import (DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig, QATCallback,
                         QATConfig, load_pretrained)
from helpers import TokenDataset, tiny_bert, tiny_llama

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"


def args(tmp):
    return TrainingArguments(output_dir=str(tmp), use_cpu=True, report_to=[], max_steps=2,
                             per_device_train_batch_size=4, disable_tqdm=True, save_strategy="no")


def kd(tmp, student, teacher, **cfg):
    return DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp),
                               distillation_config=DistillationConfig(**cfg) if cfg else None,
                               train_dataset=TokenDataset(8))


def with_callback(tmp, cb, model=None):
    return Trainer(model=model or tiny_bert(), args=args(tmp), train_dataset=TokenDataset(8), callbacks=[cb])


def nan_teacher(tmp):
    teacher = tiny_bert(seed=1)
    teacher.classifier.register_forward_hook(lambda m, i, o: o * float("nan"))
    kd(tmp, tiny_bert(layers=2), teacher).train()


def recipe(tmp, text):
    from hf_compress.cli.recipes import load_recipe

    (tmp / "r.yaml").write_text(text)
    return load_recipe(tmp / "r.yaml")  # validates every section against its config class


BASE = "model: {name: 'tiny:bert', task: sequence-classification, num_labels: 2}\ndata: {local: sst2}\n"


def data(tmp, rows, **cfg):
    import json

    from hf_compress.cli.data import DataConfig, load_datasets

    (tmp / "d").mkdir()
    for split in ("train", "validation"):
        (tmp / "d" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    from transformers import BertTokenizerFast
    from helpers import minilm_path

    tok = BertTokenizerFast.from_pretrained(minilm_path())
    load_datasets(DataConfig(local=str(tmp / "d"), **cfg), tok, "sequence-classification")


TOY = [{"sentence": w, "label": i % 2} for i, w in enumerate(["good film", "bad plot", "fine actor", "dull scene"] * 4)]


def dry(tmp, text="", rows=None, name="train.jsonl", model="config: {layers: 2}", max_length=24):
    """What `hf-compress run --dry-run` checks: the recipe, then data, folders and meta-device models."""
    import json

    from hf_compress.cli.pipeline import prepare

    folder = tmp / "toy"
    folder.mkdir(exist_ok=True)
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in TOY) + "\n")
    if rows is not None:
        (folder / name).write_text(rows)
    base = (f"output_dir: {tmp / 'run'}\nmodel: {{name: 'tiny:bert', {model}}}\n"
            f"data: {{local: {folder}, text_column: sentence, max_length: {max_length}}}\n")
    r = recipe(tmp, base + text)
    prepare(r)


def in_folder(tmp, sub, text):
    (tmp / "run" / sub).mkdir(parents=True)
    (tmp / "run" / sub / "model.safetensors").write_bytes(b"the user's weights")
    dry(tmp, text)


def own_model(tmp, export):
    m = tiny_bert(layers=2)
    m.save_pretrained(tmp / "mine")
    recipe(tmp, f"model: {{name: {tmp / 'mine'}, tokenizer: char}}\ndata: {{local: x}}\nexport: {{dir: {tmp / 'mine' / export}}}\n")


def read_only(tmp):
    import os

    real = os.access
    os.access = lambda p, mode, **k: False if Path(p) == tmp / "ro" else real(p, mode, **k)
    try:
        (tmp / "ro").mkdir()
        recipe(tmp, BASE + f"output_dir: {tmp / 'ro' / 'out'}\n")
    finally:
        os.access = real


def alias_bomb(tmp):
    from hf_compress.cli.recipes import load_recipe

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (tmp / "bomb.yaml").write_text("\n".join(lines) + "\n" + BASE + "name: *a8\n")
    load_recipe(tmp / "bomb.yaml")


def recipe_folder(tmp):
    from hf_compress.cli.recipes import load_recipe

    load_recipe(tmp)


def missing_data(tmp):
    from hf_compress.cli.data import DataConfig, load_rows

    load_rows(DataConfig(local="no_such_folder"), data_dir=tmp)


def pickle_only(tmp):
    m = tiny_bert()
    m.save_pretrained(tmp)
    (tmp / "model.safetensors").rename(tmp / "pytorch_model.bin")
    load_pretrained(tmp)


CASES = {
    "kd-temperature": (lambda t: DistillationConfig(temperature=0), ValueError, r"`temperature`=0.0 must be > 0"),
    "kd-alpha": (lambda t: DistillationConfig(alpha=1.5), ValueError, r"`alpha`=1.5 must be ≤ 1"),
    "kd-kd_loss": (lambda t: DistillationConfig(kd_loss="kl"), ValueError, r"`kd_loss`='kl': choose one of"),
    "kd-no-teacher": (lambda t: kd(t, tiny_bert(), None), ValueError, r"teacher"),
    "kd-labels": (lambda t: kd(t, tiny_bert(), tiny_bert(num_labels=3)), ValueError, r"label"),
    "kd-vocab": (lambda t: kd(t, tiny_llama(), _resized(tiny_llama(), 64)), ValueError, r"vocab"),
    "kd-hidden-width": (lambda t: kd(t, tiny_bert(), tiny_bert(hidden=48), hidden_loss_weight=1.0, hidden_projection=False),
                        ValueError, r"hidden_projection"),
    "kd-layer-map": (lambda t: kd(t, tiny_bert(layers=2), tiny_bert(), hidden_loss_weight=1.0, layer_map={0: 9}),
                     ValueError, r"layer_map"),
    "kd-attention-heads": (lambda t: kd(t, tiny_bert(heads=2), tiny_bert(), attention_loss_weight=1.0),
                           ValueError, r"head"),
    "kd-nan": (nan_teacher, FloatingPointError, r"step 1.*soft|soft.*step 1"),
    "kd-frozen-student": (lambda t: kd(t, tiny_bert().requires_grad_(False), tiny_bert(seed=1)), ValueError,
                          r"no trainable parameter.*requires_grad_\(True\)"),
    "kd-multi-label": (lambda t: kd(t, _multi_label(tiny_bert()), tiny_bert(seed=1)), ValueError,
                       r"problem_type='multi_label_classification'.*softmax.*single-label"),
    "prune-sparsity": (lambda t: PruningConfig(target_sparsity=1.0), ValueError, r"target_sparsity"),
    "prune-method": (lambda t: PruningConfig(method="random"), ValueError, r"method"),
    "prune-granularity": (lambda t: PruningConfig(granularity="rows"), ValueError, r"granularity"),
    "prune-n-m": (lambda t: PruningConfig(granularity="n:m", n=4, m=4), ValueError, r"\bn\b.*\bm\b"),
    "prune-steps": (lambda t: PruningConfig(pruning_start_step=10, pruning_end_step=5), ValueError, r"end_step"),
    "prune-no-target": (lambda t: with_callback(t, PruningCallback(PruningConfig(pruning_targets=["nothing_here"]))),
                        ValueError, r"`pruning_targets`.*matches no Linear"),
    "prune-too-many-units": (lambda t: with_callback(t, PruningCallback(PruningConfig(granularity="layers", target_sparsity=0.9))),
                             ValueError, r"layer"),
    "prune-architecture": (lambda t: with_callback(t, PruningCallback(PruningConfig(granularity="heads")),
                                                   model=_t5()),
                           ValueError, r"not supported|unsupported|support"),
    "prune-frozen": (lambda t: with_callback(t, PruningCallback(PruningConfig(method="taylor", pruning_start_step=1)), model=_lora()),
                     ValueError, r"method='taylor'.*frozen.*method='magnitude'"),
    "prune-structured-peft": (lambda t: with_callback(t, PruningCallback(PruningConfig(granularity="heads", target_sparsity=0.5)),
                                                      model=_lora()), ValueError, r"granularity.*PEFT.*merge_and_unload"),
    "qat-bits": (lambda t: QATConfig(weight_bits=16), ValueError, r"weight_bits"),
    "qat-export": (lambda t: QATConfig(export="onnx"), ValueError, r"export"),
    "qat-observer": (lambda t: QATConfig(activation_bits=8, observer="histogram"), ValueError, r"observer"),
    "qat-no-target": (lambda t: with_callback(t, QATCallback(QATConfig(qat_targets=["nothing_here"]))),
                      ValueError, r"`qat_targets`.*matches no Linear"),
    "config-renamed-field": (lambda t: PruningConfig(targets=["query"]), TypeError,
                             r"`targets` is now `pruning_targets`.*targets= to pruning_targets="),
    "recipe-renamed-field": (lambda t: recipe(t, BASE + "quantization: {start_step: 100}\n"), ValueError,
                             r"`quantization.start_step` is now `quantization.qat_start_step`"),
    "recipe-unknown-key": (lambda t: recipe(t, BASE + "trainig: {max_steps: 3}\n"), ValueError, r"trainig.*training"),
    "recipe-unknown-field": (lambda t: recipe(t, BASE + "pruning: {target_sparsty: 0.5}\n"), ValueError,
                             r"target_sparsty.*target_sparsity"),
    "data-missing": (lambda t: missing_data(t), FileNotFoundError, r"data_dir=DIR"),
    "data-columns": (lambda t: data(t, [{"sentence": "good", "label": 1}] * 4), ValueError, r"text_column"),
    "load-pickle": (pickle_only, FileNotFoundError, r"safetensors only"),
    "recipe-type": (lambda t: recipe(t, BASE + "seed: abc\n"), ValueError, r"`seed`='abc' must be an integer"),
    "recipe-duplicate-key": (lambda t: recipe(t, BASE + "seed: 1\nseed: 2\n"), ValueError, r"line 4: duplicate key `seed`"),
    "recipe-alias-bomb": (alias_bomb, ValueError, r"expands to more than"),
    "recipe-folder": (recipe_folder, ValueError, r"is a folder"),
    "output-dir-file": (lambda t: recipe(t, BASE + f"output_dir: {t / 'r.yaml'}\n"), ValueError, r"output_dir .* is a file"),
    "output-dir-under-file": (lambda t: recipe(t, BASE + f"output_dir: {t / 'r.yaml' / 'x'}\n"), ValueError, r"which is a file"),
    "output-dir-read-only": (read_only, ValueError, r"read-only"),
    "export-over-model": (lambda t: own_model(t, "compressed"), ValueError, r"would overwrite model.name's folder"),
    "teacher-train-resume": (lambda t: recipe(t, BASE + "teacher: {train: {resume_from_checkpoint: x}}\n"), ValueError,
                             r"teacher.train.resume_from_checkpoint"),
    "teacher-folder-foreign": (lambda t: in_folder(t, "teacher", "teacher: {train: {max_steps: 1}}\n"), ValueError,
                               r"teacher folder .* holds files hf-compress did not write \(model.safetensors"),
    "export-foreign-files": (lambda t: in_folder(t, "model", ""), ValueError, r"export.dir .* holds files hf-compress did not write"),
    "data-bad-line": (lambda t: dry(t, rows='{"sentence": "a", "label": 1}\n{"sentence": \n'), ValueError,
                      r"train.jsonl line 2: not valid JSON"),
    "data-label-negative": (lambda t: dry(t, rows='{"sentence": "a", "label": 1}\n{"sentence": "b", "label": -1}\n'),
                            ValueError, r"train.jsonl row 2: label -1 is negative"),
    "data-label-missing": (lambda t: dry(t, rows='{"sentence": "a", "label": 1}\n{"sentence": "b"}\n'), ValueError,
                           r"train.jsonl row 2 has no label"),
    "data-num-labels-one": (lambda t: dry(t, model="num_labels: 1"), ValueError, r"num_labels=1 \(one output"),
    "data-label-range": (lambda t: dry(t, model="num_labels: 2", rows='{"sentence": "a", "label": 5}\n'), ValueError,
                         r"train.jsonl row 1: label 5 is out of range for model.num_labels=2"),
    "dry-max-length": (lambda t: dry(t, max_length=128), ValueError, r"max_length=128 exceeds the 64 positions"),
    "dry-student-layers": (lambda t: dry(t, "student: [0, 5]\n"), ValueError, r"index 5 is out of range"),
    "dry-nm-divisible": (lambda t: dry(t, "pruning: {granularity: 'n:m', n: 2, m: 5}\n"), ValueError, r"divisible by m=5"),
    "dry-group-size": (lambda t: dry(t, "quantization: {weight_bits: 4, group_size: 24}\n"), ValueError, r"group_size`=24 does not divide"),
    "dry-layer-bits": (lambda t: dry(t, "quantization: {layer_bits: {nomatch: 4}}\n"), ValueError, r"pattern 'nomatch' matches no Linear"),
    "dry-model-config-key": (lambda t: dry(t, model="config: {layers: 2, layerz: 3}"), ValueError, r"`model.config.layerz`"),
}


def _multi_label(model):
    model.config.problem_type = "multi_label_classification"
    return model


def _resized(model, vocab):
    model.resize_token_embeddings(vocab)
    return model


def _lora():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))


def _t5():
    from transformers import T5Config, T5ForSequenceClassification

    return T5ForSequenceClassification(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                decoder_start_token_id=0, pad_token_id=0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path):
    fn, exc, pattern = CASES[case]
    with pytest.raises(exc) as err:
        fn(tmp_path)
    assert re.search(pattern, str(err.value), re.S), str(err.value)


def test_docs_table_lists_every_case():
    rows = re.findall(r"^\| `([\w-]+)` \|", DOC.read_text(), re.M)
    assert set(rows) - {"resume-config", "resume-cut-short"} == set(CASES)
