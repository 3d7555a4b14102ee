"""`QATCallback`: quantisation-aware training inside any `transformers.Trainer`.

Event by event (public TrainerCallback events only):
- on_init_end: select the targeted layers and check them against the config (targets matching
  nothing, group sizes not dividing a width) — bad input fails when the Trainer is built.
- on_train_begin (or on_step_begin of `qat_start_step`): fake quantisation goes into the targeted layers
  in place. The Trainer built its optimizer before this event, and that is fine: the layers keep their
  `weight` / `bias` Parameter objects, so the optimizer updates the float master weights. On resume,
  the observers' ranges come back from the checkpoint (a different config is refused).
- on_step_end: activation observers commit this step's statistics (reduced over all ranks first, so
  every rank uses the same ranges), and stop moving at `freeze_observers_step`. A step the fp16 grad
  scaler skips (a non-finite gradient, checked at on_pre_optimizer_step: `callbacks/_amp.py`) commits
  nothing: its statistics are discarded, as the optimizer discards its gradients.
- on_log: fraction of Linear layers under fake quantisation and a summary of the observed ranges, in the
  training logs only (never in evaluation results); they reach the report_to integrations under
  DistillationTrainer, or with the stock Trainer after `hf_compress.callbacks.report_to_integrations(trainer)`.
- on_step_end / on_epoch_end / on_save: observer state into the checkpoint (hf_compress/qat.*), staged
  before the Trainer saves so that no kill point loses it (`hf_compress.checkpointing`).
- on_train_end: after any best-model reload (its observer ranges come back with it),
  `hf_compress.quantization.convert`: `export=None` — the targeted weights become their
  quantised-dequantised values and the fake quantisation is removed; otherwise the layers become real
  low-bit layers. Either way the scheme is recorded in the model config so `hf_compress.load_pretrained`
  rebuilds the same model. A qat_start_step at or after the run's last step is refused before training.

With pruning, in either list order: pruning masks the float weights under the fake quantisation, and
at on_train_end it removes its structure before QAT quantises the layers that remain (a PruningCallback
listed after this one is finished first: `callbacks/_order.py`). Zeros stay zeros: 0.0 is on every grid.
"""

from __future__ import annotations

import torch

from ..checkpointing import StatefulCallback, best_checkpoint, check_state_tensors, load_state
from ..modules import is_linear, unwrap
from ..quantization import build_plan, convert, fake_quant_layers, insert_fake_quant, observers, set_observing
from ..quantization.config import QATConfig
from ..quantization.observers import sync_observers
from ..sharding import is_sharded
from ._amp import skipped_by_scaler
from ._order import (
    block_places, finish_pending, follow_blocks, mid_run_changes, register_restore, restore_all, still_pending,
)
from ._logs import LogsForIntegrations, is_training_log
from ._steps import refuse_start_after_run

NAME = "qat"


