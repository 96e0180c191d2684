"""The scheduler's partition controller (pure): windows built from what the scheduler sees,
SLO-policy decisions, idle loans ended the moment the lent side gets work, and a static policy
that never moves."""

from __future__ import annotations

import pytest

from sglang_semipd import protocol as P
from sglang_semipd.partition.controller import PartitionController

FRACTIONS = (40 / 132, 72 / 132, 104 / 132)


def _it(role: str, split: int, start: float, dur: float, bs: int, mode: str = "") -> P.IterationStat:
    mode = mode or ("extend" if role == "prefill" else "decode")
    return P.IterationStat(role=role, iteration=0, split=split, mode=mode, batch_size=bs,
                           tokens=bs, start=start, end=start + dur)


def test_window_has_latencies_and_iteration_times_at_the_split_in_force():
    c = PartitionController(FRACTIONS, 1, policy="static", now=0.0, warmup_iters=0)
    c.on_request("a", 0.0)
    c.on_request("b", 0.1)
    c.on_output(["a"], [1], [False], 0.3)  # a: first token, TTFT 0.3
    for k in range(4):
        c.on_iteration(_it("decode", 1, 0.4 + k * 0.02, 0.02, 8))
    c.on_iteration(_it("decode", 0, 0.6, 0.5, 8))  # another split: not timed for this one
    c.on_iteration(_it("prefill", 1, 0.2, 0.1, 2))
    c.on_output(["a"], [11], [True], 0.5)  # a: 10 more tokens in 0.2 s
    w = c.window(1.0)
    assert w.share == pytest.approx(72 / 132)
    assert w.ttfts == pytest.approx((0.3,)) and w.tpots == pytest.approx((0.02,))
    assert w.decode_iters == 4 and w.decode_iter_time_s == pytest.approx(0.02)
    assert w.decode_iter_batch == 8
    assert w.prefill_iters == 1 and w.prefill_iter_time_s == pytest.approx(0.1)
    assert w.prefill_iter_requests == 2
    assert w.prefill_queue_len == 1 and not w.prefill_idle  # b still waits
    assert c.attainment == 1.0  # a: TTFT 0.3 <= 1.0 s, TPOT 0.02 <= 0.1 s
    assert c.window(2.0).decode_iters == 0  # consumed
    c.on_request("c", 2.0)
    c.on_output(["b", "c"], [1, 1], [False, False], 2.2)
    c.on_output(["b", "c"], [3, 3], [True, True], 2.26)  # b: TTFT 2.1 s misses; c meets
    c.window(3.0)
    assert c.attainment == 0.5


def test_the_first_iterations_on_each_split_are_not_timed():
    c = PartitionController(FRACTIONS, 1, policy="static", now=0.0, warmup_iters=2)
    for k, dur in enumerate((1.0, 0.5, 0.03, 0.03)):  # compile-heavy first passes
        c.on_iteration(_it("prefill", 1, 0.1 * k, dur, 1))
    c.on_iteration(_it("decode", 1, 0.5, 0.4, 1))  # decode's first on this split
    w = c.window(1.0)
    assert w.prefill_iters == 2 and w.prefill_iter_time_s == pytest.approx(0.03)
    assert w.decode_iters == 0


def test_static_policy_never_moves():
    c = PartitionController(FRACTIONS, 0, policy="static", now=0.0)
    c.on_request("a", 0.5)  # prefill busy, decode idle: an SLO policy would lend
    d = c.tick(1.0)
    assert d is not None and not d.changed and d.share == pytest.approx(FRACTIONS[0])
    assert c.tick(1.5) is None  # once per window


def test_idle_side_lends_its_sms_and_gets_them_back_at_once():
    c = PartitionController(FRACTIONS, 1, policy="slo", ttft_s=1.0, tpot_s=0.1, now=0.0,
                            warmup_iters=0)
    c.on_request("a", 0.1)  # only prefill has work
    d = c.tick(1.0)
    assert d.changed and d.loan == "decode" and d.share == pytest.approx(FRACTIONS[2])
    c.on_resized(2)
    back = c.on_iteration(_it("decode", 2, 1.1, 0.01, 1))  # decode got work
    assert back is not None and back.changed and back.share == pytest.approx(FRACTIONS[1])
    c.on_resized(1)
    c.on_iteration(_it("prefill", 1, 1.15, 0.05, 1))  # a's prefill
    c.on_output(["a"], [1], [False], 1.2)  # a decodes; nothing waits for prefill
    d = c.tick(2.0)
    assert d.loan is None  # prefill was busy during this window
    c.on_output(["a"], [2], [False], 2.5)
    d = c.tick(3.0)  # a whole window without arrivals or prefill work
    assert d.changed and d.loan == "prefill" and d.share == pytest.approx(FRACTIONS[0])
    back = c.on_request("b", 2.1)
    assert back is not None and back.share == pytest.approx(FRACTIONS[1])
    assert c.decisions == 3


