"""QATConfig.weight_range: the symmetric weight grid [-(2^(b-1)-1), 2^(b-1)-1] ("restricted") vs
[-2^(b-1), 2^(b-1)-1] ("full", torchao's / torch.ao's; "full_no_clip", torchao's no-clipping scale).

Numerics against torch.ao's observers (in torch) and a direct transcription of torchao's formulas, and
against torchao itself when it is importable (the project venv does not install it: with torchao
installed, `import transformers` imports it; run this file with a python that has torchao to compare).
"""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

from hf_compress import QATCallback, QATConfig, load_pretrained, quantize_model
from hf_compress.quantization import LayerPlan, QScheme, build_plan, convert, fake_quantize_weight, insert_fake_quant
from hf_compress.quantization.numerics import WEIGHT_RANGES, dequantize_weight, int_range, quantize_weight, weight_qparams
from helpers import TokenDataset, tiny_bert

warnings.filterwarnings("ignore", message=".*kernels.*")

BITS = (2, 3, 4, 5, 6, 7, 8)


def _weight(out=24, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[0, :7] = 0.0  # exact zeros stay zero
    w[1] = 0.0  # an all-zero channel
    w[2, 3] = -0.4  # a channel whose negative side dominates
    w[3, 5] = 0.4  # ... and one whose positive side does
    return w


def _torchao_formula(w, bits, group, mapping):
    """torchao 0.18 choose_qparams_affine + _fake_quantize_affine (int zero-point domain), written out."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = w.reshape(w.shape[0], -1, group or w.shape[1])
    lo = torch.clamp(rows.amin(-1, keepdim=True), max=0.0)
    hi = torch.clamp(rows.amax(-1, keepdim=True), min=0.0)
    if mapping == "full":  # MappingType.SYMMETRIC
        scale = torch.max(-lo, hi) / (float(qmax - qmin) / 2)
    else:  # MappingType.SYMMETRIC_NO_CLIPPING_ERR
        smin, smax = lo / float(qmin), hi / float(qmax)
        scale = torch.where(smin > smax, smin, smax)
    scale = torch.clamp(scale, min=torch.finfo(torch.float32).eps)  # torch.ao's eps (ours: MIN_SCALE)
    scale = torch.where(hi - lo > 0, scale, torch.ones_like(scale))  # ours: an all-zero group gets S = 1
    q = torch.clamp(torch.round(rows * (1.0 / scale)), qmin, qmax)
    return (q * scale).reshape(w.shape), scale


def test_int_range_is_the_one_home_of_the_range():
    for b in BITS:
        m = 2 ** (b - 1)
        assert int_range(b, True) == int_range(b, True, "restricted") == (-(m - 1), m - 1)
        assert int_range(b, True, "full") == int_range(b, True, "full_no_clip") == (-m, m - 1)
        for r in WEIGHT_RANGES:  # asymmetric grids always use every level
            assert int_range(b, False, r) == (-m, m - 1)
            s = QScheme(b, weight_range=r)
            assert (s.qmin, s.qmax) == int_range(b, True, r)
    assert int_range(4, True, "full") == (-8, 7) and int_range(8, True, "full") == (-128, 127)
    with pytest.raises(ValueError, match="weight_range"):
        int_range(4, True, "wide")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 32, 64], ids=["channel", "g32", "g64"])
@pytest.mark.parametrize("grid", ["full", "full_no_clip"])
def test_full_range_equals_torchao_formula(bits, group, grid):
    w = _weight()
    want, want_scale = _torchao_formula(w, bits, group, grid)
    scheme = QScheme(bits, group_size=group, weight_range=grid)
    assert torch.equal(fake_quantize_weight(w, scheme), want)
    assert torch.equal(weight_qparams(w, scheme)[0].reshape(-1), want_scale.reshape(-1))
    stored = quantize_weight(w, scheme)  # what an export stores decodes to the same weights
    assert torch.equal(dequantize_weight(stored), want)
    assert int(stored["q"].min()) >= -(2 ** (bits - 1)) and int(stored["q"].max()) <= 2 ** (bits - 1) - 1
    assert torch.equal(fake_quantize_weight(w, scheme)[0, :7], torch.zeros(7))
    assert torch.equal(fake_quantize_weight(w, scheme)[1], torch.zeros(w.shape[1]))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 32, 64], ids=["channel", "g32", "g64"])
def test_full_range_equals_torch_ao_observer_and_kernel(bits, group):
    """torch.ao's per-channel symmetric observer over [-2^(b-1), 2^(b-1)-1] gives our scales; its fused
    fake-quant kernel with them gives our weights, per channel and per group (groups as rows)."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    w = _weight()
    w[1] = 0.01  # the all-zero channel is ours alone (torch.ao gives it eps, we give 1): not compared here
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = w.reshape(-1, group) if group else w
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                   quant_min=qmin, quant_max=qmax)
    obs(rows)
    scale, zero = obs.calculate_qparams()
    assert not zero.any()
    scheme = QScheme(bits, group_size=group, weight_range="full")
    assert torch.equal(weight_qparams(w, scheme)[0].reshape(-1), scale.float())
    ref = torch.fake_quantize_per_channel_affine(rows, scale.float(), zero.int(), 0, qmin, qmax).reshape(w.shape)
    assert torch.equal(fake_quantize_weight(w, scheme), ref)


