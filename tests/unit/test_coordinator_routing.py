"""The semi-PD scheduler process's routing loop over real ZeroMQ sockets (no GPU: the worker
processes are played by sockets in this test).

Checks: generation requests and aborts reach both workers (decode first), control requests
only the prefill worker, all as the same bytes; worker outputs reach the detokenizer through
one socket in arrival order; a hand-off on the prefill worker's output socket goes to the
decode worker and never to the detokenizer, after the first-token output sent before it;
the resize protocol: a share asked through the prefill worker becomes one ``Resize`` to both
workers, acknowledgements complete it (with the latency in the trace), iteration reports are
traced and never reach the detokenizer, malformed control messages are dropped."""

from __future__ import annotations

import pickle
import time

import pytest
import zmq

from sglang_semipd import protocol as P
from sglang_semipd.partition.controller import PartitionController
from sglang_semipd.testing.server import wait_until
from sglang_semipd.trace import read_trace


def _recv(sock: zmq.Socket, timeout_ms: int = 5000):
    assert sock.poll(timeout_ms), "nothing arrived"
    return sock.recv_multipart()


def test_requests_are_routed_by_type_as_the_same_bytes(wired):
    from sglang.srt.managers import io_struct

    abort = pickle.dumps(io_struct.AbortReq(rid="r1"))
    flush = pickle.dumps(io_struct.FlushCacheReqInput())
    later = pickle.dumps(io_struct.AbortReq(rid="r2"))
    wired.tokenizer.send(abort)
    wired.tokenizer.send(flush)
    wired.tokenizer.send(later)
    assert _recv(wired.worker_in["decode"]) == [abort]
    assert _recv(wired.worker_in["prefill"]) == [abort]
    # a flush waits until the decode worker handed back its idle slots ...
    release = P.decode_control(_recv(wired.worker_ctl["decode"]))
    assert isinstance(release, P.ReleaseIdle)
    assert _recv(wired.worker_in["decode"]) == [later]
    assert not wired.worker_in["prefill"].poll(300)  # ... and so does what came after it
    wired.worker_out["decode"].send_multipart(P.encode_control(P.Released(seq=release.seq)))
    assert _recv(wired.worker_in["prefill"]) == [flush]
    assert _recv(wired.worker_in["prefill"]) == [later]
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


def test_a_requested_share_resizes_both_workers_and_acks_complete_it(wired):
    prefill_out = wired.worker_out["prefill"]
    prefill_out.send_multipart(P.encode_control(P.ResizeRequest(share=0.3)))  # -> 40/92
    cmds = {r: P.decode_control(_recv(wired.worker_ctl[r])) for r in ("prefill", "decode")}
    assert cmds["prefill"] == cmds["decode"]
    cmd = cmds["prefill"]
    assert isinstance(cmd, P.Resize) and (cmd.seq, cmd.split) == (1, 0) and cmd.sent_at > 0
    assert wired.coord.resizes.in_flight == cmd
    # both workers switch at their next iteration boundary and say so
    applied = cmd.sent_at + 0.0004
    prefill_out.send_multipart(P.encode_control(P.ResizeAck("prefill", 1, 0, 17, applied)))
    stat = P.IterationStat(role="decode", iteration=40, split=1, mode="decode", batch_size=8,
                           tokens=8, start=1.0, end=1.01)
    wired.worker_out["decode"].send_multipart(P.encode_control(stat))
    wired.worker_out["decode"].send_multipart(
        P.encode_control(P.ResizeAck("decode", 1, 0, 41, applied)))
    wait_until(lambda: wired.coord.resizes.in_flight is None)
    assert wired.coord.resizes.split == 0
    assert wired.coord.resizes.took_effect_at() == {"prefill": 17, "decode": 41}
    rows = read_trace(wired.trace)
    assert sorted(r["kind"] for r in rows) == ["iteration", "resize", "resize_ack", "resize_ack"]
    assert rows[0]["kind"] == "resize"
    acks = [r for r in rows if r["kind"] == "resize_ack"]
    assert len(acks) == 2 and all(abs(r["latency_ms"] - 0.4) < 1e-6 for r in acks)
    assert [r for r in rows if r["kind"] == "iteration"][0]["batch_size"] == 8
    assert not wired.detok.poll(200)  # control traffic never reaches the detokenizer


