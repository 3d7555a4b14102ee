"""ONNX export of a compressed model, for ONNX Runtime (docs/onnx.md).

`export_onnx(model_or_dir, out)` writes ``out/model.onnx`` (plus config.json, the tokenizer files of a
source directory and ``onnx_export.json``) with torch.onnx's dynamo exporter, dynamic batch and sequence
axes, and no past key values (decoders return logits for the whole sequence: ``use_cache=False``).

What each kind of layer becomes — the same numerics the PyTorch model computes:

* float layers (plain, structurally pruned with per-layer widths, weights baked onto a QAT grid with
  ``export=None``, group-wise grids included): the float weights as they are (MatMul / Gemm).
* torch-int8 ``Int8Linear`` (QAT or PTQ with ``export='torch-int8'``): our int8 codes and per-channel
  scales / zero points, unchanged (no re-calibration), as ``DynamicQuantizeLinear`` (the activation,
  uint8, per tensor, range of the tensor itself: what ``torch.ops.quantized.linear_dynamic`` does) →
  ``MatMulInteger`` (int32 accumulation) → ``Cast`` → ``Mul`` by activation scale × our weight scales →
  ``Add`` bias. ONNX Runtime fuses this into its ``DynamicQuantizeMatMul`` int8 kernel.
* layers that keep quantising their input (PTQ with ``activation_bits=8``, ``export=None``): our
  calibrated per-tensor scale and zero point as ``QuantizeLinear`` → ``DequantizeLinear`` (int8) before
  the matmul (``observer='dynamic'``: ``DynamicQuantizeLinear`` → ``DequantizeLinear``, the same grid);
  per-channel weights as int8 codes → ``DequantizeLinear`` (axis 0) with our scales.

Refused before anything is written, naming the setting and the alternative: bitsandbytes layers
(``export='bnb-int8'`` / ``'bnb-nf4'``: group-wise NF4 codes and LLM.int8 kernels that ONNX has no
operator for), symmetric dynamic activation ranges, and models that are not a transformers model.
The output directory appears whole or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .metadata import get_metadata
from .modules import model_class_for, out_axis, replace_module
from .quantization import is_fake_quant, quantize_weight, restore_layer
from .quantization.backends.torch_int8 import Int8Linear

OPSET = 18
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
)
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
INSTALL_HINT = "pip install 'hf_compress[onnx]' (onnx, onnxruntime, onnxscript)"


# ---------------------------------------------------------------- custom ops and their ONNX translation
#
# Each special layer is replaced (in a copy of the model) by a module whose forward calls one custom op;
# torch.export keeps the op whole and `custom_translation_table` writes it as the ONNX ops above.


def _dq(weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (weight_t.float() - zero.float()) * scale


def _dynamic_quantize_linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear: uint8 codes (as float), scale, zero point of x's own range (0 included)."""
    x = x.float()
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    zero = torch.clamp(torch.round((0.0 - lo) / scale), 0, 255)
    return torch.clamp(torch.round(x / scale) + zero, 0, 255), scale, zero