@pytest.mark.parametrize("bits,dtype", [(4, "int4"), (8, "int8"), (2, "int2")])
@pytest.mark.parametrize("group", [None, 32, 64], ids=["channel", "g32", "g64"])
def test_full_range_equals_torchao(bits, dtype, group):
    """torchao's QAT fake quantiser (IntxFakeQuantizer), its PTQ (IntxWeightOnlyConfig) and its
    choose_qparams_affine (SYMMETRIC / SYMMETRIC_NO_CLIPPING_ERR) against ours, bit for bit."""
    pytest.importorskip("torchao", reason="torchao is not installed in this python (see the module docstring)")
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    w = _weight()
    w[1] = 0.01  # torchao gives an all-zero group its eps as scale (same weights, different scale)
    dt = getattr(torch, dtype)
    gran = PerGroup(group) if group else PerAxis(0)
    full = QScheme(bits, group_size=group, weight_range="full")
    assert torch.equal(IntxFakeQuantizer(IntxFakeQuantizeConfig(dt, gran))(w), fake_quantize_weight(w, full))
    for mapping, grid in ((MappingType.SYMMETRIC, "full"), (MappingType.SYMMETRIC_NO_CLIPPING_ERR, "full_no_clip")):
        s, _ = choose_qparams_affine(w, mapping, (1, group or w.shape[1]), dt, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        assert torch.equal(s.reshape(-1), weight_qparams(w, QScheme(bits, group_size=group, weight_range=grid))[0].reshape(-1))
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    quantize_(lin, IntxWeightOnlyConfig(weight_dtype=dt, granularity=gran))
    assert torch.equal(lin.weight.dequantize(), fake_quantize_weight(w, full))


def test_restricted_unchanged_and_full_clips_the_positive_max():
    w = _weight()
    restricted = fake_quantize_weight(w, QScheme(4, group_size=32))
    assert torch.equal(restricted, fake_quantize_weight(w, QScheme(4, group_size=32, weight_range="restricted")))
    g = restricted.reshape(24, -1, 32)
    lo, hi = w.reshape(24, -1, 32).amin(-1), w.reshape(24, -1, 32).amax(-1)
    assert torch.allclose(g.abs().amax(-1), torch.maximum(-lo, hi), rtol=1e-6, atol=0)  # [-7, 7]: ±max kept (to an ulp)
    # [-8, 7] with S = max/7.5: row 3's +0.4 lands on 7.5 → 8 → clipped to 7·S; its STE gradient is 0
    w3 = w.clone().requires_grad_(True)
    out = fake_quantize_weight(w3, QScheme(4, group_size=32, weight_range="full"))
    s = 0.4 / 7.5
    assert out[3, 5].item() == pytest.approx(7 * s, rel=1e-6)
    out.sum().backward()
    assert w3.grad[3, 5] == 0 and (w3.grad == 0).sum() <= 24 * 4  # at most one clipped value per group
    # no_clip: nothing clipped, every gradient 1; a negative-dominated group uses -8
    w4 = w.clone().requires_grad_(True)
    nc = fake_quantize_weight(w4, QScheme(4, group_size=32, weight_range="full_no_clip"))
    nc.sum().backward()
    assert torch.equal(w4.grad, torch.ones_like(w4))
    assert nc[2, 3].item() == pytest.approx(-0.4, rel=1e-6) and nc[3, 5].item() == pytest.approx(0.4, rel=1e-6)
    assert quantize_weight(w, QScheme(4, group_size=32, weight_range="full_no_clip"))["q"][2, 3] == -8


def test_config_field_validation_and_default():
    assert QATConfig().weight_range is None  # default: per layer, see docs/quantization.md, "Which int4 grid"
    assert QScheme(4).weight_range == "restricted"  # records written before the field meant this grid
    with pytest.raises(ValueError, match=r"QATConfig\.weight_range='wide': use one of \('restricted', 'full'"):
        QATConfig(weight_bits=4, weight_range="wide")
    with pytest.raises(ValueError, match=r"bnb-int8.*weight_range='full'.*weight_range='restricted', or export='torch-int8'"):
        QATConfig(weight_bits=8, weight_range="full", export="bnb-int8")
    # asymmetric and NF4 grids ignore it (documented); the plan records it for uniform symmetric layers
    model = tiny_bert()
    plan = build_plan(model, QATConfig(weight_bits=4, group_size=16, weight_range="full"))
    assert all(lp.weight.weight_range == "full" and (lp.weight.qmin, lp.weight.qmax) == (-8, 7) for lp in plan.values())
    asym = build_plan(model, QATConfig(weight_bits=4, symmetric=False, weight_range="restricted"))
    assert all((lp.weight.qmin, lp.weight.qmax) == (-8, 7) for lp in asym.values())
    nf4 = build_plan(model, QATConfig(weight_bits=4, weight_format="nf4", group_size=32, weight_range="full"))
    assert all(lp.weight.format == "nf4" for lp in nf4.values())
    # the default resolves per layer: 'full' ([-8, 7]) where a layer has 4 bits, 'restricted' elsewhere
    mixed = build_plan(model, QATConfig(weight_bits=8, group_size=16, layer_bits={r"\.output\.dense$": 4}))
    grids = {n: (lp.weight.bits, lp.weight.weight_range, lp.weight.qmin, lp.weight.qmax) for n, lp in mixed.items()}
    assert {g for n, g in grids.items() if n.endswith(".output.dense")} == {(4, "full", -8, 7)}
    assert {g for n, g in grids.items() if not n.endswith(".output.dense")} == {(8, "restricted", -127, 127)}
    assert {lp.weight.weight_range for lp in build_plan(model, QATConfig(weight_bits=4, group_size=16)).values()} == {"full"}
    assert {lp.weight.weight_range for lp in build_plan(model, QATConfig(weight_bits=2, group_size=16)).values()} == {"restricted"}
    from hf_compress.quantization.backends import get_backend
    from hf_compress.quantization.plan import scheme_for_bits

    get_backend("bnb-int8").check(scheme_for_bits(8, QATConfig(weight_bits=8)))  # the 8-bit default is bnb-int8's grid
    old = LayerPlan.from_dict({"weight": {"bits": 4, "symmetric": True, "per_channel": True, "group_size": 16,
                                          "format": "int"}, "act": None})
    assert (old.weight.qmin, old.weight.qmax) == (-7, 7)


def _inputs():
    d = TokenDataset(8, length=12, seed=3)
    return {"input_ids": d.ids, "attention_mask": d.mask}


@pytest.mark.parametrize("kw", [dict(weight_bits=4, group_size=32), dict(weight_bits=4), dict(weight_bits=8)],
                         ids=["int4-g32", "int4-channel", "int8"])
def test_ptq_equals_qat_fake_quant_with_full_range(kw):
    model = tiny_bert(hidden=64, ffn=128)
    cfg = QATConfig(**kw, weight_range="full")
    fq = tiny_bert(hidden=64, ffn=128)
    plan = build_plan(fq, cfg)
    want = {n: fake_quantize_weight(fq.get_submodule(n).weight.detach(), lp.weight) for n, lp in plan.items()}
    quantize_model(model, cfg)
    for n, w in want.items():
        assert torch.equal(model.get_submodule(n).weight.detach(), w)


@pytest.mark.parametrize("kw,export", [
    (dict(weight_bits=4, group_size=32), None),
    (dict(weight_bits=8, activation_bits=8, observer="dynamic"), "torch-int8"),
    (dict(weight_bits=4), "torch-int8"),
], ids=["int4-g32-float", "int8-torch-int8", "int4-channel-torch-int8"])
def test_qat_export_reload_with_full_range(tmp_path, kw, export):
    """QAT with weight_range='full' → export → save → load_pretrained: the same logits; the shipped codes
    are on [-2^(b-1), 2^(b-1)-1] and reach its negative end."""
    from hf_compress.quantization.backends import get_backend

    if export and get_backend(export).unavailable():
        pytest.skip(get_backend(export).unavailable())
    bits = kw["weight_bits"]
    cfg = QATConfig(**kw, weight_range="full", export=export)
    model = tiny_bert(seed=0, layers=2, hidden=64, ffn=128)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=4,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True,
                             learning_rate=1e-3, seed=0)
    cb = QATCallback(cfg)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(48, seed=1), callbacks=[cb])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    meta = json.loads((tmp_path / "final" / "config.json").read_text())["hf_compress"]["quantization"]
    assert {d["weight"]["weight_range"] for d in meta["layers"].values()} == {"full"}
    back = load_pretrained(tmp_path / "final")
    model.eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(back(**x).logits, model(**x).logits)
    name = next(iter(cb.plan))
    if export == "torch-int8":
        with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
            codes = torch.cat([f.get_tensor(f"{n}.weight").flatten() for n in cb.plan])
        assert codes.dtype == torch.int8
        assert int(codes.min()) == -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    else:  # float weights on the grid: each group's values are S·k, k in [-8, 7] (largest |value| 8·S or 7·S)
        w = back.get_submodule(name).weight.detach().reshape(-1, 32)
        m = w.abs().amax(-1, keepdim=True)
        for row, top in zip(w, m):
            fits = [(row / (top / d)) for d in (8, 7)]
            assert any(torch.allclose(k, k.round(), atol=1e-4) and k.round().min() >= -8 and k.round().max() <= 7
                       for k in fits)


