"""DistilBERT-style student initialisation: keep some of the teacher's transformer blocks.

The student is the teacher's own class, built from a copy of its config with fewer layers; the
embeddings, the final norm, the pooler and the task head are copied unchanged and student block i
is teacher block `layers[i]`. It is an ordinary model: `save_pretrained` / `AutoModel*.from_pretrained`.
"""

from __future__ import annotations

import copy
import re
from typing import Sequence

from torch import nn

from ..modules import find_blocks, unwrap
from ..metadata import get_metadata, record


def _num_layers(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"{type(config).__name__} has no num_hidden_layers: student_from_teacher cannot resize it.")
    return int(n)


def student_from_teacher(teacher: nn.Module, layers: Sequence[int] = (0, 2, 4)) -> nn.Module:
    """A smaller model of the teacher's class whose block i is a copy of teacher block `layers[i]`.

    Works for the BERT family (``*.encoder.layer``), Llama-style (``model.layers``) and GPT-2
    (``transformer.h``) — anything whose blocks `modules.find_blocks` finds and whose config has
    `num_hidden_layers`. The teacher is not modified.
    """
    teacher = unwrap(teacher)
    config = getattr(teacher, "config", None)
    if config is None:
        raise ValueError("student_from_teacher needs a transformers model (with .config) as the teacher.")
    meta = get_metadata(config)
    if "pruning" in meta or "quantization" in meta:
        raise ValueError(
            f"student_from_teacher: the teacher is already compressed ({sorted(meta)}); build the student from "
            "the uncompressed teacher, then compress the student."
        )
    n = _num_layers(config)
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` is empty: pass the teacher block indices to keep, e.g. layers=[0, 2, 4].")
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
    if bad:
        raise ValueError(f"`layers` {bad} out of range: the teacher has blocks 0..{n - 1}.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"`layers`={layers} repeats a block; each teacher block can be copied once.")

    blocks_name, _ = find_blocks(teacher)
    new_config = copy.deepcopy(config)
    new_config.num_hidden_layers = len(layers)
    # per-layer config lists (e.g. Llama-family `layer_types`) follow the kept blocks
    for key, value in list(vars(new_config).items()):
        if isinstance(value, list) and len(value) == n and key.endswith(("layer_types", "_per_layer")):
            setattr(new_config, key, [value[i] for i in layers])

    student = type(teacher)(new_config)
    pattern = re.compile(rf"^{re.escape(blocks_name)}\.(\d+)\.(.*)$")
    new_index = {t: s for s, t in enumerate(layers)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = tensor
        elif int(m.group(1)) in new_index:
            state[f"{blocks_name}.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") or k.endswith("decoder.weight")}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"student_from_teacher: copying {type(teacher).__name__} blocks {layers} left weights unmatched "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {list(unexpected)[:5]})."
        )
    ref = next(teacher.parameters())
    student.to(ref.device)
    if ref.is_floating_point():
        student.to(ref.dtype)
    record(student, "distillation", {"teacher_blocks": list(layers), "teacher_num_layers": n})
    student.train(teacher.training)
    return student

