"""Which student layer learns from which teacher layer, and the projections between their widths."""

from __future__ import annotations

import torch
from torch import nn


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student block i -> teacher block ⌈(i+1)·Lt/Ls⌉−1: evenly spread, the last onto the last."""
    return {i: max(0, -(-(i + 1) * teacher_layers // student_layers) - 1) for i in range(student_layers)}


def resolve_layer_map(layer_map: dict[int, int] | None, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """`layer_map`, or the uniform one; every index checked against both models."""
    layer_map = dict(layer_map) if layer_map else uniform_layer_map(student_layers, teacher_layers)
    for s, t in layer_map.items():
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise ValueError(
                f"layer_map entry {s}: {t} is out of range: the student has layers 0..{student_layers - 1}, "
                f"the teacher 0..{teacher_layers - 1}."
            )
    return layer_map


def make_projections(student_width: int, teacher_width: int, student_layers, seed: int = 0) -> nn.ModuleDict:
    """One bias-free Linear student_width → teacher_width per mapped student layer (keys: str(layer)).

    Initialised from `seed` inside a forked RNG: the same on every rank, the global RNG untouched.
    """
    projections = nn.ModuleDict()
    if student_width == teacher_width:
        return projections
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in sorted(student_layers):
            projections[str(s)] = nn.Linear(student_width, teacher_width, bias=False)
    return projections