def test_export_convert_matches_fake_quant_with_full_range():
    """The exported int8 layer's dequantised weight is the fake-quantised weight, for either range."""
    from hf_compress.quantization.backends.torch_int8 import Int8Linear

    lin = torch.nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(_weight(16, 64))
    for bits in (4, 8):
        for grid in WEIGHT_RANGES:
            s = QScheme(bits, weight_range=grid)
            assert torch.equal(Int8Linear.from_float(lin, s).dequantized_weight(), fake_quantize_weight(lin.weight.detach(), s))
    model = tiny_bert(hidden=64, ffn=128)
    plan = build_plan(model, QATConfig(weight_bits=4, weight_range="full"))
    insert_fake_quant(model, plan)
    meta = convert(model, plan=plan, export="torch-int8")
    assert all(d["weight"]["weight_range"] == "full" for d in meta["layers"].values())


@pytest.mark.parametrize("grid", ["restricted", "full"])
def test_static_ptq_kept_layers_do_not_requantise_the_baked_weight(tmp_path, grid):
    """PTQ with activation_bits (export=None) keeps the layers quantising their inputs; their weights are
    baked once: 'full' is not a fixed point of re-quantisation (a group's 8·S becomes the next max)."""
    model = tiny_bert(hidden=64, ffn=128)
    cfg = QATConfig(weight_bits=4, group_size=32, weight_range=grid, activation_bits=8, observer="minmax")
    plan = build_plan(model, cfg)
    want = {n: fake_quantize_weight(model.get_submodule(n).weight.detach(), lp.weight) for n, lp in plan.items()}
    x = _inputs()
    quantize_model(model, cfg, calib_dataloader=[x], num_batches=1)
    for n, w in want.items():
        layer = model.get_submodule(n)
        assert torch.equal(layer.weight.detach(), w) and torch.equal(layer.quantized_weight().detach(), w)
    model.eval()
    with torch.no_grad():
        out = model(**x).logits
    model.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(**x).logits, out)
    changed = fake_quantize_weight(w, plan[n].weight)  # what re-quantising a baked weight would give
    assert torch.equal(changed, w) == (grid == "restricted")


