"""`LowRankCallback`: low-rank factorisation of Linear layers inside any `transformers.Trainer`.

Event by event (public TrainerCallback events only):
- on_init_end: select the targeted Linear layers and check the config against the model (targets or a
  `lowrank_ranks` pattern matching nothing, a rank above min(in, out), a start step after the run) — bad
  input fails when the Trainer is built. A load_state_dict pre-hook goes on the model, so a checkpoint
  written after the factorisation loads into it (resume, best-model reload): each targeted layer takes the
  structure and rank the checkpoint stores, before the Trainer builds its optimizer on resume.
  With lowrank_start_step=0 the layers are factorised here, before the Trainer's optimizer exists (and before
  a QATCallback listed after this one chooses its layers, so QAT quantises the factors). With a later start the
  layers and step are announced on the model, and a QATCallback that chose them refuses at train begin
  (`callbacks/_order.py`).
- on_train_begin: fix the schedule to the run's length; on resume, restore the statistics and final ranks
  from the checkpoint (refusing a different config). asvd: forward pre-hooks start collecting mean |x|.
- on_pre_optimizer_step: fwsvd: squared gradients (final here: accumulated, clipped) added per output row;
  a step the fp16 grad scaler skips adds nothing.
- on_step_begin of step lowrank_start_step: the factorisation. The Trainer built its optimizer in `train()`
  before on_train_begin, so each dense weight is replaced in its param group by its two factors, at its
  position (what create_optimizer would build for the factorised model, so resumed runs load the optimizer
  state into the same slots), and its AdamW state is dropped; the bias Parameter is kept with its state.
  Gradual schedules: at update points the factors shrink in place (same Parameter objects, new shapes,
  their optimizer state reset). Each structural change is recorded in the model config, so every checkpoint
  is a loadable model directory.
- on_log: weight ratio of the targeted layers and mean rank, in training logs only.
- on_step_end / on_epoch_end / on_save: statistics and final ranks into the checkpoint (hf_compress.checkpointing).
- on_train_end: after any best-model reload, `hf_compress.lowrank.convert` records the factorised layers as they
  are (hf_compress.load_pretrained and, after `import hf_compress`, the Auto classes rebuild them).
Mid-run factorisation (lowrank_start_step > 0 or a gradual schedule) is refused under distributed training:
DDP / FSDP register the parameters when they wrap the model.
"""

from __future__ import annotations

from ..checkpointing import StatefulCallback, best_checkpoint, load_state
from ..lowrank import LowRank, convert, prepare, restructure_to_fit
from ..lowrank.config import LowRankConfig
from ..modules import unwrap
from ..pruning.schedules import is_update_step
from ._amp import skipped_by_scaler
from ._order import announce_mid_run_change, register_restore, restore_all
from ._logs import LogsForIntegrations, is_training_log

NAME = "lowrank"


