"""Crafted directories (issue 14, "Bad input"): `load_pretrained` and the Auto classes (through the
hf_compress quantizer) refuse each one with a clear error, quickly, before allocating the model — the checks
of hf_compress.storage read config.json and the safetensors headers only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import hf_compress  # noqa: F401
from hf_compress import PruningConfig, QATConfig, load_pretrained, quantize_model
from hf_compress.pruning import Pruner, convert, remove_pruned
from helpers import TokenDataset, tiny_bert


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Refusing directories to craft from: int8 layers; non-uniform heads / FFN widths; sparse int8."""
    root = tmp_path_factory.mktemp("bases")
    quantize_model(tiny_bert(hidden=64, ffn=128), QATConfig(export="torch-int8")).save_pretrained(root / "int8")
    m = tiny_bert(layers=3)
    for kind in ("heads", "neurons"):
        Pruner(m, granularity=kind, scope="global").update(0.5)
    remove_pruned(m)
    m.save_pretrained(root / "heads")
    s = tiny_bert(hidden=64, ffn=128)
    Pruner(s, granularity="unstructured").update(0.5)
    convert(s, PruningConfig(granularity="unstructured", target_sparsity=0.5))
    quantize_model(s, QATConfig(export="torch-int8")).save_pretrained(root / "sparse")
    return root


def _edit_config(d, fn):
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def _move_weights_out(d):
    """The real weights go to a sibling folder (another model's), and `d` keeps only an index."""
    other = d.parent / f"{d.name}-other"
    other.mkdir()
    shutil.move(d / "model.safetensors", other / "model.safetensors")
    return other / "model.safetensors"


def _index(d, target):
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"x": target}}))


def _first(seq):
    return next(iter(seq))


def _heads(cfg, fn):
    cfg["hf_compress"]["pruning"]["heads"] = fn(cfg["hf_compress"]["pruning"]["heads"])


