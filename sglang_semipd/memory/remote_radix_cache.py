"""RemoteRadixCache: SGLang's ``RadixCache`` API over the memory manager's tree.

The radix tree (and the KV slots it holds) lives in the memory-manager process
(:class:`~sglang_semipd.memory.service.KVStateService`) and is shared by the
prefill and the decode worker.  This class reproduces ``RadixCache``'s request
bookkeeping (``cache_finished_req`` / ``cache_unfinished_req``: ``req.prefix_indices``,
``req.last_node``, ``req.cache_protected_len``, ``req_to_token`` writes, duplicate
frees, lock transfer) on the worker, against its own ``req_to_token_pool``.

Contracts:

* Nodes are :class:`RemoteNode` handles (the server's ``TreeNode.id``).  Every
  empty match / empty insert yields the one :attr:`RemoteRadixCache.root_node`
  object, whose lock operations are local no-ops (as in SGLang).
* Slots move between this worker and the tree only through the shared client
  (the allocator's): ``insert`` passes the caller's slots past the cached prefix
  to the tree; duplicates and the unaligned tail go back through the allocator
  (buffered frees, see :mod:`~sglang_semipd.memory.remote_allocator`).
* ``cache_unfinished_req`` inserts *and locks* in one request (``Insert(lock=True)``)
  before it drops the previous lock, so the other worker can never evict the
  request's prefix in between; it asks for the tree's indices (one more round
  trip) only when the tree already held part of the new range.
* Between ``match_prefix`` and ``inc_lock_ref`` the other worker may evict the
  matched node: ``inc_lock_ref`` then raises :class:`StaleNodeError` (the node's
  indices must not be used; re-match).
* ``evictable_size`` / ``protected_size`` / ``total_size`` are the server's
  counters from the allocator's last ``Stats`` (refreshed when older than its
  ``stats_max_age_s``) corrected by this worker's own lock/insert/evict deltas
  since; the other worker's changes show up at the next refresh. ``evictable_size`` never
  exceeds ``size - available_size()`` of the allocator.

Not supported (``NotImplementedError``): EAGLE bigram keys, HiCache
(``init_load_back`` & co. from the base class), ``all_values_flatten``.
"""

from __future__ import annotations

import logging
from array import array
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    DecLockRefParams,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams

from sglang_semipd import protocol as P
from sglang_semipd.memory.client import KVStateClient, as_index_array, as_tensor
from sglang_semipd.memory.remote_allocator import RemoteTokenAllocator

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

logger = logging.getLogger(__name__)

ROOT_HANDLE = 0  # nominal id of the root (the service's first TreeNode); never sent


class StaleNodeError(P.KVStateError):
    """The node was evicted (by the other worker) before this worker locked it."""

    def __init__(self, handle: int, message: str) -> None:
        super().__init__(P.ErrorCode.UNKNOWN_NODE, f"node {handle}: {message}")
        self.handle = handle


class RemoteNode:
    """Handle of a node of the memory manager's radix tree.

    ``prefix_len`` is the matched length (tokens root..node) when known."""

    __slots__ = ("id", "prefix_len", "is_root")
    backuped = False  # no host (HiCache) copies
    evicted = False
    host_value = None

    def __init__(self, handle: int, prefix_len: int = 0, is_root: bool = False) -> None:
        self.id, self.prefix_len, self.is_root = handle, prefix_len, is_root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteNode) and (self.id, self.is_root) == \
            (other.id, other.is_root)

    def __hash__(self) -> int:
        return hash((self.id, self.is_root))

    def __repr__(self) -> str:
        return "RemoteNode(root)" if self.is_root else \
            f"RemoteNode({self.id}, prefix_len={self.prefix_len})"

    def get_last_hash_value(self) -> Optional[str]:
        return None

    def get_prefix_hash_values(self, node: Any = None) -> list[str]:
        return []