class LowRankCallback(LogsForIntegrations, StatefulCallback):
    base_name = NAME
    log_marker = f"{NAME}/weight_ratio"

    def __init__(self, config: LowRankConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError("LowRankCallback: pass either a LowRankConfig or keyword options, not both.")
        self.config = config if config is not None else LowRankConfig(**kwargs)
        self.lowrank: LowRank | None = None
        self.end: int | None = None
        self.result: dict | None = None
        self.ended = False  # this run's end of training ran (at on_train_end, or first in another callback's)
        self._hook = None

    # ------------------------------------------------------------------ helpers
    def _prepare(self, model) -> LowRank:
        model = unwrap(model)
        if self.lowrank is None or not self.lowrank.same_model(model):
            if self.lowrank is not None:
                self.lowrank.stop_statistics()
            self.lowrank = prepare(model, self.config)
            self.claim_name(model)
            self._install_load_hook(model)
        return self.lowrank

    def _install_load_hook(self, model) -> None:
        if self._hook is not None:
            self._hook.remove()
        lowrank = self.lowrank

        def fit_checkpoint(module, state_dict, prefix, *args):
            restructure_to_fit(module, lowrank.names, state_dict, prefix)

        self._hook = model.register_load_state_dict_pre_hook(fit_checkpoint)

    def _record(self, model) -> None:
        convert(model, self.config, lowrank=self.lowrank)

    def _end(self, max_steps: int) -> int:
        return self.config.resolve_end(max_steps)

    def state_tensors(self):
        return self.lowrank.state_dict() if self.lowrank is not None else None

    def state_meta(self, state) -> dict:
        return {"config": self.config.to_dict(), "final": self.lowrank.final, "end_step": self.end}

    def state_weights(self):
        return self.lowrank.weights() if self.lowrank is not None else []

    def _announce(self, lr, state) -> None:
        """Tell a QATCallback of the same Trainer / run (`state`) which layers the factorisation replaces, and when."""
        step = self.config.lowrank_start_step
        announce_mid_run_change(lr.model, lr.names, step, f"factorised by LowRankCallback at step {step} (lowrank_start_step)",
                                trainer_state=state)

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.refuse_zero3()
        c = self.config
        if (c.lowrank_start_step > 0 or c.gradual) and getattr(args, "world_size", 1) > 1:
            raise ValueError(
                f"LowRankCallback: factorising during training (lowrank_start_step={c.lowrank_start_step}, "
                f"lowrank_schedule={c.lowrank_schedule!r}) under distributed training ({args.world_size} processes): "
                "DDP / FSDP register the parameters when they wrap the model. Use lowrank_start_step=0 with "
                "lowrank_schedule='one_shot' (factorised when the Trainer is built), or train on one process."
            )
        if args.max_steps and args.max_steps > 0:
            self._end(args.max_steps)
        if model is None:
            return
        lr = self._prepare(model)
        if c.lowrank_start_step == 0 and lr.final is None:  # before the optimizer exists
            lr.factorise(optimizer=None, step=0, end=c.lowrank_start_step + 1)
            self._record(lr.model)
        elif lr.final is None:  # a QATCallback checks these at train begin (callbacks/_order.py)
            self._announce(lr, state)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        c = self.config
        lr = self._prepare(model)
        self.end = self._end(state.max_steps)
        self.result, self.ended = None, False
        register_restore(lr.model, self, state)
        resumed = self.read_resume_state(args, state, c)
        if resumed is not None:
            tensors, meta, ckpt = resumed
            if meta.get("end_step") not in (None, self.end):
                raise ValueError(
                    f"Resuming from {ckpt}: its low-rank schedule ends at step {meta['end_step']}, this run's at "
                    f"{self.end}: the run length changed. Resume with the same max_steps / num_train_epochs (or give "
                    "lowrank_end_step explicitly in both runs)."
                )
            lr.load_state_dict(tensors)
            if meta.get("final") is not None:
                lr.final = dict(meta["final"])
        elif c.lowrank_start_step == 0 and lr.final is None:  # a model built in train() (model_init)
            lr.factorise(optimizer=optimizer, step=0, end=self.end)
            self._record(lr.model)
        if lr.final is None and state.global_step < c.lowrank_start_step:
            # again for this train() (a model model_init built, or a QATCallback added to this Trainer later):
            # a QATCallback checks it at its first step (callbacks/_order.py)
            self._announce(lr, state)
            if c.data_aware:
                lr.start_statistics()

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        lr, c, step = self.lowrank, self.config, state.global_step
        if lr is None:
            return
        if lr.final is None:
            if step >= c.lowrank_start_step:
                lr.factorise(optimizer=optimizer, step=step, end=self.end)
                self._record(lr.model)
            return
        if c.gradual and c.lowrank_start_step < step <= self.end and is_update_step(
                step, c.lowrank_start_step, self.end, c.lowrank_frequency, c.lowrank_schedule):
            if lr.shrink(step, self.end, optimizer=optimizer):
                self._record(lr.model)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        lr = self.lowrank
        if lr is not None and lr.final is None and self.config.lowrank_method == "fwsvd" and not skipped_by_scaler(optimizer):
            lr.accumulate()

    def metrics_for_log(self, state, logs: dict) -> dict:
        if self.lowrank is None or not is_training_log(logs):
            return {}
        s = self.lowrank.summary()
        return {f"{self.name}/weight_ratio": round(s["weight_ratio"], 6), f"{self.name}/rank_mean": round(s["rank_mean"], 3),
                f"{self.name}/layers_factorised": s["layers_factorised"]}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        super().on_train_end(args, state, control)
        if self.lowrank is None:
            return
        restore_all(self.lowrank.model, args, state)
        self.restore_before_removal(args, state)

    def restore_before_removal(self, args, state) -> None:
        """This run's end of training, before any pruning end removes units (callbacks/_order.py): its layers are
        named by the blocks they sit in, and a layers run renames the blocks after the ones it removes (it renames
        what this end records too)."""
        lr = self.lowrank
        if self.ended or lr is None:
            return
        self.ended = True
        lr.stop_statistics()
        best = best_checkpoint(args, state)
        if best is not None:  # the Trainer reloaded the best checkpoint (the load hook gave the layers its shapes)
            tensors, meta = load_state(best, self.name, config=self.config)
            self.check_fingerprint(best, meta)
            if meta.get("final") is not None:
                lr.final = dict(meta["final"])
        self.result = convert(lr.model, self.config, lowrank=lr)

    def summary(self) -> dict:
        """Ranks now, the weight ratio of the targeted layers, and what the end of training recorded."""
        out = {"recorded": self.result}
        if self.lowrank is not None:
            out.update(self.lowrank.summary())
        return out
