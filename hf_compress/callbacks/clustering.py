"""`ClusteringCallback`: k-means weight sharing (Deep Compression's clustering) inside any `transformers.Trainer`.

Event by event (public TrainerCallback events only):
- on_init_end: select the targeted layers and check them against the config (targets matching nothing,
  group sizes not dividing a width, fewer weights than clusters) — bad input fails when the Trainer is built.
- on_train_begin (or on_step_begin of `clustering_start_step`): the targeted layers are clustered (k-means per
  codebook group). The Trainer built its optimizer before this event, so the optimizer is changed
  explicitly: when the assignments freeze, each layer's trainable `clustering_centroids` take the place of
  its dense `weight` in the optimizer's param groups (same group, same position: the optimizer's state_dict
  layout stays the model's own, so a checkpoint's optimizer state loads into a fresh Trainer, and on resume
  the saved centroid state moves from the dense weight to the centroids). Before freezing, the dense weights
  stay in the optimizer and train through the clustered forward; they are re-clustered every
  `refresh_interval` steps (k-means warm-started from the current centroids).
- on_step_end / on_epoch_end / on_save: centroids and assignments into the checkpoint
  (hf_compress/clustering.*), staged before the Trainer saves (`hf_compress.checkpointing`); the model's own
  state_dict keeps its plain keys (see `hf_compress.clustering.layers`).
- on_log: fraction of Linear layers clustered and whether the assignments are frozen (training logs only).
- on_train_end: after any best-model reload (its centroids and assignments come back with it),
  `hf_compress.clustering.convert`: weights set to their clustered values, saved as codebook + packed
  b-bit indices, recorded in the config (stock transformers refuses the directory; `import hf_compress` loads it).

One process only: the centroids join the model after the Trainer wrapped it (DDP would not reduce their
gradients), so a distributed run is refused at train begin.
"""

from __future__ import annotations

import logging

import torch

from ..checkpointing import StatefulCallback, best_checkpoint, check_state_tensors, load_state
from ..clustering import (activate, bake, build_plan, clustered_layers, convert, refresh, replace_in_optimizer,
                          saved_weight, set_frozen)
from ..clustering.config import ClusteringConfig
from ..modules import is_linear, unwrap
from ..sharding import is_sharded
from ._logs import LogsForIntegrations, is_training_log
from ._steps import refuse_start_after_run

NAME = "clustering"
logger = logging.getLogger(__name__)


