"""The callbacks' numbers (`pruning*/…`, `qat/…`) in the Trainer's *training* logs, where the `report_to`
integrations (TensorBoard, W&B, trackio, …) see them.

The Trainer calls `on_log` on its callbacks in list order, and builds that list as defaults first
(`DefaultFlowCallback`, then one callback per `report_to` integration), user callbacks after: by the time
a user callback's `on_log` runs, every integration has already written the entry. No TrainerCallback
event lets a callback add to a log entry earlier (each entry is a fresh dict built inside the Trainer),
and a callback never sees the Trainer or its callback list. So the keys reach the integrations in one
of two ways:

- `DistillationTrainer` asks its callbacks for their numbers in its `log` override, before the
  integrations run (`metrics_for_log`, duck-typed: trainers never import callbacks);
- with the stock `Trainer`, `report_to_integrations(trainer)` moves the integration callbacks after every
  other callback (with the Trainer's public `pop_callback` / `add_callback`), so this `on_log` runs first.

Without either, the keys still reach `state.log_history` (trainer_state.json) and the printed logs, and
the callback warns once that the integrations did not get them.

Evaluation logs get none of these keys: `Trainer.evaluate` passes its metrics dict to `on_log` and then
returns that same dict (what `save_metrics("eval", …)` writes to eval_results.json / all_results.json,
and the model card reads from log_history), so a key added there would leak into the evaluation results.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def is_training_log(logs: dict) -> bool:
    """A step's training log (`loss`) or the end-of-training one (`train_runtime`), not an evaluation's."""
    return "loss" in logs or "train_runtime" in logs


def add_to_logs(state, logs: dict, extra: dict) -> None:
    """Put `extra` into `logs` and into the history entry the Trainer appended just before `on_log`."""
    logs.update(extra)
    if state.log_history and set(state.log_history[-1]) - {"step"} <= set(logs):
        state.log_history[-1].update(extra)


def integrations(args) -> list[str]:
    report_to = args.report_to or []
    return [r for r in ([report_to] if isinstance(report_to, str) else report_to) if r != "none"]


class LogsForIntegrations:
    """Mixin of the compression callbacks: `metrics_for_log` (their numbers for a training log) and the
    `on_log` that adds them when the Trainer did not already."""

    log_marker: str  # a key every non-empty `metrics_for_log` result holds
    ahead_of_integrations = False  # set by `report_to_integrations`
    _warned = False

    def metrics_for_log(self, state, logs: dict) -> dict:  # pragma: no cover - implemented by the callbacks
        raise NotImplementedError

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not is_training_log(logs) or self.log_marker in logs:
            return  # an evaluation's metrics, or the trainer already added them (DistillationTrainer.log)
        extra = self.metrics_for_log(state, logs)
        if not extra:
            return
        add_to_logs(state, logs, extra)
        if not self.ahead_of_integrations and not self._warned and integrations(args) and state.is_world_process_zero:
            self._warned = True
            logger.warning(
                f"{type(self).__name__}: the report_to integrations {integrations(args)} run before this callback and "
                f"never see its log keys ({self.log_marker}, ...). Call "
                "hf_compress.callbacks.report_to_integrations(trainer) after building the Trainer (or train with "
                "DistillationTrainer); trainer_state.json's log_history has them either way."
            )


def report_to_integrations(trainer) -> None:
    """Make the compression callbacks' log keys reach the `report_to` integrations of a stock `Trainer`.

    Moves the integration callbacks (TensorBoard, W&B, ...) after every other callback, so the compression
    callbacks' `on_log` adds its keys before they write the entry. Call it after building the Trainer and
    after adding callbacks. Other callbacks' relative order is kept; the integrations' other events (their
    set-up at train begin, a W&B model upload at train end) then follow ours, i.e. see the converted model.
    """
    from transformers.integrations import get_reporting_integration_callbacks

    kinds = tuple(get_reporting_integration_callbacks(trainer.args.report_to))
    if kinds:
        for cb in [c for c in trainer.callback_handler.callbacks if isinstance(c, kinds)]:
            trainer.pop_callback(cb)
            trainer.add_callback(cb)
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, LogsForIntegrations):
            cb.ahead_of_integrations = True
