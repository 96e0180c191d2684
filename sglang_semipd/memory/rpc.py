"""ZeroMQ server side of :class:`~sglang_semipd.memory.service.KVStateService`
(the client side is :mod:`sglang_semipd.memory.client`).

* :class:`KVStateServer` -- ROUTER socket; one message at a time:
  decode -> dispatch -> reply.  Any bad input (garbage, wrong version,
  truncated frames, unknown type, invalid indices, double free, stale node
  handle, ...) is answered with an ``ErrorReply`` and a log line; nothing
  escapes the loop and a refused request leaves the state unchanged.
* :func:`run_kv_state_server` -- process entry (``multiprocessing`` target or
  ``python -m sglang_semipd.memory.rpc``); builds and exports the shared pools
  when given a ``pool_builder``.

This module imports neither torch nor SGLang at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from typing import Any, Callable, Optional, Sequence

import zmq

from sglang_semipd import protocol as P
from sglang_semipd.memory.ledger import LedgerError

logger = logging.getLogger(__name__)

# Refusals that are part of normal operation (capacity pressure, eviction races).
_ROUTINE = frozenset({P.ErrorCode.OUT_OF_MEMORY, P.ErrorCode.UNKNOWN_NODE})
_ANON_OK = (P.Hello, P.Stats, P.CheckInvariant, P.ReleaseClient, P.Reset, P.Shutdown,
            P.GetPoolManifest)


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
            P.Transfer: self._transfer, P.PrefillHandOff: self._prefill_hand_off,
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

    def _transfer(self, cid, msg, bufs):
        to = msg.to_client or self.service.client_with_role(msg.to_role)
        tokens, rows, locks = self.service.transfer(cid, to, bufs[0], msg.rows, msg.locks)
        return P.TransferReply(tokens=tokens, rows=rows, locks=locks), ()

    def _prefill_hand_off(self, cid, msg, bufs):
        to = self.service.client_with_role(msg.to_role)
        plens, nodes, deltas, tree = self.service.prefill_hand_off(cid, to, msg.entries, bufs)
        return P.PrefillHandOffReply(prefix_lens=plens, nodes=nodes, unlock_deltas=deltas), tree

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
