"""KVStateService: the memory manager's logic (no sockets).

It owns a real SGLang ``RadixCache`` over a real ``TokenToKVPoolAllocator``
(``PagedTokenToKVPoolAllocator`` when ``page_size > 1``) on CPU tensors, a
req->token row pool and an :class:`~sglang_semipd.memory.ledger.OwnershipLedger`.

Contracts:

* Every allocator alloc/free -- including the frees ``RadixCache.evict`` does --
  goes through :mod:`~sglang_semipd.memory.ledgered_allocator`, which validates the transition in the
  ledger *before* the allocator mutates; a refused request changes nothing.
* The ledger unit is a page (== a slot when ``page_size == 1``); all public
  sizes and indices are in tokens.  Allocations are whole pages.
* A client frees what it owns; a slot never has two owners; ``Insert`` moves
  the caller's slots past the already-cached prefix to the tree.
* Node handles are ``TreeNode.id``; a handle whose node was evicted (or that
  belongs to a tree dropped by ``reset``) raises ``UNKNOWN_NODE``.
* Lock refs are tracked per client, so ``release_client`` can drop them.
* At every point between calls: ``free + evictable + in_use == capacity`` with
  ``in_use = client_held + protected`` (see :meth:`KVStateService.check_invariant`).

Not thread-safe: the RPC server serialises calls.
"""

from __future__ import annotations

import logging
import weakref
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from sglang_semipd.memory.client import as_index_array, as_tensor
from sglang_semipd.memory.ledgered_allocator import (LedgeredPagedAllocator,
                                                     LedgeredTokenAllocator)
from sglang_semipd.memory.ledger import FREE, TREE, DuplicateSlotError, OwnershipLedger, SlotPool
from sglang_semipd.protocol import ErrorCode, InvariantReport, KVStateError, ReleaseReply

logger = logging.getLogger(__name__)




@dataclass
class _Client:
    cid: int
    name: str
    role: str
    locks: dict[int, list] = field(default_factory=dict)  # handle -> [node, count]
    leases: dict[int, set[int]] = field(default_factory=dict)  # lease id -> units
    unit_lease: dict[int, int] = field(default_factory=dict)  # unit -> lease id


