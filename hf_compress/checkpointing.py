"""Callback state inside Trainer checkpoints, written so that no kill point loses it.

A stateful callback (pruning masks and scores, QAT observers, distillation projections) keeps its
tensors beside the Trainer's own files in ``checkpoint-N/hf_compress/<name>.safetensors`` (+
``<name>.json`` for scalars, the config they were made with and a fingerprint of the weights they
belong to). The Trainer rotates old checkpoints away (``save_total_limit``) *before* ``on_save``
fires, so the state is staged first: at ``on_step_end`` / ``on_epoch_end`` of a step that will be
saved (or evaluated, with save_strategy="best") it goes to ``<output_dir>/.hf_compress-staging/checkpoint-N/``, and ``on_save``
moves it into the checkpoint. Killed anywhere in between, a resume finds it in one of the two
places. Each file goes to a temporary name first and is renamed (the JSON last: it marks the state
complete); only the main process writes.

On resume the Trainer has loaded ``trainer_state.json`` before ``on_train_begin``, so
``state.global_step`` names the checkpoint. The state is taken from ``args.resume_from_checkpoint``
when it is a path, else from ``<output_dir>/checkpoint-N`` (or the staging copy), and only if its
weight fingerprint matches the weights the Trainer actually loaded; otherwise the run stops with a
message (never restarts the masks from scratch while the logs claim otherwise).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import weakref
from typing import Any

import torch
from transformers import TrainerCallback

from .sharding import local, sum_shards

SUBDIR = "hf_compress"
STAGING = ".hf_compress-staging"


def checkpoint_dir(args, state) -> str:
    """``<output_dir>/checkpoint-N``; under hyperparameter search the trial's folder that holds it."""
    path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    if os.path.isdir(path):
        return path
    trials = sorted(glob.glob(os.path.join(glob.escape(args.output_dir), "*", f"checkpoint-{state.global_step}")),
                    key=os.path.getmtime)
    return trials[-1] if trials else path


