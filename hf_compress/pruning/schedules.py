"""Sparsity schedules: the sparsity a model has after a given number of optimizer steps.

Masks change only at *update points* — `start`, `start + frequency`, ... and always `end` — so the
value returned for any step is the schedule evaluated at the last update point at or before it.
From `end` on it is exactly `target`.
"""

from __future__ import annotations

SCHEDULES = ("cubic", "linear", "one_shot")


def is_update_step(step: int, start: int, end: int, frequency: int = 1, schedule: str = "cubic") -> bool:
    """True when the masks are recomputed as `step` optimizer steps complete."""
    if schedule == "one_shot":
        return step == start
    return start <= step <= end and ((step - start) % frequency == 0 or step == end)


def sparsity_at(
    step: int, target: float, start: int, end: int, frequency: int = 1, schedule: str = "cubic", initial: float = 0.0
) -> float:
    """Sparsity in effect after `step` optimizer steps.

    cubic (Zhu & Gupta 2017): s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start))^3 — prunes fast
    while many redundant weights remain, slowly near the target. linear: straight line from s_i to s_f.
    one_shot: 0 before `start`, the target from `start` on.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule`={schedule!r} is not one of {SCHEDULES}.")
    if step < start:
        return 0.0
    if schedule == "one_shot" or step >= end:
        return float(target)
    t = start + ((step - start) // frequency) * frequency  # last update point
    frac = (t - start) / (end - start)
    if schedule == "cubic":
        return float(target + (initial - target) * (1.0 - frac) ** 3)
    return float(initial + (target - initial) * frac)