def test_loan_only_splits_serve_loans_and_never_the_base():
    """``--idle-loan most``: the extreme planned splits (8 SMs left to the idle side) are the
    loans; the SLO policy's base split is chosen among the others only."""
    fractions = (8 / 132, *FRACTIONS, 124 / 132)
    c = PartitionController(fractions, 2, policy="slo", ttft_s=1.0, tpot_s=0.1, now=0.0,
                            warmup_iters=0, loan_fractions=(fractions[0], fractions[-1]))
    assert c.policy.shares == tuple(sorted(FRACTIONS))
    c.on_request("a", 0.1)  # only prefill has work: decode's SMs are lent, all but 8
    d = c.tick(1.0)
    assert d.loan == "decode" and d.share == pytest.approx(124 / 132)
    back = c.on_handoff(1.2)  # a's hand-off passes: the loan ends before decode runs
    assert back is not None and back.mode == "reclaim"
    assert back.share == pytest.approx(fractions[2])
    c.on_output(["a"], [3], [False], 1.5)
    d = c.tick(2.0)  # a whole window without arrivals or prefill work: lent to decode
    assert d.loan == "prefill" and d.share == pytest.approx(8 / 132)
    assert c.on_handoff(2.1) is None  # nothing lent by decode: a hand-off changes nothing
    with pytest.raises(ValueError, match="loan fractions"):
        PartitionController(fractions, 2, loan_fractions=(0.01,))


def test_a_loan_split_that_is_also_a_base_split_stays_a_base_split():
    """``--idle-loan most`` on an H100: decode keeps 28 SMs, so the loan to prefill is 104/28,
    the top of ``--sm-splits``; the SLO policy may still choose it as its base split."""
    fractions = (8 / 132, *FRACTIONS)
    c = PartitionController(fractions, 2, policy="slo", ttft_s=1.0, tpot_s=0.1, now=0.0,
                            warmup_iters=0, loan_fractions=(fractions[0], fractions[-1]),
                            base_fractions=FRACTIONS)
    assert c.policy.shares == tuple(sorted(FRACTIONS))
    assert c.policy.loan_shares == (8 / 132, FRACTIONS[-1])
    c.on_request("a", 0.1)  # only prefill has work: decode's SMs are lent (to the top split)
    d = c.tick(1.0)
    assert d.loan == "decode" and d.share == pytest.approx(FRACTIONS[-1])
    with pytest.raises(ValueError, match="base fractions"):
        PartitionController(fractions, 2, loan_fractions=(fractions[0], fractions[-1]),
                            base_fractions=(0.3,))
    with pytest.raises(ValueError, match="base fractions"):
        PartitionController(fractions, 2, base_fractions=())


def test_steady_arrivals_never_lend_the_prefill_side():
    c = PartitionController(FRACTIONS, 1, policy="slo", ttft_s=1.0, tpot_s=0.1, now=0.0)
    t, k, loans = 0.0, 0, 0
    while t < 20.0:  # a request every 0.3 s, first token 50 ms later, 5 tokens each
        c.on_request(f"r{k}", t)
        c.on_iteration(_it("prefill", c.split, t, 0.05, 1))
        c.on_output([f"r{k}"], [1], [False], t + 0.05)
        c.on_iteration(_it("decode", c.split, t + 0.06, 0.02, 1))
        c.on_output([f"r{k}"], [5], [True], t + 0.15)
        t, k = t + 0.3, k + 1
        d = c.tick(t)
        loans += bool(d is not None and d.loan)
    assert loans == 0


