"""Parameters sharded by FSDP2 (`fully_shard`: DTensor parameters), seen from compression code.

One home for "this rank's piece" and "the whole tensor": per-step work (masks, scores, gradients) runs
on this rank's shard with no communication; what needs the whole model (a global pruning threshold, a
checkpoint) gathers the full tensors, computes exactly what an unsharded run would, and keeps this
rank's shard of the result. Plain tensors pass through every function unchanged.
"""

from __future__ import annotations

import torch


def is_sharded(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh") and hasattr(t, "placements")


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard (a view that shares storage with the parameter), or `t` itself."""
    return t.to_local() if t is not None and is_sharded(t) else t


def full(piece: torch.Tensor, like) -> torch.Tensor:
    """The whole tensor whose shard on this rank is `piece`, laid out like the parameter `like`."""
    if not is_sharded(like):
        return piece
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(piece, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()).full_tensor()


def shard(whole: torch.Tensor, like) -> torch.Tensor:
    """This rank's shard of `whole` (identical on every rank), cut the way `like` is: no communication."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def sum_shards(value: torch.Tensor, like) -> torch.Tensor:
    """`value` computed on this rank's shard of `like`, summed over the ranks that hold the other shards."""
    if not is_sharded(like):
        return value
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    value = value.clone()
    for dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(value, group=like.device_mesh.get_group(dim))
    return value


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` as whole tensors on the CPU (collective under FSDP2: call it
    on every rank). Load it into an unsharded copy of the model to `convert` that copy: what ships is
    built from the full model, never from shards."""
    if not any(is_sharded(p) for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict without cpu_offload: every rank gets the whole tensors (with it, only rank 0 would)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in sd.items()}
