"""int4 ONNX export (issue 16): weight-only <= 4-bit layers become ONNX Runtime's com.microsoft MatMulNBits
carrying our integer codes and scales (no re-quantisation), for tiny BERT and a tiny Llama decoder (no past key
values), both symmetric grids ('restricted' [-7, 7], 'full' [-8, 7]), group-wise and per channel.

Tolerances, and why:
* accuracy_level=0: MatMulNBits dequantises our codes exactly ((u - 8) · S in float32: checked bit for bit by
  running one node on an identity input) and multiplies in float32; only the order of the float32 sums
  differs from PyTorch: max |ORT - torch| <= 1e-5 · (1 + max |y|), the float-model bound of tests/test_onnx.py.
* accuracy_level=4: the kernel quantises each block (block_size input features of one row) of its input to
  symmetric int8 with scale max|x| / 127, which the PyTorch model does not do. The difference is of the size
  of that rounding: "input noise" = max |torch int4 model - the same with its linear inputs rounded that way
  (the export copy run in PyTorch)|; asserted max |ORT - torch| <= 3 · noise + 1e-5, and ORT within the same
  bound of the export copy (which rounds as the kernel does, up to float32 ties).
"""

from __future__ import annotations

import copy
import inspect
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from hf_compress import QATConfig, load_pretrained, quantize_model  # noqa: E402
from hf_compress.modules import out_axis  # noqa: E402
from hf_compress.onnx import check_exportable, export_onnx, onnx_ready_copy, ort_session  # noqa: E402
from hf_compress.quantization import fake_quantize_weight, is_fake_quant, prepare  # noqa: E402
from helpers import TokenDataset, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402
from test_onnx import _ort, _torch  # noqa: E402  # PyTorch / ONNX Runtime logits of a batch: one home

MSFT = "com.microsoft"


# ---------------------------------------------------------------- helpers


def _inputs(model, n=5, length=11, seed=7):
    d = TokenDataset(n, length, seed=seed)
    batch = {"input_ids": d.ids, "attention_mask": d.mask}
    if "token_type_ids" in inspect.signature(model.forward).parameters and getattr(model.config, "type_vocab_size", 0):
        batch["token_type_ids"] = torch.zeros_like(d.ids)
    return batch


def _graph(out):
    g = onnx.load(str(out / "model.onnx"))
    return g, {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}


