"""Teacher preparation: the one place that decides how a teacher is held during distillation.

A teacher is run under `torch.no_grad()` in `eval()` mode by the caller, placed on the student's
device with the student's mixed-precision policy by `accelerator.prepare_model(..., evaluation_mode=True)`
— which applies device placement and autocast but never wraps the model for gradient synchronisation —
and it is never part of what is saved. `load_teacher` freezes the model it creates (`requires_grad=False`,
`eval()`); DistillationTrainer passes `freeze=False` and leaves the user's object's flags alone (no_grad
already keeps gradients and autograd graphs away from it), except under FSDP2, where the teacher is
sharded in place the way the student is (`accelerate.utils.fsdp2_prepare_model`, so no rank holds a full
copy) and frozen first, so that sharding keeps its dtype instead of upcasting "trainable" weights to fp32.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..modules import replace_module, select_modules, unwrap
from ..modules import model_class_for

LOW_BIT = ("int8", "nf4")


def fsdp2_sharder():
    """accelerate's `fsdp2_prepare_model(accelerator, model)`, the function `Accelerator.prepare` shards the
    student with (exported from `accelerate.utils`, accelerate ≥ 1.6), or a ValueError saying what to do."""
    import inspect

    try:
        from accelerate.utils import fsdp2_prepare_model
    except ImportError as e:
        raise ValueError(
            "FSDP2 distillation shards the teacher with accelerate.utils.fsdp2_prepare_model, which this accelerate "
            "lacks: install accelerate>=1.6, or use FSDP1 / DDP."
        ) from e
    if list(inspect.signature(fsdp2_prepare_model).parameters)[:2] != ["accelerator", "model"]:
        raise ValueError(
            "accelerate.utils.fsdp2_prepare_model no longer takes (accelerator, model): this accelerate is newer than "
            "hf_compress supports under FSDP2; pin accelerate to a 1.x release, or use FSDP1 / DDP."
        )
    return fsdp2_prepare_model


def prepare_teacher(teacher: nn.Module, accelerator: Any | None = None, freeze: bool = True) -> nn.Module:
    """Hand `teacher` to `accelerator` for placement and autocast only (no DDP); with `freeze`, first set
    `eval()` and `requires_grad=False` on it (the caller must run it under `torch.no_grad()` either way)."""
    if not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher_model must be a torch nn.Module (a transformers model), got {type(teacher).__name__}.")
    if freeze:
        teacher.eval()
        teacher.requires_grad_(False)
    if accelerator is not None:
        placed = getattr(teacher, "hf_device_map", None) or getattr(teacher, "quantization_method", None)
        if getattr(accelerator, "is_fsdp2", False) and not placed:
            # shard the teacher like the student (same mesh, wrap policy and mixed precision) instead of
            # holding a full copy on every rank; prepare_model(evaluation_mode=True) would leave it whole.
            # Sharding replaces the teacher's parameters in place, so it is frozen here in any case.
            shard = fsdp2_sharder()
            teacher.eval()
            teacher.requires_grad_(False)
            return shard(accelerator, teacher)
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
        # prepare_model skips placement under FSDP1 (it expects to shard); an unsharded teacher still
        # has to sit where the student's inputs are. Dispatched (device_map) and bitsandbytes models stay put.
        if not placed and any(p.device != accelerator.device for p in teacher.parameters()):
            teacher.to(accelerator.device)
    return teacher


def is_frozen(teacher: nn.Module) -> bool:
    return not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def load_teacher(
    name_or_path: str | os.PathLike,
    model_class: type | None = None,
    low_bit: str | None = None,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a frozen teacher, optionally with its transformer-block Linears in 8-bit or NF4 (bitsandbytes).

    On a GPU this is transformers' own `BitsAndBytesConfig` path. On CPU that path fails with
    bitsandbytes 0.50 (see ENVIRONMENT.md), so the Linear layers inside the blocks are converted here
    after an fp32 load; bitsandbytes' CPU kernels then run the forward (int8 error ≈ 0.4%, nf4 ≈ 9%).
    """
    if low_bit is not None and low_bit not in LOW_BIT:
        raise ValueError(f"low_bit={low_bit!r}: choose one of {LOW_BIT} or None for full precision.")
    from transformers import AutoConfig

    # the config through AutoConfig (a compressed teacher's config is only readable that way), handed to
    # the class so that it is not read again by the concrete config class
    from_pretrained_kwargs.setdefault("config", AutoConfig.from_pretrained(name_or_path))
    if model_class is None:
        model_class = model_class_for(from_pretrained_kwargs["config"])
    if low_bit is not None and torch.cuda.is_available():
        from transformers import BitsAndBytesConfig

        qc = (
            BitsAndBytesConfig(load_in_8bit=True)
            if low_bit == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        )
        from_pretrained_kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
        teacher = model_class.from_pretrained(name_or_path, quantization_config=qc, **from_pretrained_kwargs)
    else:
        teacher = model_class.from_pretrained(name_or_path, **from_pretrained_kwargs)
        if low_bit is not None:
            to_low_bit(teacher, low_bit)
    return prepare_teacher(teacher)


def to_low_bit(model: nn.Module, low_bit: str = "int8") -> nn.Module:
    """Replace the Linear layers inside the transformer blocks by bitsandbytes layers (in place, inference only)."""
    if low_bit not in LOW_BIT:
        raise ValueError(f"low_bit={low_bit!r}: choose one of {LOW_BIT}.")
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ValueError("low_bit needs bitsandbytes: `pip install bitsandbytes`, or load the teacher in full precision.") from e
    model = unwrap(model)
    for name, lin in select_modules(model, field="low_bit").items():
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"low_bit: {name} is a {type(lin).__name__}; only nn.Linear layers convert to bitsandbytes.")
        w = lin.weight.data.float()
        if low_bit == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=lin.bias is not None,
                compute_dtype=torch.float32, quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.float().cpu(), requires_grad=False)
        q = q.to(lin.weight.device)  # bitsandbytes quantises on this move
        replace_module(model, name, q)
    return model
