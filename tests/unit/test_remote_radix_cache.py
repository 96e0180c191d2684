"""Worker side of the memory manager: RemoteRadixCache + RemoteTokenAllocator.

One spawned process serves two memory managers (page_size 1 and 4, a thread each)
for the module; each test starts from an empty tree (``Reset``) and ends with
nothing held.  Requests are real SGLang ``Req`` objects admitted through
``Req.init_next_round_input``; rows are a real CPU ``ReqToTokenPool``."""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time
from array import array
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import evict_from_tree_cache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

from sglang_semipd import protocol as P
from sglang_semipd.memory.backend import BACKEND_NAME, register_semipd_radix_backend
from sglang_semipd.memory.remote_allocator import RemoteTokenAllocator
from sglang_semipd.memory.remote_radix_cache import RemoteNode, RemoteRadixCache, StaleNodeError
from sglang_semipd.memory.client import KVStateClient
from sglang_semipd.memory.rpc import KVStateServerConfig, run_kv_state_server
from sglang_semipd.testing.procs import recv_reply, run_reporting, wait_for_kv_server

CAPACITY = 4096
ROWS, MAX_CTX = 32, 256
_SPAWN = mp.get_context("spawn")


# ------------------------------------------------------------------ harness
class Side:
    """One worker's view: a tree cache, its allocator and a req->token pool.

    Mirrors the scheduler's calls: admission (``init_next_round_input`` + lock),
    page-aware slot allocation (``alloc_extend`` / ``alloc_decode`` shapes),
    ``cache_unfinished_req`` per prefill chunk, ``cache_finished_req`` in a free
    group."""

    def __init__(self, tree: Any, alloc: Any, pool: ReqToTokenPool, page_size: int,
                 paged_api: bool = False) -> None:
        self.tree, self.alloc, self.pool, self.ps = tree, alloc, pool, page_size
        self.paged_api = paged_api and page_size > 1  # use alloc_extend/alloc_decode

    def new_req(self, rid: str, prompt: list[int], extra_key: str | None = None,
                output: list[int] = ()) -> Req:
        req = Req(rid, "", array("q", prompt), SamplingParams(), extra_key=extra_key)
        req.output_ids.extend(output)
        return req

    def admit(self, req: Req) -> int:
        req.init_next_round_input(self.tree)
        self.tree.inc_lock_ref(req.last_node)
        self.pool.alloc([req])
        n = len(req.prefix_indices)
        if n:
            self.pool.write((req.req_pool_idx, slice(0, n)), req.prefix_indices)
        req.filled = n
        return n

    def _row(self, req: Req) -> torch.Tensor:
        return self.pool.req_to_token[req.req_pool_idx]

    def _extend_slots(self, req: Req, a: int, b: int) -> torch.Tensor:
        ps, row = self.ps, self._row(req)
        evict_from_tree_cache(self.tree, b - a + ps)
        last = int(row[a - 1]) if a else -1
        if self.paged_api:
            return self.alloc.alloc_extend(torch.tensor([a]), torch.tensor([a]),
                                           torch.tensor([b]), torch.tensor([b]),
                                           torch.tensor([last]), b - a)
        fill = min(b, -(-a // ps) * ps) - a if a % ps else 0
        head = torch.arange(last + 1, last + 1 + fill, dtype=torch.int64)
        pages = -(-(b - a - fill) // ps)
        fresh = self.alloc.alloc(pages * ps) if pages else head[:0]
        return torch.cat([head, fresh[: b - a - fill]])

    def prefill(self, req: Req, end: int, first_token: int | None) -> None:
        """Prefill up to ``end``; ``first_token`` marks the last chunk."""
        a = req.filled
        assert a == len(req.prefix_indices)
        self.pool.write((req.req_pool_idx, slice(a, end)), self._extend_slots(req, a, end))
        req.filled = end
        req.set_extend_range(a, end)
        if first_token is None:
            self.tree.cache_unfinished_req(req, chunked=True)
        else:
            req.output_ids.append(first_token)
            self.tree.cache_unfinished_req(req)

    def decode(self, reqs: list[Req], tokens: list[int]) -> None:
        ps, pos = self.ps, [r.filled for r in reqs]
        evict_from_tree_cache(self.tree, len(reqs) * ps)
        last = torch.tensor([int(self._row(r)[p - 1]) if p else -1 for r, p in zip(reqs, pos)])
        if ps == 1:
            slots = self.alloc.alloc(len(reqs))
        elif self.paged_api:
            seq = torch.tensor(pos) + 1
            slots = self.alloc.alloc_decode(seq, seq, last)
        else:
            need = [p % ps == 0 for p in pos]
            fresh = self.alloc.alloc(sum(need) * ps)
            slots, k = last + 1, 0
            for i, n in enumerate(need):
                if n:
                    slots[i], k = fresh[k], k + ps
        for r, p, s, t in zip(reqs, pos, slots.tolist(), tokens):
            self.pool.write((r.req_pool_idx, p), s)
            r.filled = p + 1
            r.output_ids.append(t)

    def finish(self, reqs: list[Req], insert: bool = True) -> None:
        self.alloc.free_group_begin()
        for r in reqs:
            self.tree.cache_finished_req(r, is_insert=insert, kv_len_to_handle=r.filled)
            self.pool.free(r)
        self.alloc.free_group_end()


def _pool() -> ReqToTokenPool:
    return ReqToTokenPool(ROWS, MAX_CTX, device="cpu", enable_memory_saver=False)


def local_side(page_size: int) -> Side:
    pool = _pool()
    if page_size == 1:
        alloc = TokenToKVPoolAllocator(CAPACITY, torch.bfloat16, "cpu", None, False)
    else:
        alloc = PagedTokenToKVPoolAllocator(CAPACITY, page_size, torch.bfloat16, "cpu", None,
                                            False)
    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=pool,
                                      token_to_kv_pool_allocator=alloc, page_size=page_size))
    return Side(tree, alloc, pool, page_size)


def remote_side(endpoint: str, name: str, role: str = "", paged_api: bool = False,
                **alloc_kw: Any) -> Side:
    client = KVStateClient(endpoint, name, role=role, timeout_s=30)
    alloc_kw.setdefault("stats_max_age_s", None)
    alloc = RemoteTokenAllocator(client, **alloc_kw)
    pool = _pool()
    tree = RemoteRadixCache(CacheInitParams(disable=False, req_to_token_pool=pool,
                                            token_to_kv_pool_allocator=alloc,
                                            page_size=client.page_size))
    return Side(tree, alloc, pool, client.page_size, paged_api=paged_api)


def close_remote(side: Side) -> P.ReleaseReply:
    """Flush, check nothing is held by this client, say goodbye."""
    side.alloc.close()
    client = side.alloc.client
    report = client.check_invariant()
    assert report.ok, report.errors
    assert client.client_id not in report.client_held, report.client_held
    bye = client.goodbye()
    client.close()
    return bye


class CountingClient:
    """Counts a KVStateClient's round trips by message type."""

    def __init__(self, client: KVStateClient) -> None:
        self.counts: dict[str, int] = {}
        inner = client.call

        def call(msg: Any, *bufs: Any, **kw: Any) -> Any:
            self.counts[type(msg).__name__] = self.counts.get(type(msg).__name__, 0) + 1
            return inner(msg, *bufs, **kw)

        client.call = call


# ------------------------------------------------------------------ server
def _servers_main(configs: list[KVStateServerConfig]) -> None:
    """Several memory managers in one process (one SGLang import)."""
    threads = [threading.Thread(target=run_kv_state_server, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    sock_dir = tmp_path_factory.mktemp("rkv")
    configs = [KVStateServerConfig(f"ipc://{sock_dir}/kv{ps}.sock", CAPACITY, page_size=ps,
                                   req_rows=ROWS, log_level="WARNING") for ps in (1, 4)]
    proc = _SPAWN.Process(target=_servers_main, args=(configs,), daemon=True)
    proc.start()
    sups = {}
    for c in configs:
        sup = KVStateClient(c.endpoint, "supervisor", timeout_s=15, register=False)
        wait_for_kv_server(sup, proc)
        sups[c.page_size] = (c.endpoint, sup)
    yield sups
    for _, sup in sups.values():
        try:
            sup.shutdown()
        finally:
            sup.close()
    proc.join(15)
    if proc.is_alive():
        proc.kill()


def fresh(servers, page_size: int) -> tuple[str, KVStateClient]:
    endpoint, sup = servers[page_size]
    sup.reset()  # refused if a previous test left anything held
    return endpoint, sup


def assert_clean(sup: KVStateClient) -> P.InvariantReport:
    report = sup.check_invariant()
    assert report.ok, report.errors
    assert report.client_held == {} and report.leased == 0
    assert report.protected == 0 and report.lock_refs == 0
    return report


# ------------------------------------------------------------------ tests
PREFIXES = [[1000 + 50 * k + i for i in range(10 + 7 * k)] for k in range(4)]


def _prompt(rng: random.Random) -> list[int]:
    base = list(rng.choice(PREFIXES))
    if rng.random() < 0.3:
        base = base[: rng.randrange(1, len(base) + 1)]
    return base + [rng.randrange(8) for _ in range(rng.randrange(1, 30))]


def _run_lockstep(rng: random.Random, local: Side, remote: Side, n_requests: int) -> dict:
    """Same random lifecycles on both sides, compared after every step."""
    active: list[dict] = []  # {"reqs": (local req, remote req), "len", "decoding"}
    seen: list[tuple[list[int], str | None]] = []
    started = stats = hits = matched = 0
    while started < n_requests or active:
        r = rng.random()
        if started < n_requests and len(active) < 4 and (r < 0.3 or not active):
            if active and r < 0.1:  # same prompt as one in flight: its chunks race ours
                prompt, key = list(rng.choice(active)["reqs"][0].origin_input_ids), None
            else:
                prompt, key = _prompt(rng), ("lora-b" if rng.random() < 0.15 else None)
            matched += (len(prompt) - 1) // remote.ps > 0
            seen.append((prompt, key))
            pair = tuple(s.new_req(f"r{started}", prompt, key) for s in (local, remote))
            got = [s.admit(q) for s, q in zip((local, remote), pair)]
            assert got[0] == got[1], (started, got)
            assert pair[0].cache_protected_len == pair[1].cache_protected_len
            assert isinstance(pair[1].last_node, RemoteNode)
            hits += got[0] > 0
            active.append({"reqs": pair, "len": len(prompt), "decoding": False})
            started += 1
            continue
        item = rng.choice(active)
        lq, rq = item["reqs"]
        if not item["decoding"]:
            end = min(item["len"], lq.filled + rng.randrange(1, 24))
            first = rng.randrange(8) if end == item["len"] else None
            for s, q in zip((local, remote), (lq, rq)):
                s.prefill(q, end, first)
            assert len(lq.prefix_indices) == len(rq.prefix_indices) == end
            assert lq.cache_protected_len == rq.cache_protected_len
            item["decoding"] = first is not None
        elif r < 0.75:
            batch = [a for a in active if a["decoding"]]
            toks = [rng.randrange(8) for _ in batch]
            for k, s in enumerate((local, remote)):
                s.decode([a["reqs"][k] for a in batch], toks)
        else:
            active.remove(item)
            insert = rng.random() < 0.9
            for s, q in zip((local, remote), (lq, rq)):
                s.finish([q], insert=insert)
            stats += 1
    return {"finished": stats, "hits": hits, "seen": seen, "matched": matched}


@pytest.mark.parametrize("page_size", [1, 4])
def test_differential_against_sglang_radix_cache(servers, page_size: int) -> None:
    endpoint, sup = fresh(servers, page_size)
    local = local_side(page_size)
    remote = remote_side(endpoint, f"diff{page_size}", role="prefill",
                         paged_api=page_size > 1, lease_block=32)
    counter = CountingClient(remote.alloc.client)
    out = _run_lockstep(random.Random(7 + page_size), local, remote, n_requests=60)
    assert out["finished"] == 60 and out["hits"] > 10

    remote.alloc.flush()
    report = remote.tree.refresh_stats()
    assert local.tree.protected_size() == 0 and remote.tree.protected_size() == 0
    assert report.evictable == local.tree.evictable_size() == remote.tree.evictable_size()
    assert report.evictable + report.protected == local.tree.total_size() > 0
    assert remote.tree.total_size() == local.tree.total_size()
    # cache_unfinished_req had to adopt the tree's slots (another request's) at least once
    assert counter.counts["MatchPrefix"] > out["matched"], (counter.counts, out["matched"])

    # same LRU eviction on both trees, then the same matches
    want = local.tree.evictable_size() // 2
    ev = [s.tree.evict(EvictParams(num_tokens=want)).num_tokens_evicted
          for s in (local, remote)]
    assert ev[0] == ev[1] >= want
    for prompt, key in out["seen"]:
        params = MatchPrefixParams(key=RadixKey(array("q", prompt), key))
        lens = [len(s.tree.match_prefix(params).device_indices) for s in (local, remote)]
        assert lens[0] == lens[1], (prompt, key, lens)
    bye = close_remote(remote)
    assert (bye.freed_tokens, bye.dropped_locks) == (0, 0)
    assert_clean(sup)
    assert local.alloc.available_size() + local.tree.evictable_size() == CAPACITY


def _worker_body(endpoint: str, role: str, prompts: list[list[int]], conn: Any) -> None:
    """A prefill or decode worker sharing the memory manager's tree; the parent
    sequences the hand-off (prefilled -> decode locks -> prefill finishes)."""
    side = remote_side(endpoint, role, role=role, paged_api=True, lease_block=16)
    if role == "prefill":
        reqs = [side.new_req(f"p{i}", p) for i, p in enumerate(prompts)]
        for q in reqs:
            side.admit(q)
            n = len(q.origin_input_ids)
            for end in range(min(n, 8 + q.filled), n, 8):  # chunked prefill
                side.prefill(q, end, None)
            side.prefill(q, n, 7)
        conn.send({"prefilled": len(reqs)})
        conn.recv()
        side.finish(reqs)  # hand-off done: cache finished, drop the prefill's locks
    else:
        conn.recv()
        reqs = [side.new_req(f"d{i}", p, output=[7]) for i, p in enumerate(prompts)]
        conn.send({"hits": [side.admit(q) for q in reqs]})
        conn.recv()
        for q in (q for q in reqs if q.filled < len(q.origin_input_ids)):
            side.prefill(q, len(q.origin_input_ids), None)  # recompute the unaligned tail
        for step in range(10):
            side.decode(reqs, [step] * len(reqs))
        side.finish(reqs)
    bye = close_remote(side)
    conn.send({"goodbye": [bye.freed_tokens, bye.dropped_locks]})


def _worker_main(*args: Any) -> None:
    run_reporting(_worker_body, *args)


def test_prefill_and_decode_workers_share_the_tree(servers) -> None:
    endpoint, sup = fresh(servers, 4)
    rng = random.Random(3)
    prompts = [PREFIXES[k % 4] + [rng.randrange(50) for _ in range(5 + 3 * k)]
               for k in range(6)]
    pipes = {role: _SPAWN.Pipe() for role in ("prefill", "decode")}
    procs = [_SPAWN.Process(target=_worker_main, args=(endpoint, role, prompts, child))
             for role, (_, child) in pipes.items()]
    for p in procs:
        p.start()
    pre, dec = pipes["prefill"][0], pipes["decode"][0]
    assert recv_reply(pre) == {"prefilled": len(prompts)}
    dec.send("go")
    assert recv_reply(dec)["hits"] == [len(p) // 4 * 4 for p in prompts]
    pre.send("go")
    dec.send("go")
    assert recv_reply(pre) == recv_reply(dec) == {"goodbye": [0, 0]}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0, f"worker exit code {p.exitcode}"
    report = assert_clean(sup)
    assert report.evictable > 0 and report.free + report.evictable == CAPACITY


@pytest.mark.parametrize("page_size", [1, 4])
def test_decode_fast_path_round_trips(servers, page_size: int) -> None:
    endpoint, sup = fresh(servers, page_size)
    block, batch, steps = 64, 8, 48
    side = remote_side(endpoint, "fast", role="decode", paged_api=True, lease_block=block)
    reqs = [side.new_req(f"f{i}", [3000 + 40 * i + j for j in range(9)]) for i in range(batch)]
    for q in reqs:
        side.admit(q)
        side.prefill(q, len(q.origin_input_ids), 1)
    counter = CountingClient(side.alloc.client)
    for step in range(steps):
        side.decode(reqs, [step] * batch)
    tokens = steps * batch if page_size == 1 else \
        sum(_new_pages(q, steps) for q in reqs) * page_size
    bound = -(-tokens // block) + 1
    assert counter.counts.get("Lease", 0) == sum(counter.counts.values()) <= bound, bound
    counter.counts.clear()
    side.finish(reqs)  # per request Insert + DecLockRef; all frees in one Free
    frees = counter.counts.pop("Free", 0)  # none when every row ends page-aligned
    assert counter.counts == {"Insert": batch, "DecLockRef": batch} and frees == (page_size > 1)
    bye = close_remote(side)
    assert (bye.freed_tokens, bye.dropped_locks) == (0, 0)
    assert_clean(sup)


def test_available_plus_evictable_never_exceeds_the_pool(servers) -> None:
    """SGLang computes ``used = size - (available + evictable)`` from two estimates and, with
    --enable-metrics, asserts ``used >= 0`` (a decode worker died of ``usage=-0.00031`` on
    the H100). An over-estimate of the free count (here: a stale correction) must not make
    the sum exceed the pool."""
    endpoint, sup = fresh(servers, 1)
    side = remote_side(endpoint, "sum")
    reqs = [side.new_req(f"s{i}", [5000 + 30 * i + j for j in range(20)]) for i in range(4)]
    for q in reqs:
        side.admit(q)
        side.prefill(q, len(q.origin_input_ids), 1)
    side.finish(reqs)  # 80 tokens now evictable in the shared tree
    side.alloc.refresh_stats()
    assert side.tree.evictable_size() == 80
    assert side.alloc.available_size() + side.tree.evictable_size() <= side.alloc.size
    side.alloc.note_server_free(60)  # an over-estimate of what this worker freed
    total = side.alloc.available_size() + side.tree.evictable_size()
    assert total <= side.alloc.size and side.tree.evictable_size() == 20
    side.alloc.refresh_stats()
    assert side.tree.evictable_size() == 80  # the true count again after a refresh
    close_remote(side)
    sup.reset()
    assert_clean(sup)


def _new_pages(q: Req, steps: int) -> int:
    """Pages started by the last ``steps`` decode positions of ``q``."""
    return sum(1 for p in range(q.filled - steps, q.filled) if p % 4 == 0)


def test_stale_node_and_allocator_contracts(servers) -> None:
    endpoint, sup = fresh(servers, 1)
    a = remote_side(endpoint, "a", lease_block=16)
    b = remote_side(endpoint, "b", lease_block=16)
    q = a.new_req("s0", list(range(500, 540)))
    a.admit(q)
    a.prefill(q, 40, 1)
    a.finish([q])
    m = b.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", range(500, 540)))))
    assert len(m.device_indices) == 40 and not m.last_device_node.is_root
    assert a.tree.evict(EvictParams(num_tokens=CAPACITY)).num_tokens_evicted == 40
    with pytest.raises(StaleNodeError):
        b.tree.inc_lock_ref(m.last_device_node)
    alloc = a.alloc
    small = alloc.alloc(3)
    assert small.dtype == torch.int64 and alloc.leased_available == 13
    big = alloc.alloc(100)
    before = alloc.available_size()
    alloc.free(big)  # buffered: counted locally, not yet on the server
    alloc.free(small)
    assert alloc.pending_free_tokens == 103 and alloc.available_size() == before + 103
    assert sup.stats().client_held[alloc.client.client_id] == 116
    assert alloc.flush() == 103 and alloc.pending_free_tokens == 0
    assert alloc.alloc(CAPACITY * 2) is None
    for call in [lambda: alloc.get_cpu_copy(None), lambda: alloc.resize(None),
                 alloc.backup_state, a.tree.all_values_flatten]:
        with pytest.raises(NotImplementedError):
            call()
    for side in (a, b):
        close_remote(side)
    assert_clean(sup)


def test_create_tree_cache_with_semipd_backend(servers) -> None:
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext, create_tree_cache

    endpoint, sup = fresh(servers, 4)
    side = remote_side(endpoint, "built")
    calls: list[Any] = []

    def factory(ctx: Any) -> KVStateClient:
        calls.append(ctx)
        return side.alloc.client

    register_semipd_radix_backend(lambda ctx: None)
    register_semipd_radix_backend(factory)  # idempotent: re-points the factory
    server_args = SimpleNamespace(radix_cache_backend=BACKEND_NAME,
                                  enable_session_radix_cache=False,
                                  enable_streaming_session=False)

    def ctx(alloc: Any) -> TreeCacheBuildContext:
        params = CacheInitParams(disable=False, req_to_token_pool=side.pool,
                                 token_to_kv_pool_allocator=alloc, page_size=4)
        return TreeCacheBuildContext(server_args, params, False, False, False, False, None,
                                     None, None, 1, 0, None)

    cache = create_tree_cache(ctx(side.alloc))
    assert isinstance(cache, RemoteRadixCache) and calls
    assert cache.client is side.alloc.client and cache.page_size == 4
    assert cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [1, 2, 3, 4, 5])))
                              ).last_device_node is cache.root_node
    local = PagedTokenToKVPoolAllocator(64, 4, torch.bfloat16, "cpu", None, False)
    with pytest.raises(TypeError):
        create_tree_cache(ctx(local))
    close_remote(side)
    assert_clean(sup)


def test_a_refused_allocation_waits_for_the_other_worker_when_asked(servers) -> None:
    """Two workers allocate from one pool, so an allocation the estimate allowed can be
    refused (the prefill worker died of this on the H100: ``available=513`` estimated, 8
    free). With ``oom_wait_s`` the prefill worker's allocation waits until the decode
    worker frees; without it (the decode worker's default) it is refused at once."""
    endpoint, sup = fresh(servers, 1)
    prefill = remote_side(endpoint, "p", oom_wait_s=5.0)
    decode = remote_side(endpoint, "d")
    held = decode.alloc.alloc(CAPACITY - 50)
    assert held is not None and decode.alloc.alloc(200) is None  # no wait: refused now
    assert decode.alloc.oom_waits == 0

    def free_later() -> None:
        time.sleep(0.3)
        decode.alloc.free(held[:400])
        decode.alloc.flush()

    t = threading.Thread(target=free_later)
    t0 = time.monotonic()
    t.start()
    got = prefill.alloc.alloc(200)
    waited = time.monotonic() - t0
    t.join()
    assert got is not None and len(got) == 200
    assert 0.25 <= waited < 4.0, waited
    assert prefill.alloc.oom_waits == 1 and prefill.alloc.oom_wait_total_s >= 0.25
    prefill.alloc.free(got)
    decode.alloc.free(held[400:])
    for side in (prefill, decode):
        close_remote(side)
    assert_clean(sup)


def test_a_wait_that_nobody_ends_is_refused_after_oom_wait_s(servers, caplog) -> None:
    endpoint, sup = fresh(servers, 1)
    side = remote_side(endpoint, "p", oom_wait_s=0.2)
    held = side.alloc.alloc(CAPACITY - 8)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="sglang_semipd.memory.remote_allocator"):
        assert side.alloc.alloc(100) is None
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert "still refused after waiting" in caplog.text
    last = side.alloc.alloc(8)  # an exact fit is granted at once
    assert last is not None and len(last) == 8
    side.alloc.free(held)
    side.alloc.free(last)
    close_remote(side)
    assert_clean(sup)