@pytest.mark.parametrize("kw", [dict(weight_bits=4, weight_range="full"), dict(weight_bits=4, weight_range="full_no_clip"),
                                dict(weight_bits=4), dict(weight_bits=4, symmetric=False), dict(weight_bits=8, symmetric=False)],
                         ids=["full", "full_no_clip", "int4-default", "int4-asymmetric", "int8-asymmetric"])
def test_convert_again_keeps_weights_baked_on_a_grid_that_is_not_a_fixed_point(tmp_path, kw):
    """Float weights baked on 'full' (the 4-bit default) move if quantised again (a group's 8·S becomes the next
    max: S' = 8·S/7.5). A second convert, and an export of the reloaded baked model, keep them exactly; a weight
    trained off the grid since is quantised afresh from its float value. Asymmetric grids move as well."""
    model = tiny_bert(hidden=64, ffn=128).eval()
    cfg = QATConfig(**kw)
    quantize_model(model, cfg)
    names = list(build_plan(tiny_bert(hidden=64, ffn=128), cfg))
    baked = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    scheme = build_plan(tiny_bert(hidden=64, ffn=128), cfg)[names[0]].weight
    assert scheme.weight_range == kw.get("weight_range", "full" if kw["weight_bits"] == 4 else "restricted")
    moved = [n for n in names if not torch.equal(fake_quantize_weight(baked[n], scheme), baked[n])]
    assert moved  # re-quantising the baked weights would change them: what the test guards against
    x = _inputs()
    with torch.no_grad():
        ref = model(**x).logits
    convert(model, cfg)  # again, in memory
    assert all(torch.equal(model.get_submodule(n).weight, baked[n]) for n in names)
    quantize_model(model, cfg)  # PTQ again: it fake-quantises the layers before converting them
    assert all(torch.equal(model.get_submodule(n).weight, baked[n]) for n in names)
    model.save_pretrained(tmp_path / "baked")
    again = quantize_model(load_pretrained(tmp_path / "baked").eval(), QATConfig(**kw, export="torch-int8"))
    assert all(torch.equal(again.get_submodule(n).dequantized_weight(), baked[n]) for n in names)
    back = load_pretrained(tmp_path / "baked").eval()
    w1 = back.get_submodule(names[1]).weight.data
    w1[0, 0] = 3 * w1[0].abs().max()  # trained since: off the grid, and its row has a new scale
    fresh = fake_quantize_weight(back.get_submodule(names[1]).weight.detach(), scheme)
    convert(back, QATConfig(**kw, export="torch-int8"))
    for n in names:  # real int8 storage of the same values, bit for bit (the moved one re-quantised from its floats)
        assert torch.equal(back.get_submodule(n).dequantized_weight(), fresh if n == names[1] else baked[n]), n
    with torch.no_grad():
        out = back(**x).logits
    # bake -> save -> load -> export ships what exporting the float model directly ships
    back2 = load_pretrained(tmp_path / "baked").eval()
    convert(back2, QATConfig(**kw, export="torch-int8"))
    direct = quantize_model(tiny_bert(hidden=64, ffn=128).eval(), QATConfig(**kw, export="torch-int8"))
    with torch.no_grad():
        want = direct(**x).logits
        assert torch.equal(back2(**x).logits, want) and not torch.equal(out, want)


def test_convert_again_keeps_baked_codes_of_gpt2_conv1d_layers():
    """GPT-2's Conv1D stores its weight [in, out]: the recovered codes are taken on the [out, in] view, and the
    int8 layers ship exactly the baked values."""
    from hf_compress.cli.models import tiny_gpt2

    model = tiny_gpt2().eval()
    cfg = QATConfig(weight_bits=4)  # the default 4-bit grid, 'full': not a fixed point
    quantize_model(model, cfg)
    names = list(build_plan(tiny_gpt2(), cfg))
    baked = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    assert type(model.get_submodule(names[0])).__name__ == "Conv1D"
    convert(model, cfg)
    assert all(torch.equal(model.get_submodule(n).weight, baked[n]) for n in names)
    convert(model, QATConfig(weight_bits=4, export="torch-int8"))
    for n in names:
        assert torch.equal(model.get_submodule(n).dequantized_weight(), baked[n].t()), n