def test_the_same_share_again_sends_nothing_and_garbage_is_dropped(wired):
    prefill_out = wired.worker_out["prefill"]
    prefill_out.send_multipart([P.CONTROL_TAG, b"\x81\xa4type\xa5bogus"])  # unknown record
    prefill_out.send_multipart(P.encode_control(P.ResizeAck("decode", 9, 0, 1)))  # never sent
    prefill_out.send_multipart(P.encode_control(P.ResizeRequest(share=0.5)))  # already there
    assert not wired.worker_ctl["decode"].poll(300)
    prefill_out.send_multipart(P.encode_control(P.ResizeRequest(share=0.8)))  # -> 104/28
    cmd = P.decode_control(_recv(wired.worker_ctl["decode"]))
    assert (cmd.seq, cmd.split) == (1, 2)
    assert not wired.detok.poll(200)


def test_an_operator_pins_the_split_with_the_static_policy_and_hands_it_back(wired):
    fractions = [s.prefill_fraction for s in wired.coord.splits]
    wired.coord.controller = PartitionController(fractions, 1, policy="slo")
    prefill_out = wired.worker_out["prefill"]
    prefill_out.send_multipart(P.encode_control(P.ResizeRequest(share=0.8, policy="static")))
    cmd = P.decode_control(_recv(wired.worker_ctl["decode"]))
    assert (cmd.seq, cmd.split) == (1, 2)
    wait_until(lambda: wired.coord.controller.kind == "static")
    assert wired.coord.controller.policy.share == pytest.approx(fractions[2])
    prefill_out.send_multipart(P.encode_control(P.ResizeRequest(policy="slo")))
    wait_until(lambda: wired.coord.controller.kind == "slo")
    assert not wired.worker_ctl["decode"].poll(300)  # a policy alone resizes nothing
    prefill_out.send_multipart(P.encode_control(P.ResizeRequest(policy="lottery")))
    prefill_out.send_multipart(P.encode_control(P.ResizeRequest(share=1.5)))
    time.sleep(0.3)
    assert wired.coord.controller.kind == "slo" and not wired.worker_ctl["decode"].poll(100)
    kinds = [r["kind"] for r in read_trace(wired.trace)]
    assert kinds.count("policy") == 2


def _sglang(cls, **given):
    """A real SGLang message, the fields this test does not care about left empty."""
    import inspect

    empty = {n: None for n, p in inspect.signature(cls).parameters.items()
             if p.default is inspect.Parameter.empty}
    return cls(**{**empty, **given})


@pytest.mark.parametrize("policy", ["static", "slo"])
def test_the_controller_sees_requests_finish_under_every_policy(wired, policy):
    """Under the static policy too (attainment is exported either way): a tracker that saw
    arrivals but no finishes would grow for ever and scan a longer list every window."""
    from sglang.srt.managers import io_struct

    fractions = [s.prefill_fraction for s in wired.coord.splits]
    wired.coord.controller = PartitionController(fractions, 1, policy=policy)
    wired.tokenizer.send(pickle.dumps(_sglang(io_struct.TokenizedGenerateReqInput, rid="q1",
                                              input_ids=[1, 2, 3])))
    wait_until(lambda: wired.coord.controller.latency.in_flight == 1)
    assert wired.coord.controller.latency.tokens_waiting == 3  # its prompt, until a token
    out = _sglang(io_struct.BatchTokenIDOutput, rids=["q1"], completion_tokens=[4],
                  finished_reasons=[{"type": "length", "length": 4}])
    wired.worker_out["decode"].send(pickle.dumps(out))
    wait_until(lambda: wired.coord.controller.latency.in_flight == 0)
    assert wired.coord.controller.latency.finished == 1
    assert wired.coord.controller.latency.tokens_waiting == 0