def test_eager_loans_lend_prefills_sms_between_its_requests():
    """``--eager-loan``: the same steady arrivals as above, where window loans never come;
    the prefill side's SMs go to decode whenever nothing waits for a first token while
    requests decode, and every arrival takes them back."""
    c = PartitionController(FRACTIONS, 1, policy="slo", ttft_s=1.0, tpot_s=0.1, now=0.0,
                            eager_loan=True, eager_after_s=0.01)
    c.on_request("r0", 0.0)
    assert c.tick(0.02) is None  # r0 waits for its first token
    c.on_output(["r0"], [1], [False], 0.05)
    assert c.tick(0.055) is None  # idle for 5 ms only
    lend = c.tick(0.07)
    assert lend.mode == "eager-loan" and lend.loan == "prefill" and lend.changed
    assert lend.share == pytest.approx(FRACTIONS[0]) and c.eager_loans == 1
    c.on_resized(0)
    assert c.tick(0.09) is None  # lent already
    back = c.on_request("r1", 0.1)
    assert back.mode == "eager-reclaim" and back.share == pytest.approx(FRACTIONS[1])
    c.on_resized(1)
    assert c.tick(0.2) is None  # r1 waits
    c.on_output(["r0", "r1"], [5, 1], [True, False], 0.21)
    c.tick(0.215)
    assert c.tick(0.23).mode == "eager-loan" and c.eager_loans == 2
    c.on_resized(0)
    w = c.tick(1.5)  # the window: the loan stays while the base split is judged
    assert w is not None and w.loan == "prefill" and not w.changed
    c.on_output(["r1"], [5], [True], 1.6)  # nothing decodes now
    assert c.on_request("r2", 1.7).mode == "eager-reclaim"
    c.on_output(["r2"], [1], [True], 1.75)  # finished with its first token: none decodes
    assert c.tick(1.9) is None and c.eager_loans == 2  # no one to lend to


def test_eager_loans_between_requests_that_do_not_stream():
    """Non-streaming requests get no output before they finish: the hand-off alone tells the
    controller that a request decodes and nothing waits (the GPU test's first run lent twice
    in 48 requests before this)."""
    c = PartitionController(FRACTIONS, 1, policy="slo", ttft_s=1.0, tpot_s=0.1, now=0.0,
                            eager_loan=True, eager_after_s=0.005)
    loans = 0
    for k in range(5):  # every 60 ms: prefill 8 ms, then 80 ms of decoding
        t = 0.06 * k
        if (d := c.on_request(f"r{k}", t)) is not None:
            c.on_resized(c.fractions.index(d.share))
        assert c.tick(t + 0.001) is None  # r<k> waits for its first token
        c.on_handoff(t + 0.008, f"r{k}")
        assert c.tick(t + 0.009) is None  # idle for 1 ms only
        d = c.tick(t + 0.02)
        if d is not None and d.mode == "eager-loan":
            loans += 1
            c.on_resized(c.fractions.index(d.share))
        if k:
            c.on_output([f"r{k - 1}"], [64], [True], t + 0.03)
    assert loans == 5 and c.eager_loans == 5


def test_no_eager_loan_without_the_flag_under_the_static_policy_or_in_a_burst():
    for kw in ({}, {"policy": "static", "eager_loan": True}):
        c = PartitionController(FRACTIONS, 1, ttft_s=1.0, now=0.0, window_s=100.0, **kw)
        c.on_request("a", 0.0)
        c.on_output(["a"], [1], [False], 0.05)
        assert c.tick(0.5) is None
    fractions = (*FRACTIONS, 1.0)  # a burst split past the planned ones
    c = PartitionController(fractions, 1, ttft_s=0.3, now=0.0, window_s=100.0, burst_split=3,
                            eager_loan=True, eager_after_s=0.01)
    c.on_request("a", 0.0)
    c.on_output(["a"], [1], [False], 0.01)
    c.on_request("b", 0.02)
    assert c.tick(0.2).mode == "burst"  # b has waited 0.18 s
    c.on_resized(3)
    c.on_output(["b"], [1], [False], 0.25)
    assert c.tick(0.26).mode == "burst-end"
    c.on_resized(1)
    assert c.tick(0.265) is None and c.tick(0.28).mode == "eager-loan"  # after the burst


def test_bad_arguments():
    with pytest.raises(ValueError):
        PartitionController(FRACTIONS, 3)
    with pytest.raises(ValueError):
        PartitionController(FRACTIONS, 0, policy="round-robin")


def test_an_operator_can_pin_the_split_and_hand_it_back():
    c = PartitionController(FRACTIONS, 1, policy="slo", ttft_s=1.0, tpot_s=0.1, now=0.0,
                            warmup_iters=0)
    c.set_policy("static", 2)  # pinned on split 2 (the resize itself is the caller's)
    assert c.kind == "static"
    c.on_request("a", 0.5)  # decode idle: the SLO policy would lend, the static one not
    d = c.tick(1.0)
    assert d.share == pytest.approx(FRACTIONS[2]) and d.loan is None
    c.on_resized(2)
    c.set_policy("slo")  # back to the controller, from the split in force
    assert c.kind == "slo" and c.policy.share == pytest.approx(FRACTIONS[2])
    d = c.tick(2.0)
    assert d is not None and d.previous_share == pytest.approx(FRACTIONS[2])
    with pytest.raises(ValueError):
        c.set_policy("round-robin")
    with pytest.raises(ValueError):
        c.set_policy("static", 3)
    assert c.kind == "slo"
