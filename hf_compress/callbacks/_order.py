"""What callbacks on one model must know of each other, whatever the order of `callbacks=[...]`.

**End of training in the right order.** The Trainer runs `on_train_end` on its callbacks in list order,
and a callback never sees that list. Some ends must come first: `PruningCallback` removes pruned heads /
neurons / layers (and records the sparsity of float weights), which must happen before `QATCallback` turns
the layers into int8 or 4-bit ones, or records their shapes for reloading. So a callback whose end must precede
quantisation registers itself on the model it trains (`finish_before_converting`), and the quantising callback runs
what is still pending on that model (`finish_pending`) before it converts. Each registered callback's
`on_train_end` then runs once per run: the Trainer's own later call finds it done (`finished_this_run`).

**Restore, then remove.** The first end of training that removes units or converts lets every callback of the
run first restore what it needs of the model as trained (its `restore_before_removal`; `register_restore`,
`restore_all`). After a best-model reload, a layers run's skipped blocks come back only with its masks (the first
removal deletes every skipped block and all-zero unit, the other runs' too). QATCallback checks the best checkpoint
against the weights and notes the block each of its layers sits in while all blocks are there: removing layers
renames the blocks after them, and its plan follows the blocks. LowRankCallback runs its whole end there (its
record is renamed with the blocks). Registrations carry their run's `state`, so a run refused or stopped before
its end leaves nothing behind for the next one.

**Structure that changes mid-run.** LowRankCallback with lowrank_start_step > 0 replaces Linears by factorised
layers during training, after QATCallback chose its layers: QAT would then miss them (they would ship
unquantised) or fail at its start step. The factorising callback announces its layers and step when the Trainer
is built (`announce_mid_run_change`); QATCallback checks them at train begin (`mid_run_changes`) and refuses
before the first step. An announcement counts only for the Trainer that made it: it carries that Trainer's
`state` at `on_init_end` (one object per Trainer, shared by its callbacks there), so a Trainer built and
never trained leaves no refusal behind for the next one on the same model. The factorising callback announces
again at train begin with that run's `state` (one object per `train()`), which QATCallback checks at the run's
first step: a model `model_init` builds in `train()`, or a QATCallback added to the Trainer after it was built.
"""

from __future__ import annotations

import weakref

_PENDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> [(callback whose end is due, its run's state)]
_RESTORE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> [(callback to restore first, its run's state)]
# model -> {(layer name, id(state)): (step, what, state)}
_MID_RUN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def announce_mid_run_change(model, names, step: int, what: str, trainer_state) -> None:
    """`names` (modules of `model`) stop being plain Linears at optimizer step `step`: `what` says how.
    `trainer_state`: the `state` of the announcing event: `on_init_end`'s names the Trainer, `on_train_begin`'s
    the `train()` run. Kept side by side, so a check against either finds it."""
    _MID_RUN.setdefault(model, {}).update({(n, id(trainer_state)): (step, what, trainer_state) for n in names})


def mid_run_changes(model, trainer_state=None) -> dict:
    """{layer name: (step, what)} announced for `model` with `trainer_state` (a Trainer's init state or a
    run's state; None: by any Trainer, for a callback added after its Trainer was built)."""
    return {n: (step, what) for (n, _), (step, what, t) in _MID_RUN.get(model, {}).items()
            if trainer_state is None or t is trainer_state}


def finish_before_converting(model, callback, trainer_state) -> None:
    """Register `callback` at its train begin (`trainer_state`: that run's `state`): its `on_train_end` must run
    before `model` is converted. Registrations of other runs are dropped: a run refused or stopped before its
    end leaves none behind for the next one on the same model."""
    kept = [(c, t) for c, t in _PENDING.get(model, []) if t is trainer_state and c is not callback]
    _PENDING[model] = kept + [(callback, trainer_state)]


def finished_this_run(model, callback) -> bool:
    """Called first in the registered callback's `on_train_end`: True when that end already ran this run
    (a converting callback ran it early); otherwise marks it as running now and returns False."""
    pending = _PENDING.get(model, [])
    for i, (c, _) in enumerate(pending):
        if c is callback:
            del pending[i]
            return False
    return True


def still_pending(model, trainer_state) -> list:
    """The callbacks registered on `model` by the run of `trainer_state` whose `on_train_end` has not run yet."""
    return [c for c, t in _PENDING.get(model, []) if t is trainer_state]


def register_restore(model, callback, trainer_state) -> None:
    """Register `callback` at its train begin: its `restore_before_removal(args, state)` (the best checkpoint's
    masks / observer ranges, what it needs of the model as trained) must run before any end of training on
    `model` removes units. Registrations of other runs are dropped, as in `finish_before_converting`."""
    kept = [(c, t) for c, t in _RESTORE.get(model, []) if t is trainer_state and c is not callback]
    _RESTORE[model] = kept + [(callback, trainer_state)]


def restore_all(model, args, state) -> None:
    """Run, once each, the `restore_before_removal` of every callback the run of `state` registered on `model`.
    Called first in each end of training that removes units or converts."""
    entries = _RESTORE.get(model, [])
    due = [c for c, t in entries if t is state]
    _RESTORE[model] = [(c, t) for c, t in entries if t is not state]
    for callback in due:
        callback.restore_before_removal(args, state)


def finish_pending(model, args, state, control, **kwargs) -> None:
    """Run the `on_train_end` of every callback the run of `state` registered on `model` and that has not ended
    yet (called before converting it)."""
    kwargs.pop("model", None)
    for callback in still_pending(model, state):
        callback.on_train_end(args, state, control, model=model, **kwargs)


def block_places(model, names) -> dict:
    """{name: (the transformer block object it sits in, its name inside the block)} for the `names` inside blocks."""
    from ..modules import find_blocks, split_block_name

    try:
        prefix, blocks = find_blocks(model)
    except ValueError:  # no block list: nothing can be renamed
        return {}
    places = {name: split_block_name(name, prefix) for name in names}
    return {name: (blocks[p[0]], p[1]) for name, p in places.items() if p is not None and p[0] < len(blocks)}


def follow_blocks(model, plan: dict, places: dict) -> dict:
    """`plan` ({layer name: anything}) renamed after removed blocks: a layer of a block still in the model gets the
    block's index now; a layer of a removed block leaves the plan; names outside the blocks stay."""
    if not places:
        return plan
    from ..modules import find_blocks

    prefix, blocks = find_blocks(model)
    index = {id(b): i for i, b in enumerate(blocks)}
    out = {}
    for name, value in plan.items():
        if name not in places:
            out[name] = value
            continue
        block, inner = places[name]
        if id(block) in index:
            out[f"{prefix}.{index[id(block)]}" + (f".{inner}" if inner else "")] = value
    return out