def test_prompt_lengths_of_single_and_batched_sglang_requests():
    from array import array

    from sglang.srt.managers import io_struct

    from sglang_semipd.scheduler import _prompt_lens, _rids

    one = _sglang(io_struct.TokenizedGenerateReqInput, rid="a", input_ids=array("i", [5] * 7))
    bare = _sglang(io_struct.TokenizedGenerateReqInput, rid="b", input_ids=None)
    batch = _sglang(io_struct.BatchTokenizedGenerateReqInput, batch=[one, bare])
    assert (_rids(one), _prompt_lens(one)) == (["a"], [7])
    assert (_rids(batch), _prompt_lens(batch)) == (["a", "b"], [7, 0])


def test_a_handoff_ends_a_decode_loan_before_it_reaches_the_decode_worker(wired):
    """Decode idle, prefill busy: decode's SMs are lent. The first hand-off ends the loan (a
    ``Resize`` back to the base split for both workers) as it passes, so the adopted request's
    first decode step does not run on the lent split."""
    fractions = [s.prefill_fraction for s in wired.coord.splits]
    # The coordinator's loop ticks the controller on its own clock: with a window of an hour,
    # ended here, no tick of its own can decide (and lend decode's SMs again) during the test.
    # The tick comes 2 windows after the start: at (now + hour) - now, float rounding can
    # leave the difference a hair under one window, and the tick would not decide.
    now, hour = time.monotonic(), 3600.0
    c = PartitionController(fractions, 1, policy="slo", now=now, warmup_iters=0, window_s=hour)
    c.on_request("a", now + 0.1)  # only prefill has work
    decision = c.tick(now + 2 * hour)
    assert decision is not None and decision.loan == "decode"
    assert c.policy.share == pytest.approx(fractions[2])
    c.on_resized(2)
    wired.coord.resizes.split = 2
    wired.coord.controller = c
    handoff = P.HandOff(rid="a", req_pool_idx=2, kv_len=10, first_token=5)
    wired.worker_out["prefill"].send_multipart(P.encode_handoff(handoff))
    cmds = {r: P.decode_control(_recv(wired.worker_ctl[r])) for r in ("prefill", "decode")}
    assert cmds["prefill"] == cmds["decode"] and cmds["decode"].split == 1
    assert P.decode_handoff(_recv(wired.decode_handoffs)) == handoff
    assert c.policy.loan is None
    decisions = [r for r in read_trace(wired.trace) if r["kind"] == "decision"]
    assert decisions[-1]["mode"] == "reclaim"


@pytest.mark.parametrize("wired", ["none", "mps"], indirect=True)
def test_modes_without_in_place_resize_ignore_requests(wired):
    wired.worker_out["prefill"].send_multipart(P.encode_control(P.ResizeRequest(share=0.3)))
    assert not wired.worker_ctl["prefill"].poll(300)
    assert wired.coord.resizes.seq == 0


def _exit_when_set(event) -> None:
    event.wait(30)