class QATCallback(LogsForIntegrations, StatefulCallback):
    base_name = NAME
    log_marker = f"{NAME}/fake_quant_fraction"

    def __init__(self, config: QATConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError("QATCallback: pass either a QATConfig or keyword options, not both.")
        self.config = config if config is not None else QATConfig(**kwargs)
        self.plan = None
        self.model = None
        self.active = False  # fake quantisation is in the model
        self._observers = []  # cached: the hot path does not walk the module tree
        self._skipped = False  # the fp16 grad scaler skips this optimizer step
        self._trainer = None  # the `state` of its Trainer's on_init_end: which Trainer it belongs to (_order.py)
        self._run_checked = None  # the `state` of the train() whose announcements were checked at its first step
        self.result: dict | None = None  # metadata recorded at the end of training
        self.restored = False  # this run's best checkpoint is checked and its block places noted (before removals)
        self._blocks: dict = {}  # planned layer name -> (its block, the name inside the block)

    # ------------------------------------------------------------------ helpers
    def _plan(self, model):
        model = unwrap(model)
        if self.plan is None or self.model is not model:
            self.plan, self.model = build_plan(model, self.config), model
            self.claim_name(model)
        return self.plan

    def _activate(self, model, step: int) -> None:
        insert_fake_quant(model, self.plan)
        f = self.config.freeze_observers_step
        set_observing(model, f is None or step < f)
        self._observers = list(observers(model).values())
        self.active = True

    def state_tensors(self) -> dict[str, torch.Tensor] | None:
        if self.model is None:
            return None
        out = {}
        for name, obs in observers(self.model).items():
            out.update({f"{name}.{k}": v for k, v in obs.state().items()})
        return out

    # ------------------------------------------------------------------ events
    def state_meta(self, state) -> dict:
        return {"config": self.config.to_dict(), "active": self.active,
                "observing": any(o.observing for o in self._observers)}

    def state_weights(self):
        return [self.model.get_submodule(n).weight for n in self.plan] if self.model is not None else []

    def _load_observers(self, model, tensors, meta, ckpt: str) -> None:
        if meta.get("active"):
            expected = {f"{n}.{k}": tuple(v.shape) for n, obs in observers(model).items() for k, v in obs.state().items()}
            check_state_tensors(ckpt, self.name, tensors, expected)  # every observer's range there, and finite
            dev = next(model.parameters()).device
            for name, obs in observers(model).items():
                obs.load_state({k: tensors[f"{name}.{k}"].to(dev) for k in ("lo", "hi", "initialized")})

    def _check_start(self, max_steps: int) -> None:
        refuse_start_after_run(self.config, "qat_start_step", max_steps,
                               "fake quantisation would never run, yet the export would be labelled quantised",
                               "for quantisation without training use quantize_model")

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.refuse_zero3()
        self._trainer = state
        if model is not None:
            self._plan(model)
        self._check_start(args.max_steps)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = unwrap(model)
        self._plan(model)
        self._check_start(state.max_steps)
        self._refuse_mid_run_changes(model, self._trainer, state.global_step)
        self._run_checked = None
        if any(is_sharded(p) for p in model.parameters()):
            raise ValueError(
                "QATCallback under FSDP2: converting to what ships needs the full model, which the Trainer never "
                "holds when sharded. Train QAT with DDP (or one process), or run the technique yourself on the "
                "sharded model and convert a gathered copy (hf_compress.sharding.full_state_dict; docs/architecture.md)."
            )
        self.result, self.active = None, bool(fake_quant_layers(model))
        register_restore(model, self, state)
        self.restored, self._blocks = False, {}
        resumed = self.read_resume_state(args, state, self.config)
        if state.global_step >= self.config.qat_start_step:
            self._activate(model, state.global_step)
        if resumed is not None:
            self._load_observers(model, *resumed)

    def _refuse_mid_run_changes(self, model, trainer_state, step: int) -> None:
        """Refuse when layers QAT quantises are announced to be replaced after `step` by the Trainer whose
        init / run state is `trainer_state` (callbacks/_order.py)."""
        later = {n: w for n, (s, w) in mid_run_changes(model, trainer_state).items() if n in self.plan and s > step}
        if later:
            first = next(iter(later))
            raise ValueError(
                f"QATCallback: {len(later)} of the layers it quantises (e.g. `{first}`) are {later[first]}, after QAT "
                "chose them: QAT would miss the factorised layers (they would ship unquantised) or fail when it starts. "
                "Use lowrank_start_step=0 and list LowRankCallback before QATCallback (factorised when the Trainer is "
                "built, so QAT quantises the factors), or keep those layers out of QAT (QATConfig.qat_exclude)."
            )

    def _refuse_shifted_groups(self, model, state) -> None:
        """Refuse group-wise weights on layers whose input features a structured pruning run of this `train()` removes
        in slices the groups do not fall on: after removal each group would hold other weights than QAT trained
        with, so the shipped model would not be the one evaluated."""
        for other in still_pending(model, state):
            for name, width in (other.input_cuts() if hasattr(other, "input_cuts") else {}).items():
                lp = self.plan.get(name)
                gs = lp.weight.group_size if lp is not None else None
                if gs and width % gs:
                    raise ValueError(
                        f"QATConfig.group_size={gs} with {other.name} (granularity={other.config.granularity!r}, "
                        f"remove_pruned=True): removing a pruned unit takes {width} input feature(s) out of `{name}`, "
                        f"which do not fill whole {gs}-feature quantisation groups, so after removal its groups would "
                        "hold other weights than the ones QAT trained with (the shipped model would not be the one "
                        f"evaluated). Use a group_size that divides {width}, group_size=None (one scale per output "
                        "channel), or remove_pruned=False; or prune in one run and quantise the pruned model in another."
                    )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._run_checked is not state and self.model is not None:
            # the first step of this train(): every callback's on_train_begin has run, so a change announced there
            # (for a model model_init built, or by a Trainer this callback was added to later) is known now
            self._refuse_mid_run_changes(self.model, state, state.global_step)
            self._refuse_shifted_groups(self.model, state)
            self._run_checked = state
        if self.model is not None and state.global_step >= self.config.qat_start_step and not self.active:
            self._activate(self.model, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._skipped = bool(self.active and self._observers) and skipped_by_scaler(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.active and self._observers:
            self._commit_observers(state)
        self._skipped = False
        super().on_step_end(args, state, control)  # stage the state of a step about to be saved

    def _commit_observers(self, state) -> None:
        if self._skipped:  # every rank skips alike (the gradients were all-reduced, or the flag was)
            for o in self._observers:
                o.discard()
        else:
            sync_observers(self._observers)
            for o in self._observers:
                o.commit()
        f = self.config.freeze_observers_step
        if f is not None and state.global_step >= f:
            for o in self._observers:
                o.observing = False

    def summary(self) -> dict[str, float]:
        """Fraction of Linear layers under fake quantisation and the observed activation ranges."""
        model = self.model
        if model is None:
            return {}
        n_linear = sum(1 for _, m in model.named_modules() if is_linear(m))
        layers = fake_quant_layers(model)
        out = {f"{NAME}/fake_quant_fraction": round(len(layers) / max(n_linear, 1), 6)}
        obs = [o for o in observers(model).values() if o.ready]
        if obs:
            lo = torch.stack([o.lo for o in obs])
            hi = torch.stack([o.hi for o in obs])
            out.update({
                f"{NAME}/act_min": round(lo.min().item(), 6),
                f"{NAME}/act_max": round(hi.max().item(), 6),
                f"{NAME}/act_range_mean": round((hi - lo).mean().item(), 6),
            })
        if layers:
            with torch.no_grad():
                amax = torch.stack([m.weight.detach().abs().amax().float() for m in layers.values()])
            out[f"{NAME}/weight_absmax_max"] = round(amax.max().item(), 6)
            out[f"{NAME}/weight_absmax_mean"] = round(amax.mean().item(), 6)
        return out

    def metrics_for_log(self, state, logs: dict) -> dict:
        """`summary()` for a training log entry ({} for an evaluation's)."""
        if self.model is None or not is_training_log(logs):
            return {}
        return self.summary()

    def restore_before_removal(self, args, state) -> None:
        """While the model is still as trained (before any pruning end removes units; callbacks/_order.py): after a
        best-model reload, the best checkpoint's observer ranges, checked against the weights; and the block each
        planned layer sits in, so the plan follows the blocks when a layers run removes some."""
        if self.restored or self.model is None:
            return
        self.restored = True
        model = self.model
        best = best_checkpoint(args, state)
        if best is not None:  # the Trainer reloaded the best checkpoint's weights: its observer ranges come back too
            tensors, meta = load_state(best, self.name, config=self.config)
            self.check_fingerprint(best, meta)
            self._load_observers(model, tensors, meta, best)
        self._blocks = block_places(model, self.plan)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        super().on_train_end(args, state, control)
        if self.model is None:
            return
        model = unwrap(model) if model is not None else self.model
        restore_all(model, args, state)
        self.restore_before_removal(args, state)
        finish_pending(model, args, state, control, **kwargs)  # e.g. pruning removes its units before we convert
        self.plan = follow_blocks(model, self.plan, self._blocks)  # removed layers renamed the blocks after them
        self.result = convert(model, self.config, plan=self.plan)
        self.active, self._observers = False, []