def _truncate(d):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _fake_header(d):
    """A 200-byte file whose header claims a 3.2 GB tensor."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [12_500_000, 64], "data_offsets": [0, 3_200_000_000]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


# case -> (base, craft(d), error regex, the Auto class path applies)
CASES = {
    "index-dotdot-path": ("int8", lambda d: (_move_weights_out(d), _index(d, f"../{d.name}-other/model.safetensors")),
                          r"not a plain name inside the directory", True),
    "index-absolute-path": ("int8", lambda d: _index(d, str(_move_weights_out(d))), r"not a plain name|outside", True),
    "symlink-escapes": ("int8", lambda d: os.symlink(_move_weights_out(d), d / "model.safetensors"),
                        r"symbolic link .* outside", True),
    "named-pipe": ("int8", lambda d: (os.remove(d / "model.safetensors"), os.mkfifo(d / "model.safetensors")),
                   r"not a regular file|no file named model.safetensors", True),  # transformers' own OSError
    "header-past-end-of-file": ("int8", _truncate, r"does not fit the file|exceeds the file", True),
    "header-claims-3GB": ("int8", _fake_header, r"does not fit the file", True),
    "not-a-model-class": ("int8", lambda d: _edit_config(d, lambda c: c.update(architectures=["AutoTokenizer"])),
                          r"not a transformers model class", False),
    "shape-disagrees-with-header": ("int8", lambda d: _edit_config(d, lambda c: c.update(intermediate_size=4096)),
                                    r"records \(in, out\) = \(64, 128\) but the architecture has \(64, 4096\)", True),
    "position-table-disagrees": ("int8", lambda d: _edit_config(d, lambda c: c.update(max_position_embeddings=4096)),
                                 r"do not fit the model config.json describes .*position_embeddings\.weight: file "
                                 r"\[64, 64\], model \[4096, 64\]", True),
    "too-many-layers": ("int8", lambda d: _edit_config(d, lambda c: c.update(num_hidden_layers=100_000)),
                        r"num_hidden_layers=100000, but the weight files hold 4 blocks", False),
    "too-many-labels": ("int8", lambda d: _edit_config(d, lambda c: (c.pop("id2label", None), c.pop("label2id", None),
                                                                     c.update(num_labels=10**9))),
                        r"num_labels=1000000000", False),
    "unknown-quantised-layer": ("int8", lambda d: _edit_config(d, lambda c: c["hf_compress"]["quantization"]["layers"].update(
        {"bert.encoder.layer.9.attention.self.query": _first(c["hf_compress"]["quantization"]["layers"].values())})),
        r"layer\.9\.attention\.self\.query' is not a Linear layer", True),
    "quantised-width-wrong": ("int8", lambda d: _edit_config(d, lambda c: _first(
        c["hf_compress"]["quantization"]["layers"].values()).update(in_features=10**6)),
        r"records \(in, out\) = \(1000000", True),
    "more-heads-than-config": ("heads", lambda d: _edit_config(d, lambda c: _heads(c, lambda h: [64] * len(h))),
                               r"pruning\.heads=.* does not fit the architecture|asks for 64 heads in layer 0, but the "
                               r"config builds only 4", True),  # the Auto path: the surgery's own check, on meta
    "zero-heads": ("heads", lambda d: _edit_config(d, lambda c: _heads(c, lambda h: [0] + h[1:])),
                   r"pruning\.heads must be a list of positive integers", True),
    "unknown-sparse-weight": ("sparse", lambda d: _edit_config(d, lambda c: c["hf_compress"]["storage"]["tensors"].append(
        "bert.encoder.layer.7.output.dense.weight")), r"sparse weight .*layer\.7\.output\.dense\.weight", True),
}


class _Timeout(Exception):
    pass


def _quickly(fn, seconds=60):
    """Run fn with an alarm: a load that blocks (a named pipe) fails the test instead of hanging it."""
    def ring(*_):
        raise _Timeout(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_directory_refused(case, bases, tmp_path):
    base, craft, match, auto = CASES[case]
    d = tmp_path / "crafted"
    shutil.copytree(bases / base, d)
    craft(d)
    with pytest.raises((ValueError, OSError), match=match):
        _quickly(lambda: load_pretrained(d))
    if auto:
        with pytest.raises((ValueError, OSError), match=match):
            _quickly(lambda: AutoModelForSequenceClassification.from_pretrained(d))


def test_hub_cache_layout_still_loads(bases, tmp_path):
    """huggingface_hub's cache links snapshots/<rev>/file to ../../blobs/<hash>: that link is allowed."""
    snap = tmp_path / "models--x--y" / "snapshots" / "abc"
    blobs = tmp_path / "models--x--y" / "blobs"
    shutil.copytree(bases / "int8", snap)
    blobs.mkdir()
    shutil.move(snap / "model.safetensors", blobs / "0123")
    os.symlink("../../blobs/0123", snap / "model.safetensors")
    d = TokenDataset(4, 12, seed=3)
    batch = {"input_ids": d.ids, "attention_mask": d.mask}
    ref = load_pretrained(bases / "int8")
    with torch.no_grad():
        assert torch.equal(load_pretrained(snap)(**batch).logits, ref(**batch).logits)
        assert torch.equal(AutoModelForSequenceClassification.from_pretrained(snap).eval()(**batch).logits,
                           ref(**batch).logits)


MEMORY = textwrap.dedent(r"""
    import json, resource, sys, time
    import hf_compress
    from transformers import AutoModelForSequenceClassification
    out = {}
    for name, fn in (("load_pretrained", hf_compress.load_pretrained),
                     ("auto", AutoModelForSequenceClassification.from_pretrained)):
        t = time.time()
        try:
            fn(sys.argv[1])
            out[name] = "loaded"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[:300]
        out[name + "_s"] = time.time() - t
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT" + json.dumps(out))
""")


def test_config_describing_3GB_stays_small_in_memory(bases, tmp_path):
    """A 250 KB directory whose config.json describes a 3.2 GB embedding (vocab_size 12.5 M): refused from the
    headers, and the process's peak resident memory stays far below what the config describes."""
    d = tmp_path / "crafted"
    shutil.copytree(bases / "int8", d)
    _edit_config(d, lambda c: c.update(vocab_size=12_500_000))
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(d)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    r = json.loads(line[0][len("RESULT"):])
    for name in ("load_pretrained", "auto"):
        assert r[name].startswith("ValueError") and "do not fit the model config.json describes" in r[name], r
        assert "word_embeddings" in r[name] and r[name + "_s"] < 60, r
    assert r["maxrss_mb"] < 1500, r  # the model it describes is 3200 MB
