"""Worker generations for ``--sm-partition mps`` resizes (pure: no torch, no sockets).

Under ``mps`` a worker's SM share is its ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, fixed when the
process creates its CUDA context, so a resize cannot happen in place (the paper's mechanism):
the scheduler starts a *standby* prefill/decode pair with the new percentages, attached to the
same memory manager (same weights, same KV pool, same radix tree), and swaps it in once both
are ready. From the swap on, new requests go to the new pair; the old pair finishes the
requests it already has -- nothing is migrated, so nothing is dropped or duplicated -- and is
retired (told to exit once idle) when the last of them has finished.

:class:`GenerationTracker` is the bookkeeping: which generation each request belongs to, and
when a retiring generation has no request left. Every request reaches exactly one generation
(the current one when it arrives) and finishes there (a finished output batch names it; aborts
and disconnects end in one too).
"""

from __future__ import annotations

from typing import Iterable, Optional


class GenerationTracker:
    """See the module docstring. Generation ``0`` is the pair started with the server."""

    def __init__(self) -> None:
        self.current = 0
        self._owner: dict[str, int] = {}
        self._live: dict[int, set[str]] = {0: set()}
        self.retiring: set[int] = set()

    def route(self, rid: str) -> int:
        """A new request: it belongs to the current generation (returned)."""
        gen = self._owner.setdefault(rid, self.current)
        self._live[gen].add(rid)
        return gen

    def finish(self, rids: Iterable[str]) -> list[int]:
        """Requests finished; returns the retiring generations this left without requests."""
        emptied = []
        for rid in rids:
            gen = self._owner.pop(rid, None)
            if gen is None:
                continue
            live = self._live[gen]
            live.discard(rid)
            if gen in self.retiring and not live and gen not in emptied:
                emptied.append(gen)
        return emptied

    def swap(self, new: int) -> Optional[int]:
        """``new`` becomes current; the old current starts retiring. Returns the old generation
        if it has no request left (retire it at once), else None (wait for :meth:`finish`)."""
        if new in self._live:
            raise ValueError(f"generation {new} already exists")
        old, self.current = self.current, new
        self._live[new] = set()
        self.retiring.add(old)
        return old if not self._live[old] else None

    def retired(self, gen: int) -> None:
        """``gen``'s workers exited; forget it."""
        if gen == self.current:
            raise ValueError("the current generation cannot retire")
        self.retiring.discard(gen)
        for rid in self._live.pop(gen, set()):
            self._owner.pop(rid, None)

    def in_flight(self, gen: int) -> int:
        return len(self._live.get(gen, ()))