class KVStateService:
    """Single owner of KV allocation state; methods map 1:1 to protocol requests."""

    def __init__(self, capacity: int, page_size: int = 1, req_rows: int = 256,
                 eviction_policy: str = "lru") -> None:
        if page_size < 1 or capacity < page_size:
            raise ValueError(f"need capacity >= page_size >= 1, got {capacity}, {page_size}")
        self.page_size = page_size
        self.num_units = capacity // page_size
        self.capacity = self.num_units * page_size
        self.ledger = OwnershipLedger(self.num_units, "slot" if page_size == 1 else "page")
        if page_size == 1:
            alloc = LedgeredTokenAllocator(self.num_units, torch.int64, "cpu", None, False)
        else:
            alloc = LedgeredPagedAllocator(self.capacity, page_size, torch.int64, "cpu",
                                           None, False)
        alloc.attach(self.ledger)
        self.allocator = alloc
        self.cache = RadixCache(CacheInitParams(
            disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=alloc,
            page_size=page_size, eviction_policy=eviction_policy))
        self.rows = SlotPool(req_rows)
        self._clients: dict[int, _Client] = {}
        self._nodes: weakref.WeakValueDictionary[int, TreeNode] = weakref.WeakValueDictionary()
        self._next_client = 1
        self._next_lease = 1

    # ------------------------------------------------------------ clients
    def register(self, name: str, role: str = "") -> int:
        """New client id (never reused)."""
        cid = self._next_client
        self._next_client += 1
        self._clients[cid] = _Client(cid, name, role)
        logger.info("client %d registered (name=%s role=%s)", cid, name, role)
        return cid

    def _client(self, cid: int) -> _Client:
        client = self._clients.get(cid)
        if client is None:
            raise KVStateError(ErrorCode.UNKNOWN_CLIENT, f"no client {cid}")
        return client

    def release_client(self, cid: int) -> ReleaseReply:
        """Drop every lock ref, slot, lease and row of ``cid`` and unregister it."""
        client = self._client(cid)
        dropped = 0
        for node, count in client.locks.values():
            for _ in range(count):
                self.cache.dec_lock_ref(node)
            dropped += count
        units = self.ledger.slots_of(cid)
        if units:
            with self.allocator.acting(free_owner=cid):
                self.allocator.free(as_tensor(units) * self.page_size)
        rows = self.rows.give_all(cid)
        del self._clients[cid]
        logger.info("client %d released: %d tokens, %d locks, %d rows, %d leases", cid,
                    len(units) * self.page_size, dropped, rows, len(client.leases))
        return ReleaseReply(client_id=cid, freed_tokens=len(units) * self.page_size,
                            dropped_locks=dropped, freed_rows=rows,
                            closed_leases=len(client.leases))

    # ---------------------------------------------------------- slots
    def _pages(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def _ensure_free(self, units: int) -> None:
        """Evict just enough (like SGLang's scheduler); refuse up front, without
        evicting anything, when even a full eviction could not make room."""
        need, free = units * self.page_size, self.allocator.available_size()
        if need > free + self.cache.evictable_size():
            raise KVStateError(ErrorCode.OUT_OF_MEMORY,
                               f"need {need} tokens, {free} free + "
                               f"{self.cache.evictable_size()} evictable")
        if need > free:
            self.evict(need - free)

    def alloc(self, cid: int, sizes: Sequence[int]) -> list[array]:
        """Whole-page slots for each size (all or nothing; evicts the tree when short)."""
        self._client(cid)
        if any(s < 0 for s in sizes):
            raise KVStateError(ErrorCode.BAD_REQUEST, "negative size")
        units = [self._pages(s) for s in sizes]
        total = sum(units)
        if total == 0:
            return [array("q") for _ in sizes]
        self._ensure_free(total)
        with self.allocator.acting(alloc_owner=cid):
            out = self.allocator.alloc(total * self.page_size)
        if out is None:
            raise KVStateError(ErrorCode.OUT_OF_MEMORY,
                               f"need {total * self.page_size} tokens, "
                               f"{self.allocator.available_size()} free after eviction")
        flat, pieces, pos = as_index_array(out), [], 0
        for u in units:
            pieces.append(flat[pos:pos + u * self.page_size])
            pos += u * self.page_size
        return pieces

    def _check_tokens(self, idx: array) -> None:
        if self.page_size > 1 and len(set(idx)) != len(idx):
            raise DuplicateSlotError("duplicate token indices in one call")

    def _forget_leased(self, client: _Client, units: Sequence[int]) -> None:
        if client.unit_lease:
            for u in units:
                lid = client.unit_lease.pop(u, None)
                if lid is not None:
                    client.leases[lid].discard(u)

    def free(self, cid: int, buffers: Sequence[array]) -> int:
        """Free every index of every buffer (atomic); returns tokens freed."""
        client = self._client(cid)
        flat = array("q")
        for b in buffers:
            flat.extend(b if isinstance(b, array) and b.typecode == "q" else array("q", b))
        if not flat:
            return 0
        self._check_tokens(flat)
        t = as_tensor(flat)
        units = self.allocator.units(t)
        with self.allocator.acting(free_owner=cid):
            self.allocator.free(t)
        self._forget_leased(client, units)
        return len(units) * self.page_size

    def lease(self, cid: int, n: int) -> tuple[int, array]:
        """A block of >= n slots the client hands out locally."""
        client = self._client(cid)
        (idx,) = self.alloc(cid, [n])
        lid = self._next_lease
        self._next_lease += 1
        units = self.allocator.units(as_tensor(idx)) if len(idx) else []
        client.leases[lid] = set(units)
        client.unit_lease.update((u, lid) for u in units)
        return lid, idx

    def return_lease(self, cid: int, lease_id: int, unused: array) -> int:
        """Free ``unused`` (must still be in the lease) and close the lease."""
        client = self._client(cid)
        members = client.leases.get(lease_id)
        if members is None:
            raise KVStateError(ErrorCode.UNKNOWN_LEASE, f"client {cid} has no lease {lease_id}")
        self._check_tokens(unused)
        units = self.allocator.units(as_tensor(unused)) if len(unused) else []
        if not members.issuperset(units):
            raise KVStateError(ErrorCode.NOT_OWNED, "returned indices are not in the lease")
        freed = self.free(cid, [unused])
        for u in client.leases.pop(lease_id):
            client.unit_lease.pop(u, None)
        return freed

    # ---------------------------------------------------------- rows
    def alloc_req_rows(self, cid: int, n: int) -> list[int]:
        self._client(cid)
        rows = self.rows.take(n, cid)
        if rows is None:
            raise KVStateError(ErrorCode.OUT_OF_MEMORY,
                               f"need {n} req rows, {self.rows.available} free")
        return rows

    def free_req_rows(self, cid: int, rows: Sequence[int]) -> int:
        self._client(cid)
        return self.rows.give(list(rows), cid)

    # ---------------------------------------------------------- tree
    def _register(self, node: TreeNode) -> int:
        self._nodes[node.id] = node
        return node.id

    def _is_live(self, node: TreeNode) -> bool:
        root = self.cache.root_node
        while node is not root:
            parent = node.parent
            if parent is None or node.key is None:
                return False
            if parent.children.get(node.key.child_key(self.page_size)) is not node:
                return False
            node = parent
        return True

    def _resolve(self, handle: int) -> TreeNode:
        node = self._nodes.get(handle)
        if node is None or not self._is_live(node):
            raise KVStateError(ErrorCode.UNKNOWN_NODE,
                               f"node {handle} is unknown or was evicted")
        return node

    def _lock(self, client: _Client, node: TreeNode) -> int:
        delta = self.cache.inc_lock_ref(node).delta or 0
        entry = client.locks.setdefault(node.id, [node, 0])
        entry[1] += 1
        return delta

    def match_prefix(self, cid: int, tokens: Sequence[int], extra_key: Optional[str] = None,
                     lock: bool = False) -> tuple[array, int, int]:
        """``(indices, prefix_len, node handle)``; with ``lock`` the node is locked
        atomically (the indices stay valid until the matching DecLockRef)."""
        client = self._client(cid)
        key = RadixKey(array("q", tokens), extra_key)
        res = self.cache.match_prefix(MatchPrefixParams(key=key))
        node = res.last_device_node
        if lock:
            self._lock(client, node)
        idx = as_index_array(res.device_indices)
        return idx, len(idx), self._register(node)

    def _page_units(self, values: array) -> list[int]:
        """Pages of page-structured ``values`` (slot k of a page sits at page*ps + k)."""
        ps = self.page_size
        if ps == 1:
            return list(values)
        units = []
        for j in range(0, len(values), ps):
            page, rem = divmod(values[j], ps)
            if rem or values[j:j + ps] != array("q", range(values[j], values[j] + ps)):
                raise KVStateError(ErrorCode.INVALID_INDICES,
                                   f"values[{j}:{j + ps}] is not one whole page")
            units.append(page)
        return units

    def insert(self, cid: int, tokens: Sequence[int], values: array,
               extra_key: Optional[str] = None, lock: bool = False,
               priority: int = 0) -> tuple[int, int]:
        """Insert ``tokens -> values``; returns ``(prefix_len, node handle)``.

        ``values[prefix_len:aligned_len]`` must be the caller's slots and pass to
        the tree; ``values[:prefix_len]`` stay with their owners (the caller frees
        its duplicates); the unaligned tail stays with the caller."""
        client = self._client(cid)
        if len(values) != len(tokens):
            raise KVStateError(ErrorCode.BAD_REQUEST,
                               f"{len(tokens)} tokens but {len(values)} values")
        token_arr = array("q", tokens)
        aligned = len(token_arr) // self.page_size * self.page_size
        probe = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(token_arr, extra_key)))
        prefix = len(probe.device_indices)
        units = self._page_units(array("q", values[prefix:aligned]))
        self.ledger.adopt(units, cid)  # validates ownership + distinctness atomically
        try:
            res = self.cache.insert(InsertParams(
                key=RadixKey(token_arr, extra_key), value=as_tensor(array("q", values)),
                priority=priority))
        except Exception:
            self.ledger.move(units, TREE, cid)
            raise
        if res.prefix_len != prefix:  # pragma: no cover - would be an SGLang change
            raise KVStateError(ErrorCode.INTERNAL, f"insert prefix {res.prefix_len} != {prefix}")
        self._forget_leased(client, units)
        node = res.last_device_node
        if lock:
            self._lock(client, node)
        return prefix, self._register(node)

    def inc_lock_ref(self, cid: int, handle: int) -> tuple[int, int]:
        """Lock the path root->node; returns ``(delta, caller's lock count on it)``."""
        client = self._client(cid)
        delta = self._lock(client, self._resolve(handle))
        return delta, client.locks[handle][1]

    def dec_lock_ref(self, cid: int, handle: int) -> tuple[int, int]:
        """Undo one of the caller's own locks on ``handle``."""
        client = self._client(cid)
        entry = client.locks.get(handle)
        if entry is None:
            raise KVStateError(ErrorCode.NOT_LOCKED, f"client {cid} holds no lock on {handle}")
        delta = self.cache.dec_lock_ref(entry[0]).delta or 0
        entry[1] -= 1
        if entry[1] == 0:
            del client.locks[handle]
        return delta, entry[1]

    def client_with_role(self, role: str) -> int:
        """The one registered client with ``role`` (UNKNOWN_CLIENT if none or several)."""
        found = [c.cid for c in self._clients.values() if c.role == role]
        if len(found) != 1:
            raise KVStateError(ErrorCode.UNKNOWN_CLIENT,
                               f"{len(found)} clients have role {role!r}, need exactly one")
        return found[0]

    def transfer(self, cid: int, to_cid: int, slots: array, rows: Sequence[int],
                 locks: Sequence[int]) -> tuple[int, int, int]:
        """Hand ``slots`` (tokens; whole pages move), req rows and lock refs (one per
        handle listed) from ``cid`` to ``to_cid`` -- the prefill -> decode hand-off. All or
        nothing: every item is checked to be ``cid``'s before anything moves. Returns
        ``(tokens, rows, locks)`` moved."""
        client, dest = self._client(cid), self._client(to_cid)
        if cid == to_cid:
            raise KVStateError(ErrorCode.BAD_REQUEST, "transfer to oneself")
        need = Counter(locks)
        for h, n in need.items():
            entry = client.locks.get(h)
            if entry is None or entry[1] < n:
                raise KVStateError(ErrorCode.NOT_LOCKED,
                                   f"client {cid} holds {0 if entry is None else entry[1]} "
                                   f"lock(s) on node {h}, cannot hand over {n}")
        rows = list(rows)
        self.rows.ledger.check_owned(rows, cid)
        self._check_tokens(slots)
        units = self.allocator.units(as_tensor(slots)) if len(slots) else []
        units = list(dict.fromkeys(units))  # a page may hold several of the tokens
        self.ledger.move(units, cid, to_cid)
        try:
            self.rows.ledger.move(rows, cid, to_cid)
        except Exception:
            self.ledger.move(units, to_cid, cid)
            raise
        self._forget_leased(client, units)
        for h, n in need.items():
            entry = client.locks[h]
            entry[1] -= n
            if entry[1] == 0:
                del client.locks[h]
            dest.locks.setdefault(h, [entry[0], 0])[1] += n
        return len(units) * self.page_size, len(rows), len(locks)

    def prefill_hand_off(self, cid: int, to_cid: int, entries: Sequence[Any],
                         buffers: Sequence[array]
                         ) -> tuple[list[int], list[int], list[int], list[array]]:
        """A prefill batch's hand-off in one call (``PrefillHandOff``): per entry, in order,
        :meth:`insert` its tokens locked, :meth:`dec_lock_ref` its ``unlock``, and
        :meth:`transfer` its tail slots, row and the new node's (else ``hand_lock``'s) lock
        ref to ``to_cid``. Returns ``(prefix_lens, nodes, unlock_deltas, tree slots)``, the
        tree slots being those of tokens ``[protected, prefix_len)`` where the tree held
        more than the entry's ``protected`` prefix. The first refusal raises; the entries
        before it stay done (each step is all or nothing, as its own request is)."""
        if len(buffers) != 3 * len(entries):
            raise KVStateError(ErrorCode.BAD_REQUEST,
                               f"{len(entries)} entries need {3 * len(entries)} buffers, "
                               f"got {len(buffers)}")
        prefix_lens, nodes, deltas, adopted = [], [], [], []
        for i, e in enumerate(entries):
            tokens, values, tail = buffers[3 * i:3 * i + 3]
            plen, node = self.insert(cid, tokens, values, e.extra_key, lock=True,
                                     priority=e.priority) if len(tokens) else (0, 0)
            delta = self.dec_lock_ref(cid, e.unlock)[0] if e.unlock else 0
            tree = array("q")
            if plen > e.protected:
                tree = self.match_prefix(cid, tokens[:plen], e.extra_key)[0][e.protected:plen]
            lock = node or e.hand_lock
            self.transfer(cid, to_cid, tail, [e.row], [lock] if lock else [])
            prefix_lens.append(plen)
            nodes.append(node)
            deltas.append(delta)
            adopted.append(tree)
        return prefix_lens, nodes, deltas, adopted

    def evict(self, num_tokens: int) -> int:
        """Evict >= num_tokens unlocked cached tokens if possible; returns tokens evicted."""
        with self.allocator.acting(free_owner=TREE):
            return self.cache.evict(EvictParams(num_tokens=num_tokens)).num_tokens_evicted

    def reset(self) -> None:
        """Drop the tree (all cached slots back to free); BUSY while anything is held."""
        held = self.ledger.client_counts()
        if held or any(c.locks or c.leases for c in self._clients.values()) or \
                self.rows.available != self.rows.capacity:
            raise KVStateError(ErrorCode.BUSY, f"clients still hold state: {held}")
        self.evict(self.capacity)
        if self.ledger.tree_count:
            raise KVStateError(ErrorCode.INTERNAL, "tree not empty after full eviction")
        self.cache.reset()
        self._nodes.clear()

    # ------------------------------------------------------ invariants
    def stats(self) -> InvariantReport:
        """Counter-only report (cheap): equation plus ledger/allocator/tree totals."""
        ps, errors = self.page_size, []
        free = self.allocator.available_size()
        evictable, protected = self.cache.evictable_size(), self.cache.protected_size()
        held = {c: n * ps for c, n in self.ledger.client_counts().items()}
        in_use = sum(held.values()) + protected
        if free + evictable + in_use != self.capacity:
            errors.append(f"free {free} + evictable {evictable} + in_use {in_use} "
                          f"!= capacity {self.capacity}")
        if self.ledger.free_count * ps != free:
            errors.append(f"ledger free {self.ledger.free_count * ps} != allocator {free}")
        if self.ledger.tree_count * ps != evictable + protected:
            errors.append(f"ledger tree {self.ledger.tree_count * ps} != tree "
                          f"{evictable + protected}")
        return InvariantReport(
            ok=not errors, full=False, capacity=self.capacity, free=free,
            evictable=evictable, protected=protected, client_held=held,
            leased=sum(len(m) for c in self._clients.values() for m in c.leases.values()) * ps,
            in_use=in_use, lock_refs=sum(e[1] for c in self._clients.values()
                                         for e in c.locks.values()),
            req_rows_capacity=self.rows.capacity, req_rows_free=self.rows.available,
            req_rows_held=self.rows.ledger.client_counts(), errors=errors)

    def check_invariant(self) -> InvariantReport:
        """Full check: :meth:`stats` plus ledger recount, allocator free list vs ledger,
        tree walk (values vs ledger TREE set, evictable/protected recount, lock_ref
        == locks held by clients below each node) and lease/row bookkeeping."""
        report = self.stats()
        errors = list(report.errors) + self._structural_errors()
        fields = {f: getattr(report, f) for f in report.__struct_fields__}
        fields.update(ok=not errors, full=True, errors=errors)
        return InvariantReport(**fields)

    def _structural_errors(self) -> list[str]:
        errors = self.ledger.verify() + self.rows.verify()
        free_ids = self.allocator.free_unit_ids()
        if len(set(free_ids)) != len(free_ids):
            errors.append("allocator free list holds a unit twice")
        if sorted(free_ids) != list(self.ledger.slots_of(FREE)):
            errors.append("allocator free list != ledger FREE set")
        tree_units, evictable, protected = self._walk_tree(errors)
        if len(set(tree_units)) != len(tree_units):
            errors.append("a unit is referenced by two tree nodes")
        if sorted(tree_units) != list(self.ledger.slots_of(TREE)):
            errors.append("tree values != ledger TREE set")
        if (evictable, protected) != (self.cache.evictable_size(), self.cache.protected_size()):
            errors.append(f"tree recount evictable/protected {evictable}/{protected} != "
                          f"{self.cache.evictable_size()}/{self.cache.protected_size()}")
        for cid in set(self.ledger.client_counts()) | set(self.rows.ledger.client_counts()):
            if cid not in self._clients:
                errors.append(f"unregistered client {cid} still holds slots or rows")
        for c in self._clients.values():
            for lid, members in c.leases.items():
                if any(self.ledger.owner(u) != c.cid or c.unit_lease.get(u) != lid
                       for u in members):
                    errors.append(f"lease {lid} of client {c.cid} holds foreign units")
            if len(c.unit_lease) != sum(len(m) for m in c.leases.values()):
                errors.append(f"client {c.cid} lease index out of sync")
        return errors

    def _expected_lock_refs(self, errors: list[str]) -> dict[int, int]:
        root, expected = self.cache.root_node, {}
        for c in self._clients.values():
            for handle, (node, count) in c.locks.items():
                if count <= 0 or not self._is_live(node):
                    errors.append(f"client {c.cid} lock on dead node {handle} (count {count})")
                while node is not root and node is not None:
                    expected[id(node)] = expected.get(id(node), 0) + count
                    node = node.parent
        return expected

    def _walk_tree(self, errors: list[str]) -> tuple[list[int], int, int]:
        """Every non-root node: (ledger units of values, evictable, protected)."""
        expected = self._expected_lock_refs(errors)
        root = self.cache.root_node
        if root.lock_ref != 1:
            errors.append(f"root lock_ref {root.lock_ref} != 1")
        units: list[int] = []
        evictable = protected = 0
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            n = len(node.key)
            if node.value is None or len(node.value) != n or n % self.page_size:
                errors.append(f"node {node.id}: key/value length mismatch")
                continue
            if node.lock_ref > 0:
                protected += n
            else:
                evictable += n
            if node.lock_ref != expected.get(id(node), 0):
                errors.append(f"node {node.id}: lock_ref {node.lock_ref} != client locks "
                              f"{expected.get(id(node), 0)}")
            try:
                units.extend(self._page_units(as_index_array(node.value)))
            except KVStateError as exc:
                errors.append(f"node {node.id}: {exc}")
        return units, evictable, protected