def _int8_matmul(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What the exported graph computes: DynamicQuantizeLinear → MatMulInteger (exact, in float64) → Cast → Mul."""
    xq, xs, xz = _dynamic_quantize_linear(x)
    acc = (xq.double() - xz.double()) @ (weight_t.double() - zero.double())
    return acc.float() * (xs * scale)


# The eager implementations compute what the ONNX graph computes (ONNX's rounding of x / S), so the export
# copy run in PyTorch is a reference for ONNX Runtime; the exporter only needs their shapes.
@torch.library.custom_op("hf_compress::int8_linear", mutates_args=())
def _int8_linear(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _int8_matmul(x, weight_t, scale, zero) + bias


@_int8_linear.register_fake
def _(x, weight_t, scale, zero, bias):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1], dtype=torch.float32)


@torch.library.custom_op("hf_compress::int8_linear_nobias", mutates_args=())
def _int8_linear_nobias(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return _int8_matmul(x, weight_t, scale, zero)


@_int8_linear_nobias.register_fake
def _(x, weight_t, scale, zero):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1], dtype=torch.float32)


@torch.library.custom_op("hf_compress::qdq_static", mutates_args=())
def _qdq_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(torch.round(torch.clamp(x.float(), lo, hi) / scale) + zero, -128, 127)
    return (q - zero) * scale


@_qdq_static.register_fake
def _(x, scale, zero, lo, hi):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("hf_compress::qdq_dynamic", mutates_args=())
def _qdq_dynamic(x: torch.Tensor) -> torch.Tensor:
    xq, xs, xz = _dynamic_quantize_linear(x)
    return (xq - xz) * xs


@_qdq_dynamic.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("hf_compress::dq_weight_t", mutates_args=())
def _dq_weight_t(weight_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return _dq(weight_t, scale, zero)


@_dq_weight_t.register_fake
def _(weight_t, scale, zero):
    return weight_t.new_empty(weight_t.shape, dtype=torch.float32)


def translation_table() -> dict:
    """torch.onnx `custom_translation_table` for the stand-in layers' custom ops."""
    from onnxscript import opset18 as op

    FLOAT = 1  # onnx.TensorProto.FLOAT

    def int8_linear_nobias(x, weight_t, scale, zero):
        # the pattern onnxruntime.quantization.quantize_dynamic writes, which ORT fuses to DynamicQuantizeMatMul
        xq, xs, xz = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, weight_t, xz, zero)
        return op.Mul(op.Cast(acc, to=FLOAT), op.Mul(xs, scale))

    def int8_linear(x, weight_t, scale, zero, bias):
        return op.Add(int8_linear_nobias(x, weight_t, scale, zero), bias)

    def qdq_static(x, scale, zero, lo, hi):
        return op.DequantizeLinear(op.QuantizeLinear(op.Clip(x, lo, hi), scale, zero), scale, zero)

    def qdq_dynamic(x):
        xq, xs, xz = op.DynamicQuantizeLinear(x)
        return op.DequantizeLinear(xq, xs, xz)

    def dq_weight_t(weight_t, scale, zero):
        return op.DequantizeLinear(weight_t, scale, zero, axis=1)

    ops = torch.ops.hf_compress
    return {
        ops.int8_linear.default: int8_linear,
        ops.int8_linear_nobias.default: int8_linear_nobias,
        ops.qdq_static.default: qdq_static,
        ops.qdq_dynamic.default: qdq_dynamic,
        ops.dq_weight_t.default: dq_weight_t,
    }


class _Int8LinearOnnx(nn.Module):
    """Stands for an `Int8Linear` in the exported graph: its codes (stored [in, out] for MatMulInteger),
    scales and zero points, unchanged."""

    def __init__(self, m: Int8Linear):
        super().__init__()
        self.register_buffer("weight_t", m.weight.detach().t().contiguous())
        self.register_buffer("scale", m.weight_scale.detach().float().clone())
        self.register_buffer("zero", m.weight_zero_point.detach().clone())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())

    def forward(self, x):
        ops = torch.ops.hf_compress
        if self.bias is None:
            return ops.int8_linear_nobias(x, self.weight_t, self.scale, self.zero).to(x.dtype)
        return ops.int8_linear(x, self.weight_t, self.scale, self.zero, self.bias).to(x.dtype)


