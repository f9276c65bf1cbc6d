"""The slot store: cached branch outputs, alive only from their write to their last read.

Live bytes are what the schedule's liveness says (``cache_bytes``, peak in ``peak_cache_bytes``).
A freed slot's storage is kept for the next store of the same shape, dtype and device instead of being
returned to the allocator, so a warm run allocates nothing and the memory held does not depend on
what the allocator does with freed blocks.
The pool holds only shapes the last run stored, each at most as many as that run had alive at once,
so the memory kept between runs is the liveness bound; ``release(keep_pool=False)`` (disable_cache) gives it all back.

Fresh storage comes in one block of ``block_slots`` slots (the policy's liveness bound, set by the
runtime), each slot a cache-line-aligned view of it. On CPU, 168 separate 2.4 MB slots (TaylorSeer
order 2 on the DiT-XL/2 shape) sat in glibc's heap among the activations and made a plain process
page-fault more of the activations afresh than one block does, which glibc maps apart from its heap
(631k faults per run vs 295k-468k; benchmarks/README.md).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable

import torch

__all__ = ["SlotStore"]


_ALIGN = 64  # bytes: a cache line, and the widest vector the fused ops load


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class SlotStore:
    def __init__(self):
        self._live: dict[Hashable, torch.Tensor] = {}
        self._pool: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self.cache_bytes = 0
        self.peak_cache_bytes = 0
        self.pooled_bytes = 0  # storage of freed slots kept for the next store of the same shape
        self.allocations = 0  # fresh blocks of storage so far (a warm run of the same shape makes none)
        self.allocated_slots = 0  # slots in those blocks
        self.block_slots = 1  # slots per fresh block: the most a run keeps alive at once (see the module doc)
        self._not_recycled: set = set()  # keys stored by store_new: their memory is never handed out again
        self._kinds_used: set = set()  # (shape, dtype, device) stored since the last release

    def get(self, key: Hashable) -> torch.Tensor | None:
        return self._live.get(key)

    def keys(self):
        return self._live.keys()

    def slot_for(self, key: Hashable, like: torch.Tensor) -> torch.Tensor:
        """A contiguous slot of ``like``'s shape/dtype/device under ``key`` (its content is undefined)."""
        slot = self._live.get(key)
        if slot is not None and slot.shape == like.shape and slot.dtype == like.dtype and slot.device == like.device:
            return slot
        self.free(key)
        kind = (tuple(like.shape), like.dtype, like.device)
        spare = self._pool[kind]
        if not spare:
            count = max(1, self.block_slots - len(self._live))  # what this run may still need alive at once
            numel, size = like.numel(), like.element_size()
            stride = -(-numel * size // _ALIGN) * _ALIGN // size  # every slot starts on a cache line
            block = torch.empty((count, stride), dtype=like.dtype, device=like.device)
            spare.extend(row[:numel].view(like.shape) for row in block)
            self.pooled_bytes += count * _nbytes(spare[0])
            self.allocations += 1
            self.allocated_slots += count
        slot = spare.pop()
        self.pooled_bytes -= _nbytes(slot)
        self._live[key] = slot
        self.cache_bytes += _nbytes(slot)
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)
        self._kinds_used.add(kind)
        return slot

    def store_new(self, key: Hashable, value: torch.Tensor) -> None:
        """Keep ``value`` itself under ``key``, never reusing memory (training: autograd may still hold
        the previous slot, so its storage must not be overwritten)."""
        self.free(key, recycle=False)
        self._live[key] = value
        self._not_recycled.add(key)
        self.cache_bytes += _nbytes(value)
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)

    def free(self, key: Hashable, *, recycle: bool = True) -> None:
        slot = self._live.pop(key, None)
        if slot is None:
            return
        self.cache_bytes -= _nbytes(slot)
        if key in self._not_recycled:  # training's slots: autograd may still hold them, and the pool
            self._not_recycled.discard(key)  # would keep every run's (nothing takes them back out)
        elif recycle:
            self._pool[(tuple(slot.shape), slot.dtype, slot.device)].append(slot)
            self.pooled_bytes += _nbytes(slot)

    def release(self, *, keep_pool: bool = True) -> None:
        """Free every slot (a new run starts); ``keep_pool=False`` also returns the pooled storage.

        Spares of shapes the ending run did not store (an earlier batch size or resolution) are returned
        too, so the pool holds at most what the last run had alive at its peak."""
        for key in list(self._live):
            self.free(key, recycle=keep_pool)
        if not keep_pool or self._kinds_used:  # a release right after a release changes nothing
            for kind in [k for k in self._pool if not keep_pool or k not in self._kinds_used]:
                self.pooled_bytes -= sum(_nbytes(t) for t in self._pool.pop(kind))
        self._kinds_used.clear()

    def reset_peak(self) -> None:
        self.peak_cache_bytes = self.cache_bytes

