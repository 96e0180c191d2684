"""The semi-PD scheduler process's routing loop over real ZeroMQ sockets (no GPU: the worker
processes are played by sockets in this test).

Checks: generation requests and aborts reach both workers (decode first), control requests
only the prefill worker, all as the same bytes; worker outputs reach the detokenizer through
one socket in arrival order; a hand-off on the prefill worker's output socket goes to the
decode worker and never to the detokenizer, after the first-token output sent before it."""

from __future__ import annotations

import pickle
import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from sglang_semipd import protocol as P
from sglang_semipd.scheduler import Coordinator


def _recv(sock: zmq.Socket, timeout_ms: int = 5000):
    assert sock.poll(timeout_ms), "nothing arrived"
    return sock.recv_multipart()


@pytest.fixture
def wired(tmp_path):
    ctx = zmq.Context.instance()
    port_args = SimpleNamespace(scheduler_input_ipc_name=f"ipc://{tmp_path}/sched-in",
                                detokenizer_ipc_name=f"ipc://{tmp_path}/detok",
                                tokenizer_ipc_name=f"ipc://{tmp_path}/tok", rpc_ipc_name="",
                                nccl_port=0)
    tokenizer = ctx.socket(zmq.PUSH)  # SGLang's TokenizerManager binds PUSH here
    tokenizer.bind(port_args.scheduler_input_ipc_name)
    detok = ctx.socket(zmq.PULL)  # the DetokenizerManager binds PULL
    detok.bind(port_args.detokenizer_ipc_name)
    coord = Coordinator(SimpleNamespace(), port_args, gpu_id=0, tp_rank=0)
    coord._bind_sockets()
    worker_in, worker_out = {}, {}
    for role, ep in coord.endpoints.items():
        worker_in[role] = ctx.socket(zmq.PULL)
        worker_in[role].connect(ep.scheduler_input)
        worker_out[role] = ctx.socket(zmq.PUSH)
        worker_out[role].connect(ep.output)
    decode_handoffs = ctx.socket(zmq.PULL)
    decode_handoffs.connect(coord.endpoints["decode"].handoff)
    thread = threading.Thread(target=coord.serve, daemon=True)
    thread.start()
    time.sleep(0.2)
    yield SimpleNamespace(coord=coord, tokenizer=tokenizer, detok=detok, worker_in=worker_in,
                          worker_out=worker_out, decode_handoffs=decode_handoffs)
    coord._stop = True
    thread.join(5)
    coord.stop()  # no children here: only removes its run directory
    for s in [tokenizer, detok, decode_handoffs, *worker_in.values(), *worker_out.values()]:
        s.close(0)


def test_requests_are_routed_by_type_as_the_same_bytes(wired):
    from sglang.srt.managers import io_struct

    abort = pickle.dumps(io_struct.AbortReq(rid="r1"))
    flush = pickle.dumps(io_struct.FlushCacheReqInput())
    wired.tokenizer.send(abort)
    wired.tokenizer.send(flush)
    assert _recv(wired.worker_in["decode"]) == [abort]
    assert _recv(wired.worker_in["prefill"]) == [abort]
    assert _recv(wired.worker_in["prefill"]) == [flush]
    assert not wired.worker_in["decode"].poll(300)  # one reply only: prefill's


def test_handoff_follows_the_first_token_and_skips_the_detokenizer(wired):
    first_token = pickle.dumps({"stands for": "BatchTokenIDOutput", "rid": "r1"})
    handoff = P.HandOff(rid="r1", req_pool_idx=2, kv_len=10, first_token=5)
    wired.worker_out["prefill"].send(first_token)
    wired.worker_out["prefill"].send_multipart(P.encode_handoff(handoff))
    got = P.decode_handoff(_recv(wired.decode_handoffs))
    assert got == handoff
    # by the time decode has the hand-off, the first token is already queued for the
    # detokenizer ahead of anything decode sends for this request
    decode_out = pickle.dumps({"stands for": "decode tokens", "rid": "r1"})
    wired.worker_out["decode"].send(decode_out)
    assert _recv(wired.detok) == [first_token]
    assert _recv(wired.detok) == [decode_out]
    assert not wired.detok.poll(300)
    assert wired.coord.handoffs == 1
