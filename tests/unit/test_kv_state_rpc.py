"""Memory-manager RPC end to end: real processes, real ZeroMQ (ipc://).

One server process (spawned once per module: importing SGLang costs ~10-15 s)
serves every test; each test ends with nothing held (``Reset`` succeeds).
Client processes import neither torch nor SGLang.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from array import array
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest
import zmq

from sglang_semipd import protocol as P
from sglang_semipd.memory.client import KVStateClient, KVStateTimeout
from sglang_semipd.memory.rpc import KVStateServerConfig, run_kv_state_server
from sglang_semipd.testing.procs import wait_for_kv_server

CAPACITY = 256
PREFIXES = [list(range(1000 + 40 * k, 1000 + 40 * k + 16 + 8 * k)) for k in range(4)]
PREFIXES.append(PREFIXES[0][:10] + list(range(3000, 3012)))  # shares 10 tokens with #0
_SPAWN = mp.get_context("spawn")


# --------------------------------------------------------------- worker side
class _Hammer:
    """One simulated worker: requests (match+lock, alloc, decode from a lease,
    insert, free duplicates, unlock) interleaved at random; logs every interval
    during which it held an index (``excl``: allocated/leased; ``shared``: a
    locked tree prefix).  Start times are taken after the reply arrives and end
    times before the release is sent, so a correct server makes intervals of
    different holders disjoint."""

    def __init__(self, endpoint: str, name: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.c = KVStateClient(endpoint, name, role="decode", timeout_s=60)
        self.excl: dict[int, float] = {}
        self.log: dict[str, list] = {"excl": [], "shared": [], "rows": [], "violations": []}
        self.stats: dict[str, int] = defaultdict(int)
        self.active: list[dict] = []
        self.lease = None

    def _gain(self, idx) -> None:
        now = time.monotonic()
        for i in idx:
            if i in self.excl:
                self.log["violations"].append(f"index {i} handed to {self.c.name} twice")
            self.excl[i] = now

    def _drop(self, idx) -> None:
        now = time.monotonic()
        for i in idx:
            self.log["excl"].append((i, self.excl.pop(i), now))

    def start(self) -> None:
        rng, c = self.rng, self.c
        tokens = rng.choice(PREFIXES) + [rng.randrange(6) for _ in range(rng.randrange(20))]
        if rng.random() < 0.7:
            m = c.match_prefix(tokens, lock=True)
        else:  # separate lock call: the node may be evicted in between
            m = c.match_prefix(tokens)
            try:
                c.inc_lock_ref(m.node)
            except P.KVStateError as exc:
                assert exc.code == P.ErrorCode.UNKNOWN_NODE, exc
                self.stats["stale_handles"] += 1
                return
        t0 = time.monotonic()
        self.stats["prefix_hits"] += m.prefix_len > 0
        try:
            own = c.alloc(len(tokens) - m.prefix_len)
        except P.KVStateError as exc:
            assert exc.code == P.ErrorCode.OUT_OF_MEMORY, exc
            self.stats["oom"] += 1
            self._unlock(m, t0)
            return
        self._gain(own)
        rows = c.alloc_req_rows(1)
        self.active.append(dict(tokens=tokens, m=m, t0=t0, own=list(own),
                                rows=(rows, time.monotonic())))

    def _unlock(self, m, t0: float) -> None:
        self.log["shared"].append((list(m.indices), t0, time.monotonic()))
        self.c.dec_lock_ref(m.node)

    def decode(self, req: dict) -> None:
        """Decode steps take slots from a local lease: no round trip per token."""
        k = self.rng.randrange(1, 5)
        if self.lease is None or self.lease.available < k:
            self._close_lease()
            try:
                self.lease = self.c.lease(24)
            except P.KVStateError as exc:
                assert exc.code == P.ErrorCode.OUT_OF_MEMORY, exc
                self.lease = None
                return
            self._gain(self.lease.indices)
        taken = self.lease.take(k)
        if self.rng.random() < 0.1:  # speculative slots not needed after all
            self.lease.give_back(taken)
            taken = self.lease.take(k)
        req["own"].extend(taken)
        req["tokens"].extend(self.rng.randrange(6) for _ in range(k))
        self.stats["decode_steps"] += 1

    def _close_lease(self) -> None:
        if self.lease is not None and not self.lease.closed:
            self._drop(self.lease.remaining())
            self.lease.return_unused()
            self.stats["leases"] += 1

    def finish(self, req: dict, insert: bool) -> None:
        c, m, own = self.c, req["m"], req["own"]
        self._drop(own)
        if insert:
            values = list(m.indices) + own
            res = c.insert(req["tokens"], values)
            dups = own[:max(0, res.prefix_len - m.prefix_len)]
            self._gain(dups)
            self._drop(dups)
            if dups:
                c.free(dups[:1], dups[1:])
            self.stats["dup_slots"] += len(dups)
        else:
            c.free(own)
        rows, t_rows = req["rows"]
        self.log["rows"].append((rows, t_rows, time.monotonic()))
        c.free_req_rows(rows)
        self._unlock(m, req["t0"])
        self.stats["requests"] += 1

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.3 and len(self.active) < 3:
            self.start()
        elif r < 0.75 and self.active:
            self.decode(self.rng.choice(self.active))
        elif r < 0.97 and self.active:
            req = self.active.pop(self.rng.randrange(len(self.active)))
            self.finish(req, insert=self.rng.random() < 0.85)
        elif r >= 0.97:
            report = self.c.check_invariant()
            if not report.ok:
                self.log["violations"].append(f"invariant: {report.errors}")
            self.stats["checks"] += 1

    def drain(self) -> dict:
        while self.active:
            self.finish(self.active.pop(), insert=True)
        self._close_lease()
        bye = self.c.goodbye()
        return {"freed_tokens": bye.freed_tokens, "dropped_locks": bye.dropped_locks,
                "freed_rows": bye.freed_rows}


def _hammer_main(endpoint: str, name: str, seed: int, duration_s: float, out: str) -> None:
    worker = _Hammer(endpoint, name, seed)
    Path(out + ".cid").write_text(str(worker.c.client_id))
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        worker.step()
    leftovers = worker.drain()
    Path(out).write_text(json.dumps({**worker.log, "stats": worker.stats, "goodbye": leftovers}))


def _holder_main(endpoint: str, out: str) -> None:
    """Grabs a bit of everything, reports its client id, then hangs (to be killed)."""
    c = KVStateClient(endpoint, "doomed", role="prefill", timeout_s=60)
    tokens = PREFIXES[1]
    own = c.alloc(len(tokens))
    c.insert(tokens, own)
    c.match_prefix(tokens + [1, 2], lock=True)
    c.alloc(7)
    c.lease(16).take(3)
    c.alloc_req_rows(2)
    Path(out).write_text(str(c.client_id))
    time.sleep(600)


# ---------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sock_dir = tmp_path_factory.mktemp("kv")
    endpoint = f"ipc://{sock_dir}/kv.sock"
    config = KVStateServerConfig(endpoint, CAPACITY, page_size=1, req_rows=16,
                                 log_level="WARNING")
    proc = _SPAWN.Process(target=run_kv_state_server, args=(config,), daemon=True)
    proc.start()
    supervisor = KVStateClient(endpoint, "supervisor", role="supervisor", timeout_s=15,
                               register=False)
    wait_for_kv_server(supervisor, proc)
    yield endpoint, supervisor, proc
    try:
        supervisor.shutdown()
    finally:
        supervisor.close()
        proc.join(15)
        if proc.is_alive():
            proc.kill()


def _assert_clean(supervisor: KVStateClient) -> None:
    report = supervisor.check_invariant()
    assert report.ok, report.errors
    assert report.free + report.evictable + report.in_use == report.capacity == CAPACITY
    assert report.client_held == {} and report.leased == 0
    assert report.protected == 0 and report.lock_refs == 0 and report.req_rows_held == {}
    supervisor.reset()  # refused (BUSY) if anything at all were still held
    assert supervisor.stats().free == CAPACITY


def _conflicts(logs: list[dict], kind: str, shared: str | None = None) -> list[str]:
    """Pairs of overlapping hold intervals on one index where either is exclusive."""
    by_idx: dict[int, list] = defaultdict(list)
    for who, log in enumerate(logs):
        for idx, start, end in log[kind]:
            for i in (idx if isinstance(idx, list) else [idx]):
                by_idx[i].append((start, end, who, True))
        for idx, start, end in log.get(shared, []) if shared else []:
            for i in idx:
                by_idx[i].append((start, end, who, False))
    bad = []
    for i, spans in by_idx.items():
        spans.sort()
        for a, (start, end, who, excl) in enumerate(spans):
            b = a + 1
            while b < len(spans) and spans[b][0] < end:
                if excl or spans[b][3]:
                    bad.append(f"{kind} {i}: holder {who} [{start}, {end}) vs "
                               f"{spans[b][2]} from {spans[b][0]}")
                b += 1
    return bad


def test_two_worker_processes_never_share_a_slot(server, tmp_path) -> None:
    endpoint, supervisor, _ = server
    outs = [str(tmp_path / f"w{i}.json") for i in range(2)]
    procs = [_SPAWN.Process(target=_hammer_main, args=(endpoint, f"w{i}", 1234 + i, 4.0, out))
             for i, out in enumerate(outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0, f"worker exit code {p.exitcode}"
    logs = [json.loads(Path(out).read_text()) for out in outs]
    for log in logs:
        assert log["violations"] == []
        assert log["goodbye"] == {"freed_tokens": 0, "dropped_locks": 0, "freed_rows": 0}
        st = log["stats"]
        assert st["requests"] > 20 and st["decode_steps"] > 20 and st["leases"] > 0
        assert st["prefix_hits"] > 0 and st["checks"] > 0
    assert sum(log["stats"].get("dup_slots", 0) for log in logs) > 0  # insert races happened
    assert _conflicts(logs, "excl", "shared") == []
    assert _conflicts(logs, "rows") == []
    _assert_clean(supervisor)


def test_conflict_checker_flags_overlaps() -> None:
    a = {"excl": [(5, 1.0, 2.0)], "shared": [([7], 1.0, 3.0)]}
    b = {"excl": [(5, 2.0, 3.0), (7, 2.5, 2.6)], "shared": [([5], 1.5, 1.6)]}
    assert len(_conflicts([a, b], "excl", "shared")) == 2
    assert _conflicts([a, {"excl": [], "shared": [([7], 0.0, 9.0)]}], "excl", "shared") == []


def _raw(endpoint: str, ctx: zmq.Context, kind: int = zmq.DEALER) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 15000)
    sock.connect(endpoint)
    return sock


def _ask(sock: zmq.Socket, frames: list[bytes]) -> object:
    sock.send_multipart(frames)
    return P.decode(sock.recv_multipart())[0]


def _header(**over: object) -> bytes:
    base = {"v": P.PROTOCOL_VERSION, "seq": 3, "bufs": [], "msg": {"type": "Stats"}}
    base.update(over)
    return msgspec.msgpack.encode(base)


BAD_FRAMES = [
    ([b"\xc1garbage"], P.ErrorCode.BAD_MESSAGE),
    ([os.urandom(64)], None),
    ([_header(v=P.PROTOCOL_VERSION + 7)], P.ErrorCode.VERSION),
    ([_header(msg={"type": "Teleport"})], P.ErrorCode.UNKNOWN_TYPE),
    ([_header(msg={"type": "OkReply"})], P.ErrorCode.UNKNOWN_TYPE),
    ([_header(msg={"type": "Alloc", "sizes": [-3]})], P.ErrorCode.BAD_MESSAGE),
    ([_header(bufs=[["i8", 2], ["i8", 2]], msg={"type": "Insert"}), b"\0" * 16],
     P.ErrorCode.TRUNCATED),
    ([_header(bufs=[["i8", 4]], msg={"type": "MatchPrefix"}), b"\0" * 31], P.ErrorCode.TRUNCATED),
    ([_header(), b"extra"], P.ErrorCode.BAD_FRAMES),
    (P.encode(P.Free(), [1]), P.ErrorCode.NOT_REGISTERED),
]


def test_bad_messages_get_error_replies_and_server_keeps_serving(server) -> None:
    endpoint, supervisor, proc = server
    ctx = zmq.Context.instance()
    sock = _raw(endpoint, ctx)
    for frames, code in BAD_FRAMES:
        reply = _ask(sock, frames)
        assert isinstance(reply, P.ErrorReply), reply
        assert code is None or reply.code == code, (frames[:1], reply)
    req = _raw(endpoint, ctx, zmq.REQ)  # REQ's empty delimiter is handled too
    assert isinstance(_ask(req, P.encode(P.Stats())), P.InvariantReport)
    req.close()
    cid = _ask(sock, P.encode(P.Hello(name="raw"))).client_id
    other = supervisor.alloc(2)
    mine = KVStateClient(endpoint, "raw-typed", timeout_s=15)
    got = mine.alloc(2)
    for msg, bufs, code in [
        (P.Free(), ([0],), P.ErrorCode.INVALID_INDICES),
        (P.Free(), ([CAPACITY + 10],), P.ErrorCode.INVALID_INDICES),
        (P.Free(), ([-1],), P.ErrorCode.INVALID_INDICES),
        (P.Free(), ([other[0]],), P.ErrorCode.NOT_OWNED),
        (P.Free(), ([got[0]],), P.ErrorCode.NOT_OWNED),
        (P.IncLockRef(node=10 ** 9), (), P.ErrorCode.UNKNOWN_NODE),
        (P.DecLockRef(node=0), (), P.ErrorCode.NOT_LOCKED),
        (P.Insert(), ([1, 2, 3], [other[0]]), P.ErrorCode.BAD_REQUEST),
        (P.Insert(), ([7], [other[0]]), P.ErrorCode.NOT_OWNED),
        (P.ReturnLease(lease_id=99), ([],), P.ErrorCode.UNKNOWN_LEASE),
        (P.FreeReqRows(rows=[1]), (), P.ErrorCode.DOUBLE_FREE),
        (P.Alloc(sizes=[CAPACITY + 1]), (), P.ErrorCode.OUT_OF_MEMORY),
        (P.ReleaseClient(client_id=10 ** 6), (), P.ErrorCode.UNKNOWN_CLIENT),
        (P.Reset(), (), P.ErrorCode.BUSY),
    ]:
        reply = _ask(sock, P.encode(msg, *bufs, seq=11))
        assert isinstance(reply, P.ErrorReply) and reply.code == code, (msg, reply)
    sock.send_multipart(P.encode(P.Alloc(sizes=[2, 1])))
    reply, (two, one) = P.decode(sock.recv_multipart())
    assert reply.sizes == [2, 1] and len(two) == 2 and len(one) == 1
    assert _ask(sock, P.encode(P.Free())).freed == 0  # an empty batch is fine
    assert _ask(sock, P.encode(P.Free(), array("i", one))).freed == 1  # int32 buffers too
    with pytest.raises(P.KVStateError) as info:  # double free through the typed client
        mine.free(got)
        mine.free(got)
    assert info.value.code == P.ErrorCode.DOUBLE_FREE
    assert supervisor.check_invariant().ok
    assert supervisor.free(other) == 2
    assert _ask(sock, P.encode(P.Goodbye())).freed_tokens == 2
    mine.goodbye()
    mine.close()
    sock.close()
    assert proc.is_alive() and cid > 0
    _assert_clean(supervisor)


def test_killed_client_is_released_by_supervisor(server, tmp_path) -> None:
    endpoint, supervisor, _ = server
    out = tmp_path / "doomed.cid"
    victim = _SPAWN.Process(target=_holder_main, args=(endpoint, str(out)))
    hammer_out = str(tmp_path / "mid.json")
    hammer = _SPAWN.Process(target=_hammer_main, args=(endpoint, "mid", 99, 60.0, hammer_out))
    victim.start()
    deadline = time.monotonic() + 60
    while not out.exists():
        assert time.monotonic() < deadline and victim.is_alive()
        time.sleep(0.05)
    hammer.start()
    while not Path(hammer_out + ".cid").exists():
        assert time.monotonic() < deadline and hammer.is_alive()
        time.sleep(0.05)
    time.sleep(1.0)  # let the hammer get deep into its requests
    os.kill(victim.pid, signal.SIGKILL)
    os.kill(hammer.pid, signal.SIGKILL)
    victim.join(10)
    hammer.join(10)
    before = supervisor.check_invariant()
    assert before.ok, before.errors
    doomed, mid = int(out.read_text()), int(Path(hammer_out + ".cid").read_text())
    assert before.client_held.get(doomed, 0) >= 7 + 16 and before.lock_refs >= 1
    rep = supervisor.release_client(doomed)
    assert (rep.freed_rows, rep.closed_leases, rep.dropped_locks) == (2, 1, 1)
    assert rep.freed_tokens >= 7 + 16
    supervisor.release_client(mid)
    with pytest.raises(P.KVStateError) as info:
        supervisor.release_client(doomed)
    assert info.value.code == P.ErrorCode.UNKNOWN_CLIENT
    _assert_clean(supervisor)


def test_client_timeout_then_drops_the_stale_reply(tmp_path) -> None:
    """A late reply to a timed-out request must not be taken for the next reply."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)

    def fake_server() -> None:
        ident, *frames = router.recv_multipart()  # first request: answered too late
        late = P.decode_frames(frames).seq
        ident2, *frames2 = router.recv_multipart()
        router.send_multipart([ident, *P.encode(P.ErrorReply(code="stale"), seq=late)])
        router.send_multipart([ident2, *P.encode(P.OkReply(), seq=P.decode_frames(frames2).seq)])

    thread = threading.Thread(target=fake_server, daemon=True)
    thread.start()
    client = KVStateClient(endpoint, "impatient", register=False, timeout_s=0.3)
    with pytest.raises(KVStateTimeout) as info:
        client.stats()
    assert info.value.code == P.ErrorCode.TIMEOUT
    client.timeout_s = 15
    client.reset()  # gets OkReply although the stale ErrorReply arrives first
    thread.join(15)
    client.close()
    router.close()


def test_client_modules_import_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import sglang_semipd.memory.client, sglang_semipd.memory.rpc, sglang_semipd.protocol\n"
            "assert not any(m.startswith('sglang.') for m in sys.modules)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_lease_is_local_and_returns_the_rest(server) -> None:
    endpoint, supervisor, _ = server
    with KVStateClient(endpoint, "leaser", timeout_s=15) as c:
        with c.lease(10) as lease:
            assert lease.available == 10 and list(lease.remaining()) == list(lease.indices)
            first = lease.take(4)
            lease.give_back(first[2:])
            assert lease.available == 8
            with pytest.raises(ValueError):
                lease.give_back(array("q", [first[0] + 1000]))
            assert c.stats().leased == 10
            c.free(first[:2])
            assert c.stats().leased == 8
        assert lease.closed and c.stats().client_held == {}
        c.goodbye()
    _assert_clean(supervisor)
