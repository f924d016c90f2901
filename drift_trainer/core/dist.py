"""The few collectives a refresh needs, and how rows are split over ranks."""

from __future__ import annotations

import contextlib

import numpy as np
import torch


class Dist:
    """The few collectives a refresh needs, over ``torch.distributed`` when it is initialised (else identities)."""

    def __init__(self):
        import torch.distributed as td

        self.td = td if td.is_available() and td.is_initialized() else None
        self.world_size = self.td.get_world_size() if self.td else 1
        self.rank = self.td.get_rank() if self.td else 0
        self.device = torch.device("cpu")
        if self.td is not None and self.td.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def all_reduce_sum(self, x: np.ndarray) -> np.ndarray:
        if self.td is None:
            return x
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=self.device)
        self.td.all_reduce(t)
        return t.cpu().numpy()

    def all_gather(self, x: np.ndarray) -> np.ndarray:
        """Concatenate equal-length arrays from every rank along axis 0 (rank order)."""
        if self.td is None:
            return x
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self.td.all_gather(parts, t)
        return torch.cat(parts).cpu().numpy()

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.td is None:
            return [obj]
        out = [None] * self.world_size
        self.td.all_gather_object(out, obj)
        return out

    def all_reduce_max(self, x: np.ndarray) -> np.ndarray:
        if self.td is None:
            return x
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=self.device)
        self.td.all_reduce(t, op=self.td.ReduceOp.MAX)
        return t.cpu().numpy()

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        if self.td is None:
            return x
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64, device=self.device)
        self.td.broadcast(t, src=0)
        return t.cpu().numpy()


def shard(n: int, rank: int, world_size: int) -> tuple[np.ndarray, int]:
    """Rows of this rank (strided) and the per-rank count every rank pads to."""
    mine = np.arange(rank, n, world_size)
    per_rank = (n + world_size - 1) // world_size
    return mine, per_rank


def rank_calls(num_batches: int, dist: Dist | None, min_calls: int = 0) -> list[tuple[int, bool]]:
    """This rank's share of ``num_batches`` forward batches: ``(batch, keep)`` pairs, batches ``rank, rank + world,
    ...`` (:func:`shard`). Every rank gets the same number of calls (at least ``min_calls``), since a forward is a
    collective under ZeRO-3 and FSDP2: a rank with fewer batches repeats one with ``keep=False`` (its result is
    discarded)."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine, per_rank = shard(num_batches, rank, world)
    mine = mine.tolist()
    calls = max(per_rank, min_calls)
    return [(mine[j], True) if j < len(mine) else (mine[-1] if mine else 0, False) for j in range(calls)]


def sum_over_ranks(arrays: list[np.ndarray], dist: Dist | None) -> list[np.ndarray]:
    """Element-wise sums over ranks (identities in one process): each rank filled its own entries, zeros elsewhere,
    so every rank ends with every entry."""
    if dist is None or dist.world_size == 1:
        return arrays
    return [dist.all_reduce_sum(a) for a in arrays]


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.td is not None:
        dist.td.barrier()


def fsdp_modules(model) -> list:
    """The modules of ``model`` that torch's FSDP2 ``fully_shard`` manages (empty for any other model)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def fsdp2_unsharded(model):
    """Hold every FSDP2 parameter group of ``model`` unsharded (full weights on every rank) for the duration, then
    reshard and restore each group's own reshard-after-forward setting.

    Gathered once, the forwards inside run no collective, so ranks may make different numbers of them (``generate``
    with rows stopping at their EOS). A model without FSDP2 modules is yielded as it is. The settings are restored
    through FSDP2's state (``_auto_reshard_after_forward``, ``post_forward_mesh_info``), since the public
    ``set_reshard_after_forward`` cannot express the root's automatic choice."""
    modules = fsdp_modules(model)
    if not modules:
        yield model
        return
    saved = []
    for m in modules:
        state = m._get_fsdp_state()
        saved.append(
            (getattr(state, "_auto_reshard_after_forward", None), [g.post_forward_mesh_info for g in _groups(state)])
        )
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
        for m, (auto, infos) in zip(modules, saved):
            state = m._get_fsdp_state()
            if auto is not None:
                state._auto_reshard_after_forward = auto
            for g, info in zip(_groups(state), infos):
                g.post_forward_mesh_info = info


def _groups(state) -> list:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch versions with a single group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)
