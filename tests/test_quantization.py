"""Quantisation numerics, observers, fake quantisation in place, export backends, PTQ, reload."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from hf_compress import QATConfig, load_pretrained, quantize_model
from hf_compress.quantization import (
    Observer,
    QScheme,
    build_plan,
    commit_observers,
    fake_quant_layers,
    fake_quantize,
    fake_quantize_weight,
    convert,
    insert_fake_quant,
    quantize_weight,
    rebuild_quantized,
    remove_fake_quant,
)
from hf_compress.quantization.numerics import NF4_CODE, dequantize_weight
from hf_compress.quantization.backends import get_backend
from helpers import TokenDataset, tiny_bert, tiny_gpt2

warnings.filterwarnings("ignore", message=".*kernels.*")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def ref_fake_quant(w: np.ndarray, bits: int, symmetric: bool, group: int | None, per_channel: bool = True,
                   weight_range: str = "restricted"):
    """Independent reference: the formula written out row by row, group by group, in float32 numpy.
    Symmetric grids: "restricted" = codes ±(2^(b-1)-1), S = max|r|/qmax; "full" = [-2^(b-1), 2^(b-1)-1],
    S = max|r|/(2^(b-1) - 0.5) (torchao's)."""
    out = np.empty_like(w, dtype=np.float64)
    rows = [w.reshape(-1)] if not per_channel and not group else list(w)
    res = []
    for row in rows:
        chunks = [row] if not group else [row[i:i + group] for i in range(0, len(row), group)]
        qrow = []
        for r in chunks:
            r = r.astype(np.float32)
            lo, hi = min(float(r.min()), 0.0), max(float(r.max()), 0.0)
            if symmetric:
                qmin, qmax = -(2 ** (bits - 1) - (weight_range == "restricted")), 2 ** (bits - 1) - 1
                s = np.float32(max(-lo, hi) / ((qmax - qmin) / 2)) if max(-lo, hi) > 0 else np.float32(1)
                z = np.float32(0)
            else:
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                s = np.float32((np.float32(hi) - np.float32(lo)) / (qmax - qmin)) if hi > lo else np.float32(1)
                z = np.float32(np.clip(qmin - np.rint(np.float32(lo) / s), qmin, qmax))
            q = np.clip(np.rint(r * (np.float32(1) / s)) + z, qmin, qmax)  # r/S via the float32 reciprocal
            qrow.append(((q - z) * s).astype(np.float32))
        res.append(np.concatenate(qrow))
    out = np.stack(res).reshape(w.shape) if per_channel or group else res[0].reshape(w.shape)
    return out


SCHEMES = [
    dict(bits=8, symmetric=True, per_channel=True, group_size=None),
    dict(bits=8, symmetric=False, per_channel=True, group_size=None),
    dict(bits=8, symmetric=True, per_channel=False, group_size=None),
    dict(bits=4, symmetric=True, per_channel=True, group_size=16),
    dict(bits=4, symmetric=True, per_channel=True, group_size=16, weight_range="full"),
    dict(bits=4, symmetric=False, per_channel=True, group_size=16),
    dict(bits=4, symmetric=False, per_channel=False, group_size=None),
]


@pytest.mark.parametrize("kw", SCHEMES, ids=lambda k: f"b{k['bits']}-{'sym' if k['symmetric'] else 'asym'}-"
                         f"{'g' + str(k['group_size']) if k['group_size'] else ('ch' if k['per_channel'] else 'tensor')}"
                         f"{'-' + k['weight_range'] if 'weight_range' in k else ''}")
def test_quantize_dequantize_matches_independent_formula(kw):
    torch.manual_seed(0)
    w = torch.randn(12, 48) * 0.1 + 0.02
    w[3] = w[3].abs()  # a row with only positive values: asymmetric range must still contain 0
    scheme = QScheme(**kw)
    got = fake_quantize_weight(w, scheme)
    ref = ref_fake_quant(w.numpy(), kw["bits"], kw["symmetric"], kw["group_size"], kw["per_channel"],
                         kw.get("weight_range", "restricted"))
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-7)
    # integer storage of the export path dequantises to the same values, codes inside the range
    stored = quantize_weight(w, scheme)
    assert stored["q"].dtype == torch.int8
    assert int(stored["q"].min()) >= scheme.qmin and int(stored["q"].max()) <= scheme.qmax
    assert torch.equal(dequantize_weight(stored), got)