@pytest.mark.parametrize("tight", [True, False])
def test_a_nearly_full_pool_refreshes_the_free_count_sooner(servers, tight: bool) -> None:
    """Below ``tight_free_tokens`` the last ``Stats`` is trusted for only
    ``tight_stats_max_age_s``, so the other worker's allocations show up within ms."""
    endpoint, sup = fresh(servers, 1)
    watcher = remote_side(endpoint, "w", stats_max_age_s=30.0, tight_stats_max_age_s=0.005,
                          tight_free_tokens=CAPACITY + 1 if tight else 0)
    other = remote_side(endpoint, "o")
    assert watcher.alloc.available_size() == CAPACITY
    held = other.alloc.alloc(1000)
    time.sleep(0.02)
    seen = watcher.alloc.available_size()
    assert seen == (CAPACITY - 1000 if tight else CAPACITY)
    other.alloc.free(held)
    for side in (watcher, other):
        close_remote(side)
    assert_clean(sup)


def test_secure_makes_the_next_decode_allocation_local(servers) -> None:
    """``secure(n)`` leases ahead, so the decode step's allocation (even one larger than
    ``small_alloc_max``) needs no server call and cannot be refused after SGLang's check."""
    endpoint, sup = fresh(servers, 1)
    side = remote_side(endpoint, "d", lease_block=64)
    counting = CountingClient(side.alloc.client)
    assert side.alloc.secure(200) and side.alloc.leased_available >= 200
    before = dict(counting.counts)
    got = side.alloc.alloc(200)  # > small_alloc_max (32): would be an Alloc round trip
    assert got is not None and len(got) == 200 and counting.counts == before
    assert side.alloc.secure(0) and counting.counts == before
    side.alloc.free(got)
    close_remote(side)
    assert_clean(sup)