def staging_dir(args, step: int) -> str:
    return os.path.join(args.output_dir, STAGING, f"checkpoint-{step}")


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_state(folder: str, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """`tensors` + `meta` as ``folder/<name>.safetensors`` and ``folder/<name>.json`` (the JSON last)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(os.path.join(folder, f"{name}.safetensors"), lambda p: save_file(clean, p))

    def _json(p):
        with open(p, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)

    _atomic_write(os.path.join(folder, f"{name}.json"), _json)
    return folder


def save_state(args, state, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str | None:
    """Write one callback's state into the checkpoint just saved (main process only)."""
    if not state.is_world_process_zero:
        return None
    return write_state(os.path.join(checkpoint_dir(args, state), SUBDIR), name, tensors, meta)


def _has_state(folder: str, name: str) -> bool:
    return os.path.exists(os.path.join(folder, SUBDIR, f"{name}.json"))


def find_resume_dir(args, state, name: str | None = None) -> str | None:
    """The checkpoint a resumed run started from (None for a fresh run).

    With `name`: the folder that holds that callback's state for this step — the checkpoint itself,
    or the staging copy a kill between the Trainer's save and ``on_save`` left behind.
    """
    if state.global_step <= 0:
        return None
    candidates = [checkpoint_dir(args, state), staging_dir(args, state.global_step)]
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.insert(0, args.resume_from_checkpoint)
    if name is not None:
        return next((c for c in candidates if _has_state(c, name)), None)
    return next((c for c in candidates if os.path.isdir(c)), None)


def _config_dict(config) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the config as a dict, its fields' defaults); a plain dict has no defaults."""
    if config is None or isinstance(config, dict):
        return config, {}
    defaults = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return as_dict, {k: v for k, v in defaults.items() if k in as_dict}


def load_state(
    ckpt: str, name: str, config=None, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read one callback's state; refuse when it was written with a different compression config.

    `config`: the config dataclass (or its dict). A field the checkpoint does not know (added to the config
    after it was written) counts as unchanged when it has its default value, which keeps the old behaviour."""
    config, defaults = _config_dict(config)
    from safetensors.torch import load_file

    folder = os.path.join(ckpt, SUBDIR)
    meta_path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(meta_path):
        raise ValueError(
            f"Resuming from {ckpt}, but it holds no {name} state ({meta_path} is missing). "
            f"It was written without {name} or its save was interrupted: resume from an earlier checkpoint, "
            f"or start a fresh run (a new output_dir)."
        )
    with open(meta_path) as f:
        meta = json.load(f)
    saved = meta.get("config") or {}
    diff = {} if config is None else {
        k: (saved.get(k), v)
        for k, v in config.items()
        if (saved.get(k) != v if k in saved else not (k in defaults and _same(defaults[k], v)))
    }
    if config is not None and (diff or set(saved) - set(config)):
        diff.update({k: (saved[k], None) for k in set(saved) - set(config)})
        raise ValueError(
            f"Resuming from {ckpt} with a different {name} config than the checkpoint was written with: "
            f"{{field: (checkpoint, now)}} = {diff}. Use the checkpoint's settings, or start a fresh run."
        )
    tensors = load_file(os.path.join(folder, f"{name}.safetensors"), device=str(device))
    return tensors, meta


def check_state_tensors(
    ckpt: str, name: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple], optional: dict[str, tuple] | None = None
) -> None:
    """Refuse a saved state that does not fit this run before anything is copied from it: a tensor missing,
    of another shape (``copy_`` would broadcast it silently), or holding NaN/Inf (masks, scores and observer
    ranges are finite in any state a run writes)."""
    where = f"{ckpt}/{SUBDIR}/{name}.safetensors"
    missing = sorted(k for k in expected if k not in tensors)
    if missing:
        raise ValueError(
            f"Resuming from {ckpt}: the {name} state ({where}) lacks {missing[:3]} ({len(missing)} tensor(s)); it was "
            "written for another model or edited. Resume from a checkpoint of this run, or start a fresh run."
        )
    shapes = {**(optional or {}), **expected}
    wrong = [(k, tuple(tensors[k].shape), tuple(want)) for k, want in shapes.items() if k in tensors and tuple(tensors[k].shape) != tuple(want)]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(
            f"Resuming from {ckpt}: in the {name} state ({where}) `{k}` has shape {list(got)} but this model needs "
            f"{list(want)} ({len(wrong)} tensor(s) differ); it was written for another model or edited. Resume from "
            "a checkpoint of this run, or start a fresh run."
        )
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"Resuming from {ckpt}: the {name} state ({where}) holds NaN/Inf in `{k}`; the file is damaged "
                "(a run never saves non-finite masks, scores or observer ranges). Resume from an earlier checkpoint, "
                "or start a fresh run."
            )


def _same(default, value) -> bool:
    """A default compared with a config dict's value (to_dict turns tuples into lists)."""
    norm = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731
    return norm(default) == norm(value)


def fingerprint(weights) -> float:
    """A number that changes with the weights (sum of |w| in float64, over every shard): ties a saved
    state to the weights it was saved with."""
    total = None
    for w in weights:
        piece = local(w.detach()).double().abs().sum()
        piece = sum_shards(piece, w)
        total = piece if total is None else total + piece
    return float(total) if total is not None else 0.0


def best_checkpoint(args, state) -> str | None:
    """The checkpoint the Trainer reloaded before ``on_train_end`` (``load_best_model_at_end``), or None."""
    best = getattr(state, "best_model_checkpoint", None)
    if getattr(args, "load_best_model_at_end", False) and best and os.path.isdir(best):
        return best
    return None


# one name per callback and model: two callbacks of one kind never share checkpoint files
_NAMES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


class StatefulCallback(TrainerCallback):
    """Base of the callbacks whose state lives in checkpoints; subclasses give `base_name`,
    `state_tensors()`, `state_meta()` and `state_weights()` (the weights the state belongs to)."""

    base_name = "state"
    name: str | None = None

    def refuse_zero3(self) -> None:
        """DeepSpeed ZeRO-3 partitions every parameter: masks, observers and convert would see empty shards."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError(
                f"{type(self).__name__} does not support DeepSpeed ZeRO-3 (partitioned parameters): use DDP, "
                "DeepSpeed ZeRO-1/2, or FSDP2 (docs/architecture.md says which techniques run sharded)."
            )

    def claim_name(self, model: torch.nn.Module) -> str:
        """`base_name`, or `base_name_2`, `_3`... when another live callback on this model has it (in list order,
        so a resumed run gets the same names)."""
        taken = _NAMES.setdefault(model, {})
        for name, ref in taken.items():
            if ref() is self:
                self.name = name
                return name
        name, i = self.base_name, 1
        while name in taken and taken[name]() is not None:
            i += 1
            name = f"{self.base_name}_{i}"
        taken[name] = weakref.ref(self)
        self.name = name
        return name

    # what subclasses provide
    def state_tensors(self) -> dict[str, torch.Tensor] | None:  # None: nothing to save (yet)
        return None

    def state_meta(self, state) -> dict[str, Any]:
        return {}

    def state_weights(self) -> list[torch.Tensor]:
        return []

    def _payload(self, state):
        tensors = self.state_tensors()
        if tensors is None:
            return None
        meta = {**self.state_meta(state), "step": state.global_step, "fingerprint": fingerprint(self.state_weights())}
        return tensors, meta

    # staging and moving into the checkpoint
    def _stage(self, args, state, control) -> None:
        # a save is decided at step / epoch end, except save_strategy="best": after the evaluation
        will_save = control.should_save or (args.save_strategy == "best" and control.should_evaluate)
        if not will_save or self.name is None:
            return
        payload = self._payload(state)  # every rank: gathering shards is collective
        if payload is not None and state.is_world_process_zero:
            write_state(os.path.join(staging_dir(args, state.global_step), SUBDIR), self.name, *payload)

    def on_step_end(self, args, state, control, **kwargs):
        self._stage(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._stage(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if self.name is None:
            return
        staged = os.path.join(staging_dir(args, state.global_step), SUBDIR)
        if state.is_world_process_zero and _has_state(os.path.dirname(staged), self.name):
            target = os.path.join(checkpoint_dir(args, state), SUBDIR)
            os.makedirs(target, exist_ok=True)
            for ext in (".safetensors", ".json"):  # the JSON last: it marks the state complete
                os.replace(os.path.join(staged, self.name + ext), os.path.join(target, self.name + ext))
            self._clean_staging(args, state.global_step)
            return
        payload = self._payload(state)
        if payload is not None:
            save_state(args, state, self.name, *payload)

    def _clean_staging(self, args, upto: int | None = None) -> None:
        root = os.path.join(args.output_dir, STAGING)
        if not os.path.isdir(root):
            return
        for d in os.listdir(root):
            step = d.rpartition("-")[2]
            if upto is None or (step.isdigit() and int(step) < upto):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        if upto is None:
            shutil.rmtree(root, ignore_errors=True)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._clean_staging(args)

    # reading back
    def read_resume_state(self, args, state, config, device="cpu"):
        """(tensors, meta, folder) of the checkpoint this run resumes from; None for a fresh run.

        Refuses when the run resumes (global_step > 0) but no state of this callback is found, or the one
        found belongs to other weights than those the Trainer loaded."""
        if state.global_step <= 0:
            return None
        ckpt = find_resume_dir(args, state, self.name)
        where = f"{checkpoint_dir(args, state)} (or TrainingArguments.resume_from_checkpoint)"
        if ckpt is None:
            raise ValueError(
                f"Resuming at step {state.global_step}, but no {self.name} state for that step was found in {where}: "
                "it was written without it, or its save was interrupted. "
                "When you resume from a checkpoint outside output_dir, also set "
                "TrainingArguments(resume_from_checkpoint=PATH) to it (the callbacks read it there), or start a fresh run."
            )
        tensors, meta = load_state(ckpt, self.name, config=config, device=device)
        self.check_fingerprint(ckpt, meta)
        self.validate_state(ckpt, tensors)
        return tensors, meta, ckpt

    def validate_state(self, ckpt: str, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse saved tensors that do not fit this callback (missing, other shapes, NaN/Inf)."""
        check_state_tensors(ckpt, self.name, tensors, self.expected_state(), self.optional_state())

    def expected_state(self) -> dict[str, tuple[int, ...]]:
        """Shapes the saved state must have, by tensor name (what this callback would save now); subclasses
        add the names whose presence depends on the run (e.g. a rewind snapshot)."""
        now = self.state_tensors() or {}
        return {k: tuple(v.shape) for k, v in now.items()}

    def optional_state(self) -> dict[str, tuple[int, ...]]:
        """Shapes of tensors a saved state may hold or not (checked when present)."""
        return {}

    def check_fingerprint(self, ckpt: str, meta: dict) -> None:
        saved = meta.get("fingerprint")
        if saved is None:
            return
        now = fingerprint(self.state_weights())
        if not math.isclose(saved, now, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"The {self.name} state in {ckpt} was saved with other weights than the ones the Trainer loaded "
                f"(fingerprint {saved!r} vs {now!r}): the run resumes from another checkpoint than {ckpt}. Set "
                "TrainingArguments(resume_from_checkpoint=PATH) to the checkpoint you resume from."
            )
