"""fp16: a step the grad scaler skips (non-finite gradients) leaves gradient scores, masks and observer
ranges as if it had never happened.

Mechanism tested: the stock `Trainer` loop with a real `torch.amp.GradScaler("cpu")` in its Accelerator.
`TrainingArguments(fp16=True, use_cpu=True)` is accepted but accelerate gives it no scaler and no
autocast on CPU (it trains in fp32), so the test hands the Trainer's Accelerator the scaler (and the
fp16 autocast) it builds on CUDA: backward scales the loss, the Trainer's clip unscales, the scaler's
`found_inf` skips the step. One step gets an inf gradient from a tensor hook. The expected scores and
ranges are computed independently from what a recorder callback saw on the steps the optimizer really
took (a step is "taken" when the weights changed).
"""

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_compress import PruningCallback, PruningConfig, QATCallback, QATConfig
from hf_compress.pruning.masks import unstructured_masks
from hf_compress.quantization import observers
from helpers import TokenDataset, tiny_bert


def _fp16_trainer(tmp_path, model, steps, callbacks, optim, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, fp16=True, report_to=[], max_steps=steps, per_device_train_batch_size=8,
        logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0, optim=optim, **kw,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(64, seed=1), callbacks=callbacks)
    # what accelerate builds for fp16 on CUDA (on CPU it builds none): a real scaler, fp16 autocast
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.accelerator.native_amp = True
    return trainer


class Overflow(TrainerCallback):
    """Makes one gradient inf on the optimizer steps in `bad` (1-based: the step being taken), and can blow
    up the inputs of some layers on those steps too (what a real overflow sees)."""

    def __init__(self, model, bad, blow_up=(), where="classifier"):
        self.bad, self.now = set(bad), 0
        model.get_submodule(where).weight.register_hook(lambda g: g * float("inf") if self.now in self.bad else g)
        for name in blow_up:
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a: (a[0] * 1e3,) + a[1:] if self.now in self.bad else None)

    def on_step_begin(self, args, state, control, **kw):
        self.now = state.global_step + 1


class Taken(TrainerCallback):
    """Ground truth of what the optimizer did: a step is taken when some weight changed in
    `optimizer.step()` (list it after the callbacks under test, whose own edits come before the step)."""

    def __init__(self, model):
        self.model, self.taken = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.before = [p.detach().clone() for p in self.model.parameters()]

    def on_optimizer_step(self, args, state, control, **kw):
        self.taken[state.global_step + 1] = any(not torch.equal(b, p) for b, p in zip(self.before, self.model.parameters()))


class GradRecorder(TrainerCallback):
    """(w, dL/dw) of the targeted weights where the callback reads them (listed before it)."""

    def __init__(self, cb):
        self.cb, self.seen = cb, {}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.seen[state.global_step + 1] = [(w.detach().float().clone(), w.grad.detach().float().clone())
                                            for w in self.cb.pruner.weights]


@pytest.mark.parametrize("optim, where, max_grad_norm", [
    ("adamw_torch_fused", "bert.encoder.layer.0.attention.self.query", 1.0),  # the Trainer's default optimizer
    ("adamw_torch", "bert.encoder.layer.0.attention.self.query", 1.0),
    # a pruned weight's gradient is finite, another's is not: the scaler still skips, so do the scores
    ("adamw_torch_fused", "classifier", 0.0),
])
def test_movement_scores_and_masks_skip_the_overflow_step(tmp_path, optim, where, max_grad_norm):
    # update points at steps 2, 4, 6; the overflow falls on update point 4
    cfg = PruningConfig(method="movement", target_sparsity=0.5, schedule="linear", pruning_start_step=2,
                        pruning_end_step=6, frequency=2)
    model = tiny_bert(seed=0)
    cb = PruningCallback(cfg)
    rec, taken = GradRecorder(cb), Taken(model)
    sparsity = {}

    class Sparsity(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sparsity[state.global_step] = cb.pruner.sparsity()

    trainer = _fp16_trainer(tmp_path, model, 8, [rec, cb, taken, Sparsity()], optim, max_grad_norm=max_grad_norm)
    trainer.add_callback(Overflow(model, bad={4}, where=where))
    trainer.train()
    assert taken.taken == {s: s != 4 for s in range(1, 9)}, taken.taken  # the scaler skipped step 4, and only it

    # movement scores: S = -sum over the steps taken (<= the schedule's end) of w_t * g_t
    expected = [torch.zeros_like(w, dtype=torch.float32) for w in cb.pruner.weights]
    for step in range(1, 7):
        if taken.taken[step]:
            for e, (w, g) in zip(expected, rec.seen[step]):
                e.addcmul_(w, g, value=-1.0)
    for got, want in zip(cb.pruner.scores, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
    # no mask from the poisoned step: step 4's update waits for step 5, the end's comes at 6
    assert sparsity[4] == sparsity[3] == pytest.approx(cb.sparsity_at(2), abs=5e-3)
    assert sparsity[5] == pytest.approx(cb.sparsity_at(5), abs=5e-3)
    assert sparsity[8] == pytest.approx(0.5, abs=5e-3)
    for mask, want in zip(cb.pruner.masks, unstructured_masks(expected, 0.5, "global")):
        assert torch.equal(mask.bool(), want.bool())


def test_update_owed_at_the_last_step_is_made_at_train_end(tmp_path):
    cfg = PruningConfig(method="taylor", target_sparsity=0.5, schedule="one_shot", pruning_start_step=4, pruning_end_step=4)
    model = tiny_bert(seed=0)
    cb = PruningCallback(cfg)
    trainer = _fp16_trainer(tmp_path, model, 4, [cb], "adamw_torch_fused")
    trainer.add_callback(Overflow(model, bad={4}, where="bert.encoder.layer.1.output.dense"))
    trainer.train()
    assert cb.pruner.sparsity() == pytest.approx(0.5, abs=5e-3)
    assert all(torch.isfinite(s).all() for s in cb.pruner.scores)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_observer_ranges_skip_the_overflow_step(tmp_path, optim):
    model = tiny_bert(seed=0)
    cb = QATCallback(QATConfig(activation_bits=8, observer="minmax"))
    taken = Taken(model)
    trainer = _fp16_trainer(tmp_path, model, 6, [cb, taken], optim)
    inputs: dict[int, dict[str, list]] = {}
    ranges = {}

    class Record(TrainerCallback):  # what each observer was shown, step by step (independent of commit)
        def on_train_begin(self, args, state, control, **kw):
            self.step = 0
            for name, obs in observers(model).items():
                obs.register_forward_hook(
                    lambda m, a, out, name=name: inputs.setdefault(self.step, {}).setdefault(name, []).append(
                        torch.stack(torch.aminmax(a[0].detach().float()))))

        def on_step_begin(self, args, state, control, **kw):
            self.step = state.global_step + 1

        def on_step_end(self, args, state, control, **kw):  # after QATCallback committed (train end converts)
            ranges.update({n: (o.lo.item(), o.hi.item()) for n, o in observers(model).items()})

    trainer.add_callback(Record())
    layers = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.dense"]
    trainer.add_callback(Overflow(model, bad={3}, blow_up=layers))
    trainer.train()
    assert taken.taken == {s: s != 3 for s in range(1, 7)}, taken.taken
    assert inputs[3][layers[0]] and len(ranges) == len(inputs[1])  # the observers did see the blown-up step
    for name, (lo, hi) in ranges.items():
        rows = torch.stack([r for s in range(1, 7) if taken.taken[s] for r in inputs[s][name]])
        assert (lo, hi) == (rows[:, 0].min().item(), rows[:, 1].max().item()), name