def _decode_and_prefill(servers) -> tuple:
    """(decode, prefill, supervisor) on a fresh pool: a decode side with 64-token leases that
    trusts its free count until told (a stale estimate, as between two refreshes), and a
    prefill side that takes slots behind its back."""
    endpoint, sup = fresh(servers, 1)
    decode = remote_side(endpoint, "d", lease_block=64, stats_max_age_s=30.0,
                         tight_free_tokens=0)
    return decode, remote_side(endpoint, "p"), sup


def _close_all(sup, *sides) -> None:
    for side in sides:
        close_remote(side)
    assert_clean(sup)


def test_secure_uses_the_lease_remainder_and_says_no_when_the_pool_cannot(servers) -> None:
    decode, prefill, sup = _decode_and_prefill(servers)
    small = decode.alloc.alloc(14)  # opens a 64-token lease: 50 left in it
    assert decode.alloc.leased_available == 50
    held = prefill.alloc.alloc(CAPACITY - 64 - 70)  # the server keeps 70 free
    assert decode.alloc.available_size() > 100  # stale: does not know about the 4k just taken
    # 100 > 70 free, but the lease's 50 handed back make 120: one lease of 100 fits
    assert decode.alloc.secure(100) and decode.alloc.leased_available == 100
    assert decode.alloc.secure(150) is False  # 20 free + 100 leased: refused ...
    assert decode.alloc.available_size() < 150  # ... and the estimate is fresh: SGLang retracts
    assert decode.alloc.leased_available == 100  # what it held is kept
    decode.alloc.free(small)
    prefill.alloc.free(held)
    _close_all(sup, decode, prefill)


