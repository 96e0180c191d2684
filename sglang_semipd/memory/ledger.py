"""Ownership ledger: the ground truth of who owns each KV allocation unit.

Pure Python (``array`` module only, no torch) so it can be unit-tested and
reasoned about in isolation.

Units are ids ``1..capacity`` (a unit is a token slot when ``page_size == 1``
and a page otherwise).  Unit 0 is SGLang's padding slot/page and is never
owned by anybody.  Every unit is in exactly one state:

* ``FREE``   (owner 0): in the allocator's free list;
* ``TREE``   (owner -1): referenced by exactly one radix-tree node;
* ``CLIENT`` (owner = client id >= 1): handed to a worker (allocated or leased).

Contracts:

* Every transition (:meth:`OwnershipLedger.move` and its wrappers) is atomic:
  either every unit of the call moves, or the call raises a
  :class:`LedgerError` subclass and the ledger is unchanged.
* Issuing a non-free unit raises :class:`DoubleIssueError`; freeing a free
  unit raises :class:`DoubleFreeError`; moving a unit owned by someone else
  raises :class:`NotOwnedError`; an id outside ``1..capacity`` raises
  :class:`InvalidSlotError`; the same id twice in one call raises
  :class:`DuplicateSlotError`.
* ``sum(count(o) for every owner o) == capacity`` always (see :meth:`verify`).
"""

from __future__ import annotations

import logging
from array import array
from collections import deque
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

FREE = 0
TREE = -1
PADDING = -2


