"""Releases held back until the GPU work that may still touch them is done.

Why: with SGLang's overlap scheduler the decode worker processes iteration N's results (and
frees the KV slots and ``req_to_token`` rows of the requests that finished or were retracted)
while iteration N+1 is already queued on the GPU, and N+1 still reads those rows and writes
one more KV slot for each of those requests. In stock SGLang that is safe: the freed slots
go to a local free list and are only reused by work queued after N+1 on the same stream. Here
they go back to the memory manager, and the *prefill* worker, on its own stream in another
process, could be handed them at once and write a new prompt's KV there before N+1 has run.
So the decode worker tags each release with an event recorded after the latest forward it
launched (its *gate*), and the release only reaches the memory manager once that event has
completed.

:class:`GatedReleases` is the bookkeeping: a FIFO of (gate, payload). A gate is anything with
``query() -> bool`` (a ``torch.cuda.Event``) and ``synchronize()``; ``None`` means
"release now". Gates complete in the order they were recorded (each forward waits for the
previous one, also across a resize, see ``workers``), so :meth:`ready` stops at the first gate
not yet done. Pure Python (no torch).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Deque, Generic, Optional, TypeVar

T = TypeVar("T")

GateSource = Callable[[], Optional[Any]]  # the gate new releases wait for (None: no wait)


class GatedReleases(Generic[T]):
    """Payloads waiting for their gate; ``size`` sums ``weight(payload)`` over them."""

    def __init__(self, weight: Callable[[T], int] = lambda _: 1) -> None:
        self._queue: Deque[tuple[Any, T]] = collections.deque()
        self._weight = weight
        self.size = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, payload: T, gate: Any) -> None:
        self._queue.append((gate, payload))
        self.size += self._weight(payload)

    def ready(self) -> list[T]:
        """Pop and return the payloads whose gates have completed (oldest first)."""
        out: list[T] = []
        while self._queue and (self._queue[0][0] is None or self._queue[0][0].query()):
            out.append(self._pop())
        return out

    def drain(self) -> list[T]:
        """Wait for every gate (``synchronize``), then pop and return everything."""
        out: list[T] = []
        while self._queue:
            gate = self._queue[0][0]
            if gate is not None:
                gate.synchronize()
            out.append(self._pop())
        return out

    def _pop(self) -> T:
        _, payload = self._queue.popleft()
        self.size -= self._weight(payload)
        return payload