def test_secure_up_to_leases_what_the_pool_has_and_admission_sees_no_more(servers) -> None:
    """Before re-prefilling retracted requests the decode worker leases what that pass may
    allocate; a pool short of it gives what it has, and the estimate is fresh afterwards."""
    decode, prefill, sup = _decode_and_prefill(servers)
    assert decode.alloc.secure_up_to(300) >= 300  # room: the whole bound
    taken = decode.alloc.alloc(300)  # served from the lease
    held = prefill.alloc.alloc(CAPACITY - 300 - 120)  # 120 left free on the server
    assert decode.alloc.available_size() > 1000  # stale until the next refresh
    assert decode.alloc.secure_up_to(500) == 120  # all the pool has, not the bound
    assert decode.alloc.available_size() == 120  # fresh: SGLang admits no more than that
    got = decode.alloc.alloc(120)
    assert got is not None and len(got) == 120
    assert decode.alloc.secure_up_to(10) == 0  # nothing left: nothing leased, no raise
    for t in (taken, got):
        decode.alloc.free(t)
    prefill.alloc.free(held)
    _close_all(sup, decode, prefill)


def test_a_large_allocation_takes_the_lease_and_the_rest_from_the_server(servers) -> None:
    """Slots leased ahead count in ``available_size`` but are no longer free on the server:
    an allocation larger than the lease that the server alone cannot give is served from
    both (SGLang admitted it against that estimate and raises on None)."""
    decode, prefill, sup = _decode_and_prefill(servers)
    assert decode.alloc.secure(100, ahead=1) and decode.alloc.leased_available == 100
    held = prefill.alloc.alloc(CAPACITY - 100 - 60)  # 60 free on the server
    decode.alloc.refresh_stats()
    assert decode.alloc.available_size() == 160
    got = decode.alloc.alloc(150)  # > small_alloc_max and > the lease: both are needed
    assert got is not None and len(got) == 150 and len(set(got.tolist())) == 150
    assert decode.alloc.leased_available == 0
    assert decode.alloc.alloc(40) is None  # 10 left: refused, and the lease is not touched
    decode.alloc.free(got)
    prefill.alloc.free(held)
    _close_all(sup, decode, prefill)


