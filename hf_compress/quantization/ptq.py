"""Post-training quantisation: the QAT config applied after training, through the same numerics.

* dynamic (`activation_bits=None`): only the weights are quantised; an int8 export quantises the
  activations at run time.
* static (`activation_bits=8`): an observer per targeted layer records the range of its input over a
  few batches of `calib_dataloader` (model in eval mode, no gradients, weights already quantised,
  activations still float), then is frozen. Every batch counts the same: minmax gives the min / max
  over the batches, moving_average the mean of the per-batch minima / maxima, percentile the mean of
  the per-batch percentiles (`averaging` is for training only). With `export=None` the model keeps
  the fake quantisation of its inputs with those fixed ranges (simulated static int8, to measure its
  accuracy); the export backends quantise activations at run time instead, so with an export the
  calibrated ranges are not used (a warning says so).
* `observer="dynamic"` with `activation_bits=8`: each input is quantised with its own range, as the
  torch-int8 kernels do; nothing to calibrate.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import commit_observers, convert, insert_fake_quant, observers, remove_fake_quant, set_observing
from .backends import get_backend
from .config import QATConfig
from .plan import build_plan, field_of


def _run(model: nn.Module, batch, device) -> None:
    if isinstance(batch, Mapping):
        model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    elif torch.is_tensor(batch):
        model(batch.to(device))
    elif isinstance(batch, (list, tuple)):
        model(*[b.to(device) if torch.is_tensor(b) else b for b in batch])
    else:
        raise ValueError(f"calib_dataloader yields {type(batch).__name__}: yield dicts of tensors (model inputs), tensors or tuples.")


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int) -> int:
    """Feed up to `num_batches` batches through the model in eval mode, committing the ranges after each.

    The observers average the batches with equal weights (`Observer.calibrating`), so the result is the
    same whatever the batch order and whatever `averaging` says.
    """
    was_training = model.training
    model.eval()
    set_observing(model, True, in_eval=True)
    live = list(observers(model).values())
    for o in live:
        o.calibrating = True
        o.commits.zero_()
    device = next(model.parameters()).device
    n = 0
    try:
        for batch in batches:
            if n >= num_batches:
                break
            _run(model, batch, device)
            commit_observers(model)
            n += 1
    finally:
        for o in live:
            o.calibrating = False
        set_observing(model, False)
        model.train(was_training)
    return n


def quantize_model(model: nn.Module, config, calib_dataloader: Iterable | None = None, num_batches: int = 8) -> nn.Module:
    """PTQ of `model` in place with a QATConfig (or any object / dict with its fields); returns the model.

    `config.export` picks the result as in QAT: None (float weights on the grid), "torch-int8",
    "bnb-int8" or "bnb-nf4" (real low-bit layers). The scheme is recorded in
    ``config.hf_compress["quantization"]`` so `hf_compress.load_pretrained` rebuilds the model.
    A dict is validated as ``QATConfig(**config)`` first (an unknown or renamed key is an error).
    """
    if isinstance(config, Mapping):
        config = QATConfig(**config)
    export = field_of(config, "export")
    if export:
        get_backend(export).require()
    plan = build_plan(model, config)
    act_quant = bool(field_of(config, "activation_bits"))
    static = act_quant and field_of(config, "observer", "moving_average") != "dynamic"
    if static and calib_dataloader is None:
        raise ValueError(
            "quantize_model: activation_bits is set (static PTQ) but no `calib_dataloader` was given: pass a "
            "few batches of model inputs to calibrate the activation ranges, or set activation_bits=None (dynamic)."
        )
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r}: use a positive integer.")
    insert_fake_quant(model, plan)
    if static:
        if calibrate(model, calib_dataloader, num_batches) == 0:
            remove_fake_quant(model, bake=False)
            raise ValueError("quantize_model: calib_dataloader yielded no batch.")
        if export:
            warnings.warn(
                f"export={export!r} quantises activations at run time: the calibrated static ranges are not used."
            )
    convert(model, config, plan=plan, export=export, keep_input_quant=act_quant)
    return model
