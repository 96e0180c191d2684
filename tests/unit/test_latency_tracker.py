"""TTFT / TPOT as the scheduler process measures them from the messages it forwards."""

from __future__ import annotations

import pytest

from sglang_semipd.latency import LatencyTracker


def test_ttft_and_tpot_from_arrival_first_token_and_finish():
    lt = LatencyTracker(start=0.0)
    lt.on_request("a", 1.0)
    lt.on_request("b", 1.5)
    lt.on_request("a", 9.0)  # a duplicate arrival (both workers' copies) counts once
    lt.on_outputs(["a"], [1], [False], 1.2)  # prefill worker's first token
    lt.on_outputs(["a", "b"], [3, 1], [False, False], 1.6)
    lt.on_outputs(["a", "b"], [5, 1], [True, True], 2.0)  # b: a single token
    w = lt.window(2.0, share=0.5)
    assert w.ttfts == pytest.approx((0.2, 0.1))
    assert w.tpots == pytest.approx(((2.0 - 1.2) / 4,))  # b has no TPOT
    assert w.arrivals == 2 and w.arrival_rate == pytest.approx(1.0)
    assert w.prefill_idle and w.decode_idle and lt.finished == 2
    again = lt.window(3.0, share=0.5)  # nothing new: an empty window
    assert again.ttfts == () and again.tpots == () and again.arrivals == 0


def test_queues_aborts_and_unknown_requests():
    lt = LatencyTracker(start=0.0)
    for rid in ("x", "y", "z"):
        lt.on_request(rid, 0.0)
    lt.on_outputs(["x", "ghost"], [1, 4], [False, True], 0.5)  # ghost: never seen: ignored
    lt.on_abort("y")
    w = lt.window(1.0, share=0.25)
    assert (w.prefill_queue_len, w.decode_batch_size) == (1, 1)
    assert not w.prefill_idle and not w.decode_idle
    assert lt.in_flight == 2 and lt.finished == 0


def test_a_request_that_does_not_stream_gets_its_first_token_at_its_hand_off():
    """SGLang sends a non-streaming request no output batch before it finishes: its first
    token is the prefill worker's hand-off, not its only output (else TTFT would be its whole
    latency and it would wait for a first token while it decodes)."""
    lt = LatencyTracker(start=0.0)
    lt.on_request("a", 1.0)
    lt.on_first_token("a", 1.05)  # hand-off
    assert (lt.waiting_first_token, lt.decoding) == (0, 1)
    lt.on_first_token("a", 1.5)  # a repeat (the stream's output batch too) changes nothing
    lt.on_first_token("ghost", 1.5)  # unknown: ignored
    lt.on_outputs(["a"], [9], [True], 2.05)  # the only output batch
    w = lt.window(3.0, share=0.5)
    assert w.ttfts == pytest.approx((0.05,))
    assert w.tpots == pytest.approx(((2.05 - 1.05) / 8,))
    assert lt.finished == 1 and w.decode_idle and w.prefill_idle