class RemoteRadixCache(BasePrefixCache):
    """SGLang prefix cache whose tree is the memory manager's (see module doc)."""

    def __init__(self, params: CacheInitParams, client: Optional[KVStateClient] = None
                 ) -> None:
        alloc = params.token_to_kv_pool_allocator
        if not isinstance(alloc, RemoteTokenAllocator):
            raise TypeError("RemoteRadixCache needs a RemoteTokenAllocator, got "
                            f"{type(alloc).__name__}")
        if client is not None and client is not alloc.client:
            raise ValueError("the cache and the allocator must share one KVStateClient")
        if params.is_eagle:
            raise NotImplementedError("EAGLE bigram keys are not supported by RemoteRadixCache")
        if params.page_size != alloc.page_size:
            raise ValueError(f"page_size {params.page_size} != memory manager's "
                             f"{alloc.page_size}")
        self.client = alloc.client
        self.disable = params.disable
        self.req_to_token_pool = params.req_to_token_pool
        self.token_to_kv_pool_allocator: RemoteTokenAllocator = alloc
        self.page_size = params.page_size
        self.disable_finished_insert = params.disable_finished_insert
        self.is_eagle = False
        self.device = torch.device(alloc.device) if isinstance(alloc.device, (str, torch.device)) \
            else torch.device("cpu")
        self.root_node = RemoteNode(ROOT_HANDLE, 0, is_root=True)
        self._seen_generation = -1
        self._evictable_delta = self._protected_delta = 0
        self._deferring: Optional[set[int]] = None  # see defer_unfinished
        self._deferred: dict[int, Any] = {}

    # ------------------------------------------------------------ sizes
    def _sync(self) -> None:
        """Forget our corrections once the allocator has fetched newer stats."""
        generation = self.token_to_kv_pool_allocator.stats_generation
        if self._seen_generation != generation:
            self._seen_generation = generation
            self._evictable_delta = self._protected_delta = 0

    def _deltas(self) -> P.InvariantReport:
        stats = self.token_to_kv_pool_allocator.server_stats()  # may refresh
        self._sync()
        return stats

    def _shift(self, evictable: int, protected: int) -> None:
        """Record an operation already applied on the server (never refreshes:
        a refresh now would already include it)."""
        self._sync()
        self._evictable_delta += evictable
        self._protected_delta += protected

    def evictable_size(self) -> int:
        """Unlocked cached tokens (estimate, see module doc), never more than the pool's
        capacity minus what the allocator reports available: SGLang counts
        ``used = size - (available + evictable)`` and, with ``--enable-metrics``, asserts it
        is not negative (two estimates from different moments could overlap)."""
        estimate = max(0, self._deltas().evictable + self._evictable_delta)
        alloc = self.token_to_kv_pool_allocator
        return max(0, min(estimate, alloc.size - alloc.available_size()))

    def protected_size(self) -> int:
        """Locked cached tokens, all clients (estimate, see module doc)."""
        return max(0, self._deltas().protected + self._protected_delta)

    def total_size(self) -> int:
        return self.evictable_size() + self.protected_size()

    def refresh_stats(self) -> P.InvariantReport:
        """Fresh server counters for every size this cache and its allocator report."""
        return self.token_to_kv_pool_allocator.refresh_stats()

    def pretty_print(self) -> None:
        """Logs the shared tree's counters (the tree itself is in the memory manager)."""
        st = self.refresh_stats()
        logger.info("remote radix tree: %d tokens (%d evictable, %d protected), %d lock refs, "
                    "%d free", st.evictable + st.protected, st.evictable, st.protected,
                    st.lock_refs, st.free)

    # ------------------------------------------------------------ tree ops
    def reset(self) -> None:
        """Drop the shared tree (server ``Reset``): flushes this worker's frees and
        lease first; refused (``KVStateError`` BUSY) while any client holds anything."""
        self.token_to_kv_pool_allocator.clear()
        self.client.reset()
        self.refresh_stats()

    def _node(self, handle: int, prefix_len: int) -> RemoteNode:
        return self.root_node if prefix_len == 0 else RemoteNode(handle, prefix_len)

    def _aligned(self, n: int) -> int:
        return n // self.page_size * self.page_size

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """Longest cached page-aligned prefix of ``params.key`` (one round trip)."""
        key = params.key
        if key.is_bigram:
            raise NotImplementedError("EAGLE bigram keys are not supported")
        tokens = key.raw_token_ids()
        n = self._aligned(len(tokens))
        if self.disable or n == 0:
            return self._empty_match()
        res = self.client.match_prefix(tokens[:n], key.extra_key)
        node = self._node(res.node, res.prefix_len)
        return MatchResult(device_indices=as_tensor(res.indices, self.device),
                           last_device_node=node, last_host_node=node, best_match_node=node,
                           host_hit_length=0)

    def _empty_match(self) -> MatchResult:
        root = self.root_node
        return MatchResult(device_indices=torch.empty((0,), dtype=torch.int64,
                                                      device=self.device),
                           last_device_node=root, last_host_node=root, best_match_node=root)

    def _insert(self, tokens: Sequence[int], values: array, extra_key: Optional[str],
                priority: int, lock: bool, locked_before: int = 0) -> tuple[int, RemoteNode]:
        """Insert page-aligned ``tokens -> values``; ``(prefix_len, last node)``.

        With ``lock`` the new last node is locked in the same request;
        ``locked_before`` (tokens of the path this worker already locks) only
        feeds the size estimates."""
        if not len(tokens):
            return 0, self.root_node
        res = self.client.insert(tokens, values, extra_key, lock=lock, priority=priority)
        if lock:
            newly = len(tokens) - locked_before
            self._shift(-(res.prefix_len - locked_before), newly)
        else:
            self._shift(len(tokens) - res.prefix_len, 0)
        return res.prefix_len, RemoteNode(res.node, len(tokens))

    def insert(self, params: InsertParams) -> InsertResult:
        """SGLang's ``insert``: ``params.value`` must be this worker's slots past
        the cached prefix (they pass to the tree)."""
        if self.disable:
            return InsertResult(prefix_len=0)
        if params.value is None:
            raise ValueError("RemoteRadixCache.insert needs KV indices (value)")
        tokens = params.key.raw_token_ids()
        n = self._aligned(len(tokens))
        prefix, node = self._insert(tokens[:n], as_index_array(params.value[:n]),
                                    params.key.extra_key, params.priority or 0, lock=False)
        return InsertResult(prefix_len=prefix, last_device_node=node)

    def evict(self, params: EvictParams) -> EvictResult:
        """Evict >= ``num_tokens`` unlocked tokens from the shared tree (LRU, server side)."""
        if self.disable or params.num_tokens <= 0:
            return EvictResult()
        evicted = self.client.evict(params.num_tokens)
        self._shift(-evicted, 0)
        self.token_to_kv_pool_allocator.note_server_free(evicted)
        return EvictResult(num_tokens_evicted=evicted)

    def inc_lock_ref(self, node: Any) -> IncLockRefResult:
        """Lock root..node against eviction (raises :class:`StaleNodeError`)."""
        if self.disable or node is None or node.is_root:
            return IncLockRefResult(delta=0)
        try:
            delta = self.client.inc_lock_ref(node.id)
        except P.KVStateError as exc:
            if exc.code == P.ErrorCode.UNKNOWN_NODE:
                raise StaleNodeError(node.id, "evicted before it was locked; "
                                     "re-match the request") from exc
            raise
        self._shift(delta, -delta)
        return IncLockRefResult(delta=delta)

    def dec_lock_ref(self, node: Any, params: Optional[DecLockRefParams] = None
                     ) -> DecLockRefResult:
        """Undo one :meth:`inc_lock_ref` (or locked insert) of ``node``."""
        if self.disable or node is None or node.is_root:
            return DecLockRefResult(delta=0)
        delta = self.client.dec_lock_ref(node.id)
        self._shift(delta, -delta)
        return DecLockRefResult(delta=delta)

    # ------------------------------------------------------------ requests
    def _kv_row(self, req: Req, n: int) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[req.req_pool_idx, :n]

    def cache_finished_req(self, req: Req, is_insert: bool = True, *,
                           kv_len_to_handle: int) -> None:
        """Insert the finished request's KV (page-aligned part) into the shared
        tree, free its duplicates and unaligned tail, and drop its lock."""
        alloc = self.token_to_kv_pool_allocator
        cpl = req.cache_protected_len
        if self.disable_finished_insert:
            is_insert = False
        if self.disable:
            kv = self.req_to_token_pool.req_to_token[req.req_pool_idx, cpl:kv_len_to_handle]
            alloc.free_segment(kv, start_pos=cpl)
            return
        token_ids = (req.origin_input_ids + req.output_ids)[:kv_len_to_handle]
        kv_indices = self._kv_row(req, len(token_ids))
        key_len = self._aligned(len(token_ids))
        if is_insert:
            freed_end, _ = self._insert(token_ids[:key_len],
                                        as_index_array(kv_indices[:key_len]), req.extra_key,
                                        getattr(req, "priority", 0) or 0, lock=False)
        else:
            freed_end = key_len
        alloc.free_segments([(kv_indices[cpl:freed_end], cpl),
                             (kv_indices[key_len:], key_len)])
        if req.last_node is not None:
            self.dec_lock_ref(req.last_node)

    def cache_unfinished_req(self, req: Req, chunked: bool = False, **unused: Any) -> None:
        """Insert the request's filled page-aligned prefix, take the tree's indices
        for it and move the request's lock to the new last node (see module doc). A request
        named to :meth:`defer_unfinished` is only noted: :meth:`hand_off` caches it."""
        if self.disable:
            return
        if self._deferring is not None and id(req) in self._deferring:
            self._deferred[id(req)] = req.get_fill_ids()
            return
        cpl = req.cache_protected_len
        token_ids = req.get_fill_ids()
        kv_indices = self._kv_row(req, len(token_ids))
        key_len = self._aligned(len(token_ids))
        values = kv_indices[:key_len].to(dtype=torch.int64, copy=True)
        new_prefix, new_node = self._insert(token_ids[:key_len], as_index_array(values),
                                            req.extra_key, getattr(req, "priority", 0) or 0,
                                            lock=True, locked_before=cpl)
        self.token_to_kv_pool_allocator.free_segment(kv_indices[cpl:new_prefix],
                                                     start_pos=cpl)
        if new_prefix > cpl:  # the tree had its own slots there: adopt them
            res = self.client.match_prefix(token_ids[:key_len], req.extra_key)
            if res.prefix_len != key_len:
                raise P.KVStateError(P.ErrorCode.INTERNAL,
                                     f"locked prefix matched {res.prefix_len} != {key_len}")
            new_indices = as_tensor(res.indices, values.device)
            self.req_to_token_pool.write((req.req_pool_idx, slice(cpl, key_len)),
                                         new_indices[cpl:])
        else:  # the tree holds exactly this request's slots
            new_indices = values
        req.cache_protected_len = key_len
        if req.last_node is not None:
            self.dec_lock_ref(req.last_node)
        if key_len < len(kv_indices):
            req.prefix_indices = torch.cat([new_indices.to(kv_indices.device),
                                            kv_indices[key_len:]])
        else:
            req.prefix_indices = new_indices
        req.last_node = new_node

    # ------------------------------------------------------------ hand-off (prefill worker)
    def defer_unfinished(self, reqs: Sequence[Req]) -> None:
        """Until the next :meth:`hand_off`, ``cache_unfinished_req`` of these requests
        only notes their filled token ids: :meth:`hand_off` caches them in the round trip
        that hands them over (SGLang's prefill result loop caches each prefilled request;
        the prefill worker hands all of them off right after it)."""
        self._deferring, self._deferred = {id(r) for r in reqs}, {}

    def hand_off(self, reqs: Sequence[Req], to_role: str) -> None:
        """Hand prefilled ``reqs`` to the ``to_role`` client in one round trip
        (``PrefillHandOff``), where the prefill worker took 2-4 per request (insert, match
        when the tree held more, unlock, transfer) and up to 3 device syncs; the H100's stack
        samples put all memory-manager calls at ~2 ms per request, and the trace 14.6 ms
        (P50) between prefill iterations with requests waiting.

        A request whose ``cache_unfinished_req`` was deferred is cached as that call would
        have done: its page-aligned prefix inserted and locked, its duplicate slots freed,
        its row made to name the tree's slots, its previous lock dropped. Then its tail
        slots, its row and its lock ref (on ``req.last_node``) move to the receiver. Ends
        deferring. Afterwards ``req.cache_protected_len`` and ``req.last_node`` say what the
        receiver holds, and the row writes are complete on the device (the receiver reads
        the row once it has the hand-off message). ``req.prefix_indices`` is left stale:
        the request leaves this worker."""
        deferred, self._deferring, self._deferred = self._deferred, None, {}
        if not reqs:
            return
        alloc = self.token_to_kv_pool_allocator
        pool = self.req_to_token_pool.req_to_token
        spans, plans = [], []
        for r in reqs:
            row, kv_len, cpl = int(r.req_pool_idx), int(r.kv_committed_len), \
                int(r.cache_protected_len)
            token_ids = deferred.get(id(r))
            key_len = self._aligned(len(token_ids)) if token_ids is not None else cpl
            spans.append((row, max(kv_len, len(token_ids or ()))))
            plans.append((r, row, kv_len, cpl, token_ids, key_len))
        rows = self._rows_on_cpu(pool, spans)
        entries, buffers, empty = [], [], array("q")
        for (r, row, kv_len, cpl, token_ids, key_len), kv in zip(plans, rows):
            node = r.last_node
            held = 0 if node is None or node.is_root else int(node.id)
            tail = as_index_array(kv[key_len:kv_len])
            if token_ids is None:  # not cached here (radix cache off or insert skipped)
                entries.append(P.HandOffEntry(row=row, protected=cpl, hand_lock=held))
                buffers += [empty, empty, tail]
                continue
            entries.append(P.HandOffEntry(row=row, protected=cpl, unlock=held,
                                          extra_key=r.extra_key,
                                          priority=getattr(r, "priority", 0) or 0))
            buffers += [P.token_buffer(token_ids[:key_len]), as_index_array(kv[:key_len]), tail]
        reply, tree = self.client.prefill_hand_off(to_role, entries, buffers)
        wrote = False
        for i, ((r, row, kv_len, cpl, token_ids, key_len), kv) in enumerate(zip(plans, rows)):
            if token_ids is None:
                continue
            plen, node_id = reply.prefix_lens[i], reply.nodes[i]
            if key_len:  # as _insert(lock=True, locked_before=cpl)
                self._shift(-(plen - cpl), key_len - cpl)
            alloc.free_segment(kv[cpl:plen], start_pos=cpl)  # duplicates of the tree's
            if plen > cpl:
                self.req_to_token_pool.write((row, slice(cpl, plen)),
                                             as_tensor(tree[i], pool.device))
                wrote = True
            if entries[i].unlock:
                delta = reply.unlock_deltas[i]
                self._shift(delta, -delta)
            r.cache_protected_len = key_len
            r.last_node = RemoteNode(node_id, key_len) if node_id else self.root_node
        if wrote and pool.is_cuda:
            torch.cuda.current_stream(pool.device).synchronize()

    @staticmethod
    def _rows_on_cpu(pool: torch.Tensor, spans: Sequence[tuple[int, int]]
                     ) -> list[torch.Tensor]:
        """``pool[row, :n]`` per ``(row, n)``, int64 on the host, in one device copy."""
        flat = torch.cat([pool[row, :n] for row, n in spans]).to("cpu", torch.int64)
        return list(torch.split(flat, [n for _, n in spans]))

    # ------------------------------------------------------------ misc
    def all_values_flatten(self) -> torch.Tensor:
        raise NotImplementedError("the tree's values live in the memory manager "
                                  "(use KVStateClient.check_invariant)")

    def available_and_evictable_str(self) -> str:
        available = self.token_to_kv_pool_allocator.available_size()
        evictable = self.evictable_size()
        return (f"Available tokens: {available + evictable} ({available=} + {evictable=}) "
                f"[semipd shared pool, estimates]\n")
