"""ZeroMQ client side of the memory manager (the server is :mod:`sglang_semipd.memory.rpc`).

* :class:`KVStateClient` -- DEALER socket with typed, blocking methods
  (timeouts; ``KVStateError`` on ``ErrorReply``).  Results are ``array('q')``;
  :func:`as_tensor` converts lazily to torch.  Not thread-safe: one per thread.
* :class:`SlotLease` -- decode-path helper: one round trip takes N slots,
  ``take``/``give_back`` are local, ``return_unused`` closes the lease.

This module imports neither torch nor SGLang at import time (clients stay light).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from array import array
from typing import Any, Iterable, Optional, Sequence

import zmq

from sglang_semipd import protocol as P

logger = logging.getLogger(__name__)


class KVStateTimeout(P.KVStateError):
    """No reply within the client's timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(P.ErrorCode.TIMEOUT, message)


def as_tensor(indices: Sequence[int], device: Any = None) -> Any:
    """Torch int64 tensor of ``indices`` (imports torch lazily; copies)."""
    import torch

    arr = P.as_int_array(indices)
    if not len(arr):
        return torch.empty((0,), dtype=torch.int64, device=device)
    dtype = torch.int64 if arr.typecode == "q" else torch.int32
    t = torch.frombuffer(bytearray(arr.tobytes()), dtype=dtype).to(torch.int64)
    return t if device is None else t.to(device)


def as_index_array(t: Any) -> array:
    """``array('q')`` copy of a 1-D integer tensor on any device (the inverse of as_tensor)."""
    import torch

    return array("q", t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())


@dataclasses.dataclass(frozen=True)
class MatchResult:
    indices: array
    prefix_len: int
    node: int
    locked: bool


@dataclasses.dataclass(frozen=True)
class InsertResult:
    prefix_len: int
    node: int
    locked: bool


