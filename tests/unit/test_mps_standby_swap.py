"""``--sm-partition mps`` resizes in the semi-PD scheduler, over real ZeroMQ sockets: the
standby pair is started (its worker processes are played by sockets and a ready pipe here),
swapped in once both are ready, new requests go to it while the old pair finishes its own
requests (hand-offs stay within a pair, aborts reach both pairs), and the old pair is retired
once its last request finished; a standby that fails to start is abandoned. The pure
bookkeeping (``partition.standby.GenerationTracker``) is tested on its own below."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_semipd import protocol as P
from sglang_semipd.partition.standby import GenerationTracker
from sglang_semipd.testing.server import wait_until
from sglang_semipd.trace import read_trace
from tests.unit.test_coordinator_routing import _recv, _sglang

MPS = pytest.mark.parametrize("wired", ["mps"], indirect=True)


class FakeProc:
    """Stands for a worker process (the test decides when it exits, and how)."""

    def __init__(self) -> None:
        self.exitcode = None

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout=None) -> None:
        pass

    def terminate(self) -> None:
        self.exitcode = self.exitcode if self.exitcode is not None else -15

    kill = terminate


def _request(rid: str) -> bytes:
    from sglang.srt.managers import io_struct

    return pickle.dumps(_sglang(io_struct.TokenizedGenerateReqInput, rid=rid,
                                input_ids=[1, 2, 3]))


def _finished(rid: str) -> bytes:
    from sglang.srt.managers import io_struct

    return pickle.dumps(_sglang(io_struct.BatchTokenIDOutput, rids=[rid], completion_tokens=[2],
                                finished_reasons=[{"type": "length", "length": 2}]))


def _standby_setup(wired, monkeypatch):
    """Fake gen-0 processes, and a ``_spawn_worker`` that hands back fake processes and keeps
    the pipes' writing ends, so that the test can report the standby pair ready."""
    coord = wired.coord
    coord.procs.update(prefill=FakeProc(), decode=FakeProc())
    spawned: dict[str, tuple] = {}

    def spawn_worker(role, ep, gen_id, split):
        reader, writer = mp.Pipe(duplex=False)
        spawned[role] = (ep, writer, FakeProc(), gen_id, split)
        return spawned[role][2], reader

    monkeypatch.setattr(coord, "_spawn_worker", spawn_worker)
    return coord, spawned


def _connect(ctx, spawned):
    socks = {}
    for role, (ep, *_rest) in spawned.items():
        for name, kind, addr in (("in", zmq.PULL, ep.scheduler_input),
                                 ("out", zmq.PUSH, ep.output), ("ctl", zmq.PULL, ep.control),
                                 ("handoff", zmq.PULL, ep.handoff)):
            if name == "handoff" and role != "decode":
                continue
            sock = ctx.socket(kind)
            sock.connect(addr)
            socks[role, name] = sock
    time.sleep(0.2)
    return socks


@MPS
def test_a_resize_swaps_in_a_standby_pair_and_retires_the_old_one(wired, monkeypatch):
    coord, spawned = _standby_setup(wired, monkeypatch)
    old_decode_handoffs = wired.decode_handoffs
    wired.tokenizer.send(_request("r1"))  # served by generation 0
    for role in ("decode", "prefill"):
        assert _recv(wired.worker_in[role]) == [_request("r1")]
    wired.worker_out["prefill"].send_multipart(P.encode_control(P.ResizeRequest(share=0.75)))
    wait_until(lambda: len(spawned) == 2)
    assert {s[3] for s in spawned.values()} == {1} and {s[4] for s in spawned.values()} == {2}
    assert coord.gens.current == 0  # not before both are ready
    socks = _connect(zmq.Context.instance(), spawned)
    spawned["prefill"][1].send({"status": "ready"})
    time.sleep(0.3)
    assert coord.gens.current == 0
    spawned["decode"][1].send({"status": "ready"})
    wait_until(lambda: coord.gens.current == 1)
    assert coord.resizes.split == 2
    # new requests: the new pair only
    wired.tokenizer.send(_request("r2"))
    for role in ("decode", "prefill"):
        assert _recv(socks[role, "in"]) == [_request("r2")]
    assert not wired.worker_in["prefill"].poll(200)
    # hand-offs stay within their pair
    h1, h2 = P.HandOff(rid="r1", req_pool_idx=1, kv_len=3), P.HandOff(rid="r2")
    wired.worker_out["prefill"].send_multipart(P.encode_handoff(h1))
    socks["prefill", "out"].send_multipart(P.encode_handoff(h2))
    assert P.decode_handoff(_recv(old_decode_handoffs)) == h1
    assert P.decode_handoff(_recv(socks["decode", "handoff"])) == h2
    # an abort reaches both pairs
    from sglang.srt.managers import io_struct

    abort = pickle.dumps(io_struct.AbortReq(rid="r9"))
    wired.tokenizer.send(abort)
    assert _recv(wired.worker_in["decode"]) == [abort]
    assert _recv(socks["decode", "in"]) == [abort]
    # the old pair's last request finishes: it is told to retire, both workers
    assert not wired.worker_ctl["decode"].poll(200)
    wired.worker_out["decode"].send(_finished("r1"))
    assert _recv(wired.detok) == [_finished("r1")]
    for role in ("prefill", "decode"):
        assert P.decode_control(_recv(wired.worker_ctl[role])) == P.Retire(generation=0)
    assert not socks["decode", "ctl"].poll(200)  # the new pair is not
    old = coord.old[0]
    for proc in old.procs.values():
        proc.exitcode = 0
    wait_until(lambda: not coord.old)
    kinds = [r["kind"] for r in read_trace(wired.trace)]
    assert kinds.index("standby_start") < kinds.index("standby_swap") < kinds.index("retired")
    assert coord.procs["prefill"] is spawned["prefill"][2]
    for sock in socks.values():
        sock.close(0)


