"""Keeping the topology identical on every rank of a torch.distributed job.

Each rank scans its own batch, so the ranks would track different candidates and decide
differently. With a process group set on the controller (``SEFTController(...,
process_group="auto")`` under ``torch.distributed``), every rank instead:
- at the first pass of a window, agrees on finiteness (a min-reduction) and tracks the
  union of all ranks' candidates (an all-gather), so the window's sums cover the same
  positions everywhere;
- before each decision, sums the window statistics over ranks (an all-reduce); the delta
  values are already equal (DDP averages their gradients), so the pure decision is too;
- after each evolution step, compares a topology hash across ranks and raises if it
  differs.
The collectives run on a group of their own, apart from DDP's gradient all-reduce.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def resolve_group(process_group) -> Optional[object]:
    """None (single process), a given group, or with "auto" a new group over all ranks
    when torch.distributed is initialised with more than one rank."""
    if process_group is None:
        return None
    if process_group == "auto":
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return dist.new_group(backend=dist.get_backend())
    return process_group


def _device(group) -> torch.device:
    """Where this group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_agree(flag: bool, group) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def union_positions(positions: Tensor, group) -> Tensor:
    """Sorted union of every rank's (sorted, unique) int64 positions."""
    world, dev = dist.get_world_size(group), _device(group)
    n = torch.tensor([positions.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    width = int(max(s.item() for s in sizes))
    padded = torch.full((width,), -1, dtype=torch.int64, device=dev)
    padded[:positions.numel()] = positions.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    merged = torch.cat(parts)
    return torch.unique(merged[merged >= 0]).to(positions.device)  # sorted


def sum_over_ranks(t: Tensor, group) -> Tensor:
    r = t.to(_device(group), copy=True)
    dist.all_reduce(r, op=dist.ReduceOp.SUM, group=group)
    return r.to(t.device)


def topology_hash(layers) -> int:
    """A cheap fingerprint of every layer's pattern and delta slots (int64 arithmetic)."""
    h = torch.zeros((), dtype=torch.int64)
    for i, layer in enumerate(layers):
        idx = torch.arange(layer.col.numel(), dtype=torch.int64, device=layer.col.device)
        part = (layer.col.long() * 7919 + idx).sum() * (i + 1)
        part = part + (layer.crow.long() * 31).sum() + (layer.delta_slots * 17).sum()
        h = h * 1_000_003 + part.cpu()
    return int(h)


def check_same_topology(layers, group, step: int) -> None:
    h = torch.tensor([topology_hash(layers)], dtype=torch.int64, device=_device(group))
    world = dist.get_world_size(group)
    hs = [torch.zeros_like(h) for _ in range(world)]
    dist.all_gather(hs, h, group=group)
    if len({int(x.item()) for x in hs}) != 1:
        raise RuntimeError(f"SEFT: the sparse topology differs across ranks after the evolution step at "
                           f"step {step} (hashes {[int(x.item()) for x in hs]}); the ranks' statistics or "
                           "delta values went out of sync")