class ClusteringCallback(LogsForIntegrations, StatefulCallback):
    base_name = NAME
    log_marker = f"{NAME}/clustered_fraction"

    def __init__(self, config: ClusteringConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError("ClusteringCallback: pass either a ClusteringConfig or keyword options, not both.")
        self.config = config if config is not None else ClusteringConfig(**kwargs)
        self.plan = None
        self.model = None
        self.optimizer = None
        self.active = False
        self.frozen = False
        self.result: dict | None = None

    # ------------------------------------------------------------------ helpers
    def _plan(self, model):
        model = unwrap(model)
        if self.plan is None or self.model is not model:
            self.plan, self.model = build_plan(model, self.config), model
            self.claim_name(model)
        return self.plan

    def _layers(self):
        return [self.model.get_submodule(n) for n in self.plan]

    def _activate(self, step: int, state: dict | None = None, frozen: bool | None = None) -> None:
        frozen = step >= self.config.freeze_at if frozen is None else frozen
        activate(self.model, self.plan, self.config, frozen=False, state=state)
        self.active = True
        if frozen:
            self._freeze()

    def _freeze(self) -> None:
        """Only the centroids train from now: they take the dense weights' places in the optimizer."""
        missing = []
        for name, m in zip(self.plan, self._layers()):
            set_frozen(m, True)
            if self.optimizer is not None and not replace_in_optimizer(self.optimizer, m.weight, m.clustering_centroids):
                missing.append(name)
        if missing:
            logger.warning(f"ClusteringCallback: {len(missing)} clustered layer(s) (e.g. {missing[0]}) have weights the "
                           "optimizer does not train; their centroids stay at their k-means values.")
        self.frozen = True

    def state_tensors(self) -> dict[str, torch.Tensor] | None:
        if self.model is None:
            return None
        out = {}
        if self.active:
            for name, m in zip(self.plan, self._layers()):
                out[f"{name}.centroids"] = m.clustering_centroids.detach()
                out[f"{name}.assignments"] = m.assignments().to(torch.uint8 if m.hfc_bits <= 8 else torch.int16)
        return out

    def state_meta(self, state) -> dict:
        return {"config": self.config.to_dict(), "active": self.active, "frozen": self.frozen}

    def state_weights(self):
        return [saved_weight(m) for m in self._layers()] if self.model is not None else []

    def _expected(self) -> dict[str, tuple]:
        out = {}
        for name, p in self.plan.items():
            w = self.model.get_submodule(name).weight
            out[f"{name}.centroids"] = (p.groups, 2 ** p.bits)
            out[f"{name}.assignments"] = (p.groups, w.numel() // p.groups)
        return out

    def _restore(self, tensors, meta, ckpt: str, step: int) -> None:
        """Clustered layers as the checkpoint had them (or dense when it had none yet)."""
        if not meta.get("active"):
            return
        check_state_tensors(ckpt, self.name, tensors, self._expected())
        k = 2 ** self.config.clustering_bits
        bad = [n for n, t in tensors.items() if n.endswith(".assignments") and t.numel() and int(t.max()) >= k]
        if bad:
            raise ValueError(f"Resuming from {ckpt}: the {self.name} state holds assignments >= {k} in {bad[0]}; the file "
                             "is damaged or was written with other clustering_bits. Resume from another checkpoint.")
        dev = next(self.model.parameters()).device
        self._activate(step, state={n: t.to(dev) for n, t in tensors.items()}, frozen=bool(meta.get("frozen")))

    def _check_start(self, max_steps: int) -> None:
        refuse_start_after_run(self.config, "clustering_start_step", max_steps,
                               "the weights would never be clustered while training",
                               "to cluster without training, call hf_compress.clustering.convert")

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.refuse_zero3()
        if model is not None:
            self._plan(model)
        self._check_start(args.max_steps)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        model = unwrap(model)
        self._plan(model)
        self._check_start(state.max_steps)
        if args.world_size > 1:
            raise ValueError(
                f"ClusteringCallback trains on one process (world_size is {args.world_size}): the centroids join the "
                "model after the Trainer wrapped it for DDP, which would not reduce their gradients. Run without "
                "torchrun/accelerate launch, or cluster after training with hf_compress.clustering.convert."
            )
        if any(is_sharded(p) for p in model.parameters()):
            raise ValueError("ClusteringCallback under FSDP2: clustering needs the full weights; train on one process.")
        self.optimizer, self.result = optimizer, None
        self.active = self.frozen = False
        resumed = self.read_resume_state(args, state, self.config)
        if resumed is not None and resumed[1].get("active"):
            self._restore(resumed[0], resumed[1], resumed[2], state.global_step)
        elif state.global_step >= self.config.clustering_start_step:
            self._activate(state.global_step)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.model is None:
            return
        if optimizer is not None:
            self.optimizer = optimizer
        step, c = state.global_step, self.config
        if not self.active:
            if step >= c.clustering_start_step:
                self._activate(step)
            return
        if self.frozen:
            return
        if step >= c.freeze_at or (step - c.clustering_start_step) % c.refresh_interval == 0:
            for m in self._layers():
                refresh(m, c.kmeans_iters)
        if step >= c.freeze_at:
            self._freeze()

    def summary(self) -> dict[str, float]:
        if self.model is None:
            return {}
        n_linear = sum(1 for _, m in self.model.named_modules() if is_linear(m))
        return {f"{NAME}/clustered_fraction": round(len(clustered_layers(self.model)) / max(n_linear, 1), 6),
                f"{NAME}/frozen": float(self.frozen)}

    def metrics_for_log(self, state, logs: dict) -> dict:
        if self.model is None or not is_training_log(logs):
            return {}
        return self.summary()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        super().on_train_end(args, state, control)
        if self.model is None:
            return
        best = best_checkpoint(args, state)
        if best is not None:  # the Trainer reloaded the best checkpoint's weights: its clusters come back too
            tensors, meta = load_state(best, self.name, config=self.config)
            self.optimizer = None  # training is over
            if meta.get("active"):
                self._restore(tensors, meta, best, state.global_step)
            else:  # the best checkpoint was saved before clustering started: its dense weights are what convert clusters
                for m in self._layers():
                    bake(m, keep_weight=True)
            self.check_fingerprint(best, meta)
        self.result = convert(self.model, self.config, plan=self.plan)
        self.active = self.frozen = False
