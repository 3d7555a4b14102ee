"""`PruningCallback`: gradual magnitude / movement / Taylor pruning inside any `transformers.Trainer`.

Event by event (public TrainerCallback events only):
- on_init_end: select the targeted Linear layers and check the config against the model (bad input fails
  when the Trainer is built, before any training).
- on_train_begin: fix the schedule to the run's length; on resume, restore masks, scores and the rewind
  snapshot from the checkpoint (refusing a different config).
- on_pre_optimizer_step: gradients are final here (accumulated, all-reduced under DDP, clipped):
  accumulate gradient scores, recompute masks at update points, zero the gradients of pruned weights
  (so AdamW's moments stay zero). A step the fp16 grad scaler skips (a non-finite gradient) adds nothing
  to the scores and recomputes no mask; a mask update due then happens at the next step that is taken
  (or at train end), so the schedule's target is still reached (`callbacks/_amp.py`).
- on_optimizer_step: re-apply the masks, so no optimizer state (momentum, weight decay) revives a weight.
- on_step_end: lottery-ticket snapshot and rewind.
- on_log: sparsity in the training logs (per module in the last one), never in evaluation results; they
  reach the report_to integrations under DistillationTrainer, or with the stock Trainer after
  `hf_compress.callbacks.report_to_integrations(trainer)` (`callbacks/_logs.py`).
- on_step_end / on_epoch_end / on_save: masks and scores into the checkpoint, staged before the Trainer
  saves so that no kill point (checkpoint rotation included) loses them (`hf_compress.checkpointing`).
- on_train_end: after any best-model reload (the masks of the reloaded checkpoint come back with it),
  `hf_compress.pruning.convert` makes the model what ships: structured units removed, the run recorded
  with the sparsity of its (restored) masks, so `hf_compress.load_pretrained` rebuilds it. Every pruning run
  on the model restores its masks before any removes units (`callbacks/_order.py`). Always before
  QATCallback converts, in either list order: a QATCallback listed first runs this end itself before
  converting (`callbacks/_order.py`), and the Trainer's call then finds it done.
It only touches the `model` the Trainer hands it — the student under DistillationTrainer. Two
PruningCallbacks on one model keep separate state (`pruning_heads`, `pruning_heads_2`, ...).
"""

from __future__ import annotations

from ..checkpointing import StatefulCallback, best_checkpoint, load_state
from ..modules import out_axis, unwrap
from ..pruning import Pruner, convert, is_update_step, prepare, sparsity_at
from ..pruning.config import PruningConfig
from ..pruning.pruner import check_plain
from ..sharding import is_sharded
from ._amp import skipped_by_scaler
from ._order import finish_before_converting, finished_this_run, register_restore, restore_all
from ._logs import LogsForIntegrations, is_training_log


