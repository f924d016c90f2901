"""The few collectives a refresh needs, and how rows are split over ranks."""

from __future__ import annotations

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


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.td is not None:
        dist.td.barrier()
