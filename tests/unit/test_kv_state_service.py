"""KVStateService over SGLang's real RadixCache + allocators, model-checked.

A hypothesis state machine drives two logical clients through random
alloc/free/lease/match/insert/lock/unlock/evict/req-row/release operations and
checks the full invariant after every step, for page_size 1 and 4.
"""

from __future__ import annotations

from array import array
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sglang_semipd.memory.ledger import TREE
from sglang_semipd.memory.service import KVStateService
from sglang_semipd.protocol import ErrorCode, KVStateError

PREFIXES = [list(range(1, 13)), list(range(1, 7)) + list(range(50, 56)), list(range(100, 111))]
suffixes = st.lists(st.integers(0, 3), max_size=8)


def _all_nodes(svc: KVStateService) -> list:
    out, stack = [], [svc.cache.root_node]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


class KVMachine(RuleBasedStateMachine):
    PAGE = 1
    CAP = 48

    def __init__(self) -> None:
        super().__init__()
        self.svc = KVStateService(self.CAP, self.PAGE, req_rows=6)
        self.owned: dict[int, set[int]] = {}  # every token index a client owns
        self.pool: dict[int, set[int]] = {}  # owned, not used by an active request
        self.leases: dict[int, dict[int, set[int]]] = {}
        self.locks: dict[int, Counter] = {}
        self.rows: dict[int, set[int]] = {}
        self.reqs: list[dict] = []
        self.handles: set[int] = set()
        self.cids = [self._new_client("a"), self._new_client("b")]

    # ------------------------------------------------------------- helpers
    def _new_client(self, name: str) -> int:
        cid = self.svc.register(name)
        self.owned[cid], self.pool[cid], self.leases[cid] = set(), set(), {}
        self.locks[cid], self.rows[cid] = Counter(), set()
        return cid

    def _whole_pages(self, idx) -> set[int]:
        ps = self.PAGE
        return {p * ps + k for p in {i // ps for i in idx} for k in range(ps)}

    def _gain(self, cid: int, idx) -> None:
        idx = list(idx)
        assert len(idx) % self.PAGE == 0 and self._whole_pages(idx) == set(idx)
        for other in self.owned.values():
            assert other.isdisjoint(idx), "slot handed out twice"
        assert all(self.svc.ledger.owner(i // self.PAGE) == cid for i in idx)
        self.owned[cid].update(idx)

    def _lose(self, cid: int, idx) -> None:
        gone = self._whole_pages(idx)
        self.owned[cid] -= gone
        self.pool[cid] -= gone
        for members in self.leases[cid].values():
            members -= gone

    def _expect(self, code: str, fn, *args) -> None:
        before = self.svc.stats()
        with pytest.raises(Exception) as info:
            fn(*args)
        assert getattr(info.value, "code", None) == code, info.value
        assert self.svc.stats() == before

    def _take_pool(self, cid: int, n_tokens: int) -> list[int] | None:
        pages = sorted({i // self.PAGE for i in self.pool[cid]})
        need = -(-n_tokens // self.PAGE)
        if need > len(pages):
            return None
        idx = sorted(self._whole_pages(p * self.PAGE for p in pages[:need]))
        self.pool[cid] -= set(idx)
        return idx

    # --------------------------------------------------------------- rules
    @rule(c=st.integers(0, 1), sizes=st.lists(st.integers(0, 12), min_size=1, max_size=3))
    def alloc(self, c: int, sizes: list[int]) -> None:
        cid = self.cids[c]
        try:
            pieces = self.svc.alloc(cid, sizes)
        except KVStateError as exc:
            assert exc.code == ErrorCode.OUT_OF_MEMORY
            return
        for size, piece in zip(sizes, pieces):
            assert len(piece) == -(-size // self.PAGE) * self.PAGE
            self._gain(cid, piece)
            self.pool[cid].update(piece)

    @rule(c=st.integers(0, 1), frac=st.floats(0, 1))
    def free_some(self, c: int, frac: float) -> None:
        cid = self.cids[c]
        pages = sorted({i // self.PAGE for i in self.pool[cid]})
        pick = sorted(self._whole_pages(p * self.PAGE for p in pages[:int(len(pages) * frac)]))
        half = len(pick) // 2
        assert self.svc.free(cid, [array("q", pick[:half]), array("q", pick[half:])]) == len(pick)
        self._lose(cid, pick)

    @rule(c=st.integers(0, 1), n=st.integers(1, 10))
    def lease(self, c: int, n: int) -> None:
        cid = self.cids[c]
        try:
            lid, idx = self.svc.lease(cid, n)
        except KVStateError as exc:
            assert exc.code == ErrorCode.OUT_OF_MEMORY
            return
        self._gain(cid, idx)
        self.pool[cid].update(idx)
        self.leases[cid][lid] = set(idx)

    @rule(c=st.integers(0, 1), frac=st.floats(0, 1))
    def return_lease(self, c: int, frac: float) -> None:
        cid = self.cids[c]
        if not self.leases[cid]:
            return
        lid = min(self.leases[cid])
        pages = sorted({i // self.PAGE for i in self.leases[cid][lid] & self.pool[cid]})
        unused = sorted(self._whole_pages(p * self.PAGE for p in pages[:int(len(pages) * frac)]))
        assert self.svc.return_lease(cid, lid, array("q", unused)) == len(unused)
        self._lose(cid, unused)
        del self.leases[cid][lid]

    @rule(c=st.integers(0, 1), which=st.integers(0, 2), suffix=suffixes,
          from_pool=st.booleans(), lock_late=st.booleans())
    def start_request(self, c: int, which: int, suffix: list[int], from_pool: bool,
                      lock_late: bool) -> None:
        cid = self.cids[c]
        tokens = PREFIXES[which] + suffix
        idx, plen, node = self.svc.match_prefix(cid, tokens, lock=not lock_late)
        if lock_late:  # separate IncLockRef right after: nothing ran in between
            self.svc.inc_lock_ref(cid, node)
        assert plen == len(idx) and plen % self.PAGE == 0
        assert all(self.svc.ledger.owner(i // self.PAGE) == TREE for i in idx)
        self.locks[cid][node] += 1
        own = self._take_pool(cid, len(tokens) - plen) if from_pool else None
        if own is None:
            try:
                (piece,) = self.svc.alloc(cid, [len(tokens) - plen])
            except KVStateError as exc:
                assert exc.code == ErrorCode.OUT_OF_MEMORY
                self._unlock(cid, node)
                return
            self._gain(cid, piece)
            own = list(piece)
        self.reqs.append(dict(cid=cid, tokens=tokens, prefix=list(idx), node=node, own=own))

    @rule(c=st.integers(0, 1), which=st.integers(0, 2), suffix=suffixes,
          from_pool=st.booleans(), lock=st.booleans())
    def full_request(self, c: int, which: int, suffix: list[int], from_pool: bool,
                     lock: bool) -> None:
        n = len(self.reqs)
        self.start_request(c, which, suffix, from_pool, lock_late=False)
        if len(self.reqs) > n:
            self.finish_request(len(self.reqs) - 1, lock)

    def _unlock(self, cid: int, node: int) -> None:
        self.svc.dec_lock_ref(cid, node)
        self.locks[cid][node] -= 1
        if not self.locks[cid][node]:
            del self.locks[cid][node]

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100), with_row=st.booleans())
    def hand_off(self, i: int, with_row: bool) -> None:
        """Prefill -> decode: the request's own slots, its lock (and a row) change owner."""
        req = self.reqs[i % len(self.reqs)]
        src = req["cid"]
        dst = self.cids[1] if src == self.cids[0] else self.cids[0]
        rows = sorted(self.rows[src])[:1] if with_row else []
        moved = self.svc.transfer(src, dst, array("q", req["own"]), rows, [req["node"]])
        assert moved == (len(req["own"]), len(rows), 1)
        self._lose(src, req["own"])
        self._gain(dst, req["own"])
        self.locks[src][req["node"]] -= 1
        if not self.locks[src][req["node"]]:
            del self.locks[src][req["node"]]
        self.locks[dst][req["node"]] += 1
        self.rows[src] -= set(rows)
        self.rows[dst] |= set(rows)
        req["cid"] = dst

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100), lock=st.booleans())
    def finish_request(self, i: int, lock: bool) -> None:
        req = self.reqs.pop(i % len(self.reqs))
        cid, tokens, prefix, own = req["cid"], req["tokens"], req["prefix"], req["own"]
        values = prefix + own[:len(tokens) - len(prefix)]
        plen, node = self.svc.insert(cid, tokens, array("q", values), lock=lock)
        aligned = len(tokens) // self.PAGE * self.PAGE
        assert len(prefix) <= plen <= aligned
        moved = values[plen:aligned]
        assert all(self.svc.ledger.owner(v // self.PAGE) == TREE for v in moved)
        self._lose(cid, moved)
        rest = [i for i in own if i not in set(moved)]
        assert self.svc.free(cid, [array("q", rest[:1]), array("q", rest[1:])]) == len(rest)
        self._lose(cid, rest)
        self._unlock(cid, req["node"])
        if lock:  # the insert locked its last node atomically; drop that lock too
            self.locks[cid][node] += 1
            self._unlock(cid, node)
        self.handles.add(node)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def abort_request(self, i: int) -> None:
        req = self.reqs.pop(i % len(self.reqs))
        self.svc.free(req["cid"], [array("q", req["own"])])
        self._lose(req["cid"], req["own"])
        self._unlock(req["cid"], req["node"])

    @rule(c=st.integers(0, 1), which=st.integers(0, 2), suffix=suffixes)
    def match_only(self, c: int, which: int, suffix: list[int]) -> None:
        _, _, node = self.svc.match_prefix(self.cids[c], PREFIXES[which] + suffix)
        self.handles.add(node)

    @precondition(lambda self: self.handles)
    @rule(c=st.integers(0, 1), data=st.data())
    def lock_handle(self, c: int, data) -> None:
        cid, handle = self.cids[c], data.draw(st.sampled_from(sorted(self.handles)))
        try:
            self.svc.inc_lock_ref(cid, handle)
        except KVStateError as exc:
            assert exc.code == ErrorCode.UNKNOWN_NODE
            self.handles.discard(handle)
            return
        self.locks[cid][handle] += 1

    @rule(c=st.integers(0, 1), data=st.data())
    def unlock_handle(self, c: int, data) -> None:
        cid = self.cids[c]
        free_locks = self.locks[cid] - Counter(r["node"] for r in self.reqs if r["cid"] == cid)
        if free_locks:
            self._unlock(cid, data.draw(st.sampled_from(sorted(free_locks))))

    @rule(n=st.integers(0, 40))
    def evict(self, n: int) -> None:
        before = self.svc.cache.evictable_size()
        got = self.svc.evict(n)
        assert got >= min(n, before) or got == before

    @rule(c=st.integers(0, 1), n=st.integers(0, 3), give=st.booleans())
    def req_rows(self, c: int, n: int, give: bool) -> None:
        cid = self.cids[c]
        if give and self.rows[cid]:
            rows = sorted(self.rows[cid])[:n]
            assert self.svc.free_req_rows(cid, rows) == len(rows)
            self.rows[cid] -= set(rows)
            return
        try:
            rows = self.svc.alloc_req_rows(cid, n)
        except KVStateError as exc:
            assert exc.code == ErrorCode.OUT_OF_MEMORY
            return
        assert all(r not in held for held in self.rows.values() for r in rows)
        self.rows[cid].update(rows)

    @rule(c=st.integers(0, 1), kind=st.sampled_from(
        ["free_other", "padding", "range", "double_free", "dup", "insert_foreign",
         "insert_len", "unknown_node", "not_locked", "client_dies"]))
    def misuse(self, c: int, kind: str) -> None:
        """Every refused request leaves the state exactly as it was."""
        cid, other = self.cids[c], self.cids[1 - c]
        free, ps = self.svc.free, self.PAGE
        if kind == "free_other" and self.owned[other]:
            self._expect(ErrorCode.NOT_OWNED, free, cid, [array("q", [min(self.owned[other])])])
        elif kind == "padding":
            self._expect(ErrorCode.INVALID_INDICES, free, cid, [array("q", [0])])
        elif kind == "range":
            self._expect(ErrorCode.INVALID_INDICES, free, cid,
                         [array("q", [self.svc.capacity + ps])])
        elif kind == "double_free" and self.svc.ledger.free_count:
            slot = self.svc.ledger.slots_of(0)[0] * ps
            self._expect(ErrorCode.DOUBLE_FREE, free, cid, [array("q", [slot])])
        elif kind == "dup" and self.pool[cid]:
            i = min(self.pool[cid])
            self._expect(ErrorCode.DUPLICATE_INDICES, free, cid, [array("q", [i]), array("q", [i])])
        elif kind == "insert_foreign" and self.owned[other]:
            foreign = sorted(self._whole_pages([min(self.owned[other])]))
            toks = [900 + k for k in range(len(foreign))]
            self._expect(ErrorCode.NOT_OWNED, self.svc.insert, cid, toks, array("q", foreign))
        elif kind == "insert_len":
            self._expect(ErrorCode.BAD_REQUEST, self.svc.insert, cid, [1, 2], array("q", [1]))
        elif kind == "unknown_node":
            self._expect(ErrorCode.UNKNOWN_NODE, self.svc.inc_lock_ref, cid, -5)
        elif kind == "not_locked":
            self._expect(ErrorCode.NOT_LOCKED, self.svc.dec_lock_ref, cid, 10 ** 9)
        elif kind == "client_dies":
            self._client_dies(c)

    def _client_dies(self, c: int) -> None:
        cid = self.cids[c]
        rep = self.svc.release_client(cid)
        assert rep.freed_tokens == len(self.owned[cid])
        assert rep.dropped_locks == sum(self.locks[cid].values())
        assert rep.freed_rows == len(self.rows[cid])
        self.reqs = [r for r in self.reqs if r["cid"] != cid]
        for table in (self.owned, self.pool, self.leases, self.locks, self.rows):
            del table[cid]
        self._expect(ErrorCode.UNKNOWN_CLIENT, self.svc.alloc, cid, [1])
        self.cids[c] = self._new_client(f"respawn-{c}")

    # ---------------------------------------------------------- invariants
    @invariant()
    def state_is_sound(self) -> None:
        svc, ps = self.svc, self.PAGE
        report = svc.check_invariant()
        assert report.ok, report.errors
        assert report.free + report.evictable + report.in_use == report.capacity
        assert report.in_use == sum(report.client_held.values()) + report.protected
        assert report.client_held == {c: len(o) for c, o in self.owned.items() if o}
        assert report.leased == sum(len(m) for ls in self.leases.values() for m in ls.values())
        assert report.lock_refs == sum(sum(c.values()) for c in self.locks.values())
        assert report.req_rows_held == {c: len(r) for c, r in self.rows.items() if r}
        assert svc.ledger.free_count * ps == svc.allocator.available_size()
        assert svc.ledger.tree_count * ps == svc.cache.evictable_size() + svc.cache.protected_size()

    def teardown(self) -> None:
        for cid in list(self.cids):
            self.svc.release_client(cid)
        report = self.svc.check_invariant()
        assert report.ok, report.errors
        assert report.protected == 0 and report.client_held == {} and report.lock_refs == 0
        assert report.free + report.evictable == report.capacity
        for node in _all_nodes(self.svc):
            assert node.lock_ref == (1 if node is self.svc.cache.root_node else 0)
        self.svc.reset()
        assert self.svc.allocator.available_size() == self.svc.capacity


class PagedKVMachine(KVMachine):
    PAGE = 4
    CAP = 64


_SETTINGS = settings(max_examples=120, stateful_step_count=60, deadline=None,
                     derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestKVStatePage1 = KVMachine.TestCase
TestKVStatePage1.settings = _SETTINGS
TestKVStatePaged = PagedKVMachine.TestCase
TestKVStatePaged.settings = _SETTINGS


# ------------------------------------------------------------- direct tests
@pytest.fixture(params=[1, 4], ids=["page1", "page4"])
def svc(request) -> KVStateService:
    return KVStateService(32 * request.param, request.param, req_rows=4)


def test_alloc_evicts_tree_before_failing(svc: KVStateService) -> None:
    ps, a = svc.page_size, svc.register("a")
    tokens = list(range(svc.capacity))
    (idx,) = svc.alloc(a, [svc.capacity])
    assert svc.insert(a, tokens, idx)[0] == 0
    assert svc.cache.evictable_size() == svc.capacity and svc.allocator.available_size() == 0
    (again,) = svc.alloc(a, [3 * ps])  # short: the tree gives way
    assert len(again) == 3 * ps and svc.check_invariant().ok
    with pytest.raises(KVStateError) as info:
        svc.alloc(a, [svc.capacity])
    assert info.value.code == ErrorCode.OUT_OF_MEMORY
    assert svc.ledger.client_counts() == {a: 3}


def test_locked_prefix_survives_eviction_and_handles_go_stale(svc: KVStateService) -> None:
    a, b = svc.register("a"), svc.register("b")
    ps = svc.page_size
    (idx,) = svc.alloc(a, [8 * ps])
    _, node = svc.insert(a, list(range(8 * ps)), idx)
    _, plen, locked = svc.match_prefix(b, list(range(4 * ps)), lock=True)
    assert plen == 4 * ps
    assert svc.evict(svc.capacity) == 4 * ps  # only the unlocked tail goes
    with pytest.raises(KVStateError) as info:
        svc.inc_lock_ref(a, node)
    assert info.value.code == ErrorCode.UNKNOWN_NODE
    with pytest.raises(KVStateError) as info:
        svc.reset()
    assert info.value.code == ErrorCode.BUSY
    svc.dec_lock_ref(b, locked)
    svc.reset()
    assert svc.check_invariant().ok and svc.allocator.available_size() == svc.capacity


def test_insert_rejects_bad_page_structure_atomically() -> None:
    svc = KVStateService(64, 4)
    a = svc.register("a")
    (idx,) = svc.alloc(a, [8])
    scrambled = array("q", [idx[1], idx[0]] + list(idx[2:]))
    with pytest.raises(KVStateError) as info:
        svc.insert(a, list(range(8)), scrambled)
    assert info.value.code == ErrorCode.INVALID_INDICES
    assert svc.ledger.client_counts() == {a: 2} and svc.cache.total_size() == 0
    assert svc.insert(a, list(range(8)), idx)[0] == 0 and svc.check_invariant().ok


def test_extra_key_namespaces_are_disjoint() -> None:
    svc = KVStateService(32)
    a = svc.register("a")
    (idx,) = svc.alloc(a, [6])
    assert svc.insert(a, [1, 2, 3, 4, 5, 6], idx, extra_key="lora-1")[0] == 0
    assert svc.match_prefix(a, [1, 2, 3], extra_key=None)[1] == 0
    got, plen, _ = svc.match_prefix(a, [1, 2, 3, 9], extra_key="lora-1")
    assert plen == 3 and list(got) == list(idx[:3])
    (dup,) = svc.alloc(a, [6])
    assert svc.insert(a, [1, 2, 3, 4, 5, 6], dup, extra_key="lora-2")[0] == 0
    assert svc.check_invariant().ok and svc.ledger.tree_count == 12


def test_hopeless_alloc_is_refused_without_evicting() -> None:
    svc = KVStateService(16)
    a = svc.register("a")
    (idx,) = svc.alloc(a, [10])
    svc.insert(a, list(range(10)), idx)
    with pytest.raises(KVStateError) as info:
        svc.alloc(a, [17])
    assert info.value.code == ErrorCode.OUT_OF_MEMORY
    assert svc.cache.evictable_size() == 10  # the cache was not thrown away for nothing
    (big,) = svc.alloc(a, [16])  # possible: evicts the whole tree
    assert len(big) == 16 and svc.cache.evictable_size() == 0 and svc.check_invariant().ok


def test_transfer_hands_slots_rows_and_locks_over_atomically(svc: KVStateService) -> None:
    ps = svc.page_size
    pre, dec = svc.register("prefill"), svc.register("decode")
    (cached,) = svc.alloc(pre, [4 * ps])
    _, node = svc.insert(pre, list(range(4 * ps)), cached)
    _, _, locked = svc.match_prefix(pre, list(range(4 * ps)), lock=True)
    (tail,) = svc.alloc(pre, [3 * ps + 1])  # the request's own slots, last page partial
    rows = svc.alloc_req_rows(pre, 1)
    before = svc.check_invariant()
    # refused: a row the prefill side does not own -> nothing moves
    with pytest.raises(Exception):
        svc.transfer(pre, dec, tail, rows + [rows[0] % 4 + 1], [locked])
    assert svc.ledger.client_counts() == {pre: len(tail) // ps + (len(tail) % ps > 0)}
    with pytest.raises(KVStateError) as info:
        svc.transfer(pre, dec, tail, rows, [locked, locked])  # holds only one lock
    assert info.value.code == ErrorCode.NOT_LOCKED
    with pytest.raises(KVStateError) as info:
        svc.transfer(pre, 999, tail, rows, [])
    assert info.value.code == ErrorCode.UNKNOWN_CLIENT

    tokens, nrows, nlocks = svc.transfer(pre, dec, tail, rows, [locked])
    assert (tokens, nrows, nlocks) == (4 * ps if ps > 1 else 4, 1, 1)
    after = svc.check_invariant()
    assert after.ok and after.free == before.free and after.protected == before.protected
    assert pre not in svc.ledger.client_counts()
    with pytest.raises(Exception):
        svc.free(pre, [tail])  # no longer the prefill side's
    with pytest.raises(KVStateError):
        svc.dec_lock_ref(pre, locked)
    svc.dec_lock_ref(dec, locked)
    assert svc.free(dec, [tail]) == tokens
    assert svc.free_req_rows(dec, rows) == 1
    final = svc.check_invariant()
    assert final.ok and final.lock_refs == 0 and final.in_use == 0