def test_conv1d_axis_is_the_same_grid_transposed():
    torch.manual_seed(0)
    w = torch.randn(16, 24)
    s = QScheme(4, group_size=8)
    assert torch.equal(fake_quantize_weight(w.t().contiguous(), s, axis=1), fake_quantize_weight(w, s).t())


def test_ste_gradient_identity_inside_zero_outside():
    scale, zero = torch.tensor(0.1), torch.tensor(0.0)
    # 8-bit symmetric: representable range ±12.7; values outside get clamped
    x = torch.tensor([-20.0, -12.7, -3.04, 0.0, 0.05, 5.0, 12.7, 12.76, 30.0], requires_grad=True)
    y = fake_quantize(x, scale, zero, -127, 127)
    y.backward(torch.arange(1.0, 10.0))
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)  # 12.76/0.1 rounds to 128 > 127
    assert torch.equal(x.grad, torch.arange(1.0, 10.0) * inside)
    assert torch.allclose(y[[0, 8]], torch.tensor([-12.7, 12.7]))
    # weights: min/max scales clamp nothing, so the gradient is the identity everywhere (also nf4)
    for scheme in (QScheme(8), QScheme(4, symmetric=False, group_size=8), QScheme(4, group_size=32, format="nf4")):
        w = torch.randn(8, 64, requires_grad=True)
        g = torch.randn(8, 64)
        fake_quantize_weight(w, scheme).backward(g)
        assert torch.equal(w.grad, g)


@pytest.mark.parametrize("scheme", [QScheme(8), QScheme(8, symmetric=False), QScheme(4, symmetric=False, group_size=8),
                                    QScheme(8, symmetric=False, per_channel=False), QScheme(4, group_size=32, format="nf4")],
                         ids=["sym8", "asym8", "asym4-g8", "asym8-tensor", "nf4"])
def test_exact_zeros_stay_zero(scheme):
    torch.manual_seed(1)
    w = torch.randn(8, 64) + 0.7  # mostly positive: asymmetric ranges far from symmetric
    w[torch.rand_like(w) < 0.5] = 0.0
    w[2] = 0.0  # a fully pruned channel
    out = fake_quantize_weight(w, scheme)
    assert torch.all(out[w == 0] == 0)
    assert torch.all(out[2] == 0) and torch.isfinite(out).all()


def test_grid_levels_per_channel_and_group():
    torch.manual_seed(0)
    w = torch.randn(6, 512)
    out8 = fake_quantize_weight(w, QScheme(8))
    assert all(row.unique().numel() <= 256 for row in out8)
    out4 = fake_quantize_weight(w, QScheme(4, group_size=64)).reshape(6, 8, 64)
    assert all(g.unique().numel() <= 16 for row in out4 for g in row)


def test_nf4_grid_matches_bitsandbytes():
    bf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    ours = fake_quantize_weight(w, QScheme(4, group_size=64, format="nf4"))
    packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(ours, bf.dequantize_4bit(packed, state))
    assert torch.equal(torch.tensor(NF4_CODE), state.code.cpu())


def test_numerics_in_float32_under_bf16():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    out = fake_quantize_weight(w.bfloat16(), QScheme(8))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fake_quantize_weight(w.bfloat16().float(), QScheme(8)).bfloat16())


# ---------------------------------------------------------------- observers


