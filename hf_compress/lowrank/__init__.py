"""Low-rank factorisation on bare modules and tensors: `LowRankConfig` (config.py), the factorised layer and
the (weighted) truncated SVD (factorize.py), optimizer param-group surgery (optim.py), the life cycle.

Life cycle: `prepare(model, config)` gives the `LowRank` (targeted layers, statistics, ranks) that
`LowRankCallback` drives at Trainer events — statistics before `lowrank_start_step` (asvd / fwsvd), the
factorisation at it, rank reductions on a gradual schedule — and `convert(model, config)` records what ships
(``config.hf_compress["lowrank"]``). `rebuild_lowrank` gives a saved model its factorised layers back on load.
"""

from .config import DATA_AWARE, METHODS, LowRankConfig
from .factorize import LowRankLinear, break_even, decompose, energy_rank, factors, is_lowrank, saves_parameters
from .lifecycle import LowRank, convert, prepare, rebuild_lowrank, restructure_to_fit
from .optim import replace_parameters

__all__ = [
    "DATA_AWARE", "METHODS", "LowRank", "LowRankConfig", "LowRankLinear", "break_even", "convert", "decompose",
    "energy_rank", "factors", "is_lowrank", "prepare", "rebuild_lowrank", "replace_parameters", "restructure_to_fit",
    "saves_parameters",
]