class KVStateClient:
    """Blocking DEALER client; every method is one round trip.

    Raises ``KVStateError`` (``.code``) on an ``ErrorReply`` and
    :class:`KVStateTimeout` when no reply arrives in ``timeout_s``; a late
    reply to a timed-out request is recognised by its ``seq`` and dropped."""

    def __init__(self, endpoint: str, name: str, role: str = "", *, timeout_s: float = 10.0,
                 register: bool = True, context: Optional[zmq.Context] = None) -> None:
        self.endpoint, self.name, self.role, self.timeout_s = endpoint, name, role, timeout_s
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTING_ID, f"{name}-{os.getpid()}-{id(self):x}".encode())
        self._sock.connect(endpoint)
        self._seq = itertools.count(1)
        self.client_id = 0
        self.page_size = self.capacity = self.req_rows = 0
        if register:
            self.hello()

    def call(self, msg: Any, *buffers: Any, timeout_s: Optional[float] = None
             ) -> tuple[Any, list[array]]:
        """Send ``msg`` + buffers; return ``(reply, reply_buffers)``."""
        seq = next(self._seq)
        self._sock.send_multipart(P.encode(msg, *buffers, seq=seq), copy=False)
        timeout_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        while True:
            if not self._sock.poll(timeout_ms, zmq.POLLIN):
                raise KVStateTimeout(f"{type(msg).__name__} got no reply in {timeout_ms} ms")
            decoded = P.decode_frames(self._sock.recv_multipart(copy=False))
            if decoded.seq != seq:
                logger.warning("dropping stale reply seq=%d (want %d)", decoded.seq, seq)
                continue
            if isinstance(decoded.msg, P.ErrorReply):
                raise P.KVStateError(decoded.msg.code, decoded.msg.message)
            return decoded.msg, decoded.buffers

    def hello(self, timeout_s: Optional[float] = None) -> int:
        reply, _ = self.call(P.Hello(name=self.name, role=self.role), timeout_s=timeout_s)
        self.client_id, self.page_size = reply.client_id, reply.page_size
        self.capacity, self.req_rows = reply.capacity, reply.req_rows
        return self.client_id

    def alloc(self, n: int) -> array:
        """``ceil(n / page_size) * page_size`` fresh slot indices."""
        return self.alloc_many([n])[0]

    def alloc_many(self, sizes: Sequence[int]) -> list[array]:
        """One atomic allocation for several requests."""
        _, bufs = self.call(P.Alloc(sizes=list(sizes)))
        return bufs

    def free(self, *index_arrays: Iterable[int]) -> int:
        """Free several index arrays in one message; returns tokens freed."""
        reply, _ = self.call(P.Free(), *index_arrays)
        return reply.freed

    def lease(self, n: int) -> "SlotLease":
        reply, bufs = self.call(P.Lease(n=n))
        return SlotLease(self, reply.lease_id, bufs[0])

    def return_lease(self, lease_id: int, unused: Iterable[int]) -> int:
        reply, _ = self.call(P.ReturnLease(lease_id=lease_id), unused)
        return reply.returned

    def alloc_req_rows(self, n: int) -> list[int]:
        return self.call(P.AllocReqRows(n=n))[0].rows

    def free_req_rows(self, rows: Sequence[int]) -> int:
        return self.call(P.FreeReqRows(rows=list(rows)))[0].freed

    def match_prefix(self, token_ids: Iterable[int], extra_key: Optional[str] = None,
                     lock: bool = False) -> MatchResult:
        reply, bufs = self.call(P.MatchPrefix(extra_key=extra_key, lock=lock),
                                P.token_buffer(token_ids))
        return MatchResult(bufs[0], reply.prefix_len, reply.node, reply.locked)

    def insert(self, token_ids: Iterable[int], values: Iterable[int],
               extra_key: Optional[str] = None, lock: bool = False,
               priority: int = 0) -> InsertResult:
        reply, _ = self.call(P.Insert(extra_key=extra_key, lock=lock, priority=priority),
                             P.token_buffer(token_ids), P.as_int_array(values))
        return InsertResult(reply.prefix_len, reply.node, reply.locked)

    def inc_lock_ref(self, node: int) -> int:
        return self.call(P.IncLockRef(node=node))[0].delta

    def dec_lock_ref(self, node: int) -> int:
        return self.call(P.DecLockRef(node=node))[0].delta

    def evict(self, num_tokens: int) -> int:
        return self.call(P.Evict(num_tokens=num_tokens))[0].num_evicted

    def transfer(self, to_client: int, slots: Iterable[int], rows: Sequence[int] = (),
                 locks: Sequence[int] = (), to_role: str = "") -> P.TransferReply:
        """Hand slots, req rows and lock refs to another client (see ``Transfer``);
        ``to_client=0`` names it by ``to_role`` instead."""
        reply, _ = self.call(P.Transfer(to_client=to_client, to_role=to_role,
                                        rows=[int(r) for r in rows],
                                        locks=[int(h) for h in locks]), slots)
        return reply

    def prefill_hand_off(self, to_role: str, entries: Sequence[P.HandOffEntry],
                         buffers: Sequence[Iterable[int]]
                         ) -> tuple[P.PrefillHandOffReply, list[array]]:
        """A prefill batch's hand-off in one round trip (see ``PrefillHandOff``):
        ``buffers`` are three per entry (token ids, their slots, the tail slots); returns the
        reply and, per entry, the tree's slots the caller's row must adopt."""
        return self.call(P.PrefillHandOff(to_role=to_role, entries=list(entries)), *buffers)

    def stats(self) -> P.InvariantReport:
        return self.call(P.Stats())[0]

    def check_invariant(self) -> P.InvariantReport:
        return self.call(P.CheckInvariant())[0]

    def reset(self) -> None:
        self.call(P.Reset())

    def release_client(self, client_id: int) -> P.ReleaseReply:
        """Supervisor call: release a (dead) client's holdings."""
        return self.call(P.ReleaseClient(client_id=client_id))[0]

    def goodbye(self, timeout_s: Optional[float] = None) -> P.ReleaseReply:
        """Hand back everything this client holds and unregister (the reply says what)."""
        reply = self.call(P.Goodbye(), timeout_s=timeout_s)[0]
        self.client_id = 0
        return reply

    def shutdown(self) -> None:
        self.call(P.Shutdown())

    def pool_manifest(self) -> P.PoolManifest:
        """The shared pools to attach to (see :mod:`sglang_semipd.memory.pool_attach`)."""
        return self.call(P.GetPoolManifest())[0].manifest

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> "KVStateClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SlotLease:
    """Slots leased once, handed out locally without round trips.

    ``take(k)`` hands out ``k`` slots (``k`` a multiple of the page size);
    ``give_back`` puts taken slots back (whole pages);  ``return_unused`` sends
    the local remainder back to the server and closes the lease (once).  Slots
    taken and then freed/inserted via the client leave the lease server-side."""

    def __init__(self, client: KVStateClient, lease_id: int, indices: array) -> None:
        self.client, self.lease_id = client, lease_id
        self.indices = indices  # the whole leased block, as granted
        self.page_size = max(client.page_size, 1)
        ps = self.page_size
        self._free: list[int] = [indices[j] for j in range(len(indices) - ps, -1, -ps)]
        self._taken: set[int] = set()
        self.closed = False

    @property
    def available(self) -> int:
        return len(self._free) * self.page_size

    def take(self, k: int) -> array:
        """``k`` leased slots (local; raises ``KVStateError('lease_exhausted')``)."""
        ps = self.page_size
        if self.closed or k % ps or k < 0:
            raise ValueError(f"cannot take {k} from lease {self.lease_id} (closed={self.closed})")
        if k > self.available:
            raise P.KVStateError("lease_exhausted", f"lease {self.lease_id}: {k} > {self.available}")
        out = array("q")
        for _ in range(k // ps):
            start = self._free.pop()
            self._taken.add(start)
            out.extend(range(start, start + ps))
        return out

    def remaining(self) -> array:
        """The untaken slots (what ``return_unused`` would send back)."""
        out = array("q")
        for start in reversed(self._free):
            out.extend(range(start, start + self.page_size))
        return out

    def give_back(self, indices: Iterable[int]) -> None:
        """Return taken slots to the local pool (whole pages, each taken from here)."""
        idx, ps = list(indices), self.page_size
        starts = [idx[j] for j in range(0, len(idx), ps)]
        if len(idx) % ps or any(idx[j:j + ps] != list(range(idx[j], idx[j] + ps))
                                for j in range(0, len(idx), ps)):
            raise ValueError("give_back takes whole pages")
        if not self._taken.issuperset(starts) or len(set(starts)) != len(starts):
            raise ValueError("give_back of slots not taken from this lease")
        self._taken.difference_update(starts)
        self._free.extend(reversed(starts))

    def return_unused(self) -> int:
        """Send the untaken rest back; closes the lease.  Returns tokens returned."""
        if self.closed:
            raise ValueError(f"lease {self.lease_id} already returned")
        returned = self.client.return_lease(self.lease_id, self.remaining())
        self._free.clear()
        self.closed = True
        return returned

    def __enter__(self) -> "SlotLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.closed:
            self.return_unused()