class _InputQuantLinearOnnx(nn.Module):
    """Stands for a layer that quantises its input (PTQ with activation_bits, export=None)."""

    def __init__(self, m: nn.Module, name: str):
        super().__init__()
        plan = m.hfc_plan
        act, axis = plan.act, m.hfc_axis
        self.dynamic = act.observer == "dynamic"
        if self.dynamic:
            if act.symmetric:
                raise ValueError(
                    f"{name}: symmetric dynamic activation ranges (activation_symmetric=True, observer='dynamic') have "
                    "no ONNX operator (DynamicQuantizeLinear is asymmetric uint8). Quantise with activation_symmetric=False, "
                    "or export='torch-int8'."
                )
        else:
            obs = m.input_observer
            scale, zero = obs.qparams(act.bits, act.symmetric)
            if act.bits != 8:
                raise ValueError(f"{name}: {act.bits}-bit activations cannot be exported to ONNX: use activation_bits=8.")
            scale, zero = scale.reshape(()).float(), zero.reshape(()).float()
            self.register_buffer("a_scale", scale.clone())
            self.register_buffer("a_zero", zero.to(torch.int8))
            # clipping to the grid's ends first: the symmetric grid stops at -127, int8 saturation at -128
            self.register_buffer("a_lo", ((act.qmin - zero) * scale).reshape(()))
            self.register_buffer("a_hi", ((act.qmax - zero) * scale).reshape(()))
        w = m.weight.detach()
        scheme = plan.weight
        self.quantized = scheme.format == "int" and not scheme.group_size
        if self.quantized:  # per-channel / per-tensor grid: int8 codes + DequantizeLinear with our scales
            s = quantize_weight(w, scheme, axis)
            self.register_buffer("weight_t", s["q"].t().contiguous())
            self.register_buffer("w_scale", s["scale"][:, 0].float().contiguous())
            self.register_buffer("w_zero", s["zero"][:, 0].contiguous())
        else:  # group-wise grids: the quantised weight in float, exactly
            wq = m.quantized_weight().detach().float()
            self.register_buffer("weight_f", (wq if axis == 1 else wq.t()).contiguous())  # [in, out]
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())

    def forward(self, x):
        ops = torch.ops.hf_compress
        if self.dynamic:
            xq = ops.qdq_dynamic(x)
        else:
            xq = ops.qdq_static(x, self.a_scale, self.a_zero, self.a_lo, self.a_hi)
        w = ops.dq_weight_t(self.weight_t, self.w_scale, self.w_zero) if self.quantized else self.weight_f
        y = xq @ w
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


# ---------------------------------------------------------------- checks (before anything is written)


def _require_packages() -> None:
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}.")


def check_exportable_config(config) -> None:
    """The checks `check_exportable` can make from a saved config alone (before loading any weights)."""
    _check_metadata(get_metadata(config))


def _check_metadata(meta: dict) -> None:
    backend = (meta.get("quantization") or {}).get("backend")
    if backend in ("bnb-int8", "bnb-nf4"):
        what = ("bitsandbytes NF4: 4-bit NormalFloat codes with one absmax per group of weights (group-wise)"
                if backend == "bnb-nf4" else "bitsandbytes LLM.int8 (Linear8bitLt) kernels")
        raise ValueError(
            f"This model was quantised with QATConfig.export={backend!r} ({what}); ONNX has no operator that "
            "computes it. Re-run QAT / quantize_model with export='torch-int8' (per-channel int8, <= 8-bit weights: "
            "exported as integer ONNX ops with the same scales) or export=None (weights on the grid, stored as "
            "floats: exported exactly as a float model)."
        )


def check_exportable(model: nn.Module) -> None:
    """ValueError naming the setting and the alternative when `model` has a layer ONNX cannot represent
    with the numerics it computes in PyTorch. Writes nothing."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"export_onnx exports a transformers model (or its saved directory); got {type(model).__name__}.")
    _check_metadata(get_metadata(model))
    for name, m in model.named_modules():
        mod = type(m).__module__ or ""
        if mod.startswith("bitsandbytes"):
            raise ValueError(
                f"{name} is a bitsandbytes layer ({type(m).__name__}); ONNX has no operator for it. Quantise with "
                "QATConfig.export='torch-int8' or export=None instead."
            )
        if is_fake_quant(m) and m.hfc_plan.act is not None:
            act = m.hfc_plan.act
            if act.observer == "dynamic" and act.symmetric:
                _InputQuantLinearOnnx(m, name)  # raises with the message
            if act.observer != "dynamic":
                obs = getattr(m, "input_observer", None)
                if obs is None or not obs.ready:
                    raise ValueError(
                        f"{name} quantises its input but has no calibrated range yet (QAT still running?). Finish QAT "
                        "(convert at train end) or calibrate with quantize_model before exporting."
                    )


# ---------------------------------------------------------------- export


class _Wrapper(nn.Module):
    """Named tensor inputs → one tensor output (logits, or last_hidden_state for a base model)."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if getattr(self.model.config, "is_decoder", False) or _is_decoder(self.model):
            kw["use_cache"] = False
        return getattr(self.model(**kw), self.output)


