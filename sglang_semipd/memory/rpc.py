"""ZeroMQ transport for :class:`~sglang_semipd.memory.service.KVStateService`.

* :class:`KVStateServer` -- ROUTER socket; one message at a time:
  decode -> dispatch -> reply.  Any bad input (garbage, wrong version,
  truncated frames, unknown type, invalid indices, double free, stale node
  handle, ...) is answered with an ``ErrorReply`` and a log line; nothing
  escapes the loop and a refused request leaves the state unchanged.
* :class:`KVStateClient` -- DEALER socket with typed, blocking methods
  (timeouts; ``KVStateError`` on ``ErrorReply``).  Results are ``array('q')``;
  :func:`as_tensor` converts lazily to torch.  Not thread-safe: one per thread.
* :class:`SlotLease` -- decode-path helper: one round trip takes N slots,
  ``take``/``give_back`` are local, ``return_unused`` closes the lease.
* :func:`run_kv_state_server` -- process entry (``multiprocessing`` target or
  ``python -m sglang_semipd.memory.rpc``).

This module imports neither torch nor SGLang at import time (clients stay light).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import signal
import threading
from array import array
from typing import Any, Callable, Iterable, Optional, Sequence

import zmq

from sglang_semipd import protocol as P
from sglang_semipd.memory.ledger import LedgerError

logger = logging.getLogger(__name__)

# Refusals that are part of normal operation (capacity pressure, eviction races).
_ROUTINE = frozenset({P.ErrorCode.OUT_OF_MEMORY, P.ErrorCode.UNKNOWN_NODE})
_ANON_OK = (P.Hello, P.Stats, P.CheckInvariant, P.ReleaseClient, P.Reset, P.Shutdown,
            P.GetPoolManifest)


class KVStateTimeout(P.KVStateError):
    """No reply within the client's timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(P.ErrorCode.TIMEOUT, message)


