"""DistillationTrainer: a `transformers.Trainer` whose loss distils one or more teachers into the model.

Swap-in: ``Trainer(model=student, ...)`` → ``DistillationTrainer(model=student, teacher_model=teacher, ...)``.
Only public Trainer surfaces are overridden: `compute_loss` (the loss), `create_optimizer` (adds the
learned hidden-state projections), `log` (adds the loss parts), `prediction_step` (keeps cache columns
out of the evaluation forward). Checkpointing of the projections and their gradient handling run in a
small internal `TrainerCallback`.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .. import checkpointing
from ..distillation import losses as L
from ..distillation.cache import COLUMNS, INDICES, VALUES, CachedLogitsCollator, forward_columns, has_cached_logits
from ..distillation.layers import make_projections, resolve_layer_map
from ..distillation.teacher import prepare_teacher
from ..modules import unwrap
from ..distillation.config import DistillationConfig

logger = logging.getLogger(__name__)

STATE_NAME = "distillation"


def _base(model: nn.Module) -> nn.Module:
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = _base(model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or (
        LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    )


def _output_width(model: nn.Module) -> tuple[str, int]:
    """("vocab_size", V) for language-model heads, ("num_labels", C) for classification heads."""
    model = _base(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return "vocab_size", int(head.weight.shape[0])
    return "num_labels", int(model.config.num_labels)


class _DistillationState(checkpointing.StatefulCallback):
    """Projections in Trainer checkpoints (staged like every callback state), restored on resume; their
    gradients synced, clipped and cleared.

    The projections live outside the (possibly DDP-wrapped) student, so the Trainer neither
    all-reduces, clips nor zeroes their gradients: this callback does, at the matching events.
    """

    base_name = STATE_NAME

    def __init__(self, projections: nn.ModuleDict, config: dict):
        self.projections = projections
        self.config = config
        self.name = STATE_NAME  # one per trainer

    def state_tensors(self):
        return self.projections.state_dict()

    def state_meta(self, state) -> dict:
        return {"config": self.config}

    def _params(self):
        return [p for p in self.projections.parameters() if p.requires_grad]

    def on_train_begin(self, args, state, control, **kwargs):
        device = next(iter(self.projections.parameters()), torch.empty(0)).device
        resumed = self.read_resume_state(args, state, self.config, device=device)
        if resumed is not None:
            self.projections.load_state_dict(resumed[0])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in self.projections.parameters():  # every rank starts from rank 0's projections
                torch.distributed.broadcast(p.data, src=0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = [p for p in self._params() if p.grad is not None]
        if not params:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        for p in self._params():
            p.grad = None  # the Trainer zeroes only the student's gradients


class _TeacherModes(TrainerCallback):
    """Teachers run in eval mode during training and get back the mode the user left them in afterwards."""

    def __init__(self, teachers: list):
        self.teachers = teachers
        self.modes: list[bool] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.modes = [t.training for t in self.teachers]
        for t in self.teachers:
            t.eval()

    def on_train_end(self, args, state, control, **kwargs):
        if self.modes is not None:
            for t, mode in zip(self.teachers, self.modes):
                t.train(mode)
        self.modes = None


class _FiniteCheck(TrainerCallback):
    """Reads the trainer's device-side NaN/Inf record back at steps every rank shares: before a log, save or
    evaluation (the flow callback, which runs first, has set `control` by then), every `check_finite_steps`
    steps, at epoch ends and at the end of training. So no log line, checkpoint or evaluation follows a bad step."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._finite_record = None

    def on_step_end(self, args, state, control, **kwargs):
        every = self.trainer.distillation_config.check_finite_steps
        if (control.should_log or control.should_save or control.should_evaluate or control.should_training_stop
                or (every and state.global_step % every == 0)):
            self.trainer._flush_finite_check()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._flush_finite_check()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._flush_finite_check()


