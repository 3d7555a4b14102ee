"""Export backends: each turns a (fake-)quantised Linear into a real low-bit layer.

Every backend has the same methods (see `Backend`), one file per library. The integer codes and scales
come from numerics.quantize_weight, so the exported layer computes with exactly the weights QAT trained.
"""

from __future__ import annotations

from torch import nn

from ..numerics import QScheme


class Backend:
    """Interface of an export backend."""

    name: str = ""
    package: str = ""  # the pip package it needs

    def unavailable(self) -> str | None:
        """Why this backend cannot run here (None when it can)."""
        return None

    def check(self, scheme: QScheme) -> None:
        """ValueError when the backend cannot store `scheme`."""

    def convert(self, module: nn.Module, scheme: QScheme, axis: int, stored: dict | None = None) -> nn.Module:
        """A real low-bit layer computing `module` with its weight quantised by `scheme`. `stored`: the exact
        codes / scales / zero points (quantize_weight's layout) of a weight already baked on a grid that
        re-quantising would move (quantization.convert passes them); None: quantise `module.weight`."""
        raise NotImplementedError

    def empty(self, in_features: int, out_features: int, bias: bool, scheme: QScheme) -> nn.Module:
        """The same layer type with placeholder storage, ready for `load_state_dict` (reload path)."""
        raise NotImplementedError

    def require(self) -> None:
        reason = self.unavailable()
        if reason:
            raise ValueError(f"`export`={self.name!r} cannot run here: {reason}")


def names() -> tuple[str, ...]:
    return ("torch-int8", "bnb-int8", "bnb-nf4")


def get_backend(name: str) -> Backend:
    if name == "torch-int8":
        from .torch_int8 import TorchInt8

        return TorchInt8()
    if name in ("bnb-int8", "bnb-nf4"):
        from .bnb import Bnb

        return Bnb(name)
    raise ValueError(f"`export`={name!r} is not a backend: use None or one of {names()}.")