def _nbits_nodes(graph):
    return [n for n in graph.graph.node if n.op_type == "MatMulNBits" and n.domain == MSFT]


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def unpack_nbits(node, inits) -> np.ndarray:
    """The float32 [N, K] weights a MatMulNBits node dequantises, written out from the op's specification
    (independently of hf_compress): 4-bit codes, low nibble first, (u - zero point) · scale per block."""
    a = _attrs(node)
    assert a["bits"] == 4
    n_out, k, block = a["N"], a["K"], a["block_size"]
    packed = inits[node.input[1]]
    n_blocks = -(-k // block)
    assert packed.dtype == np.uint8 and packed.shape == (n_out, n_blocks, block // 2)
    codes = np.empty((n_out, n_blocks, block), np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    scales = inits[node.input[2]]
    assert scales.dtype == np.float32 and scales.shape == (n_out, n_blocks)
    if len(node.input) > 3 and node.input[3]:
        zp_packed = inits[node.input[3]]
        zp = np.empty((n_out, zp_packed.shape[1] * 2), np.uint8)
        zp[:, 0::2], zp[:, 1::2] = zp_packed & 0x0F, zp_packed >> 4
        zp = zp[:, :n_blocks]
    else:
        zp = np.full((n_out, n_blocks), 8, np.uint8)  # the op's default zero point for 4 bits
    w = (codes.astype(np.float32) - zp[..., None].astype(np.float32)) * scales[..., None]
    return w.reshape(n_out, -1)[:, :k]


def _layer_of(node, model):
    """The model layer a MatMulNBits node stands for (its B initializer is named after the module)."""
    name = node.input[1]
    for prefix in ("model.",):
        name = name[len(prefix):] if name.startswith(prefix) else name
    assert name.endswith(".B"), node.input[1]
    return name[:-2]


def _our_weights(model) -> dict[str, torch.Tensor]:
    """[out, in] weights the PyTorch model computes with, of every <= 4-bit layer: fake-quantised (QAT running)
    or baked on the grid (converted / PTQ / reloaded)."""
    meta = model.config.hf_compress.get("quantization", {}).get("layers", {}) if getattr(model.config, "hf_compress", None) else {}
    out = {}
    for name, m in model.named_modules():
        if is_fake_quant(m):
            w = fake_quantize_weight(m.weight.detach(), m.hfc_plan.weight, out_axis(m))
        elif name in meta and meta[name]["weight"]["bits"] <= 4:
            w = m.weight.detach()
        else:
            continue
        out[name] = (w.t() if out_axis(m) == 1 else w).float()
    return out


def _check_weights_exact(model, out):
    graph, inits = _graph(out)
    nodes = _nbits_nodes(graph)
    ours = _our_weights(model)
    assert nodes and len(nodes) == len(ours)
    for node in nodes:
        name = _layer_of(node, model)
        got = unpack_nbits(node, inits)
        assert got.shape == tuple(ours[name].shape)
        assert np.array_equal(got, ours[name].numpy()), name  # bit for bit (== on values)
    return nodes, inits


def _noise(model, batch, level, int4="matmulnbits"):
    """max |torch - the export copy in torch| (level 4: inputs rounded to int8 per block as the kernel does;
    int8-gemm: inputs quantised per tensor as DynamicQuantizeLinear does)."""
    graph, _ = onnx_ready_copy(model, int4=int4, accuracy_level=level)
    return (_torch(model, batch) - _torch(graph, batch)).abs().max().item(), graph


def _check_agrees(model, out, level, batch=None):
    batch = batch or _inputs(model)
    ref, got = _torch(model, batch), _ort(out, batch)
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    noise, graph = _noise(model, batch, level)
    same_graph = (got - _torch(graph, batch)).abs().max().item()
    print(f"[onnx-int4] level {level}: max|ORT - torch| {diff:.3g}, input noise {noise:.3g}, "
          f"max|ORT - export copy| {same_graph:.3g} (max|logit| {scale:.3g})")
    if level == 0:
        assert diff <= 1e-5 * (1 + scale), diff
        assert same_graph <= 1e-5 * (1 + scale), same_graph
    else:
        assert noise > 0  # the int8 rounding of the inputs is there
        assert diff <= 3 * noise + 1e-5, (diff, noise)
        # the export copy rounds the inputs as the kernel does: ORT agrees with it far better than with torch
        assert same_graph <= 0.1 * noise + 1e-5 * (1 + scale), (same_graph, noise)
    return diff, noise


def _int4_config(grid, granularity, **kw):
    group = {"group": 32, "channel": None}[granularity]
    return QATConfig(weight_bits=4, group_size=group, weight_range=grid, **kw)


# ---------------------------------------------------------------- BERT: both grids, group-wise and per channel


@pytest.mark.parametrize("granularity", ["group", "channel"])
@pytest.mark.parametrize("grid", ["restricted", "full"])
def test_bert_int4_exact_weights_and_agreement(grid, granularity, tmp_path):
    model = quantize_model(tiny_bert(layers=2, hidden=64, ffn=128), _int4_config(grid, granularity)).eval()
    for level in (0, 4):
        out = tmp_path / f"l{level}"
        info = export_onnx(model, out, accuracy_level=level)
        assert info["layers"]["int4_matmulnbits"] == 12 and info["int4"]["matmulnbits"]["accuracy_level"] == level
        nodes, _ = _check_weights_exact(model, out)
        attrs = [_attrs(n) for n in nodes]
        assert {a["accuracy_level"] for a in attrs} == {level}
        assert {a["block_size"] for a in attrs} == ({32} if granularity == "group" else {64, 128})  # K = 64, 128
        graph, inits = _graph(out)
        ops = [n.op_type for n in graph.graph.node]
        assert "MatMul" not in ops or ops.count("MatMul") <= 4  # attention score matmuls only, no float linears
        if grid == "full":  # the full grid reaches code -8 (u = 0)
            assert any((inits[n.input[1]] & 0x0F).min() == 0 for n in nodes)
        _check_agrees(model, out, level)


def test_ort_dequantises_our_codes_exactly(tmp_path):
    """ONNX Runtime's own kernel (level 0), on an identity input, returns our weights bit for bit."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = quantize_model(tiny_bert(layers=1, hidden=64, ffn=128), _int4_config("full", "group")).eval()
    export_onnx(model, tmp_path / "out", accuracy_level=0)
    graph, inits = _graph(tmp_path / "out")
    ours = _our_weights(model)
    for node in _nbits_nodes(graph):
        a = _attrs(node)
        k, n_out = a["K"], a["N"]
        used = [i for i in node.input[1:5] if i]
        one = helper.make_node("MatMulNBits", ["A", *node.input[1:4]], ["Y"], domain=MSFT,
                               K=k, N=n_out, bits=4, block_size=a["block_size"], accuracy_level=0)
        g = helper.make_graph([one], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n_out])],
                              [numpy_helper.from_array(inits[i], i) for i in used])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MSFT, 1)])
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0]
        assert np.array_equal(y.T, ours[_layer_of(node, model)].numpy())


def test_int4_linears_at_least_6x_smaller(tmp_path):
    model = quantize_model(tiny_bert(layers=2, hidden=64, ffn=128), _int4_config("restricted", "group")).eval()
    export_onnx(model, tmp_path / "int4")
    export_onnx(model, tmp_path / "float", int4="float")
    graph, inits = _graph(tmp_path / "int4")
    fp32 = packed = 0
    for node in _nbits_nodes(graph):
        a = _attrs(node)
        fp32 += 4 * a["K"] * a["N"]
        packed += sum(inits[i].nbytes for i in node.input[1:4] if i)
    print(f"[onnx-int4] linears: fp32 {fp32} B, int4 {packed} B ({fp32 / packed:.2f}x smaller)")
    assert fp32 / packed >= 6  # group 32: 4 / (0.5 + 4 / 32) = 6.4
    # and the file: int='float' writes the same layers as float MatMul / Gemm, without MatMulNBits
    fgraph, _ = _graph(tmp_path / "float")
    assert not _nbits_nodes(fgraph)
    size = {d: (tmp_path / d / "model.onnx").stat().st_size for d in ("int4", "float")}
    assert size["float"] - size["int4"] >= 0.8 * (fp32 - packed)


# ---------------------------------------------------------------- Llama decoder, QAT mid-run, asymmetric, GPT-2


@pytest.mark.parametrize("grid,granularity", [("full", "group"), ("restricted", "channel")])
def test_llama_int4_without_past_key_values(grid, granularity, tmp_path):
    model = quantize_model(tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128), _int4_config(grid, granularity))
    model.save_pretrained(tmp_path / "saved")
    info = export_onnx(tmp_path / "saved", tmp_path / "out", accuracy_level=0)  # from the directory
    model = load_pretrained(tmp_path / "saved").eval()
    assert info["past_key_values"] is False and info["layers"]["int4_matmulnbits"] == 14
    assert [o.name for o in ort_session(tmp_path / "out").get_outputs()] == ["logits"]
    _check_weights_exact(model, tmp_path / "out")
    _check_agrees(model, tmp_path / "out", 0)
    export_onnx(model, tmp_path / "out4", accuracy_level=4)
    _check_agrees(model, tmp_path / "out4", 4)


def test_qat_running_asymmetric_padding_and_gpt2(tmp_path):
    # QAT still fake-quantising (not converted): codes and scales straight from quantize_weight; asymmetric grid
    # (packed zero points); per channel with K = 48 and 96 (blocks 64 and 128: padded)
    for name, model, cfg in (
        ("qat", tiny_bert(layers=2, hidden=64, ffn=128), QATConfig(weight_bits=4, group_size=16)),
        ("asym", tiny_bert(layers=2, hidden=48, ffn=96), QATConfig(weight_bits=4, symmetric=False)),
        ("asym-group", tiny_llama(layers=1, hidden=64, ffn=128), QATConfig(weight_bits=4, group_size=32, symmetric=False)),
        ("gpt2", tiny_gpt2(layers=2, hidden=64), QATConfig(weight_bits=4, group_size=32, weight_range="full")),
        ("3bit", tiny_bert(layers=1, hidden=64, ffn=128), QATConfig(weight_bits=3, group_size=64)),
    ):
        if name == "qat":
            prepare(model, cfg)
            with torch.no_grad():  # a few "training" updates off the initial grid
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        else:
            quantize_model(model, cfg)
        model.eval()
        info = export_onnx(model, tmp_path / name, accuracy_level=0)
        assert info["layers"]["int4_matmulnbits"] > 0, name
        nodes, inits = _check_weights_exact(model, tmp_path / name)
        if name.startswith("asym"):
            assert all(len(n.input) > 3 and n.input[3] for n in nodes)  # zero points carried
        else:
            assert all(len(n.input) <= 3 or not n.input[3] for n in nodes)  # the default zero point 8
        if name == "asym":
            assert {_attrs(n)["block_size"] for n in nodes} == {64, 128}
        _check_agrees(model, tmp_path / name, 0)


def test_cli_export_writes_matmulnbits(tmp_path, capsys):
    from hf_compress.cli import main

    model = quantize_model(tiny_bert(layers=2, hidden=64, ffn=128), _int4_config("full", "group"))
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--onnx", str(tmp_path / "onnx")]) == 0
    info = json.loads((tmp_path / "onnx" / "onnx_export.json").read_text())
    assert info["layers"]["int4_matmulnbits"] == 12 and info["int4"]["matmulnbits"]["op"] == "com.microsoft.MatMulNBits"
    model = load_pretrained(tmp_path / "model")
    _check_weights_exact(model, tmp_path / "onnx")


def test_cli_int4_and_accuracy_level_options(tmp_path):
    """`hf-compress export --int4 int8-gemm` writes the int8-GEMM form (as export_onnx(int4='int8-gemm')); a bad
    --accuracy-level is refused by the parser before anything is written."""
    from hf_compress.cli import main

    model = quantize_model(tiny_bert(layers=2, hidden=64, ffn=128), _int4_config("restricted", "channel"))
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--onnx", str(tmp_path / "gemm"), "--int4", "int8-gemm"]) == 0
    layers = json.loads((tmp_path / "gemm" / "onnx_export.json").read_text())["layers"]
    assert layers["int4_int8_gemm"] == 12 and layers.get("int4_matmulnbits", 0) == 0
    assert main(["export", str(tmp_path / "model"), "--onnx", str(tmp_path / "nbits"), "--accuracy-level", "4"]) == 0
    assert json.loads((tmp_path / "nbits" / "onnx_export.json").read_text())["layers"]["int4_matmulnbits"] == 12
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "model"), "--onnx", str(tmp_path / "bad"), "--accuracy-level", "2"])
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- int8-gemm: per-channel codes for ORT's int8 GEMM


def unpack_int4_t(node_inputs, inits, k) -> np.ndarray:
    """int8 codes [K, N] from the packed uint8 [ceil(K/2), N] initializer, written out independently: u - 8, input
    feature i < ceil(K/2) in the low nibble of row i, feature i + ceil(K/2) in the high nibble."""
    packed = inits[node_inputs]
    assert packed.dtype == np.uint8
    u = np.concatenate([packed & 0x0F, packed >> 4], 0)[:k]
    return u.astype(np.int16) - 8


def _float_activations(model):
    """The same weights with float inputs: Int8Linear (4-bit codes) -> nn.Linear of its dequantised weight."""
    from hf_compress.quantization.backends.torch_int8 import Int8Linear

    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, Int8Linear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child, lin)
    return m


@pytest.mark.parametrize("source", ["weight-only", "torch-int8"])
def test_int8_gemm_packed_codes(source, tmp_path):
    """Per-channel 4-bit layers as packed codes that ONNX Runtime unpacks at load for its int8 GEMM: the file holds
    our codes (checked independently) and scales, ORT fuses the pattern into its int8 kernel, the linears are
    >= 6x smaller than fp32, and ORT agrees with PyTorch within the activation-quantisation noise."""
    import onnxruntime as ort

    model = tiny_bert(layers=2, hidden=256, heads=4, ffn=512)  # packed weights above onnxscript's folding size
    if source == "torch-int8":  # QAT / PTQ for exactly these numerics: fbgemm's dynamic int8 with 4-bit codes
        cfg = QATConfig(weight_bits=4, activation_bits=8, observer="dynamic", export="torch-int8")
    else:
        cfg = QATConfig(weight_bits=4, weight_range="full", symmetric=False)
    quantize_model(model, cfg).eval()
    info = export_onnx(model, tmp_path / "out", int4="int8-gemm")
    assert info["layers"]["int4_int8_gemm"] == 12 and info["layers"]["int8_linear"] == 0
    graph, inits = _graph(tmp_path / "out")
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulInteger") == 12 and ops.count("BitShift") == 12 and not _nbits_nodes(graph)
    # our codes and scales, per layer (the packed initializer is named after the module)
    from hf_compress.onnx import int4_storage
    from hf_compress.quantization.backends.torch_int8 import Int8Linear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear) or n in _our_weights(model)}
    meta = model.config.hf_compress["quantization"]["layers"]
    fp32 = packed = 0
    for name, m in layers.items():
        if isinstance(m, Int8Linear):
            codes, scale = m.weight.numpy(), m.weight_scale.numpy()
        else:
            from hf_compress.quantization import QScheme

            st = int4_storage(m, QScheme(**meta[name]["weight"]))
            codes, scale = st["q"].numpy(), st["scale"][:, 0].numpy()
        p = f"model.{name}.packed"
        assert np.array_equal(unpack_int4_t(p, inits, codes.shape[1]), codes.T.astype(np.int16)), name
        assert np.array_equal(inits[f"model.{name}.scale"], scale)
        fp32 += codes.size * 4
        packed += inits[p].nbytes + scale.nbytes + codes.shape[0]  # + one int8 zero point per channel
    assert fp32 / packed >= 6, fp32 / packed
    # ONNX Runtime folds the unpacking at load and fuses the int8 kernel
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert "BitShift" not in fused and sum(f in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat") for f in fused) == 12
    # agreement: within the noise of quantising the inputs per tensor at run time
    batch = _inputs(model)
    ref, got = _torch(model, batch), _ort(tmp_path / "out", batch)
    diff = (got - ref).abs().max().item()
    if source == "torch-int8":  # PyTorch quantises inputs too (fbgemm): noise = vs float inputs
        noise = (ref - _torch(_float_activations(model), batch)).abs().max().item()
    else:
        noise, _ = _noise(model, batch, 0, int4="int8-gemm")
    graph_copy, _ = onnx_ready_copy(model, int4="int8-gemm")
    same_graph = (got - _torch(graph_copy, batch)).abs().max().item()
    print(f"[onnx-int4] int8-gemm {source}: max|ORT - torch| {diff:.3g}, activation noise {noise:.3g}, "
          f"max|ORT - export copy| {same_graph:.3g}, linears {fp32 / packed:.2f}x smaller")
    assert diff <= 3 * noise + 1e-5 and same_graph <= 3 * noise + 1e-5, (diff, same_graph, noise)


def test_int8_gemm_keeps_group_wise_as_matmulnbits(tmp_path):
    model = quantize_model(tiny_bert(layers=1, hidden=64, ffn=128), QATConfig(weight_bits=4, group_size=32)).eval()
    info = export_onnx(model, tmp_path / "out", int4="int8-gemm")
    assert info["layers"]["int4_matmulnbits"] == 6 and info["layers"]["int4_int8_gemm"] == 0
    _check_weights_exact(model, tmp_path / "out")


# ---------------------------------------------------------------- refused before anything is written


def _nothing_written(parent, name):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_refusals_before_writing(tmp_path):
    # a group size MatMulNBits cannot take (not a power of two >= 16)
    model = quantize_model(tiny_bert(layers=1), QATConfig(weight_bits=4, group_size=8))
    with pytest.raises(ValueError, match=r"group_size=8 cannot be a MatMulNBits block.*int4='float'"):
        export_onnx(model, tmp_path / "out")
    assert _nothing_written(tmp_path, "out")
    info = export_onnx(model, tmp_path / "float", int4="float")  # the alternative works: exact float graph
    assert info["layers"]["int4_matmulnbits"] == 0 and info["verification"]["max_abs_diff"] <= 1e-5

    # int4 weights with quantised activations (static PTQ): MatMulNBits takes float inputs
    act = tiny_bert(layers=1, hidden=64, ffn=128)
    data = TokenDataset(8, 12, seed=1)
    quantize_model(act, QATConfig(weight_bits=4, group_size=32, activation_bits=8),
                   calib_dataloader=[{"input_ids": data.ids, "attention_mask": data.mask}])
    with pytest.raises(ValueError, match=r"quantises its input.*int4='float'.*activation_bits=None"):
        export_onnx(act, tmp_path / "out")
    assert _nothing_written(tmp_path, "out")

    # weights no longer on the recorded grid (edited after quantisation)
    edited = quantize_model(tiny_bert(layers=1, hidden=64, ffn=128), QATConfig(weight_bits=4, group_size=32))
    with torch.no_grad():
        edited.bert.encoder.layer[0].output.dense.weight[3, 5] += 1e-3
    with pytest.raises(ValueError, match=r"output.dense: its weights .* are not on the 4-bit grid.*int4='float'"):
        check_exportable(edited)
    with pytest.raises(ValueError, match="not on the 4-bit grid"):
        export_onnx(edited, tmp_path / "out")
    assert _nothing_written(tmp_path, "out")

    # options
    with pytest.raises(ValueError, match=r"int4='int4': use 'matmulnbits'.*'int8-gemm'.*or 'float'"):
        export_onnx(model, tmp_path / "out", int4="int4")
    with pytest.raises(ValueError, match=r"accuracy_level=2: use 0 .* or 4"):
        export_onnx(model, tmp_path / "out", accuracy_level=2)
    assert _nothing_written(tmp_path, "out")


def test_other_layers_unchanged(tmp_path):
    # 8-bit weight-only and NF4 grids stay float layers; nothing becomes MatMulNBits
    for cfg in (QATConfig(weight_bits=8), QATConfig(weight_bits=4, weight_format="nf4", group_size=64)):
        model = quantize_model(tiny_bert(layers=1, hidden=64, ffn=128), cfg).eval()
        out = tmp_path / str(cfg.weight_format + str(cfg.weight_bits))
        info = export_onnx(model, out)
        assert info["layers"]["int4_matmulnbits"] == 0 and info["int4"] is None
        assert info["verification"]["max_abs_diff"] <= 1e-5 * (1 + info["verification"]["max_abs_reference"])