def test_observers_against_independent_statistics():
    torch.manual_seed(0)
    batches = [torch.randn(4, 10, 8) * (i + 1) for i in range(3)]
    mm, ema, pct = Observer("minmax"), Observer("moving_average", averaging=0.5), Observer("percentile", averaging=0.5, percentile=90)
    assert not mm.ready
    for x in batches:
        for o in (mm, ema, pct):
            o(x)
            o.commit()
    flat = torch.cat([b.reshape(-1) for b in batches])
    assert mm.lo == flat.min() and mm.hi == flat.max()
    lo = hi = None
    plo = phi = None
    for b in batches:
        v = b.reshape(-1)
        lo = v.min() if lo is None else lo + 0.5 * (v.min() - lo)
        hi = v.max() if hi is None else hi + 0.5 * (v.max() - hi)
        q = torch.tensor(np.percentile(v.numpy(), [10, 90]), dtype=torch.float32)
        plo = q[0] if plo is None else plo + 0.5 * (q[0] - plo)
        phi = q[1] if phi is None else phi + 0.5 * (q[1] - phi)
    assert torch.allclose(ema.lo, lo) and torch.allclose(ema.hi, hi)
    assert torch.allclose(pct.lo, plo, atol=1e-5) and torch.allclose(pct.hi, phi, atol=1e-5)
    assert mm.ready and ema.ready and pct.ready
    # several batches before one commit (gradient accumulation) count as one step's min / max
    acc = Observer("moving_average", averaging=0.5)
    acc(batches[0]), acc(batches[1]), acc.commit()
    both = torch.cat([batches[0].reshape(-1), batches[1].reshape(-1)])
    assert acc.lo == both.min() and acc.hi == both.max()


def test_observer_state_round_trip_and_freeze():
    o = Observer("minmax")
    o(torch.tensor([-2.0, 3.0]))
    o.commit()
    fresh = Observer("minmax")
    fresh.load_state({k: v.clone() for k, v in o.state().items()})
    assert fresh.ready and fresh.lo == -2 and fresh.hi == 3
    fresh.observing = False
    fresh(torch.tensor([-50.0, 50.0]))
    fresh.commit()
    assert fresh.lo == -2 and fresh.hi == 3
    # buffers stay out of any state_dict
    assert o.state_dict() == {}


# ---------------------------------------------------------------- fake quantisation in place


def _inputs(n=8, seed=3, length=12):
    d = TokenDataset(n, length=length, seed=seed)
    return {"input_ids": d.ids, "attention_mask": d.mask}


def test_insert_keeps_parameters_and_state_dict_keys_and_matches_manual_forward():
    model = tiny_bert()
    before = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    plan = build_plan(model, {"weight_bits": 4, "group_size": 16, "symmetric": False})
    insert_fake_quant(model, plan)
    assert {n: p for n, p in model.named_parameters()} == before  # the same Parameter objects
    assert list(model.state_dict()) == keys
    layer = model.bert.encoder.layer[1].intermediate.dense
    assert isinstance(layer, nn.Linear) and layer in fake_quant_layers(model).values()
    x = torch.randn(3, 32)
    manual = F.linear(x, torch.tensor(ref_fake_quant(layer.weight.detach().numpy(), 4, False, 16)), layer.bias)
    assert torch.allclose(layer(x), manual, atol=1e-6)
    assert not isinstance(model.classifier, type(layer))  # the head stays float
    remove_fake_quant(model, bake=False)
    assert type(layer) is nn.Linear and torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))


def test_gpt2_conv1d_fake_quant():
    model = tiny_gpt2()
    plan = build_plan(model, {"weight_bits": 8})
    assert "transformer.h.0.attn.c_attn" in plan
    insert_fake_quant(model, plan)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32)
    w = torch.tensor(ref_fake_quant(layer.weight.detach().t().contiguous().numpy(), 8, True, None)).t()
    assert torch.allclose(layer(x), x @ w + layer.bias, atol=1e-5)
    model(input_ids=torch.randint(3, 100, (2, 6)))


def test_autocast_bf16_forward_and_float32_master_gradients():
    model = tiny_bert()
    insert_fake_quant(model, build_plan(model, {"weight_bits": 8, "activation_bits": 8, "observer": "minmax"}))
    layer = model.bert.encoder.layer[0].attention.self.query
    model.train()
    model(**_inputs())
    commit_observers(model)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    obs = layer.input_observer
    s, z = obs.qparams(8, False)
    xq = ref_fq_act(x, s, z)
    wq = fake_quantize_weight(layer.weight.detach(), QScheme(8))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(xq.bfloat16(), wq.bfloat16(), layer.bias.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**_inputs()).logits.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert layer.weight.dtype == torch.float32


