"""Step checks the callbacks share (one home for each refusal)."""

from __future__ import annotations


def refuse_start_after_run(config, field: str, max_steps: int, never: str, instead: str) -> None:
    """Refuse a start step at or after the run's last step: the technique would never run while training.

    `config.<field>` is the start step; `never` says what would not happen, `instead` how to get the
    technique without training. `max_steps` <= 0 (not known yet) checks nothing.
    """
    start = getattr(config, field)
    if max_steps and max_steps > 0 and start >= max_steps:
        raise ValueError(
            f"{type(config).__name__}.{field}={start} is at or after the last training step ({max_steps}): {never}. "
            f"Lower {field} or train longer ({instead})."
        )
