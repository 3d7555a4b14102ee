"""ALBERT-style cross-layer parameter sharing: a student whose groups of consecutive blocks share one set of weights.

`shared_student_from_teacher(teacher, group_size=2)` builds a model of the teacher's class with as many blocks as
the teacher; the blocks of each group hold the *same* Parameter objects (each block keeps its own module, so
per-layer attributes such as a cache's `layer_idx` stay per layer), initialised from the teacher's blocks of that
group: their mean (`init="mean"`) or one chosen block (`init="first"`, `"last"` or an index inside the group).
Forward compute is unchanged; the blocks' parameters shrink by the group size. Train it with KD
(`DistillationTrainer`): the optimizer holds each shared tensor once and its gradient is the sum over the blocks
that use it.

On disk each shared tensor is stored once, under the name of the group's last block (a `state_dict` hook drops
the other blocks' keys; ``config.hf_compress["sharing"]`` records the groups). Reloading
(`hf_compress.load_pretrained`, or an Auto class after `import hf_compress`) shares the parameters again with
`apply_sharing` before the weights load; stock transformers refuses the directory (it would leave the other
blocks at random initialisation).
"""

from __future__ import annotations

import copy
import re
from typing import Sequence, Union

import torch
from torch import nn

from ..metadata import get_metadata, record
from ..modules import find_blocks, unwrap

SECTION = "sharing"
INITS = ("mean", "first", "last")


def _groups(n: int, group_size: int | None, groups: Sequence[Sequence[int]] | None) -> list[list[int]]:
    if groups is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= n:
            raise ValueError(f"group_size={group_size!r}: use an integer from 1 to the teacher's {n} blocks "
                             "(consecutive blocks per shared group; 2 halves the block parameters).")
        return [list(range(i, min(i + group_size, n))) for i in range(0, n, group_size)]
    out = [list(g) for g in groups]
    flat = [i for g in out for i in g]
    if flat != list(range(n)) or any(not g for g in out):
        raise ValueError(f"groups={out!r}: list every block 0..{n - 1} once, in order, as non-empty groups of "
                         "consecutive blocks, e.g. [[0, 1], [2, 3], [4, 5]].")
    return out


def shared_student_from_teacher(teacher: nn.Module, group_size: int | None = 2,
                                groups: Sequence[Sequence[int]] | None = None,
                                init: Union[str, int] = "mean") -> nn.Module:
    """A model of the teacher's class whose groups of consecutive blocks share one set of weights.

    `group_size` consecutive blocks per group (the last group may be smaller), or explicit `groups` (lists of
    consecutive block indices covering every block). `init`: "mean" (element-wise mean of the group's teacher
    blocks), "first", "last", or an int (that position inside each group). The teacher is not modified.
    """
    teacher = unwrap(teacher)
    config = getattr(teacher, "config", None)
    if config is None:
        raise ValueError("shared_student_from_teacher needs a transformers model (with .config) as the teacher.")
    meta = get_metadata(config)
    if meta:
        raise ValueError(f"shared_student_from_teacher: the teacher is already compressed ({sorted(meta)}); share the "
                         "blocks of the uncompressed teacher, then compress the student.")
    blocks_name, blocks = find_blocks(teacher)
    n = len(blocks)
    groups = _groups(n, group_size if groups is None else None, groups)
    if not (init in INITS or (isinstance(init, int) and not isinstance(init, bool))):
        raise ValueError(f"init={init!r}: use one of {INITS} or an index inside each group (0 = its first block).")
    if isinstance(init, int) and not all(-len(g) <= init < len(g) for g in groups):
        raise ValueError(f"init={init}: outside the smallest group ({min(len(g) for g in groups)} blocks); use an index "
                         "every group has, or 'mean'.")
    student = copy.deepcopy(teacher)
    s_blocks = student.get_submodule(blocks_name)
    with torch.no_grad():
        for g in groups:
            src = s_blocks[g[-1]]
            if init == "mean":
                states = [blocks[i].state_dict() for i in g]
                for k, v in src.state_dict(keep_vars=True).items():
                    if v.is_floating_point():
                        v.copy_(torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype))
            else:
                pick = {"first": 0, "last": -1}.get(init, init)
                src.load_state_dict(blocks[g[pick]].state_dict())
    rec = {"blocks": blocks_name, "groups": groups, "init": init if isinstance(init, str) else int(init),
           "teacher_num_layers": n}
    apply_sharing(student, rec)
    record(student, SECTION, rec)
    student.train(teacher.training)
    return student