class KVStateServer:
    """ROUTER loop over a service; socket identities map to client ids via ``Hello``."""

    def __init__(self, service: Any, endpoint: str, context: Optional[zmq.Context] = None,
                 manifest: Optional[P.PoolManifest] = None) -> None:
        self.service = service
        self.manifest = manifest  # the shared pools workers attach to (pool_attach)
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self._sock: Optional[zmq.Socket] = None
        self._ids: dict[bytes, int] = {}
        self._identity = b""
        self._stop = threading.Event()
        self._handlers: dict[type, Callable[[Optional[int], Any, list], tuple]] = {
            P.Hello: self._hello, P.Alloc: self._alloc, P.Free: self._free,
            P.Lease: self._lease, P.ReturnLease: self._return_lease,
            P.AllocReqRows: self._alloc_rows, P.FreeReqRows: self._free_rows,
            P.MatchPrefix: self._match, P.Insert: self._insert, P.IncLockRef: self._inc,
            P.DecLockRef: self._dec, P.Evict: self._evict, P.Stats: self._stats,
            P.CheckInvariant: self._check, P.Reset: self._reset,
            P.ReleaseClient: self._release, P.Goodbye: self._goodbye,
            P.Shutdown: self._shutdown, P.GetPoolManifest: self._manifest,
        }

    def bind(self) -> None:
        """Create the ROUTER socket and bind it to ``endpoint``."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._sock = sock
        logger.info("KV state server bound to %s", self.endpoint)

    def serve_forever(self, stop_event: Any = None, poll_ms: int = 100) -> None:
        """Serve until ``stop_event.is_set()`` or a ``Shutdown`` request."""
        if self._sock is None:
            self.bind()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set() and not (stop_event is not None and stop_event.is_set()):
            if not poller.poll(poll_ms):
                continue
            while not self._stop.is_set():
                try:
                    parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._serve_one(parts)
        logger.info("KV state server on %s stopping", self.endpoint)

    def _serve_one(self, parts: list) -> None:
        identity = parts[0].bytes
        frames, envelope = parts[1:], []
        if frames and len(frames[0]) == 0:  # REQ-style empty delimiter
            envelope, frames = [b""], frames[1:]
        reply = self.handle(identity, frames)
        try:
            self._sock.send_multipart([identity, *envelope, *reply], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            logger.warning("dropping reply to %r: %s", identity, exc)

    def handle(self, identity: bytes, frames: Sequence[Any]) -> list[bytes]:
        """Decode, dispatch and encode the reply; never raises."""
        seq, self._identity = 0, identity
        try:
            decoded = P.decode_frames(frames)
            seq = decoded.seq
            handler = self._handlers.get(type(decoded.msg))
            if handler is None:
                raise P.KVStateError(P.ErrorCode.UNKNOWN_TYPE,
                                     f"{type(decoded.msg).__name__} is not a request")
            cid = self._ids.get(identity)
            if cid is None and not isinstance(decoded.msg, _ANON_OK):
                raise P.KVStateError(P.ErrorCode.NOT_REGISTERED, "send Hello first")
            reply, bufs = handler(cid, decoded.msg, decoded.buffers)
            return P.encode(reply, *bufs, seq=seq)
        except (P.KVStateError, LedgerError) as exc:
            level = logging.INFO if exc.code in _ROUTINE else logging.WARNING
            logger.log(level, "refused request from %r: %s: %s", identity, exc.code, exc)
            return P.encode(P.ErrorReply(code=exc.code, message=str(exc)), seq=seq)
        except Exception as exc:  # last line of defence: log, answer, keep serving
            logger.exception("internal error serving %r", identity)
            return P.encode(P.ErrorReply(code=P.ErrorCode.INTERNAL, message=repr(exc)), seq=seq)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    # ------------------------------------------------------------ handlers
    def _hello(self, cid, msg, bufs):
        svc = self.service
        if cid is None:
            cid = svc.register(msg.name, msg.role)
        self._ids[self._identity] = cid
        return P.HelloReply(client_id=cid, page_size=svc.page_size, capacity=svc.capacity,
                            req_rows=svc.rows.capacity), ()

    def _alloc(self, cid, msg, bufs):
        pieces = self.service.alloc(cid, msg.sizes)
        return P.AllocReply(sizes=[len(p) for p in pieces]), pieces

    def _free(self, cid, msg, bufs):
        return P.FreeReply(freed=self.service.free(cid, bufs)), ()

    def _lease(self, cid, msg, bufs):
        lid, idx = self.service.lease(cid, msg.n)
        return P.LeaseReply(lease_id=lid, n=len(idx)), (idx,)

    def _return_lease(self, cid, msg, bufs):
        return P.ReturnLeaseReply(returned=self.service.return_lease(cid, msg.lease_id,
                                                                     bufs[0])), ()

    def _alloc_rows(self, cid, msg, bufs):
        return P.ReqRowsReply(rows=self.service.alloc_req_rows(cid, msg.n)), ()

    def _free_rows(self, cid, msg, bufs):
        return P.FreeReqRowsReply(freed=self.service.free_req_rows(cid, msg.rows)), ()

    def _match(self, cid, msg, bufs):
        idx, plen, node = self.service.match_prefix(cid, bufs[0], msg.extra_key, msg.lock)
        return P.MatchPrefixReply(prefix_len=plen, node=node, locked=msg.lock), (idx,)

    def _insert(self, cid, msg, bufs):
        plen, node = self.service.insert(cid, bufs[0], bufs[1], msg.extra_key, msg.lock,
                                         msg.priority)
        return P.InsertReply(prefix_len=plen, node=node, locked=msg.lock), ()

    def _inc(self, cid, msg, bufs):
        delta, count = self.service.inc_lock_ref(cid, msg.node)
        return P.LockRefReply(node=msg.node, delta=delta, lock_count=count), ()

    def _dec(self, cid, msg, bufs):
        delta, count = self.service.dec_lock_ref(cid, msg.node)
        return P.LockRefReply(node=msg.node, delta=delta, lock_count=count), ()

    def _evict(self, cid, msg, bufs):
        return P.EvictReply(num_evicted=self.service.evict(msg.num_tokens)), ()

    def _stats(self, cid, msg, bufs):
        return self.service.stats(), ()

    def _check(self, cid, msg, bufs):
        return self.service.check_invariant(), ()

    def _reset(self, cid, msg, bufs):
        self.service.reset()
        return P.OkReply(), ()

    def _release(self, cid, msg, bufs):
        reply = self.service.release_client(msg.client_id)
        self._ids = {i: c for i, c in self._ids.items() if c != msg.client_id}
        return reply, ()

    def _goodbye(self, cid, msg, bufs):
        return self._release(cid, P.ReleaseClient(client_id=cid), bufs)

    def _shutdown(self, cid, msg, bufs):
        self._stop.set()
        return P.OkReply(), ()

    def _manifest(self, cid, msg, bufs):
        if self.manifest is None:
            raise P.KVStateError(P.ErrorCode.NO_MANIFEST, "this server exports no pools")
        return P.PoolManifestReply(manifest=self.manifest), ()


# ---------------------------------------------------------------- client side
def as_tensor(indices: Sequence[int], device: Any = None) -> Any:
    """Torch int64 tensor of ``indices`` (imports torch lazily; copies)."""
    import torch

    arr = P.as_int_array(indices)
    if not len(arr):
        return torch.empty((0,), dtype=torch.int64, device=device)
    dtype = torch.int64 if arr.typecode == "q" else torch.int32
    t = torch.frombuffer(bytearray(arr.tobytes()), dtype=dtype).to(torch.int64)
    return t if device is None else t.to(device)


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

    def stats(self) -> P.InvariantReport:
        return self.call(P.Stats())[0]

    def check_invariant(self) -> P.InvariantReport:
        return self.call(P.CheckInvariant())[0]

    def reset(self) -> None:
        self.call(P.Reset())

    def release_client(self, client_id: int) -> P.ReleaseReply:
        """Supervisor call: release a (dead) client's holdings."""
        return self.call(P.ReleaseClient(client_id=client_id))[0]

    def goodbye(self) -> P.ReleaseReply:
        reply = self.call(P.Goodbye())[0]
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