def ref_fq_act(x, s, z):
    return (torch.clamp(torch.round(x * (1 / s)) + z, -128, 127) - z) * s


# ---------------------------------------------------------------- export backends


def _qat_model(scheme_kw, export_bits=8):
    model = tiny_bert(hidden=64, ffn=128)
    plan = build_plan(model, scheme_kw)
    insert_fake_quant(model, plan)
    model.eval()
    return model, plan


BACKENDS = [
    # stated tolerances on the logits, relative; measured here: ~9e-4, ~9e-4, ~7e-4, ~5e-4, 0
    ("torch-int8", {"weight_bits": 8}, 5e-3),  # the kernels quantise activations at run time
    ("torch-int8", {"weight_bits": 8, "symmetric": False, "per_channel": False}, 5e-3),
    ("torch-int8", {"weight_bits": 4}, 5e-3),
    ("bnb-int8", {"weight_bits": 8}, 2e-3),  # bitsandbytes' CPU inference casts inputs to fp16
    ("bnb-nf4", {"weight_bits": 4, "weight_format": "nf4", "group_size": 64}, 1e-6),
]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("export,kw,tol", BACKENDS, ids=["int8", "int8-asym-tensor", "int4-in-int8", "bnb-int8", "bnb-nf4"])
def test_export_matches_fake_quant_and_reloads(export, kw, tol, tmp_path):
    if get_backend(export).unavailable():
        pytest.skip(get_backend(export).unavailable())
    model, plan = _qat_model(kw)
    x = _inputs()
    with torch.no_grad():
        fake = model(**x).logits
        float_weights = {n: model.get_submodule(n).weight.detach().clone() for n in plan}
    meta = convert(model, plan=plan, export=export)
    assert meta["backend"] == export and set(meta["layers"]) == set(plan)
    assert not fake_quant_layers(model)
    with torch.no_grad():
        real = model(**x).logits
    assert _rel(real, fake) < tol, _rel(real, fake)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hf_compress"]["quantization"]["backend"] == export
    back = load_pretrained(tmp_path)
    assert type(back.get_submodule(next(iter(plan)))) is type(model.get_submodule(next(iter(plan))))
    with torch.no_grad():
        assert torch.equal(back(**x).logits, real)
    if export == "torch-int8":  # on-disk bytes of the quantised layers vs the same layers in float32
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            q_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                          if any(k.startswith(n + ".") for n in plan))
        f_bytes = sum(w.numel() * 4 + w.shape[0] * 4 for w in float_weights.values())  # weight + bias
        assert f_bytes / q_bytes > 3.5, f_bytes / q_bytes


def test_int8_layer_refreshes_prepacked_weight_after_load():
    from hf_compress.quantization.backends.torch_int8 import Int8Linear

    torch.manual_seed(0)
    a, b = nn.Linear(32, 16), nn.Linear(32, 16)
    qa, qb = Int8Linear.from_float(a, QScheme(8)), Int8Linear.from_float(b, QScheme(8))
    x = torch.randn(4, 32)
    ya = qa(x)
    qa.load_state_dict(qb.state_dict())
    assert torch.equal(qa(x), qb(x)) and not torch.equal(qa(x), ya)
    assert torch.allclose(qa(x), F.linear(x, qb.dequantized_weight(), b.bias), rtol=0, atol=3e-2)


def test_backend_not_runnable_is_a_clear_error(monkeypatch):
    from hf_compress.quantization.backends import bnb

    monkeypatch.setattr(bnb, "_probe", lambda: "bitsandbytes is not importable (test).")
    with pytest.raises(ValueError, match="export.*bitsandbytes is not importable"):
        QATConfig(export="bnb-int8")
    model, plan = _qat_model({"weight_bits": 8})
    with pytest.raises(ValueError, match="cannot run here"):
        convert(model, plan=plan, export="bnb-int8")
    with pytest.raises(ValueError, match="cannot run here"):
        rebuild_quantized(model, {"version": 1, "backend": "bnb-int8", "layers": {}})


