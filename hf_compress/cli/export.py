"""`hf-compress export DIR --onnx OUT`: a saved (compressed) model to ONNX for ONNX Runtime (docs/onnx.md)."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  hf-compress export runs/sst2_minilm/model --onnx runs/sst2_minilm/onnx
  hf-compress export runs/sst2_minilm/model --onnx runs/sst2_minilm/onnx --overwrite
  hf-compress export runs/int4/model --onnx runs/int4/onnx --int4 int8-gemm

Writes OUT/model.onnx (inputs input_ids, attention_mask[, token_type_ids]; output logits; dynamic batch and
sequence; no past key values), OUT/config.json, the tokenizer files of DIR and OUT/onnx_export.json.
torch-int8 layers keep their int8 codes and scales (DynamicQuantizeLinear -> MatMulInteger). Models ONNX
cannot represent (bitsandbytes exports) are refused before anything is written; OUT appears whole or not at all."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export", help="export a saved model to ONNX (ONNX Runtime)",
        description="Export DIR (a directory written by `hf-compress run` or save_pretrained, compressed or not) to ONNX.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="the saved model directory (e.g. <output_dir>/model)")
    p.add_argument("--onnx", metavar="OUT", required=True, help="the directory to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (the old one goes only once the new one is complete)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: hf_compress.onnx.OPSET)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check against the PyTorch model")
    p.add_argument("--int4", choices=("matmulnbits", "int8-gemm", "float"), default=None,
                   help="how <= 4-bit weight-only layers are written (default: hf_compress.onnx.DEFAULT_INT4): "
                        "'matmulnbits' = ONNX Runtime's 4-bit MatMulNBits with our codes and scales; 'int8-gemm' = "
                        "per-channel 4-bit codes unpacked at load for ONNX Runtime's int8 GEMM (the faster on CPU, "
                        "docs/onnx.md); 'float' = weights as floats (exact, not smaller)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 4), default=None,
                   help="MatMulNBits compute: 0 = float32 input, exact dequantisation (default); 4 = input blocks as int8")
    return p


def run(args) -> int:
    from pathlib import Path

    from ..loading import load_pretrained
    from ..onnx import DEFAULT_ACCURACY_LEVEL, DEFAULT_INT4, OPSET, export_onnx

    src = Path(args.dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json here; pass the directory of a saved model (e.g. <output_dir>/model).")
    out = Path(args.onnx)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists: choose a new directory or pass --overwrite.")
    from transformers import AutoConfig

    from ..onnx import check_exportable_config

    check_exportable_config(AutoConfig.from_pretrained(src))  # refuse bitsandbytes before loading it
    model = load_pretrained(src)
    info = export_onnx(model, out, source_dir=src, overwrite=args.overwrite, opset=args.opset or OPSET, verify=not args.no_verify,
                       int4=args.int4 or DEFAULT_INT4,
                       accuracy_level=DEFAULT_ACCURACY_LEVEL if args.accuracy_level is None else args.accuracy_level)
    v = info.get("verification")
    print(f"wrote {out / 'model.onnx'} (inputs {', '.join(info['inputs'])}; output {info['output']}; "
          f"layers {json.dumps(info['layers'])})")
    if v:
        print(f"ONNX Runtime vs PyTorch on a padded {v['batch']}x{v['sequence']} batch: max |diff| {v['max_abs_diff']:.3g} "
              f"(outputs up to {v['max_abs_reference']:.3g})")
    return 0