def test_refusals_are_counted_and_summarised_not_logged_one_by_one(servers, caplog) -> None:
    """A nearly full pool refuses the decode worker's lease at every step: one summary line
    per ``REFUSAL_LOG_S``, not one line per refusal."""
    endpoint, sup = fresh(servers, 1)
    side = remote_side(endpoint, "d", lease_block=64)
    held = side.alloc.alloc(CAPACITY - 10)
    with caplog.at_level("INFO", logger="sglang_semipd.memory.remote_allocator"):
        for _ in range(30):
            assert side.alloc.secure(64) is False
    assert side.alloc.refusals >= 30
    summaries = [r for r in caplog.records if "allocations refused" in r.getMessage()]
    assert len(summaries) == 1, [r.getMessage() for r in caplog.records]
    side.alloc.free(held)
    close_remote(side)
    assert_clean(sup)


def test_gated_frees_and_rows_reach_the_manager_only_after_their_forward(servers) -> None:
    """Under the overlap loop the decode worker frees slots and rows that the forward in
    flight still writes: the memory manager (and so the prefill worker) must not get them
    back before that forward's event, and everything goes back at ``close`` / ``clear``."""
    from sglang_semipd.memory.remote_req_pool import adopt_req_pool
    from sglang_semipd.testing.gate import ManualGate as Gate

    endpoint, sup = fresh(servers, 1)
    side = remote_side(endpoint, "d", lease_block=64)
    alloc, client = side.alloc, side.alloc.client
    rows = adopt_req_pool(_pool(), client, stats_max_age_s=0.0)
    in_flight: dict[str, Any] = {"gate": None}
    alloc.free_gate = rows.free_gate = lambda: in_flight["gate"]

    def held() -> tuple[int, int]:
        r = sup.check_invariant()
        return r.client_held.get(client.client_id, 0), r.req_rows_held.get(client.client_id, 0)

    slots = alloc.alloc(100)  # more than small_alloc_max: straight from the server
    reqs = [SimpleNamespace(req_pool_idx=None) for _ in range(3)]
    assert rows.alloc(reqs) is not None
    start = held()
    assert start == (100, 3)

    first = Gate()
    in_flight["gate"] = first
    alloc.free_group_begin()
    alloc.free(slots[:40])
    alloc.free_group_end()  # a free group's end passes on only what is ready
    rows.free(reqs[0])
    assert rows.flush_rows() == 0 and alloc.release_ready() == 0
    assert held() == start
    assert alloc.pending_free_tokens == 40  # counted as this worker's to allocate
    first.done = True  # the forward that could still write them has completed
    assert alloc.release_ready() == 40 and rows.flush_rows() == 1
    assert held() == (60, 2)

    second = Gate()
    in_flight["gate"] = second
    alloc.free(slots[40:])
    rows.free(reqs[1])
    rows.free(reqs[2])
    rows.clear()  # flush_cache / retire: waits for the gate, then gives the rows back
    close_remote(side)  # ... and the slots
    assert second.waits >= 1 and held() == (0, 0)
    assert_clean(sup)


