"""A live KV-state server under a stream of malformed and mutated messages over real ZeroMQ:
every message gets a reply, the server keeps serving, and the invariant still holds."""

from __future__ import annotations

import random
import threading
import uuid
from array import array

import pytest
import zmq

from sglang_semipd import protocol as P
from sglang_semipd.memory.client import KVStateClient
from sglang_semipd.memory.rpc import KVStateServer

CAPACITY = 128
# Requests a fuzzer may mutate. Admin requests that legitimately change other clients' state
# (Shutdown, Reset, ReleaseClient, Goodbye) are left out: they are tested on their own.
SEEDS = [
    (P.Hello(name="fuzz", role="decode"), ()), (P.Alloc(sizes=[3, 5]), ()),
    (P.Free(), (array("q", [1, 2, 3]),)), (P.Lease(n=8), ()),
    (P.ReturnLease(lease_id=1), (array("q", [4]),)), (P.AllocReqRows(n=2), ()),
    (P.FreeReqRows(rows=[1]), ()), (P.MatchPrefix(lock=True), (array("i", [5, 6, 7]),)),
    (P.Insert(lock=False), (array("i", [5, 6]), array("q", [9, 10]))),
    (P.IncLockRef(node=3), ()), (P.DecLockRef(node=3), ()), (P.Evict(num_tokens=4), ()),
    (P.Stats(), ()), (P.CheckInvariant(), ()), (P.GetPoolManifest(), ()),
]


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = [bytearray(f) for f in frames]
    kind = rng.randrange(5)
    if kind == 0:  # flip bytes of the header
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(frames[0]))
            frames[0][pos] = rng.randrange(256)
    elif kind == 1 and len(frames) > 1:  # corrupt or truncate a buffer
        i = rng.randrange(1, len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif kind == 2:  # drop or add a frame
        if len(frames) > 1 and rng.random() < 0.5:
            frames.pop()
        else:
            frames.append(bytearray(rng.randbytes(rng.randrange(17))))
    elif kind == 3:  # pure garbage
        frames = [bytearray(rng.randbytes(rng.randrange(1, 40)))]
    else:  # a valid buffer with wild indices
        frames = [bytearray(f) for f in P.encode(P.Free(), array("q", [rng.randrange(-5, 10**6)]))]
    return [bytes(f) for f in frames]


@pytest.fixture()
def server(tmp_path):
    from sglang_semipd.memory.service import KVStateService

    endpoint = f"ipc://{tmp_path}/fuzz-{uuid.uuid4().hex[:8]}.sock"
    srv = KVStateServer(KVStateService(CAPACITY, page_size=1, req_rows=8), endpoint)
    srv.bind()
    stop = threading.Event()
    thread = threading.Thread(target=srv.serve_forever, args=(stop,), daemon=True)
    thread.start()
    yield endpoint
    stop.set()
    thread.join(10)
    srv.close()
    assert not thread.is_alive()


def test_server_survives_a_fuzzed_stream(server):
    rng = random.Random(1234)
    with KVStateClient(server, "honest", timeout_s=30) as honest:
        held = honest.alloc(16)
        node = honest.insert(list(range(100, 108)), list(held[:8]), lock=True).node
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.connect(server)
        raw.RCVTIMEO = 10_000
        raw.send_multipart(P.encode(P.Hello(name="fuzzer", role="decode")))
        assert isinstance(P.decode(raw.recv_multipart())[0], P.HelloReply)
        kinds = {"error": 0, "ok": 0}
        for _ in range(600):
            msg, bufs = rng.choice(SEEDS)
            frames = P.encode(msg, *bufs, seq=7)
            # one in five goes out intact: valid requests from this identity interleave
            raw.send_multipart(frames if rng.random() < 0.2 else _mutate(rng, frames))
            reply, _ = P.decode(raw.recv_multipart())  # every message is answered, decodably
            kinds["error" if isinstance(reply, P.ErrorReply) else "ok"] += 1
        raw.close(0)
        assert kinds["error"] > 300 and kinds["ok"] > 20  # both paths were exercised
        report = honest.check_invariant()
        assert report.ok, report.errors
        # the honest client's holdings and its locked prefix are intact and usable
        assert honest.match_prefix(list(range(100, 108))).prefix_len == 8
        honest.dec_lock_ref(node)
        honest.free(held[8:])
        more = honest.alloc(4)
        honest.free(more)
        assert honest.check_invariant().ok
