"""SGLang's token allocators with every alloc/free checked against the ownership ledger.

Used only inside the memory manager (:class:`~sglang_semipd.memory.service.KVStateService`):
the ledger transition is validated *before* the allocator mutates, so a refused request
changes nothing, and the frees ``RadixCache.evict`` does are accounted as the tree's.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional

import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from sglang_semipd.memory.ledger import OwnershipLedger

logger = logging.getLogger(__name__)


class _LedgerHooks:
    """Mixin over an SGLang allocator: every alloc/free updates the ledger first.

    The owner of an alloc and the expected owner of a free come from
    :meth:`acting` (the service sets them around each operation; the radix
    tree's frees happen under ``free_owner=TREE``)."""

    ledger: OwnershipLedger
    _alloc_owner: Optional[int] = None
    _free_owner: Optional[int] = None
    _depth = 0

    def attach(self, ledger: OwnershipLedger) -> None:
        self.ledger = ledger

    @contextlib.contextmanager
    def acting(self, alloc_owner: Optional[int] = None, free_owner: Optional[int] = None
               ) -> Iterator[None]:
        saved = (self._alloc_owner, self._free_owner)
        self._alloc_owner, self._free_owner = alloc_owner, free_owner
        try:
            yield
        finally:
            self._alloc_owner, self._free_owner = saved

    def units(self, idx: torch.Tensor) -> list[int]:
        """Ledger units (pages) covered by token indices ``idx``."""
        if self.page_size == 1:
            return idx.tolist()
        return torch.unique(torch.div(idx, self.page_size, rounding_mode="floor")).tolist()

    def alloc(self, need_size: int):
        out = super().alloc(need_size)
        if out is not None and out.numel():
            if self._alloc_owner is None:
                raise RuntimeError("allocator used outside KVStateService.acting()")
            try:
                self.ledger.issue(self.units(out), self._alloc_owner)
            except Exception:  # allocator and ledger disagree: a bug, never input
                logger.critical("allocator handed out slots the ledger does not see as free")
                raise
        return out

    def _ledgered(self, free_index: torch.Tensor, call) -> None:
        if self._depth == 0 and free_index.numel():
            if self._free_owner is None:
                raise RuntimeError("allocator freed outside KVStateService.acting()")
            self.ledger.release(self.units(free_index), self._free_owner)
        self._depth += 1
        try:
            call()
        finally:
            self._depth -= 1

    def free(self, free_index: torch.Tensor) -> None:
        self._ledgered(free_index, lambda: super(_LedgerHooks, self).free(free_index))

    def free_segment(self, free_index: torch.Tensor, *, start_pos: int) -> None:
        self._ledgered(free_index, lambda: super(_LedgerHooks, self).free_segment(
            free_index, start_pos=start_pos))

    def free_group_begin(self) -> None:
        raise NotImplementedError("free groups are not used by the memory manager")

    def alloc_extend(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("workers ask the memory manager for whole pages")

    alloc_decode = alloc_extend

    def free_unit_ids(self) -> list[int]:
        """Units currently in the allocator's free lists (duplicates preserved)."""
        return torch.cat((self.free_pages, self.release_pages)).tolist()


class LedgeredTokenAllocator(_LedgerHooks, TokenToKVPoolAllocator):
    """``TokenToKVPoolAllocator`` (page_size 1) whose frees/allocs hit the ledger."""


class LedgeredPagedAllocator(_LedgerHooks, PagedTokenToKVPoolAllocator):
    """``PagedTokenToKVPoolAllocator`` whose frees/allocs hit the ledger."""