def test_secure_leases_several_steps_ahead(servers) -> None:
    """A decode batch larger than the lease block: ``secure`` leases ``secure_ahead`` steps at
    once, so the next steps need no round trip; a pool that cannot give that much still gives
    the one step."""
    endpoint, sup = fresh(servers, 1)
    side = remote_side(endpoint, "d", lease_block=64, secure_ahead=4)
    counting = CountingClient(side.alloc.client)
    assert side.alloc.secure(200) and side.alloc.leased_available == 800
    before = dict(counting.counts)
    steps = []
    for _ in range(4):  # each decode step secures, then allocates one slot per request
        assert side.alloc.secure(200)
        steps.append(side.alloc.alloc(200))
    assert counting.counts == before and side.alloc.leased_available == 0
    other = remote_side(endpoint, "p")
    hog = other.alloc.alloc(CAPACITY - 800 - 300)  # 300 left: not 4 steps, but one
    assert side.alloc.secure(200) and 200 <= side.alloc.leased_available < 800
    for t in steps:
        side.alloc.free(t)
    other.alloc.free(hog)
    _close_all(sup, side, other)


# ------------------------------------------------------------------ prefill hand-off
HAND_OFF_PROMPTS = {
    "hit": list(range(2000, 2024)) + [7, 8, 9],  # admitted on a cached, locked prefix
    "fresh": list(range(3000, 3013)),
    "twin": list(range(3000, 3013)),  # the same prompt in the same batch: its slots duplicate
    "chunked": list(range(4000, 4030)),  # its first chunk was cached (and locked) before
    "tail": list(range(5000, 5011)),  # not page-aligned at page size 4
}