# ---------------------------------------------------------------- process entry
@dataclasses.dataclass(frozen=True)
class KVStateServerConfig:
    """Everything a memory-manager process needs (picklable for ``spawn``)."""

    endpoint: str
    capacity: int
    page_size: int = 1
    req_rows: int = 256
    eviction_policy: str = "lru"
    log_level: Optional[str] = None
    # "module:function" returning the pool objects to build here and export (pool_attach);
    # called under RecordAllocations(pool_device). None: bookkeeping only, no shared pools.
    pool_builder: Optional[str] = None
    pool_device: str = "cuda"


def _build_shared_pools(config: KVStateServerConfig) -> tuple[list, Optional[P.PoolManifest]]:
    if not config.pool_builder:
        return [], None
    import importlib

    from sglang_semipd.memory.pool_attach import RecordAllocations

    module, _, func = config.pool_builder.partition(":")
    build = getattr(importlib.import_module(module), func)
    recorder = RecordAllocations(config.pool_device)
    with recorder:
        pools = list(build())
    manifest = recorder.manifest(pools)
    logger.info("exporting %d shared pool tensors (%d allocations recorded)",
                len(manifest.shared), len(manifest.records))
    return pools, manifest


def run_kv_state_server(config: KVStateServerConfig, stop_event: Any = None) -> None:
    """Build the service (and the shared pools, if ``pool_builder`` is set), bind
    ``config.endpoint`` and serve until Shutdown, ``stop_event`` or SIGTERM.  Usable as a
    ``multiprocessing`` target. The pools live as long as this function runs."""
    if config.log_level:
        logging.basicConfig(level=config.log_level,
                            format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    from sglang_semipd.memory.service import KVStateService

    service = KVStateService(config.capacity, config.page_size, config.req_rows,
                             config.eviction_policy)
    pools, manifest = _build_shared_pools(config)
    server = KVStateServer(service, config.endpoint, manifest=manifest)
    local_stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: local_stop.set())
    server.bind()
    try:
        server.serve_forever(_AnyEvent(local_stop, stop_event))
    finally:
        server.close()
        del pools


class _AnyEvent:
    def __init__(self, *events: Any) -> None:
        self._events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="sglang-semipd KV state (memory manager) server")
    ap.add_argument("--endpoint", required=True, help="e.g. ipc:///tmp/semipd-kv.sock")
    ap.add_argument("--capacity", type=int, required=True, help="KV slots (tokens)")
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--req-rows", type=int, default=256)
    ap.add_argument("--eviction-policy", default="lru")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    run_kv_state_server(KVStateServerConfig(a.endpoint, a.capacity, a.page_size, a.req_rows,
                                            a.eviction_policy, a.log_level))


if __name__ == "__main__":
    main()