class LedgerError(Exception):
    """Base of ledger refusals; ``code`` matches ``protocol.ErrorCode`` values."""

    code = "ledger_error"

    def __init__(self, message: str, slot: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.slot = slot


class InvalidSlotError(LedgerError):
    code = "invalid_indices"


class DuplicateSlotError(LedgerError):
    code = "duplicate_indices"


class DoubleIssueError(LedgerError):
    code = "double_issue"


class DoubleFreeError(LedgerError):
    code = "double_free"


class NotOwnedError(LedgerError):
    code = "not_owned"


def owner_name(owner: int) -> str:
    """Human-readable owner (for error messages)."""
    if owner == FREE:
        return "FREE"
    if owner == TREE:
        return "TREE"
    if owner == PADDING:
        return "PADDING"
    return f"CLIENT({owner})"


class OwnershipLedger:
    """Owner of every unit ``1..capacity``; counts per owner kept incrementally."""

    def __init__(self, capacity: int, unit: str = "slot") -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self._capacity = capacity
        self.unit = unit
        self._owner = array("i", [FREE]) * (capacity + 1)
        self._owner[0] = PADDING
        self._counts: dict[int, int] = {FREE: capacity}

    @property
    def capacity(self) -> int:
        return self._capacity

    def owner(self, slot: int) -> int:
        """Owner id of ``slot`` (raises :class:`InvalidSlotError` if out of range)."""
        if not 1 <= slot <= self._capacity:
            raise InvalidSlotError(f"{self.unit} {slot} outside 1..{self._capacity}", slot)
        return self._owner[slot]

    def count(self, owner: int) -> int:
        return self._counts.get(owner, 0)

    @property
    def free_count(self) -> int:
        return self.count(FREE)

    @property
    def tree_count(self) -> int:
        return self.count(TREE)

    def client_counts(self) -> dict[int, int]:
        """``{client_id: units}`` for clients holding at least one unit."""
        return {o: c for o, c in self._counts.items() if o > 0 and c > 0}

    def _refuse(self, slot: int, actual: int, src: int, dst: int) -> LedgerError:
        what = f"{self.unit} {slot} is {owner_name(actual)}, expected {owner_name(src)}"
        if src == FREE:
            return DoubleIssueError(f"double issue: {what}", slot)
        if actual == FREE:
            return DoubleFreeError(f"double free: {what}", slot)
        return NotOwnedError(f"not owned: {what} (moving to {owner_name(dst)})", slot)

    def check_owned(self, slots: Iterable[int], owner: int) -> list[int]:
        """Validate (without mutating) that every slot is distinct, in range and owned
        by ``owner``; returns the slots as a list."""
        slots = list(slots)
        own, cap = self._owner, self._capacity
        for s in slots:
            if not 1 <= s <= cap:
                raise InvalidSlotError(f"{self.unit} {s} outside 1..{cap}", s)
            if own[s] != owner:
                raise self._refuse(s, own[s], owner, owner)
        if len(set(slots)) != len(slots):
            raise DuplicateSlotError(f"duplicate {self.unit} ids in one call")
        return slots

    def move(self, slots: Iterable[int], src: int, dst: int) -> int:
        """Atomically move every slot from ``src`` to ``dst``; returns the count."""
        if src == dst or dst == PADDING or src == PADDING:
            raise ValueError(f"bad transition {owner_name(src)} -> {owner_name(dst)}")
        slots = list(slots)
        own, cap = self._owner, self._capacity
        for s in slots:  # phase 1: range + ownership, no mutation
            if not 1 <= s <= cap:
                raise InvalidSlotError(f"{self.unit} {s} outside 1..{cap}", s)
            if own[s] != src:
                raise self._refuse(s, own[s], src, dst)
        for i, s in enumerate(slots):  # phase 2: apply; a repeat id shows up as dst
            if own[s] != src:
                for t in slots[:i]:
                    own[t] = src
                raise DuplicateSlotError(f"{self.unit} {s} appears twice in one call", s)
            own[s] = dst
        n = len(slots)
        self._counts[src] = self._counts.get(src, 0) - n
        self._counts[dst] = self._counts.get(dst, 0) + n
        if self._counts[src] == 0 and src not in (FREE, TREE):
            del self._counts[src]
        return n

    def issue(self, slots: Iterable[int], client: int) -> int:
        """FREE -> CLIENT(client)."""
        return self.move(slots, FREE, self._client(client))

    def release(self, slots: Iterable[int], owner: int) -> int:
        """owner (a client or TREE) -> FREE."""
        return self.move(slots, owner, FREE)

    def adopt(self, slots: Iterable[int], client: int) -> int:
        """CLIENT(client) -> TREE (the radix tree takes the slots over)."""
        return self.move(slots, self._client(client), TREE)

    @staticmethod
    def _client(client: int) -> int:
        if client < 1:
            raise ValueError(f"client ids are >= 1, got {client}")
        return client

    def slots_of(self, owner: int) -> array:
        """Every slot owned by ``owner``, ascending (O(capacity) scan)."""
        own = self._owner
        return array("q", (s for s in range(1, self._capacity + 1) if own[s] == owner))

    def verify(self) -> list[str]:
        """Recount from scratch; returns a list of discrepancies (empty when sound)."""
        errors: list[str] = []
        recount: dict[int, int] = {}
        for s in range(1, self._capacity + 1):
            o = self._owner[s]
            recount[o] = recount.get(o, 0) + 1
        if self._owner[0] != PADDING:
            errors.append(f"{self.unit} 0 lost its PADDING marker")
        if PADDING in recount:
            errors.append(f"{recount[PADDING]} {self.unit}s marked PADDING")
        mine = {o: c for o, c in self._counts.items() if c}
        if mine != {o: c for o, c in recount.items() if c}:
            errors.append(f"ledger counts {mine} != recount {recount}")
        if sum(self._counts.values()) != self._capacity:
            errors.append(f"counts sum {sum(self._counts.values())} != capacity {self._capacity}")
        return errors


class SlotPool:
    """A ledger plus a FIFO free list: allocates the ids itself (used for
    req->token rows, ids ``1..capacity``; row 0 is SGLang's padding row).

    ``take`` is all-or-nothing; ``give`` validates ownership atomically."""

    def __init__(self, capacity: int, unit: str = "row") -> None:
        self.ledger = OwnershipLedger(capacity, unit)
        self._free: deque[int] = deque(range(1, capacity + 1))

    @property
    def capacity(self) -> int:
        return self.ledger.capacity

    @property
    def available(self) -> int:
        return len(self._free)

    def take(self, n: int, client: int) -> list[int] | None:
        """``n`` free ids now owned by ``client``, or ``None`` if fewer are free."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        try:
            self.ledger.issue(ids, client)
        except LedgerError:
            self._free.extendleft(reversed(ids))
            raise
        return ids

    def give(self, ids: Sequence[int], client: int) -> int:
        """Return ids owned by ``client`` to the pool (atomic)."""
        n = self.ledger.release(ids, client)
        self._free.extend(ids)
        return n

    def give_all(self, client: int) -> int:
        """Return every id ``client`` owns; returns how many."""
        ids = self.ledger.slots_of(client)
        return self.give(list(ids), client) if ids else 0

    def verify(self) -> list[str]:
        errors = self.ledger.verify()
        free = sorted(self._free)
        if free != list(self.ledger.slots_of(FREE)):
            errors.append(f"{self.ledger.unit} free list disagrees with the ledger")
        return errors
