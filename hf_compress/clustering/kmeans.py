"""1-D k-means per codebook group, and the b-bit index packing of the export format.

A weight W (2-D; output channels on axis `axis`: 0 for Linear, 1 for GPT-2 Conv1D) is split into G groups
of `group_size` consecutive output channels (G = 1: the whole layer). Each group has its own codebook of
k = 2^b centroids; each entry has an index in [0, k).
"""

from __future__ import annotations

import math

import torch


def grouped(w: torch.Tensor, groups: int, axis: int = 0) -> torch.Tensor:
    """W as [G, n] (the entries of each group of output channels, in W's row-major order within the group)."""
    w = w.detach()
    if axis == 1:
        w = w.t()
    return w.reshape(groups, -1)


def ungrouped(values: torch.Tensor, shape: tuple[int, int], axis: int = 0) -> torch.Tensor:
    """Inverse of `grouped`: [G, n] back to W's shape."""
    if axis == 1:
        return values.reshape(shape[1], shape[0]).t()
    return values.reshape(shape)


def group_index(shape: tuple[int, int], groups: int, k: int, axis: int, device=None) -> torch.Tensor:
    """int64 tensor of W's shape: k * (group of the entry) — add the assignment to index the flat codebooks."""
    out_ch = shape[axis]
    g = torch.arange(out_ch, device=device) // (out_ch // groups) * k
    return (g[:, None] if axis == 0 else g[None, :]).expand(shape).contiguous()


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each entry: x [G, n], centroids [G, k] -> int64 [G, n] (ties: the lower centroid)."""
    order = torch.argsort(centroids, dim=1)
    sorted_c = torch.gather(centroids, 1, order)
    mid = (sorted_c[:, 1:] + sorted_c[:, :-1]) / 2
    pos = torch.searchsorted(mid.contiguous(), x.contiguous(), right=False)
    return torch.gather(order, 1, pos)


def init_centroids(x: torch.Tensor, k: int, how: str = "linear") -> torch.Tensor:
    """[G, k] initial centroids of x [G, n]."""
    x = x.float()
    if how == "density":
        q = torch.linspace(0, 1, k + 2, device=x.device)[1:-1]
        return torch.quantile(x, q, dim=1).t().contiguous() if x.shape[1] <= 16_000_000 else init_centroids(x, k)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    t = torch.linspace(0, 1, k, device=x.device)[None, :]
    return lo + (hi - lo) * t


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, init: torch.Tensor | str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [G, k] float32, assignments int64 [G, n]) of x [G, n]: Lloyd's iterations from `init`
    (a [G, k] tensor: warm start). A cluster that loses all its members keeps its centroid. Deterministic."""
    xf = x.float()
    c = init_centroids(xf, k, init) if isinstance(init, str) else init.detach().float().clone()
    for _ in range(iters):
        a = _assign(xf, c)
        sums = torch.zeros_like(c).scatter_add_(1, a, xf)
        counts = torch.zeros_like(c).scatter_add_(1, a, torch.ones_like(xf))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        if torch.equal(new, c):
            break
        c = new
    return c, _assign(xf, c)


# ----------------------------------------------------------------------------- b-bit packing


def packed_bytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [ceil(n * bits / 8)]: the indices (row-major, each < 2^bits) as a little-endian bit stream (bit j of
    index i is bit (i * bits + j) of the stream; bit t of the stream is bit t % 8 of byte t // 8). For bits
    dividing 8 each byte holds 8 / bits whole indices."""
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"index out of range for {bits} bits.")
    stream = ((flat[:, None] >> torch.arange(bits, device=flat.device)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)
    return (stream << torch.arange(8, device=flat.device)).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int64 [n] from `pack`'s bytes."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_bytes(n, bits):
        raise ValueError(f"packed indices must be uint8 [{packed_bytes(n, bits)}], not {packed.dtype} {tuple(packed.shape)}.")
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)[: n * bits]
    return (stream.view(n, bits) << torch.arange(bits, device=packed.device)).sum(1)