def _hand_off_run(servers, page_size: int, batched: bool) -> tuple[dict, dict]:
    """One prefill batch handed to a decode client, the old way (``cache_unfinished_req``
    then one ``Transfer`` per request) or batched (``defer_unfinished`` + ``hand_off``);
    returns (what each request, the tree and each client hold after it, the prefill
    client's round trips during the batch)."""
    p, dec, sup = _prefill_and_decode_client(servers, page_size, f"hand{int(batched)}")
    warm = p.new_req("warm", HAND_OFF_PROMPTS["hit"][:24])
    p.admit(warm)
    p.prefill(warm, 24, 1)
    p.finish([warm])
    batch = []
    for rid, prompt in HAND_OFF_PROMPTS.items():
        q = p.new_req(rid, prompt)
        p.admit(q)
        batch.append(q)
    chunked = batch[3]
    p.prefill(chunked, 16, None)
    assert batch[0].cache_protected_len == 24 and chunked.cache_protected_len == 16
    counter = CountingClient(p.alloc.client)
    if batched:
        p.tree.defer_unfinished(batch)
    for i, q in enumerate(batch):  # SGLang's prefill result loop
        p.prefill(q, len(q.origin_input_ids), 11 + i)
        q.kv_committed_len = len(q.origin_input_ids)
    if batched:
        p.tree.hand_off(batch, "decode")
    else:
        for q in batch:
            row, cpl = q.req_pool_idx, q.cache_protected_len
            node = q.last_node
            p.alloc.client.transfer(0, p.pool.req_to_token[row, cpl:q.kv_committed_len],
                                    [row], [] if node.is_root else [node.id],
                                    to_role="decode")
    calls = dict(counter.counts)
    p.alloc.flush()
    held = {}
    for q in batch:
        row, key = q.req_pool_idx, q.cache_protected_len
        kv = p.pool.req_to_token[row, :q.kv_committed_len].tolist()
        m = dec.match_prefix(q.origin_input_ids[:key])
        assert m.prefix_len == key and kv[:key] == list(m.indices), q.rid  # names the tree's
        held[q.rid] = (key, q.last_node.prefix_len, q.last_node.is_root,
                       len(kv) - key, len(set(kv)))
    report = sup.stats()
    ids = {p.alloc.client.client_id: "prefill", dec.client_id: "decode"}
    held["pool"] = (report.free, report.evictable, report.protected, report.lock_refs,
                    {ids[c]: n for c, n in report.client_held.items()},
                    {ids[c]: n for c, n in report.req_rows_held.items()})
    _release_handed_off(p, dec, sup, batch)
    return held, calls