def test_rebuild_bad_metadata():
    model = tiny_bert()
    with pytest.raises(ValueError, match="malformed"):
        rebuild_quantized(model, {"backend": "torch-int8"})
    with pytest.raises(ValueError, match="newer hf_compress"):
        rebuild_quantized(model, {"version": 99, "backend": "torch-int8", "layers": {}})
    layer = {"weight": QScheme(8).to_dict(), "act": None, "in_features": 4, "out_features": 4, "bias": True}
    with pytest.raises(ValueError, match="does not exist"):
        rebuild_quantized(model, {"version": 1, "backend": "torch-int8", "layers": {"bert.nothing.here": layer}})
    with pytest.raises(ValueError, match="not a backend"):
        rebuild_quantized(model, {"version": 1, "backend": "onnx", "layers": {}})


# ---------------------------------------------------------------- PTQ


def test_ptq_dynamic_weights_on_grid_and_reload(tmp_path):
    model = tiny_bert()
    ref = tiny_bert()
    quantize_model(model, QATConfig(weight_bits=4, group_size=16))
    for name in build_plan(ref, {}):
        w, w0 = model.get_submodule(name).weight, ref.get_submodule(name).weight
        # the default grid at 4 bits is "full" ([-8, 7], S = max/7.5): BENCHMARKS.md, "int4 weight grid"
        assert torch.equal(w, torch.tensor(ref_fake_quant(w0.detach().numpy(), 4, True, 16, weight_range="full")))
    assert torch.equal(model.classifier.weight, ref.classifier.weight)
    model.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path)
    assert back.config.hf_compress["quantization"]["backend"] is None
    x = _inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(**x).logits, model(**x).logits)


def test_ptq_static_calibrates_ranges_and_reloads(tmp_path):
    model = tiny_bert()
    ds = TokenDataset(32, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    # independent ranges: hooks record the inputs of one layer over the same batches on a float copy
    ref = tiny_bert()  # calibration sees quantised weights and float activations
    insert_fake_quant(ref, build_plan(ref, {}))
    seen = []
    ref.bert.encoder.layer[1].output.dense.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    ref.eval()
    with torch.no_grad():
        for i, b in enumerate(loader):
            if i == 2:
                break
            ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    quantize_model(model, QATConfig(weight_bits=8, activation_bits=8, observer="minmax"), loader, num_batches=2)
    layer = model.bert.encoder.layer[1].output.dense
    obs = layer.input_observer
    assert obs.lo == min(s.min() for s in seen) and obs.hi == max(s.max() for s in seen)
    assert not obs.observing
    meta = model.config.hf_compress["quantization"]
    assert meta["layers"]["bert.encoder.layer.1.output.dense"]["input_quant"] == [float(obs.lo), float(obs.hi)]
    # the layer now quantises its input with the frozen range
    x = torch.randn(5, 64) * 3
    s, z = obs.qparams(8, False)
    assert torch.allclose(layer(x), F.linear(ref_fq_act(x, s, z), layer.weight, layer.bias), atol=1e-6)
    model.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path)
    xi = _inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(**xi).logits, model(**xi).logits)
    assert back.bert.encoder.layer[1].output.dense.input_observer.hi == obs.hi


def test_dynamic_activation_quant_matches_int8_kernel_and_reloads(tmp_path):
    """observer='dynamic' fake-quantises each input with its own range, as the torch-int8 kernel does."""
    model = tiny_bert(hidden=64, ffn=128)
    quantize_model(model, QATConfig(activation_bits=8, observer="dynamic"))  # nothing to calibrate
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert not hasattr(layer, "input_observer") or layer.input_observer is None
    x = torch.randn(6, 64) * 2 + 0.5
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = torch.tensor((hi - lo) / 255)
    z = torch.clamp(-128 - torch.round(torch.tensor(lo) / s), -128, 127)
    want = F.linear(ref_fq_act(x, s, z), layer.weight, layer.bias)
    assert torch.allclose(layer(x), want, atol=1e-6)
    from hf_compress.quantization.backends.torch_int8 import Int8Linear

    real = Int8Linear.from_float(layer, QScheme(8))
    assert _rel(real(x), layer(x)) < 1e-3  # only the kernel's own zero-point nudging differs
    model.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path)
    assert back.config.hf_compress["quantization"]["layers"]["bert.encoder.layer.0.intermediate.dense"]["input_quant"] == "dynamic"
    xi = _inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(**xi).logits, model(**xi).logits)