def blocks_name(model: nn.Module, rec: dict) -> str:
    """The recorded block list's name in `model` (the base model of a saved head model, or the other way round)."""
    name = rec["blocks"]
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    for cand in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                 f"{prefix}.{name}" if prefix else None):
        if cand and isinstance(modules.get(cand), nn.ModuleList):
            return cand
    return name


def check_sharing_record(model: nn.Module, rec) -> list[list[int]]:
    """The record fits the model's blocks (ValueError naming the problem); returns the groups."""
    if not isinstance(rec, dict) or not isinstance(rec.get("blocks"), str) or not isinstance(rec.get("groups"), list):
        raise ValueError(f"config.json: hf_compress.sharing {rec!r:.200} is not a sharing record (blocks name and groups).")
    blocks = dict(model.named_modules()).get(blocks_name(model, rec))
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"config.json: hf_compress.sharing.blocks={rec['blocks']!r} is not the block list of "
                         f"{type(model).__name__}.")
    groups = rec["groups"]
    ok = all(isinstance(g, list) and g and all(isinstance(i, int) and not isinstance(i, bool) for i in g) for g in groups)
    if not ok or [i for g in groups for i in g] != list(range(len(blocks))):
        raise ValueError(f"config.json: hf_compress.sharing.groups={groups!r:.200} must list every block "
                         f"0..{len(blocks) - 1} once, in order.")
    return groups


def _shared_keys(prefix: str, groups) -> re.Pattern | None:
    drop = [i for g in groups for i in g[:-1]]
    if not drop:
        return None
    return re.compile(rf"^{re.escape(prefix)}\.({'|'.join(map(str, drop))})\.")


def apply_sharing(model: nn.Module, rec: dict) -> nn.Module:
    """Make the blocks of each recorded group hold the Parameter objects of the group's last block (idempotent),
    and save each shared tensor once (state_dict hook; loading tolerates the absent keys). Returns `model`."""
    model = unwrap(model)
    groups = check_sharing_record(model, rec)
    name = blocks_name(model, rec)
    blocks = model.get_submodule(name)
    for g in groups:
        src = blocks[g[-1]]
        for i in g[:-1]:
            for mod_name, mod in blocks[i].named_modules():
                other = src.get_submodule(mod_name) if mod_name else src
                for pname, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[pname] = other._parameters[pname]
    pattern = _shared_keys(name, groups)
    root = model
    if pattern is not None and getattr(root, "_hfc_sharing_hooks", None) is None:

        def save_hook(module, state_dict, pre, local_metadata, pattern=pattern):
            for k in [k for k in state_dict if k.startswith(pre) and pattern.match(k[len(pre):])]:
                del state_dict[k]

        def load_hook(module, incompatible, pattern=pattern):
            for k in [k for k in incompatible.missing_keys if pattern.match(k)]:
                incompatible.missing_keys.remove(k)

        root._hfc_sharing_hooks = (root.register_state_dict_post_hook(save_hook),
                                   root.register_load_state_dict_post_hook(load_hook))
    return model


def shared_groups(model: nn.Module) -> list[list[str]]:
    """Names of the parameters held by more than one block (one list per shared tensor)."""
    seen: dict[int, list[str]] = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return [v for v in seen.values() if len(v) > 1]



def missing_patterns(model: nn.Module, rec: dict) -> set[str]:
    """Key patterns (re.search) of the blocks whose shared tensors are stored under another block's name, for
    transformers' load report, as names of `model` (a base model or a head model)."""
    model = unwrap(model)
    name = blocks_name(model, rec)
    pattern = _shared_keys(name, check_sharing_record(model, rec))
    return {r"(^|\.)" + pattern.pattern[1:]} if pattern is not None else set()