class DistillationTrainer(Trainer):
    """`Trainer` that trains `model` (the student) towards `teacher_model` (one model or a list).

    Loss (classification): ``(1 − α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``, the KL summed
    over classes and averaged over the batch; without labels ``T²·KL`` alone. Token-level and causal-LM
    models: the same per position, averaged over positions whose label ≠ −100 after the causal shift;
    CE is the model's own loss. Optional hidden-state and attention-map matching are added with their
    weights. See `DistillationConfig` for every option and docs/distillation.md for the details.

    With a `train_dataset` made by `cache_teacher_logits`, the cached top-k logits are the soft targets
    and no teacher runs (`teacher_model` may be None). During evaluation the loss is the student's own
    loss, so eval_loss compares with plain fine-tuning and the teacher never runs.

    Gradient accumulation: when the Trainer counts the labelled items of the accumulated batch
    (`num_items_in_batch`), the CE and KD terms are sums over this micro-batch divided by that count, so
    uneven micro-batches add up to one mean over the whole batch, as the stock Trainer's loss does.

    Unlabelled rows (label −100): ignored by both terms, unless ``distill_unlabeled=True`` (classification),
    which makes them a transfer set: the KD term averages over every row, the CE term over labelled rows.
    """

    # compute_loss returns this micro-batch's share of the step's loss: the Trainer must not divide it again
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | Sequence[nn.Module] | None = None,
        args: TrainingArguments | None = None,
        distillation_config: DistillationConfig | None = None,
        **kwargs,
    ):
        cfg = DistillationConfig() if distillation_config is None else distillation_config
        if not isinstance(cfg, DistillationConfig):
            raise ValueError(f"distillation_config must be a DistillationConfig, got {type(cfg).__name__}.")
        teachers = [] if teacher_model is None else list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
        cached = has_cached_logits(kwargs.get("train_dataset"))
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        filter_columns = cached and args.remove_unused_columns
        if filter_columns:
            # The Trainer would drop the cache columns (its model's forward does not take them): the
            # CachedLogitsCollator below does the same column filtering but keeps them. The user's
            # args object is left as it was.
            args = copy.copy(args)
            args.remove_unused_columns = False
        super().__init__(model=model, args=args, **kwargs)

        self.distillation_config = cfg
        student = _base(self.model)
        self._causal = _is_causal_lm(student)
        self.layer_map = self._validate(student, teachers, cfg, cached)
        if cached and teachers and not cfg.uses_intermediate:
            logger.warning("train_dataset holds cached teacher logits: teacher_model is not run during training.")
        # the teacher runs under torch.no_grad(): its requires_grad flags are left as the user set them
        self.teachers = [prepare_teacher(t, self.accelerator, freeze=False) for t in teachers]
        self._teacher_inputs = [forward_columns(t) - {"labels"} for t in self.teachers]
        if cached:
            keep = None
            if filter_columns:
                keep = forward_columns(self.model) | {"label", "label_ids"} | set(self.label_names)
            self.data_collator = CachedLogitsCollator(self.data_collator, keep)
        self.projections = self._make_projections(student)
        self.add_callback(_DistillationState(self.projections, cfg.to_dict()))
        self.add_callback(_TeacherModes(self.teachers))
        self._finite_record: torch.Tensor | None = None  # first NaN/Inf step on the device (see _check_finite)
        if cfg.check_finite:
            self.add_callback(_FiniteCheck(self))
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_count = 0.0  # optimizer steps since the last log (each micro-batch adds 1 / accumulation steps)
        self._rows_in_batch = None  # distill_unlabeled: rows of the accumulated batch (get_batch_samples)

    # ---- set-up ------------------------------------------------------------------------------

    def _validate(self, student: nn.Module, teachers: list, cfg: DistillationConfig, cached: bool) -> dict[int, int]:
        """Every teacher/student mismatch as a ValueError naming the field and the fix, before training."""
        if not teachers and not cached:
            raise ValueError(
                "teacher_model is None and train_dataset holds no cached teacher logits: pass teacher_model=<model> "
                "(or a list), or a train_dataset made by hf_compress.cache_teacher_logits."
            )
        if cfg.uses_intermediate and not teachers:
            raise ValueError(
                "hidden_loss_weight / attention_loss_weight > 0 match the teacher's internals, which cached logits do "
                "not hold: pass teacher_model=, or set both weights to 0."
            )
        if cfg.uses_intermediate and len(teachers) > 1:
            raise ValueError(
                f"hidden_loss_weight / attention_loss_weight need a single teacher, got {len(teachers)}: with several "
                "teachers only the soft targets are combined; set both weights to 0 or pass one teacher."
            )
        if cfg.teacher_weights is not None and len(cfg.teacher_weights) != len(teachers):
            raise ValueError(
                f"teacher_weights has {len(cfg.teacher_weights)} entries for {len(teachers)} teacher(s): give one weight per teacher."
            )
        for i, t in enumerate(teachers):
            if not isinstance(t, nn.Module) or getattr(_base(t), "config", None) is None:
                raise ValueError(f"teacher_model[{i}] must be a transformers model (with .config), got {type(t).__name__}.")
        student_params = {id(p) for p in _base(student).parameters()}
        for i, t in enumerate(teachers):
            shared = sum(1 for p in _base(t).parameters() if id(p) in student_params)
            if shared:
                what = "is the student itself" if _base(t) is _base(student) else f"shares {shared} parameter tensor(s) with the student"
                raise ValueError(
                    f"teacher_model[{i}] {what} (model=): the teacher would move with every update, so the soft targets "
                    "would chase the student's own predictions and teach nothing. Distil from a separate copy made "
                    "before training: teacher_model=copy.deepcopy(model) (or the fine-tuned model loaded again)."
                )
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                f"The student (model=, {type(student).__name__}) has no trainable parameter: every parameter has "
                "requires_grad=False, so there is nothing to train (a copy.deepcopy of a model that was frozen, e.g. "
                "by an earlier teacher set-up or by PEFT). Call model.requires_grad_(True) before passing it, or add "
                "trainable adapters."
            )
        problem = getattr(student.config, "problem_type", None)
        if problem in ("multi_label_classification", "regression") or self._multi_hot_labels(student):
            problem = problem or "multi_label_classification"
            raise ValueError(
                f"The student has problem_type={problem!r} (config.problem_type, or float label vectors in "
                "train_dataset): distillation here matches softmax class distributions, which is only right for "
                "single-label classification, token-level tasks and language models. Use a single-label head "
                "(integer labels, problem_type='single_label_classification'), or fine-tune with the plain Trainer."
            )
        for role, m in [("The student (model=)", student)] + [(f"teacher_model[{i}]", t) for i, t in enumerate(teachers)]:
            if getattr(_base(m), "base_model", None) is _base(m):
                raise ValueError(
                    f"{role} is {type(_base(m)).__name__}, a model without a task head: its outputs carry no logits to "
                    "distil. Load it with a head, e.g. AutoModelForSequenceClassification / AutoModelForCausalLM / "
                    "AutoModelForTokenClassification.from_pretrained(...)."
                )
        kind, width = _output_width(student)
        if kind == "num_labels" and width < 2:
            raise ValueError(
                f"The student has num_labels={width}: distillation matches class distributions and needs ≥ 2 classes."
            )
        for i, t in enumerate(teachers):
            tkind, twidth = _output_width(t)
            if (tkind, twidth) != (kind, width):
                raise ValueError(
                    f"teacher_model[{i}] outputs {tkind}={twidth} but the student outputs {kind}={width}: teacher and "
                    f"student must predict the same classes/vocabulary (set num_labels / use the same tokenizer)."
                )
            sv, tv = getattr(student.config, "vocab_size", None), getattr(_base(t).config, "vocab_size", None)
            if sv is not None and tv is not None and sv != tv:
                raise ValueError(
                    f"teacher_model[{i}] has vocab_size={tv} but the student has vocab_size={sv}: they must share "
                    "one tokenizer so the same input ids mean the same tokens."
                )
        if cached:
            self._validate_cache(kind, width)
        if cfg.distill_unlabeled:
            self._validate_unlabeled(kind, cfg)
        if not cfg.uses_intermediate:
            return {}
        teacher = _base(teachers[0])
        layer_map = resolve_layer_map(cfg.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        ds, dt = student.config.hidden_size, teacher.config.hidden_size
        if cfg.hidden_loss_weight > 0 and ds != dt and not cfg.hidden_projection:
            raise ValueError(
                f"hidden_loss_weight > 0 but the student's hidden size {ds} differs from the teacher's {dt} and "
                "hidden_projection=False: set hidden_projection=True (a learned projection) or hidden_loss_weight=0."
            )
        if cfg.attention_loss_weight > 0:
            hs, ht = student.config.num_attention_heads, teacher.config.num_attention_heads
            if hs != ht:
                raise ValueError(
                    f"attention_loss_weight > 0 needs equal head counts, but the student has {hs} heads and the teacher "
                    f"{ht}: set attention_loss_weight=0 or use a student with {ht} heads."
                )
            for m in (student, teacher):  # fused attention kernels do not return the probability maps
                if m.config._attn_implementation != "eager":
                    logger.info("attention_loss_weight > 0: switching %s to eager attention.", type(m).__name__)
                    m.set_attn_implementation("eager")
        return layer_map

    def _multi_hot_labels(self, student: nn.Module) -> bool:
        """A sequence classifier whose first training example has a float label vector (BERT-style heads
        would infer multi-label classification from it at the first forward)."""
        if _output_width(student)[0] != "num_labels" or self._token_level_head():
            return False
        try:
            row = self.train_dataset[0]
            labels = torch.as_tensor(row.get("labels", row.get("label")))
        except Exception:  # iterable or exotic datasets: config.problem_type is the only check
            return False
        return labels.dim() >= 1 and labels.is_floating_point()

    def _validate_cache(self, kind: str, width: int) -> None:
        row = self.train_dataset[0]
        values, indices = torch.as_tensor(row[VALUES]), torch.as_tensor(row[INDICES])
        want = 1 if kind == "num_labels" and not self._token_level_head() else 2
        if values.dim() != want or values.shape != indices.shape:
            raise ValueError(
                f"train_dataset's {VALUES} has shape {tuple(values.shape)} per example but the student expects "
                f"{'[k]' if want == 1 else '[length, k]'}: the cache was made by a teacher of another task; rebuild it "
                "with cache_teacher_logits(teacher, dataset)."
            )
        if indices.numel() and int(indices.max()) >= width:
            raise ValueError(
                f"train_dataset's {INDICES} holds class id {int(indices.max())} but the student has {kind}={width}: "
                "the cache comes from a teacher with another label set / vocabulary."
            )

    def _validate_unlabeled(self, kind: str, cfg: DistillationConfig) -> None:
        if kind != "num_labels" or self._token_level_head():
            raise ValueError(
                f"distill_unlabeled=True applies to sequence classification, but the student is "
                f"{type(_base(self.model)).__name__}: token-level and language-model labels of -100 mark prompt and "
                "padding positions, which are never distilled. Set distill_unlabeled=False."
            )
        if cfg.alpha == 0:
            raise ValueError(
                "distill_unlabeled=True with alpha=0: the KD term has no weight, so the unlabelled rows would teach "
                "nothing. Set alpha > 0 (e.g. 0.5), or distill_unlabeled=False."
            )
        if self.label_smoother is not None or self.compute_loss_func is not None:
            what = "label_smoothing_factor > 0" if self.label_smoother is not None else "compute_loss_func="
            raise ValueError(
                f"distill_unlabeled=True computes the CE term over the labelled rows itself, which {what} would "
                f"replace: drop {what}, or set distill_unlabeled=False."
            )

    def _token_level_head(self) -> bool:
        return self._causal or "TokenClassification" in type(_base(self.model)).__name__

    def _make_projections(self, student: nn.Module) -> nn.ModuleDict:
        if self.distillation_config.hidden_loss_weight <= 0:
            return nn.ModuleDict()
        ds, dt = student.config.hidden_size, _base(self.teachers[0]).config.hidden_size
        return make_projections(ds, dt, self.layer_map, seed=self.args.seed).to(self.args.device)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, plus a parameter group for the learned hidden-state projections."""
        optimizer = super().create_optimizer(model)
        params = list(self.projections.parameters())
        present = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [p for p in params if id(p) not in present]
        if missing:
            if self.lr_scheduler is not None:
                raise ValueError(
                    "optimizers=(optimizer, scheduler) was passed but the optimizer lacks the hidden-state projections "
                    "(trainer.projections): include them, or pass optimizer_cls_and_kwargs= instead."
                )
            optimizer.add_param_group({"params": missing, "weight_decay": self.args.weight_decay})
        return optimizer

    # ---- the loss ------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the student's own loss; the teacher does not run
            inputs = {k: v for k, v in inputs.items() if k not in COLUMNS}
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        cfg = self.distillation_config
        inputs = dict(inputs)
        cache = {c: inputs.pop(c) for c in COLUMNS if c in inputs}
        labels = inputs.get("labels")
        # distill_unlabeled: the CE over the labelled rows is computed here (a micro-batch of unlabelled
        # rows would make the model's own mean 0/0), so the model gets no labels
        unlabelled = cfg.distill_unlabeled and labels is not None
        custom_hard = labels is not None and (self.label_smoother is not None or self.compute_loss_func is not None)
        student_inputs = {k: v for k, v in inputs.items() if not ((custom_hard or unlabelled) and k == "labels")}
        want = {}
        if cfg.hidden_loss_weight > 0:
            want["output_hidden_states"] = True
        if cfg.attention_loss_weight > 0:
            want["output_attentions"] = True
        # `count`: the labelled items of the whole accumulated batch (None: per-micro-batch means instead)
        count = self._global_count(num_items_in_batch, labels)
        local = None
        if count is not None and not custom_hard:
            local = self._local_count(inputs, labels)
            if self.model_accepts_loss_kwargs and not unlabelled:  # models that honour it return 0, not NaN, with nothing to count
                want["num_items_in_batch"] = local.clamp_min(1)

        outputs = model(**student_inputs, **want)
        want.pop("num_items_in_batch", None)
        ga = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        parts: dict[str, torch.Tensor] = {}
        if unlabelled:
            parts["hard"] = self._labelled_ce(outputs.logits, labels, count, ga)
        elif labels is not None:
            parts["hard"] = self._hard_loss(outputs, labels, num_items_in_batch if count is not None else None, local, count, ga)
        need_soft = labels is None or cfg.alpha > 0
        run_teacher = self.teachers and ((need_soft and not cache) or cfg.uses_intermediate)
        t_outputs = []
        if run_teacher:
            for t, accepted in zip(self.teachers, self._teacher_inputs):
                if t.training:
                    t.eval()
                with torch.no_grad():
                    t_outputs.append(t(**{k: v for k, v in inputs.items() if k in accepted}, **want))
        if need_soft:
            # the KD term's count: the labelled items, or with distill_unlabeled every row of the accumulated batch
            soft_count = (self._rows_in_batch if count is not None else None) if unlabelled else count
            soft = self._soft_loss(outputs.logits, t_outputs, cache, labels, inputs.get("attention_mask"), soft_count)
            parts["soft"] = soft * self._world_factor() if soft_count is not None else soft / ga
        if cfg.uses_intermediate:  # per-micro-batch means over real tokens
            mask = inputs.get("attention_mask")
            if cfg.hidden_loss_weight > 0:
                parts["hidden"] = self._hidden_loss(outputs.hidden_states, t_outputs[0].hidden_states, mask) / ga
            if cfg.attention_loss_weight > 0:
                parts["attention"] = self._attention_loss(outputs.attentions, t_outputs[0].attentions, mask) / ga

        if labels is None:
            loss = parts["soft"]
        else:
            loss = (1.0 - cfg.alpha) * parts["hard"]
            if cfg.alpha > 0:
                loss = loss + cfg.alpha * parts["soft"]
        if "hidden" in parts:
            loss = loss + cfg.hidden_loss_weight * parts["hidden"]
        if "attention" in parts:
            loss = loss + cfg.attention_loss_weight * parts["attention"]
        if cfg.check_finite:
            self._check_finite(loss, parts)
        for name, value in parts.items():
            value = value.detach().float()
            self._part_sums[name] = self._part_sums[name] + value if name in self._part_sums else value
        self._part_count += 1.0 / ga
        if want and return_outputs:  # keep the extra tensors out of what evaluation would treat as logits
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in ("hidden_states", "attentions")})
        return (loss, outputs) if return_outputs else loss

    # ---- normalisation over the accumulated batch --------------------------------------------------

    def _global_count(self, num_items_in_batch, labels):
        """The Trainer's count of labelled items in the accumulated batch (all ranks when
        average_tokens_across_devices), or None when it gave none: then each part is a micro-batch mean."""
        if labels is None or num_items_in_batch is None:
            return None
        if torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim() != 0:
            return None  # DataParallel (n_gpu > 1) hands one count per replica: keep per-micro-batch means
        return num_items_in_batch

    def _local_count(self, inputs, labels) -> torch.Tensor:
        """This micro-batch's labelled items, counted the way the Trainer counts them (after the causal shift)."""
        if "shift_labels" in inputs:
            return inputs["shift_labels"].ne(-100).sum()
        return (labels[..., 1:] if self._causal else labels).ne(-100).sum()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's batches and labelled-item count; with distill_unlabeled also the accumulated batch's
        row count (summed over ranks as the Trainer sums its count), the KD term's denominator."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.distillation_config.distill_unlabeled:
            rows = torch.tensor(sum(int(b["labels"].shape[0]) for b in batch_samples if "labels" in b), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                rows = self.accelerator.gather(rows).sum()
            # ranks holding the same batch (tensor / context / sequence parallel) counted it more than once
            for size in ("get_tp_size", "get_cp_size", "get_sp_size"):
                rows = rows / (getattr(self, size, lambda: 1)() or 1)
            self._rows_in_batch = rows
        return batch_samples, num_items_in_batch

    def _labelled_ce(self, logits, labels, count, ga) -> torch.Tensor:
        """distill_unlabeled: CE summed over the labelled rows, divided by the accumulated batch's labelled count
        (or this micro-batch's, over the accumulation steps, when the Trainer counted none); 0 without any."""
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
        if count is not None:
            return ce / torch.as_tensor(count, device=ce.device).clamp_min(1) * self._world_factor()
        return ce / labels.ne(-100).sum().clamp_min(1) / ga

    def _world_factor(self) -> int:
        """Like the stock Trainer: with a count summed over ranks, undo the DDP gradient mean."""
        if not self.args.average_tokens_across_devices:
            return 1
        tp = getattr(self, "get_tp_size", lambda: 1)() or 1
        return max(self.accelerator.num_processes // tp, 1)

    def _hard_loss(self, outputs, labels, num_items_in_batch, local, count, ga) -> torch.Tensor:
        """CE: the share of the accumulated batch's mean (sum / count), or the micro-batch mean / ga."""
        scaled = num_items_in_batch is not None
        if self.compute_loss_func is not None:  # as the stock Trainer: normalised by num_items_in_batch itself
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif self.label_smoother is not None:
            loss = self.label_smoother(outputs, labels, shift_labels=self._causal, num_items_in_batch=num_items_in_batch)
        else:
            if getattr(outputs, "loss", None) is None:
                raise ValueError(
                    f"{type(_base(self.model)).__name__} returned no loss for a batch with labels: the hard (CE) term "
                    "is the model's own loss; use a model class with a task head (e.g. AutoModelForSequenceClassification)."
                )
            # the model's own loss is a mean over this micro-batch's items (models that ignore
            # num_items_in_batch, e.g. sequence classifiers, included): turn it into its share of the sum
            loss = outputs.loss * (local / count) if scaled else outputs.loss
        return loss * self._world_factor() if scaled else loss / ga

    def _soft_loss(self, s_logits, t_outputs, cache, labels, attention_mask, count=None) -> torch.Tensor:
        cfg = self.distillation_config
        if s_logits.dim() == 3 and cfg.kd_chunk_size != 0:
            return self._chunked_soft_loss(s_logits, t_outputs, cache, labels, attention_mask, count)
        indices = None
        if t_outputs:
            t_logp = L.teacher_log_probs([o.logits for o in t_outputs], cfg.temperature, cfg.teacher_weights)
        else:
            values, indices = cache[VALUES], cache[INDICES]
            if values.dim() == 3:  # collator padding may differ from the student's sequence length
                values, indices = values[:, : s_logits.shape[1]], indices[:, : s_logits.shape[1]]
            t_logp = L.cached_log_probs(values, cfg.temperature)
        mask = None
        if s_logits.dim() == 3:
            if self._causal:
                s_logits, mask = L.causal_shift(s_logits, labels, attention_mask)
                t_logp = t_logp[:, :-1]
                indices = None if indices is None else indices[:, :-1]
            else:
                mask = L.token_mask(labels, attention_mask)
        elif labels is not None and not cfg.distill_unlabeled:
            mask = labels.ne(-100)  # classification rows the CE term counts
        return L.kd_loss(s_logits, t_logp, cfg.kd_loss, cfg.temperature, cfg.beta, mask, indices, num_items=count)

    def _chunked_soft_loss(self, s_logits, t_outputs, cache, labels, attention_mask, count=None) -> torch.Tensor:
        """Token-level / causal KD `kd_chunk_size` positions at a time (`losses.chunked_kd_loss`): the teachers' raw
        logits go in, so no float32 log-probabilities over the whole batch are built for either model. Causal LMs
        keep the unshifted logits (no copy) with the shifted mask, False at the last position."""
        cfg = self.distillation_config
        shape = tuple(s_logits.shape[:2])
        if self._causal:
            mask = L.causal_mask_full(labels, attention_mask, shape)
        else:
            mask = L.token_mask(labels, attention_mask)
        common = dict(kind=cfg.kd_loss, temperature=cfg.temperature, beta=cfg.beta, mask=mask, num_items=count,
                      chunk_size=cfg.kd_chunk_size)
        if t_outputs:
            return L.chunked_kd_loss(s_logits, [o.logits for o in t_outputs], weights=cfg.teacher_weights, **common)
        values, indices = cache[VALUES][:, : shape[1]], cache[INDICES][:, : shape[1]]
        return L.chunked_kd_loss(s_logits, teacher_logp=L.cached_log_probs(values, cfg.temperature), indices=indices, **common)

    def _hidden_loss(self, s_hidden, t_hidden, mask) -> torch.Tensor:
        cfg = self.distillation_config
        total = 0.0
        for s, t in self.layer_map.items():
            h = s_hidden[s + 1].float()  # hidden_states[0] is the embedding output
            if str(s) in self.projections:
                h = self.projections[str(s)](h)
            total = total + L.hidden_loss(h, t_hidden[t + 1], cfg.hidden_loss, mask)
        return total / len(self.layer_map)

    def _attention_loss(self, s_attn, t_attn, mask) -> torch.Tensor:
        if not s_attn or not t_attn:
            raise ValueError("attention_loss_weight > 0 but the model returned no attention maps; use eager attention.")
        total = 0.0
        for s, t in self.layer_map.items():
            total = total + L.attention_loss(s_attn[s], t_attn[t], mask)
        return total / len(self.layer_map)

    _PARTS = ("hard", "soft", "hidden", "attention")

    def _check_finite(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Record a NaN/Inf loss part on the device, with no host sync: the first bad step of this run, which
        parts were bad and their values then stay in `_finite_record` until `_flush_finite_check` reads it."""
        dev = loss.device
        no = torch.zeros((), dtype=torch.bool, device=dev)
        flags = torch.stack([~torch.isfinite(loss.detach())] + [~torch.isfinite(parts[n].detach()) if n in parts else no for n in self._PARTS])
        zero, one = torch.zeros((), dtype=torch.float64, device=dev), torch.ones((), dtype=torch.float64, device=dev)
        values = [parts[n].detach().to(torch.float64) if n in parts else zero for n in self._PARTS]
        present = torch.stack([one if n in parts else zero for n in self._PARTS])  # built on the device: no copy
        step = torch.full((1,), float(self.state.global_step + 1), dtype=torch.float64, device=dev)
        # [step, bad total, bad hard/soft/hidden/attention, their values, which parts exist]
        candidate = torch.cat([step, flags.to(torch.float64), torch.stack(values), present])
        record = self._finite_record
        if record is None or record.device != dev:
            record = torch.full_like(candidate, float("inf"))
        # keep the first bad micro-batch: replace only while no bad step is recorded (record[0] = inf)
        self._finite_record = torch.where(flags.any() & torch.isinf(record[0]), candidate, record)

    def _flush_finite_check(self) -> None:
        """Read the device-side record back (one host sync; under torch.distributed one small all-gather, so every
        rank raises together) and raise naming the first bad step. Called by `_FiniteCheck` at the same optimizer
        steps on every rank: before each log, save or evaluation, at epoch ends, at the end of training and every
        `check_finite_steps` steps."""
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        record = self._finite_record
        if world > 1:
            if record is None:  # nothing computed yet on this rank: a clean record of the right size
                record = torch.full((1 + 1 + 3 * len(self._PARTS),), float("inf"), dtype=torch.float64, device=self.args.device)
            gathered = [torch.empty_like(record) for _ in range(world)]
            dist.all_gather(gathered, record)
            rows = torch.stack(gathered).tolist()
        elif record is None:
            return
        else:
            rows = [record.tolist()]
        firsts = [(row[0], rank) for rank, row in enumerate(rows) if math.isfinite(row[0])]
        if not firsts:
            return
        step, rank = min(firsts)  # the earliest step, and the lowest rank that saw it
        row, n = rows[rank], len(self._PARTS)
        bad = [p for p, f in zip(self._PARTS, row[2 : 2 + n]) if f > 0]
        values = {p: v for p, v, there in zip(self._PARTS, row[2 + n : 2 + 2 * n], row[2 + 2 * n :]) if there > 0}
        self._raise_non_finite(bad, int(step), values, rank if world > 1 else None, world)

    def _raise_non_finite(self, bad: list, step: int, values: dict, rank=None, world=1) -> None:
        bad = bad or ["total"]
        where = f" on rank {rank} of {world}" if world > 1 else ""
        found = self.state.global_step
        checked = f"; found at the check after step {found}" if found > step else ""
        raise FloatingPointError(
            f"DistillationTrainer: the {' and '.join(bad)} loss part is NaN/Inf at step {step}{where} (parts: {values}"
            f"{checked}). Lower the learning rate or temperature, check the inputs and the teacher's logits "
            "(fp16 overflow?), or set check_finite=False to let the Trainer skip such steps."
        )

    # ---- logging and evaluation ----------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `hard_loss`, `soft_loss`, `hidden_loss`, `attention_loss` (means since the last log) to training logs,
        and the compression callbacks' numbers (`metrics_for_log`: `pruning*/…`, `qat/…`, training logs only)
        before the report_to integrations see the entry — their own `on_log` would come after them."""
        for cb in self.callback_handler.callbacks:
            metrics_for_log = getattr(cb, "metrics_for_log", None)
            if callable(metrics_for_log):
                logs.update(metrics_for_log(self.state, logs))
        if "loss" in logs and self._part_count:
            names = sorted(self._part_sums)
            means = torch.stack([self._part_sums[n] for n in names]) / self._part_count  # per optimizer step
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            for name, value in zip(names, means.tolist()):
                logs[f"{name}_loss"] = value
            self._part_sums, self._part_count = {}, 0.0
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation never sees the cache columns (the student's forward does not take them)."""
        inputs = {k: v for k, v in inputs.items() if k not in COLUMNS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