@MPS
def test_requests_answered_outside_output_batches_still_let_the_old_pair_retire(wired,
                                                                                 monkeypatch):
    """Measured on the H100: after an mps swap the old pair never retired, one request short.
    Some requests end with an answer straight to the TokenizerManager (an abort of a queued
    request, answered by the prefill worker; a request aborted while its hand-off was on the
    way, answered by the decode worker), never in an output batch through the scheduler; the
    workers' ``finished`` hand-offs end them in their generation instead."""
    coord, spawned = _standby_setup(wired, monkeypatch)
    old_decode_handoffs = wired.decode_handoffs
    for rid in ("q1", "q2"):
        wired.tokenizer.send(_request(rid))
        for role in ("decode", "prefill"):
            assert _recv(wired.worker_in[role]) == [_request(rid)]
    wired.worker_out["prefill"].send_multipart(P.encode_control(P.ResizeRequest(share=0.75)))
    wait_until(lambda: len(spawned) == 2)
    socks = _connect(zmq.Context.instance(), spawned)
    for role in ("prefill", "decode"):
        spawned[role][1].send({"status": "ready"})
    wait_until(lambda: coord.gens.current == 1)
    assert coord.gens.in_flight(0) == 2
    # q1 was aborted in the prefill worker's queue: its decode worker still learns of it
    ended = P.HandOff(rid="q1", finished=True)
    wired.worker_out["prefill"].send_multipart(P.encode_handoff(ended))
    assert P.decode_handoff(_recv(old_decode_handoffs)) == ended
    wait_until(lambda: coord.gens.in_flight(0) == 1)
    assert not wired.worker_ctl["decode"].poll(200)  # q2 is still on the old pair
    # q2 was handed off, then dropped by the decode worker (its abort came first)
    wired.worker_out["decode"].send_multipart(P.encode_handoff(P.HandOff(rid="q2",
                                                                         finished=True)))
    for role in ("prefill", "decode"):
        assert P.decode_control(_recv(wired.worker_ctl[role])) == P.Retire(generation=0)
    assert not wired.detok.poll(200)  # the note stays in the scheduler
    for sock in socks.values():
        sock.close(0)


@MPS
def test_a_standby_that_fails_to_start_is_abandoned(wired, monkeypatch):
    coord, spawned = _standby_setup(wired, monkeypatch)
    wired.worker_out["prefill"].send_multipart(P.encode_control(P.ResizeRequest(share=0.25)))
    wait_until(lambda: len(spawned) == 2)
    spawned["decode"][1].send({"status": "error", "error": "CUDA out of memory"})
    # the record is written after the standby's processes are reaped (standby is None first)
    wait_until(lambda: [r for r in read_trace(wired.trace) if r["kind"] == "standby_failed"])
    assert coord.standby is None
    assert coord.gens.current == 0 and coord.resizes.split == 1
    wired.tokenizer.send(_request("r3"))  # still served by the old pair
    assert _recv(wired.worker_in["prefill"]) == [_request("r3")]


# ---------------------------------------------------------------------------- pure
def test_tracker_retires_only_empty_generations():
    t = GenerationTracker()
    assert t.route("a") == 0 and t.route("b") == 0
    assert t.swap(1) is None  # 0 still serves a and b
    assert t.route("c") == 1
    assert t.finish(["a"]) == [] and t.finish(["c", "zzz"]) == []
    assert t.finish(["b"]) == [0]
    t.retired(0)
    assert t.swap(2) == 1  # 1 has nothing left: retire at once
    with pytest.raises(ValueError):
        t.swap(2)
    with pytest.raises(ValueError):
        t.retired(2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["route", "finish", "swap"]), st.integers(0, 9)),
                max_size=80))
def test_tracker_random_sequences(ops):
    """Every generation is reported empty exactly once, only after it stopped being current
    and its last request finished; the current one never is."""
    t = GenerationTracker()
    routed: dict[str, int] = {}
    finished: set[str] = set()
    reported: list[int] = []
    nxt = 1
    for op, i in ops:
        rid = f"r{i}"
        if op == "route" and rid not in routed:
            routed[rid] = t.route(rid)
        elif op == "finish" and rid in routed and rid not in finished:
            finished.add(rid)
            reported += t.finish([rid])
        elif op == "swap":
            empty = t.swap(nxt)
            nxt += 1
            if empty is not None:
                reported.append(empty)
    for rid in routed:
        if rid not in finished:
            reported += t.finish([rid])
    assert len(reported) == len(set(reported)) and t.current not in reported
    assert sorted(reported) == sorted(g for g in range(nxt) if g != t.current)