def test_ptq_export_torch_int8():
    model = tiny_bert(hidden=64, ffn=128)
    fq = tiny_bert(hidden=64, ffn=128)
    insert_fake_quant(fq, build_plan(fq, {}))
    quantize_model(model, QATConfig(export="torch-int8"))
    x = _inputs()
    model.eval(), fq.eval()
    with torch.no_grad():
        assert _rel(model(**x).logits, fq(**x).logits) < 5e-3


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,match", [
    (dict(weight_bits=16), "weight_bits"),
    (dict(weight_bits=1), "weight_bits"),
    (dict(activation_bits=4), "activation_bits"),
    (dict(group_size=0, weight_bits=4), "group_size"),
    (dict(group_size=64), "group_size.*<= 4 bits"),
    (dict(weight_bits=4, weight_format="nf4", group_size=48), "group_size"),
    (dict(weight_format="fp4"), "weight_format"),
    (dict(weight_format="nf4"), "weight_format.*4-bit"),
    (dict(observer="histogram"), "observer"),
    (dict(percentile=40), "percentile"),
    (dict(averaging=0), "averaging"),
    (dict(qat_start_step=-1), "qat_start_step"),
    (dict(qat_start_step=5, freeze_observers_step=5), "freeze_observers_step"),
    (dict(qat_targets=["(unclosed"]), "qat_targets"),
    (dict(layer_bits={"attention": 3.5}), "layer_bits"),
    (dict(layer_bits={"(": 4}), "layer_bits"),
    (dict(layer_bits="attention"), "layer_bits"),
    (dict(export="onnx"), "export"),
    (dict(export="torch-int8", weight_bits=4, group_size=32), "torch-int8.*group"),
    (dict(export="bnb-int8", symmetric=False), "bnb-int8"),
    (dict(export="bnb-int8", weight_bits=4), "bnb-nf4"),
    (dict(export="bnb-nf4", weight_bits=4, weight_format="int", group_size=64), "bnb-nf4"),
])
def test_config_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        QATConfig(**kw)


def test_config_parsing_and_defaults():
    c = QATConfig(export="bnb-nf4", weight_bits=4, layer_bits="attention=8,output.dense=8")
    assert c.weight_format == "nf4" and c.group_size == 64 and c.layer_bits == {"attention": 8, "output.dense": 8}
    assert QATConfig(export="none").export is None
    assert QATConfig(layer_bits='{"query": 4}', group_size=32).layer_bits == {"query": 4}
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(QATConfig).parse_args_into_dataclasses(
        ["--weight_bits", "4", "--group_size", "16", "--qat_targets", "query", "value", "--export", "none"]
    )
    assert parsed.qat_targets == ["query", "value"] and parsed.export is None and parsed.group_size == 16


def test_plan_bad_model_input():
    model = tiny_bert()  # hidden 32, ffn 64
    with pytest.raises(ValueError, match="qat_targets"):
        build_plan(model, QATConfig(qat_targets=["no_such_layer"]))
    with pytest.raises(ValueError, match="group_size.*does not divide.*32"):
        build_plan(model, QATConfig(weight_bits=4, group_size=24))
    with pytest.raises(ValueError, match="calib_dataloader"):
        quantize_model(model, QATConfig(activation_bits=8))
    with pytest.raises(ValueError, match="no batch"):
        quantize_model(model, QATConfig(activation_bits=8), calib_dataloader=[])
    assert not fake_quant_layers(model)


def test_mixed_precision_plan():
    model = tiny_bert()
    plan = build_plan(model, QATConfig(weight_bits=8, layer_bits={r"attention\.self": 4}, group_size=16))
    assert plan["bert.encoder.layer.0.attention.self.query"].weight.bits == 4
    assert plan["bert.encoder.layer.0.attention.self.query"].weight.group_size == 16
    assert plan["bert.encoder.layer.0.intermediate.dense"].weight.bits == 8
    assert plan["bert.encoder.layer.0.intermediate.dense"].weight.group_size is None