def _prefill_and_decode_client(servers, page_size: int, name: str) -> tuple:
    """(prefill side on the manager's request rows, decode client, supervisor), fresh pool."""
    from sglang_semipd.memory.remote_req_pool import adopt_req_pool

    endpoint, sup = fresh(servers, page_size)
    p = remote_side(endpoint, f"{name}-p", role="prefill")
    adopt_req_pool(p.pool, p.alloc.client)
    return p, KVStateClient(endpoint, f"{name}-d", role="decode", timeout_s=30), sup


def _release_handed_off(p: Side, dec: KVStateClient, sup: KVStateClient, reqs: list) -> None:
    """What the decode worker does with handed-off requests, then both leave: each one's
    tail and row freed, its lock dropped; nothing may be left held."""
    for q in reqs:
        row, key = q.req_pool_idx, q.cache_protected_len
        dec.free(array("q", p.pool.req_to_token[row, key:q.kv_committed_len].tolist()))
        if not q.last_node.is_root:
            dec.dec_lock_ref(q.last_node.id)
        dec.free_req_rows([row])
    dec.goodbye()
    dec.close()
    close_remote(p)
    assert_clean(sup)


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_batched_hand_off_leaves_what_the_per_request_one_did(servers, page_size) -> None:
    """The prefill worker's hand-off of a batch in one ``PrefillHandOff`` against the
    per-request ``cache_unfinished_req`` + ``Transfer`` it replaces (2-4 round trips per
    request): the same prefixes cached and locked, the same rows naming the tree's slots,
    the same tails, the same holdings per client; one round trip."""
    old, old_calls = _hand_off_run(servers, page_size, batched=False)
    new, new_calls = _hand_off_run(servers, page_size, batched=True)
    assert new == old
    assert old["twin"][0] == old["fresh"][0] > 0  # the twin adopted the fresh one's slots
    tails = sum(-(-v[3] // page_size) * page_size for k, v in old.items() if k != "pool")
    assert old["pool"][4].get("decode", 0) == tails and (tails > 0) == (page_size > 1)
    assert old["pool"][5] == {"decode": len(HAND_OFF_PROMPTS)}
    assert old_calls["Insert"] == len(HAND_OFF_PROMPTS) and old_calls["Transfer"] == 5
    assert old_calls.get("MatchPrefix", 0) >= 1 and old_calls["DecLockRef"] >= 2
    assert new_calls["PrefillHandOff"] == 1
    assert not {"Insert", "MatchPrefix", "DecLockRef", "Transfer"} & set(new_calls)


def test_a_hand_off_without_a_cached_prefix_moves_the_held_lock(servers) -> None:
    """A request whose ``cache_unfinished_req`` did not run (SGLang's
    ``skip_radix_cache_insert``, or a disabled tree): its row, its slots past the protected
    prefix and the lock it holds from admission move; nothing is inserted."""
    p, dec, sup = _prefill_and_decode_client(servers, 1, "skip")
    warm = p.new_req("warm", list(range(600, 620)))
    p.admit(warm)
    p.prefill(warm, 20, 1)
    p.finish([warm])
    q = p.new_req("q", list(range(600, 620)) + [1, 2, 3])
    assert p.admit(q) == 20
    row = q.req_pool_idx
    p.pool.write((row, slice(20, 23)), p._extend_slots(q, 20, 23))
    q.kv_committed_len = 23
    p.tree.defer_unfinished([q])  # nothing deferred: the result loop never cached it
    p.tree.hand_off([q], "decode")
    assert q.cache_protected_len == 20 and q.last_node.prefix_len == 20
    p.alloc.flush()
    report = sup.stats()
    assert report.client_held[dec.client_id] == 3 and report.req_rows_held == {dec.client_id: 1}
    assert report.lock_refs == 1 and report.protected == 20
    _release_handed_off(p, dec, sup, [q])