def _is_decoder(model: nn.Module) -> bool:
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin) or bool(getattr(model.config, "is_decoder", False))


def _uses_token_types(model: nn.Module) -> bool:
    import inspect

    return "token_type_ids" in inspect.signature(model.forward).parameters and getattr(model.config, "type_vocab_size", 0) > 0


def onnx_ready_copy(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `model` whose special layers are the export stand-ins above; counts of each kind."""
    check_exportable(model)
    attn = getattr(model.config, "_attn_implementation", None)
    model = copy.deepcopy(model).eval()
    # a deep copy of a model whose config hf_compress re-classed (after pruning / quantisation records) comes
    # back with config._attn_implementation None, and attention then ignores the padding mask: set it again
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and attn is not None and getattr(cfg, "_attn_implementation", None) is None:
            cfg._attn_implementation = attn
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in model.state_dict().values()):
        nn.Module.float(model)  # ONNX export in float32 (transformers' own .float() refuses quantised models)
    counts = {"int8_linear": 0, "input_quant_linear": 0, "fake_quant_weight": 0}
    for name, m in list(model.named_modules()):
        if isinstance(m, Int8Linear):
            replace_module(model, name, _Int8LinearOnnx(m))
            counts["int8_linear"] += 1
        elif is_fake_quant(m):
            if m.hfc_plan.act is not None:
                replace_module(model, name, _InputQuantLinearOnnx(m, name))
                counts["input_quant_linear"] += 1
            else:  # weight-only fake quantisation (QAT not converted): the weight on its grid, in float
                with torch.no_grad():
                    w = m.quantized_weight().detach()
                restore_layer(m)
                with torch.no_grad():
                    m.weight.copy_(w)
                counts["fake_quant_weight"] += 1
    return model, counts


def _load(source) -> tuple[nn.Module, Path | None]:
    if isinstance(source, nn.Module):
        return source, None
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json here; pass a directory written by save_pretrained (or a model).")
    from transformers import AutoConfig

    # `import hf_compress` (done: this module is inside it) registered the loading hooks, so the class named
    # by config.architectures rebuilds a compressed directory exactly as hf_compress.load_pretrained does
    config = AutoConfig.from_pretrained(path)
    _check_metadata(get_metadata(config))  # refuse bitsandbytes before loading it
    model = model_class_for(config).from_pretrained(path, config=config)  # the concrete class would re-read it
    return model.eval(), path


def _sample_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if _uses_token_types(model):
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return inputs


def _output_name(model: nn.Module, inputs) -> str:
    with torch.no_grad():
        kw = dict(inputs, return_dict=True)
        if _is_decoder(model):
            kw["use_cache"] = False
        out = model(**kw)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return name
    raise ValueError(f"{type(model).__name__} returns neither logits nor last_hidden_state: cannot choose the ONNX output.")


def export_onnx(
    model_or_dir, out, *, overwrite: bool = False, opset: int = OPSET, verify: bool = True, source_dir=None,
) -> dict[str, Any]:
    """Export a (compressed) transformers model, or the directory it was saved to, to ONNX in `out`.

    Writes ``out/model.onnx``, ``out/config.json``, the tokenizer files of a source directory and
    ``out/onnx_export.json`` (inputs, output, what each kind of layer became, the verification). Inputs:
    ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for models that take them), int64, with dynamic
    batch and sequence axes; output ``logits`` (``last_hidden_state`` for a base model). Decoders are
    exported without past key values.

    Everything is checked before anything is written: a model ONNX cannot represent raises ValueError
    naming the setting and the alternative. The directory is written beside `out` and renamed into place,
    so `out` is either the whole export or untouched. An existing `out` is refused unless `overwrite`.
    `source_dir`: with a model object, the directory it was loaded from (its config.json and tokenizer
    files are copied).

    `verify`: run the file in ONNX Runtime on a padded sample batch and record the largest difference from
    the PyTorch model and from the export copy run in PyTorch (the same graph: float layers as they are,
    int8 layers computing ONNX's DynamicQuantizeLinear / MatMulInteger exactly); raises, writing nothing,
    when a model without quantised activations differs by more than 1e-4 · (1 + max|y|). With dynamic
    per-tensor activation quantisation a one-code rounding difference can move a whole tensor's scale, so
    int8 differences are of the size of the quantisation noise: recorded only (docs/onnx.md).
    Returns the dict written to onnx_export.json.
    """
    _require_packages()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose a new directory, or pass overwrite=True (--overwrite).")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory.")
    model, src = _load(model_or_dir)
    if src is None and source_dir is not None:
        src = Path(source_dir)
    export_model, counts = onnx_ready_copy(model)  # every refusal happens here, before any file
    inputs = _sample_inputs(model)
    output = _output_name(export_model, inputs)
    names = list(inputs)
    wrapper = _Wrapper(export_model, output).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        onnx_path = tmp / "model.onnx"
        dyn = {n: {0: "batch", 1: "sequence"} for n in names}
        n_bytes = sum(t.numel() * t.element_size() for t in export_model.state_dict().values())
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (), str(onnx_path), kwargs=dict(inputs), dynamo=True, dynamic_shapes=dyn,
                input_names=names, output_names=[output], opset_version=opset,
                custom_translation_table=translation_table(), external_data=n_bytes > 1_500_000_000,
                verbose=False,
            )
        _copy_side_files(model, src, tmp)
        info: dict[str, Any] = {
            "format": "onnx", "opset": opset, "exporter": f"torch.onnx (dynamo) {torch.__version__}",
            "inputs": names, "output": output, "dynamic_axes": {"0": "batch", "1": "sequence"},
            "past_key_values": False, "layers": counts,
            "int8": ("DynamicQuantizeLinear -> MatMulInteger with the model's int8 codes, per-channel scales and zero "
                     "points (torch-int8 numerics)") if counts["int8_linear"] else None,
            "source": str(src) if src else None, "hf_compress": get_metadata(model) or None,
        }
        if verify:
            v = info["verification"] = verify_onnx(onnx_path, model, inputs, output, graph_reference=export_model)
            exact = not counts["int8_linear"] and not counts["input_quant_linear"]
            if exact and v["max_abs_diff"] > 1e-4 * (1 + v["max_abs_reference"]):
                raise ValueError(
                    f"ONNX Runtime output differs by {v['max_abs_diff']:.3g} from the PyTorch float model: nothing was "
                    "written (please report this)."
                )
        (tmp / "onnx_export.json").write_text(json.dumps(info, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _copy_side_files(model: nn.Module, src: Path | None, tmp: Path) -> None:
    if src is not None and (src / "config.json").is_file():
        shutil.copy2(src / "config.json", tmp / "config.json")
    else:
        model.config.to_json_file(tmp / "config.json")
    if src is not None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():  # overwrite: move the old one aside first, remove it only once the new one is in place
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def ort_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session of `path` (a model.onnx or the export directory)."""
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_torch(model: nn.Module, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
    with torch.no_grad():
        kw = dict(inputs, return_dict=True)
        if _is_decoder(model):
            kw["use_cache"] = False
        return getattr(model(**kw), output).float()


def verify_onnx(
    path, model: nn.Module, inputs: dict[str, torch.Tensor], output: str = "logits", graph_reference: nn.Module | None = None,
) -> dict[str, float]:
    """Largest difference between ONNX Runtime and the PyTorch `model` on `inputs`; with `graph_reference`
    (the export copy, whose int8 layers compute in PyTorch what the ONNX graph computes) also from that."""
    sess = ort_session(path)
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(None, feed)[0])
    ref = _run_torch(model, inputs, output)
    result = {"max_abs_diff": float((got - ref).abs().max()), "max_abs_reference": float(ref.abs().max()),
              "batch": int(inputs["input_ids"].shape[0]), "sequence": int(inputs["input_ids"].shape[1])}
    if graph_reference is not None:
        result["max_abs_diff_graph_reference"] = float((got - _run_torch(graph_reference, inputs, output)).abs().max())
    return result
