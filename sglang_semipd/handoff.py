"""The decode worker's side of the prefill -> decode hand-off (pure logic: no torch, no SGLang).

Every generation request reaches *both* workers (the scheduler sends it to decode first). The
decode worker builds its own SGLang ``Req`` from it and *parks* it; when the prefill worker has
finished the request's prefill, moved the request row, KV tail and radix lock to decode
(``Transfer`` in the memory manager) and sent a :class:`~sglang_semipd.protocol.HandOff`, the
decode worker *adopts* the parked request with the hand-off's metadata. :class:`DecodeInbox`
decides, for every hand-off and every abort, what the decode worker must do:

* hand-off for a parked request -> adopt it (once);
* hand-off marked ``finished`` (the request ended at prefill: one output token, a stop, an
  abort seen by prefill) -> nothing to adopt; the parked copy is dropped;
* hand-off before its request (possible only if the request message were delayed) -> kept
  *early*, adopted when the request is parked; a *finished* one is remembered, so that the
  request is not parked for ever when it comes;
* abort of a parked request -> the parked copy is dropped. If the prefill worker saw the abort
  before the hand-off, it answered the client and its hand-off comes ``finished``. If it had
  already handed the request off (the abort overtook the hand-off on its way to decode), the
  hand-off comes unfinished: the request's row, slots and lock were moved to decode, so they
  are *released* (an orphan), never adopted, and **the decode worker must answer the client's
  abort** -- the prefill worker no longer has the request and says nothing.

Invariants (checked by the CPU tests with random interleavings): each hand-off is either
adopted, released or ignored (``finished``) exactly once; a request aborted while parked is
never adopted; nothing stays parked, early or dropped once every request's hand-off arrived.
"""

from __future__ import annotations

import logging
from typing import Any, Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)


class HandOffLike(Protocol):
    """What the inbox reads of a hand-off record (``protocol.HandOff``)."""

    rid: str
    finished: bool


R = TypeVar("R")
H = TypeVar("H", bound=HandOffLike)


class DecodeInbox(Generic[R, H]):
    """Parked requests and received hand-offs of one decode worker; see the module docstring.
    ``R``: the worker's request object (SGLang's ``Req``), ``H``: the hand-off record."""

    def __init__(self) -> None:
        self.parked: dict[str, R] = {}
        self.early: dict[str, H] = {}  # hand-off before its request
        self.dropped: set[str] = set()  # aborted here while parked; hand-off not yet seen
        self.finished_early: set[str] = set()  # finished hand-off before its request
        self._pending: list[H] = []

    def park(self, rid: str, req: R) -> None:
        """The request arrived (decode's copy); adoptable once its hand-off is here."""
        if rid in self.finished_early:  # it already ended at prefill: nothing to decode
            self.finished_early.discard(rid)
            return
        self.parked[rid] = req
        early = self.early.pop(rid, None)
        if early is not None:
            self._pending.append(early)

    def receive(self, handoff: H) -> None:
        """A hand-off arrived from the prefill worker (handled at the next :meth:`take`)."""
        self._pending.append(handoff)

    def abort(self, rid: str, abort_all: bool = False) -> list[str]:
        """SGLang's abort semantics (``rid`` matches by prefix, so the ``n>1`` children of a
        request go with it): parked requests that match are dropped; returns their rids."""
        gone = [r for r in self.parked if abort_all or r.startswith(rid)]
        for r in gone:
            del self.parked[r]
            self.dropped.add(r)
        return gone

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def take(self) -> tuple[list[tuple[R, H]], list[H]]:
        """The pending hand-offs, sorted out: ``(adopt, release)`` -- requests to adopt with
        their hand-off, and orphaned hand-offs: their resources must be released and their
        client answered with an abort (nobody else will; see the module docstring)."""
        adopt: list[tuple[R, H]] = []
        release: list[H] = []
        pending, self._pending = self._pending, []
        for h in pending:
            req = self.parked.pop(h.rid, None)
            if h.finished:  # ended at prefill: the prefill worker answered and released
                if req is None and h.rid not in self.dropped:
                    self.finished_early.add(h.rid)  # drop the request when it comes
                self.dropped.discard(h.rid)
            elif req is not None:
                adopt.append((req, h))
            elif h.rid in self.dropped:
                self.dropped.discard(h.rid)
                release.append(h)
            else:
                self.early[h.rid] = h  # its request is still on the way
        return adopt, release

    def stats(self) -> dict[str, Any]:
        """Sizes, for logs and leak checks (all zero at idle)."""
        return {"parked": len(self.parked), "early": len(self.early),
                "dropped": len(self.dropped), "finished_early": len(self.finished_early),
                "pending": len(self._pending)}