def _worker_stand_ins(n: int):
    """Real processes in the workers' places that exit 0 when told (as SGLang's scheduler
    does on ShutdownReq), and one in the memory manager's that runs until terminated."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    events = [ctx.Event() for _ in range(n)]
    procs = [ctx.Process(target=_exit_when_set, args=(e,), daemon=True) for e in events]
    manager = ctx.Process(target=time.sleep, args=(60,), daemon=True)
    for p in [*procs, manager]:
        p.start()
    return events, procs, manager


def test_sglang_shutdown_stops_the_loop_once_the_workers_exit(wired):
    from sglang.srt.managers import io_struct

    events, (prefill, decode), manager = _worker_stand_ins(2)
    wired.coord.procs = {"memory_manager": manager, "prefill": prefill, "decode": decode}
    raw = pickle.dumps(io_struct.ShutdownReq())
    wired.tokenizer.send(raw)
    assert _recv(wired.worker_in["decode"]) == [raw]
    assert _recv(wired.worker_in["prefill"]) == [raw]
    events[0].set()  # the prefill worker is gone first: no failure, the loop waits for decode
    prefill.join(10)
    time.sleep(1.5)  # past one children check
    assert wired.thread.is_alive() and not wired.coord._stop
    events[1].set()
    decode.join(10)
    wired.thread.join(5)
    assert not wired.thread.is_alive() and wired.coord._stop  # stopped, did not raise
    wired.coord.stop()
    assert not manager.is_alive()


def test_a_worker_exiting_without_shutdown_is_a_failure(wired, monkeypatch):
    import threading

    raised = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    events, (prefill, decode), manager = _worker_stand_ins(2)
    wired.coord.procs = {"memory_manager": manager, "prefill": prefill, "decode": decode}
    events[1].set()
    decode.join(10)
    wired.thread.join(5)
    assert not wired.thread.is_alive() and not wired.coord._stop
    assert [str(e) for e in raised] == ["semi-PD decode exited (code 0)"]
    events[0].set()
    wired.coord.stop()


def test_a_request_waiting_for_its_first_token_unconfines_prefill_until_it_gets_it(wired):
    """``--burst-unconfined``: the loop's own ticks move both workers to the burst split (by
    index: no share maps to it) while the request waits, and back once its first token
    passes."""
    from sglang.srt.managers import io_struct

    from sglang_semipd.partition.splits import with_burst_split

    wired.coord.splits = list(with_burst_split(wired.coord.splits))
    fractions = [s.prefill_fraction for s in wired.coord.splits]
    wired.coord.controller = PartitionController(
        fractions, 1, policy="slo", ttft_s=0.2, now=time.monotonic(), window_s=3600.0,
        burst_split=3)  # a burst after 0.1 s of waiting
    wired.tokenizer.send(pickle.dumps(_sglang(io_struct.TokenizedGenerateReqInput, rid="q1",
                                              input_ids=[1, 2, 3])))
    cmds = {r: P.decode_control(_recv(wired.worker_ctl[r])) for r in ("prefill", "decode")}
    assert cmds["prefill"] == cmds["decode"] and cmds["decode"].split == 3
    for role, it in (("prefill", 5), ("decode", 9)):
        wired.worker_out[role].send_multipart(P.encode_control(P.ResizeAck(role, 1, 3, it)))
    wait_until(lambda: wired.coord.controller.split == 3)
    out = _sglang(io_struct.BatchTokenIDOutput, rids=["q1"], completion_tokens=[1],
                  finished_reasons=[None])
    wired.worker_out["prefill"].send(pickle.dumps(out))
    back = P.decode_control(_recv(wired.worker_ctl["decode"]))
    assert (back.seq, back.split) == (2, 1)
    assert P.decode_control(_recv(wired.worker_ctl["prefill"])) == back
    decisions = [r for r in read_trace(wired.trace) if r["kind"] == "decision"]
    assert [(r["mode"], r["split"]) for r in decisions] == [("burst", 3), ("burst-end", 1)]
    assert _recv(wired.detok)  # the first token still reaches the detokenizer


def test_eager_loans_lend_prefills_sms_between_requests_without_info_logs(wired, caplog):
    """``--eager-loan``: once a request decodes and none waits for its first token, the
    loop's own tick lends the prefill side's SMs (one ``Resize`` to the loan split for both
    workers); the next request takes them back. Both resizes and their acknowledgements are
    logged at DEBUG only."""
    from sglang.srt.managers import io_struct

    fractions = [s.prefill_fraction for s in wired.coord.splits]
    wired.coord.controller = PartitionController(
        fractions, 1, policy="slo", now=time.monotonic(), window_s=3600.0, eager_loan=True)
    caplog.set_level("DEBUG", logger="sglang_semipd.scheduler")
    wired.tokenizer.send(pickle.dumps(_sglang(io_struct.TokenizedGenerateReqInput, rid="q1",
                                              input_ids=[1, 2, 3])))
    out = _sglang(io_struct.BatchTokenIDOutput, rids=["q1"], completion_tokens=[1],
                  finished_reasons=[None])
    wired.worker_out["prefill"].send(pickle.dumps(out))  # q1 decodes, nothing waits
    lend = {r: P.decode_control(_recv(wired.worker_ctl[r])) for r in ("prefill", "decode")}
    assert lend["prefill"] == lend["decode"] and lend["decode"].split == 0  # 40/92
    for role, it in (("prefill", 5), ("decode", 9)):
        wired.worker_out[role].send_multipart(P.encode_control(P.ResizeAck(role, 1, 0, it)))
    wait_until(lambda: wired.coord.controller.split == 0)
    wired.tokenizer.send(pickle.dumps(_sglang(io_struct.TokenizedGenerateReqInput, rid="q2",
                                              input_ids=[4, 5])))
    back = P.decode_control(_recv(wired.worker_ctl["decode"]))
    assert (back.seq, back.split) == (2, 1)
    assert P.decode_control(_recv(wired.worker_ctl["prefill"])) == back
    decisions = [r for r in read_trace(wired.trace) if r["kind"] == "decision"]
    assert [r["mode"] for r in decisions] == ["eager-loan", "eager-reclaim"]
    resizes = [r for r in caplog.records if r.getMessage().startswith("resize #")]
    assert len(resizes) == 4 and {r.levelname for r in resizes} == {"DEBUG"}  # 2 + 2 acks
    assert wired.coord._quiet_seqs == {2}  # #1 is over; #2 is not acknowledged yet


def test_the_loop_polls_faster_only_while_a_burst_or_an_eager_loan_could_start():
    """``Coordinator._poll_ms`` (on its own: the loop thread would tick the controller)."""
    from types import SimpleNamespace

    from sglang_semipd.partition.splits import plan_splits, with_burst_split
    from sglang_semipd.scheduler import Coordinator

    planned = plan_splits([0.25, 0.5, 0.75], total_sms=132)
    coord = SimpleNamespace(controller=None)
    poll_ms = lambda: Coordinator._poll_ms(coord)  # noqa: E731
    assert poll_ms() == 100
    coord.controller = PartitionController([s.prefill_fraction for s in planned], 1, now=0.0)
    coord.controller.on_request("a", 0.0)
    assert poll_ms() == 100  # no burst split: nothing to watch
    c = PartitionController([s.prefill_fraction for s in with_burst_split(planned)], 1,
                            ttft_s=0.2, now=0.0, window_s=3600.0, burst_split=3)
    coord.controller = c
    assert poll_ms() == 100  # nobody waits
    c.on_request("a", 0.0)
    assert poll_ms() == 10
    assert c.tick(0.2).mode == "burst"
    c.on_output(["a"], [1], [False], 0.25)
    assert poll_ms() == 10  # the burst in force still has to end
    assert c.tick(0.26).mode == "burst-end"
    assert poll_ms() == 100
    c = PartitionController([s.prefill_fraction for s in planned], 1, ttft_s=0.2, now=0.0,
                            window_s=3600.0, eager_loan=True, eager_after_s=0.005)
    coord.controller = c
    c.on_request("b", 1.0)
    assert poll_ms() == 100  # b waits: no eager loan (and no burst split)
    c.on_handoff(1.01, "b")
    assert c.eager_armed and poll_ms() == 5  # b decodes, none waits: the loan is 5 ms away
    c.tick(1.011)
    d = c.tick(1.02)
    assert d.mode == "eager-loan"
    c.on_resized(0)
    assert not c.eager_armed and poll_ms() == 100  # lent already
