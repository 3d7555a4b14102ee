"""Adding a callback's numbers to the Trainer's log entry."""


def add_to_logs(state, logs: dict, extra: dict) -> None:
    """Put `extra` into `logs` and into the history entry the Trainer appended just before `on_log`.

    Callbacks run after the Trainer's printer and integrations, so `state.log_history` (and what the
    Trainer saves in trainer_state.json) is where these numbers are kept complete.
    """
    logs.update(extra)
    if state.log_history and set(state.log_history[-1]) - {"step"} <= set(logs):
        state.log_history[-1].update(extra)
