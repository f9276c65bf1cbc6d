"""Data parallelism over trajectories on torch.distributed, and the randomness that makes it exact.

Every random draw of training (a sample's initial noise, label, data index, forward-noising noise)
comes from a generator seeded by (seed, iteration, GLOBAL sample index, purpose). Nothing depends on
process-local RNG state, so:

* a resumed run draws exactly what the uninterrupted run drew (resume is bitwise on CPU without
  saving any RNG state);
* P processes with batch b see exactly the samples a single process with batch P*b sees: the runs
  differ only by floating-point reduction order (mean of per-rank means vs one mean).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def all_reduce_mean_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """In-place average over processes (a no-op for one process)."""
    if world.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world.size)
    return tensor


def broadcast_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.active:
        dist.broadcast(tensor, src=0)
    return tensor


def seeded(seed: int, iteration: int, index: int, purpose: str) -> torch.Generator:
    """A CPU generator for one draw, a pure function of its arguments (see the module docstring)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, iteration, index) + purpose.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def global_indices(iteration_batch: int, world: World) -> range:
    """This process's slice of the global batch of iteration_batch * world.size samples."""
    start = world.rank * iteration_batch
    return range(start, start + iteration_batch)


def draw_normal(seed: int, iteration: int, indices: range, shape: tuple, purpose: str) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=seeded(seed, iteration, i, purpose)) for i in indices])


def draw_int(seed: int, iteration: int, indices: range, high: int, purpose: str) -> torch.Tensor:
    return torch.cat([torch.randint(high, (1,), generator=seeded(seed, iteration, i, purpose)) for i in indices])