class PruningCallback(LogsForIntegrations, StatefulCallback):
    def __init__(self, config: PruningConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError("PruningCallback: pass either a PruningConfig or keyword options, not both.")
        self.config = config if config is not None else PruningConfig(**kwargs)
        self.base_name = self.config.tag
        self.pruner: Pruner | None = None
        self.end: int | None = None
        self.snapshot = None  # weights at rewind_step, until they are used
        self.removed: dict | None = None
        self.owed = False  # a mask update fell on a step the fp16 scaler skipped: due at the next step taken
        self.restored = False  # this run's final masks are restored (on_train_end, or another run's end first)

    # ------------------------------------------------------------------ helpers
    def _pruner(self, model) -> Pruner:
        model = unwrap(model)
        if self.pruner is None or not self.pruner.same_model(model):
            self.pruner = prepare(model, self.config)
            self.claim_name(model)
        return self.pruner

    def sparsity_at(self, step: int) -> float:
        """The schedule's sparsity after `step` optimizer steps (needs the run length: set at train begin)."""
        c = self.config
        end = self.end if self.end is not None else c.resolve_end(0)
        return sparsity_at(step, c.target_sparsity, c.pruning_start_step, end, c.frequency, c.schedule)

    def state_tensors(self) -> dict | None:
        if self.pruner is None:
            return None
        tensors = dict(self.pruner.state_dict())
        if self.snapshot is not None:
            tensors.update({f"rewind.{x}": s for x, s in zip(self.pruner.names, self.pruner.gather(self.snapshot))})
        return tensors

    def state_meta(self, state) -> dict:
        return {"config": self.config.to_dict(), "end_step": self.end, "owed_update": self.owed}

    def state_weights(self):
        return self.pruner.weights if self.pruner is not None else []

    def optional_state(self) -> dict:
        """The lottery-ticket snapshot is saved only between rewind_step and the rewind: one per weight."""
        if self.pruner is None:
            return {}
        return {f"rewind.{x}": tuple(w.shape) for x, w in zip(self.pruner.names, self.pruner.weights)}  # DTensor: global shape

    def _load(self, tensors) -> None:
        pruner = self.pruner
        pruner.load_state_dict(tensors)
        if f"rewind.{pruner.names[0]}" in tensors:
            self.snapshot = pruner.scatter([tensors[f"rewind.{x}"] for x in pruner.names])

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.refuse_zero3()
        if model is not None:
            self._pruner(model)
        if args.max_steps and args.max_steps > 0:
            self.config.resolve_end(args.max_steps)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        pruner = self._pruner(model)
        check_plain(dict(zip(pruner.names, (pruner.model.get_submodule(x) for x in pruner.names))))
        finish_before_converting(pruner.model, self, state)  # QATCallback runs this end first, wherever it is listed
        register_restore(pruner.model, self, state)
        self.restored = False
        c = self.config
        if c.structured and c.remove_pruned and any(is_sharded(w) for w in pruner.weights):
            raise ValueError(
                f"PruningCallback (granularity={c.granularity!r}, remove_pruned=True) under FSDP2: removing the pruned "
                "units needs the full model, which the Trainer never holds when sharded. Set remove_pruned=False "
                "(zeros stay in place), or convert a gathered copy yourself (hf_compress.sharding.full_state_dict; "
                "docs/architecture.md)."
            )
        self.end = c.resolve_end(state.max_steps)
        resumed = self.read_resume_state(args, state, c)
        if resumed is not None:
            tensors, meta, ckpt = resumed
            if meta.get("end_step") not in (None, self.end):
                raise ValueError(
                    f"Resuming from {ckpt}: its pruning schedule ends at step {meta['end_step']}, this run's at "
                    f"{self.end}: the run length changed. Resume with the same max_steps / num_train_epochs (or give "
                    "pruning_end_step explicitly in both runs)."
                )
            self._load(tensors)
            self.owed = bool(meta.get("owed_update", False))
            return
        self.owed = False
        if c.rewind_step == 0:
            self.snapshot = pruner.snapshot()
        s0 = self.sparsity_at(0)
        if s0 > 0:
            if pruner.needs_grads:
                raise ValueError(
                    f"PruningConfig: method={c.method!r} needs gradients before its first mask, but the schedule "
                    "prunes at step 0: set pruning_start_step >= 1 or pruning_end_step > pruning_start_step."
                )
            pruner.update(s0)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        p, c = self.pruner, self.config
        nxt = state.global_step + 1  # steps completed once this optimizer step is done
        due = nxt <= self.end and is_update_step(nxt, c.pruning_start_step, self.end, c.frequency, c.schedule)
        if skipped_by_scaler(optimizer):  # fp16 overflow: the optimizer skips this step, so do we
            self.owed = self.owed or due
        else:
            if nxt <= self.end:
                p.accumulate()
            if due or self.owed:
                p.update(self.sparsity_at(nxt))
                self.owed = False
        p.mask_grads()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.apply()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        c, step = self.config, state.global_step
        if c.rewind_step is not None:
            if step == c.rewind_step and self.snapshot is None:
                self.snapshot = self.pruner.snapshot()
            if step == self.end and self.snapshot is not None:
                self.pruner.rewind(self.snapshot, optimizer)
                self.snapshot = None
        super().on_step_end(args, state, control)  # stage the state of a step about to be saved

    @property
    def log_marker(self) -> str:
        return f"{self.name}/sparsity"

    def metrics_for_log(self, state, logs: dict) -> dict:
        """This callback's numbers for a training log entry ({} for an evaluation's)."""
        if self.pruner is None or not is_training_log(logs):
            return {}
        extra = {f"{self.name}/sparsity": round(self.pruner.sparsity(), 6), f"{self.name}/target": round(self.sparsity_at(state.global_step), 6)}
        if self.config.structured:
            extra[f"{self.name}/units_removed"] = self.pruner.units_removed()
        if "train_runtime" in logs:  # the end-of-training log: per module as well
            extra.update({f"{self.name}/sparsity/{k}": round(v, 6) for k, v in self.pruner.sparsity(per_module=True).items()})
        return extra

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.pruner is not None and finished_this_run(self.pruner.model, self):
            return  # a QATCallback listed before this one ran this end first (callbacks/_order.py)
        super().on_train_end(args, state, control)
        if self.pruner is None:
            return
        # Every callback of the run restores what it needs before any of them removes units: which blocks a
        # layers run skips is a forward hook, not in the weights, and the first removal deletes every skipped
        # block and all-zero unit, the other runs' too (callbacks/_order.py)
        restore_all(self.pruner.model, args, state)
        self.restore_before_removal(args, state)
        model = unwrap(model if model is not None else self.pruner.model)
        # its own figure, from its masks (zeros in the weights cannot tell whose, and another run's removal may have
        # taken some away): structured, the fraction of its units; else of its targeted weights
        own = self.pruner.unit_sparsity() if self.config.structured else self.pruner.sparsity()
        self.removed = convert(model, self.config, name=self.name, sparsity=own)
        if self.removed is not None:
            self.pruner = None  # its masks describe the layers that were just replaced

    def restore_before_removal(self, args, state) -> None:
        """The masks the shipped model keeps, once per run: after a best-model reload the best checkpoint's (the
        Trainer reloaded its weights), else this run's, with an update the fp16 scaler skipped made up."""
        if self.restored or self.pruner is None:
            return
        self.restored = True
        best = best_checkpoint(args, state)
        if best is not None:  # the Trainer reloaded the best checkpoint's weights: its masks come back too
            tensors, meta = load_state(best, self.name, config=self.config)
            self.check_fingerprint(best, meta)
            self.validate_state(best, tensors)
            self._load(tensors)
            if meta.get("owed_update"):  # that checkpoint's last update point was skipped (fp16 overflow)
                self.pruner.update(self.sparsity_at(meta["step"]))
        elif self.owed:  # the run's last update point was skipped (fp16 overflow) and no step followed
            self.pruner.update(self.sparsity_at(state.global_step))
        self.owed = False

    def input_cuts(self) -> dict[str, int]:
        """{layer name: features per unit} of the layers whose *input* features this run's removal takes out (heads:
        the attention output projection; neurons: the FFN down projection); {} when it removes none."""
        c, p = self.config, self.pruner
        if p is None or not (c.structured and c.remove_pruned) or c.granularity == "layers":
            return {}
        cuts = {}
        for g in p.groups:
            for x, d in g.parts:
                m = p.model.get_submodule(x)
                if d == 1 - out_axis(m):
                    cuts[x] = m.weight.shape[d] // g.n_units
        return cuts

    def summary(self) -> dict:
        """Sparsity now (overall and per module) and what the end of training removed."""
        out = {"removed": self.removed}
        if self.pruner is not None:
            out.update(sparsity=self.pruner.sparsity(), per_module=self.pruner.sparsity(per_module=True))
        return out
