"""``--burst-unconfined``: one split past the planned ones on which the prefill worker runs on
all SMs (``partition.splits.with_burst_split``), entered by the partition controller while a
request waits too long for its first token and left once the queue is cleared; the decode
worker's side of it is the most prefill-heavy split's stream, and shares its CUDA graphs.
Pure logic with SGLang's real argument parser; the streams themselves need a GPU."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from sglang_semipd import protocol as P
from sglang_semipd.config import SemiPDConfig, SemiPDConfigError, add_semipd_args
from sglang_semipd.latency import LatencyTracker
from sglang_semipd.partition.controller import PartitionController
from sglang_semipd.partition.splits import (SplitError, burst_index, loan_and_base_fractions,
                                            nearest_split, plan_splits, with_burst_split)
from sglang_semipd.workers import _SemiPDMixin

H100 = plan_splits((0.25, 0.5, 0.75), 132)  # 40/92, 72/60, 104/28
FRACTIONS = tuple(s.prefill_fraction for s in with_burst_split(H100))  # ..., 1.0
BURST = 3


def test_the_burst_split_is_the_top_split_with_prefill_unconfined():
    splits = with_burst_split(H100)
    assert [s.describe() for s in splits] == ["40/92", "72/60", "104/28", "all/28"]
    top, burst = splits[-2], splits[-1]
    assert burst.unconfined and not top.unconfined
    assert (burst.prefill_sms, burst.decode_sms, burst.total_sms) == (104, 28, 132)
    assert burst.prefill_fraction == 1.0 and burst_index(splits) == BURST
    assert burst_index(H100) is None
    # no share ever maps to it: set_internal_state and the SLO policy pick planned splits
    assert [nearest_split(splits, x) for x in (0.1, 0.5, 0.79, 0.99)] == [0, 1, 2, 2]
    with pytest.raises(SplitError):
        with_burst_split(splits)  # only once
    with pytest.raises(SplitError):
        with_burst_split(())
    with pytest.raises(SplitError):
        nearest_split(splits[-1:], 0.5)


def test_loans_and_base_splits_leave_the_burst_split_out():
    most = with_burst_split(plan_splits((0.05, 0.25, 0.5, 0.75, 0.95), 132))
    loans, base = loan_and_base_fractions(most, (0.25, 0.5, 0.75), lend_most=True)
    assert 1.0 not in loans and 1.0 not in base
    assert loans == (8 / 132, 104 / 132)
    assert loan_and_base_fractions(with_burst_split(H100), (0.25,), lend_most=False) == ((), None)


def test_the_oldest_wait_for_a_first_token():
    lat = LatencyTracker(0.0)
    assert lat.oldest_wait(5.0) == 0.0
    for rid, t in (("a", 1.0), ("b", 1.5), ("c", 2.0)):
        lat.on_request(rid, t)
    assert lat.oldest_wait(2.5) == pytest.approx(1.5)
    lat.on_outputs(["a"], [1], [False], 2.6)  # a's first token
    assert lat.oldest_wait(3.0) == pytest.approx(1.5) and lat.waiting_first_token == 2
    lat.on_abort("b")
    assert lat.oldest_wait(3.0) == pytest.approx(1.0)
    lat.on_outputs(["c"], [0], [True], 3.1)  # finished without a token (an error)
    assert lat.oldest_wait(4.0) == 0.0 and lat.waiting_first_token == 0
    assert lat.in_flight == 1  # a still decodes


def _controller(**kw) -> PartitionController:
    args = dict(policy="slo", ttft_s=0.3, tpot_s=0.15, now=0.0, warmup_iters=0,
                window_s=100.0, burst_split=BURST)
    args.update(kw)
    return PartitionController(FRACTIONS, 1, **args)


def test_a_long_wait_for_a_first_token_unconfines_prefill_until_the_queue_clears():
    c = _controller()
    assert c.policy.shares == pytest.approx(FRACTIONS[:3])  # never the SLO policy's choice
    c.on_request("a", 0.0)
    assert c.tick(0.1) is None  # waited 0.1 s < 0.15 s (half the TTFT target)
    d = c.tick(0.16)
    assert d.mode == "burst" and d.split == BURST and d.changed and c.in_burst
    assert d.previous_share == pytest.approx(FRACTIONS[1])
    c.on_resized(BURST)
    c.on_request("b", 0.2)
    assert c.tick(0.25) is None  # a still waits
    c.on_output(["a"], [1], [False], 0.3)
    assert c.tick(0.27 + 0.01) is None  # b has waited 0.08 s >= 0.075 s: stays
    c.on_output(["b"], [1], [False], 0.3)
    back = c.tick(0.31)  # nobody waits: back to the split it left
    assert back.mode == "burst-end" and back.split == 1 and not c.in_burst
    assert back.share == pytest.approx(FRACTIONS[1]) and back.previous_share == 1.0
    c.on_resized(1)
    assert c.bursts == 1


def test_a_burst_is_cut_after_burst_max_s_and_then_rests_as_long():
    c = _controller(burst_max_s=1.0)
    c.on_request("a", 0.0)
    assert c.tick(0.2).mode == "burst"
    c.on_resized(BURST)
    cut = c.tick(1.25)  # a still waits, but the burst has run 1.05 s
    assert cut.mode == "burst-end" and cut.split == 1 and "cut" in cut.reason
    c.on_resized(1)
    assert c.tick(2.0) is None  # resting until 2.25
    again = c.tick(2.3)
    assert again is not None and again.mode == "burst" and c.bursts == 2


def test_no_burst_during_an_idle_loan_under_the_static_policy_or_without_a_burst_split():
    c = _controller(window_s=1.0, ttft_s=3.0)  # a burst from 1.5 s of waiting
    c.on_request("a", 0.1)  # only prefill has work: the SLO policy lends decode's SMs
    d = c.tick(1.0)
    assert d.loan == "decode" and d.split is None
    c.on_resized(2)
    assert c.tick(1.7) is None  # a has waited 1.6 s, but decode's SMs are lent already
    static = _controller(policy="static")
    static.on_request("a", 0.0)
    assert static.tick(0.5) is None
    plain = PartitionController(FRACTIONS[:3], 1, ttft_s=0.3, now=0.0, window_s=100.0)
    plain.on_request("a", 0.0)
    assert plain.tick(0.5) is None and plain.burst_split is None


def test_windows_that_end_in_a_burst_are_not_judged_and_an_operator_ends_it():
    c = _controller(window_s=1.0)
    c.on_iteration(P.IterationStat(role="decode", iteration=0, split=1, mode="decode",
                                   batch_size=4, tokens=4, start=0.0, end=0.01))
    c.on_request("a", 0.0)
    c.on_output(["x"], [1], [False], 0.0)  # unknown rid: ignored
    assert c.tick(0.2).mode == "burst"
    c.on_resized(BURST)
    decisions = c.decisions
    assert c.tick(1.1) is None and c.decisions == decisions  # measured, not judged
    c.set_policy("static", 2)  # /set_internal_state: the caller resizes to split 2
    assert not c.in_burst and c.kind == "static"
    c.on_resized(2)
    assert c.tick(1.2) is None  # nothing to end


def test_prompt_tokens_count_while_their_request_waits_for_its_first_token():
    lat = LatencyTracker(0.0)
    lat.on_request("a", 0.0, 1000)
    lat.on_request("a", 0.1, 1000)  # seen twice (a batch re-sent): counted once
    lat.on_request("b", 0.2, 300)
    lat.on_request("c", 0.3, 50)
    lat.on_request("d", 0.4)  # no ids known
    assert lat.tokens_waiting == 1350
    lat.on_outputs(["a"], [1], [False], 0.5)  # a's first token
    lat.on_outputs(["a"], [2], [False], 0.6)
    assert lat.tokens_waiting == 350
    lat.on_abort("b")
    lat.on_abort("b")
    lat.on_outputs(["c"], [0], [True], 0.7)  # finished without a token (an error)
    assert lat.tokens_waiting == 0 and lat.waiting_first_token == 1
    lat.on_outputs(["a"], [3], [True], 0.8)
    assert lat.tokens_waiting == 0


def _prefill(c: PartitionController, split: int, tokens: int, seconds: float,
             at: float = 0.0) -> None:
    c.on_iteration(P.IterationStat(role="prefill", iteration=0, split=split, mode="extend",
                                   batch_size=1, tokens=tokens, start=at, end=at + seconds))


def test_the_prefill_speed_per_split_comes_from_large_extend_iterations_only():
    c = _controller(warmup_iters=1)
    _prefill(c, 2, 2048, 0.5)  # the first on this split: warm-up, not timed
    _prefill(c, 2, 2048, 0.074)
    assert c.prefill_s_per_token == {2: pytest.approx(0.074 / 2048)}
    _prefill(c, 2, 100, 0.02)  # launch-bound: not a speed
    c.on_iteration(P.IterationStat(role="decode", iteration=0, split=2, mode="decode",
                                   batch_size=64, tokens=64, start=0.0, end=0.02))
    assert c.prefill_s_per_token == {2: pytest.approx(0.074 / 2048)}
    _prefill(c, 2, 2048, 0.174)  # moves a third of the way (SPEED_SMOOTHING 0.3)
    assert c.prefill_s_per_token[2] == pytest.approx((0.074 + 0.3 * 0.1) / 2048)
    _prefill(c, 1, 1024, 0.1)
    _prefill(c, 1, 1024, 0.1)
    assert c.prefill_s_per_token[1] == pytest.approx(0.1 / 1024)


def test_a_queue_of_long_prompts_unconfines_prefill_before_anyone_has_waited_long():
    c = _controller()  # on split 1 (72/60); bursts from 0.15 s expected wait
    _prefill(c, 1, 2048, 0.125)  # 61 us a token on 72 SMs (H100: 114-150 ms a chunk)
    c.on_request("a", 1.0, 1500)
    assert c.tick(1.01) is None  # 0.01 + 0.092 s
    c.on_request("b", 1.02, 1100)
    d = c.tick(1.03)  # 0.03 s waited + 2,600 tokens (0.159 s) ahead
    assert d.mode == "burst" and d.split == BURST
    assert "0.159s to prefill the 2600 prompt tokens waiting" in d.reason
    c.on_resized(BURST)
    _prefill(c, BURST, 2048, 0.061, at=1.03)  # its own speed, not used for the way back
    c.on_output(["a"], [1], [False], 1.10)
    # b alone: waited 0.09 s >= 0.075 s
    assert c.tick(1.11) is None
    c.on_request("c", 1.12, 1400)
    c.on_output(["b"], [1], [False], 1.13)
    # c waited 0.01 s, but its 1,400 tokens take 0.085 s on the split the burst left: stays
    assert c.tick(1.13) is None
    c.on_output(["c"], [1], [False], 1.2)
    c.on_request("e", 1.2, 200)
    back = c.tick(1.21)  # 0.01 s + 0.012 s < 0.075 s
    assert back.mode == "burst-end" and back.split == 1
    assert "(+ 0.012s of prompts waiting there)" in back.reason


def test_without_a_measured_speed_only_the_wait_counts():
    c = _controller()
    _prefill(c, 2, 2048, 0.074)  # another split's speed says nothing about split 1's
    c.on_request("a", 0.0, 50_000)
    assert c.tick(0.1) is None
    assert c.tick(0.16).mode == "burst"


def test_bad_burst_splits():
    with pytest.raises(ValueError, match="burst split"):
        PartitionController(FRACTIONS, 1, burst_split=4)
    with pytest.raises(ValueError, match="burst split"):
        PartitionController(FRACTIONS, BURST, burst_split=BURST)  # never the start
    with pytest.raises(ValueError, match="burst split"):  # nor a base split
        PartitionController(FRACTIONS, 1, burst_split=BURST, base_fractions=FRACTIONS)
    with pytest.raises(ValueError, match="positive"):
        PartitionController(FRACTIONS, 1, burst_split=BURST, burst_after_s=0.0)


def _parse(*argv: str) -> argparse.Namespace:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    add_semipd_args(parser)
    return parser.parse_args(["--model-path", "m", *argv])


def test_the_flag_needs_green_contexts_and_the_slo_policy():
    which = lambda _: "/usr/bin/nvidia-cuda-mps-control"  # noqa: E731
    cfg = SemiPDConfig.from_namespace(_parse("--burst-unconfined"), which)
    assert cfg.burst_unconfined and cfg.sm_partition == "green"
    assert not SemiPDConfig.from_namespace(_parse(), which).burst_unconfined
    for argv in (("--sm-partition", "none"), ("--sm-partition", "mps"),
                 ("--partition-policy", "static")):
        with pytest.raises(SemiPDConfigError, match="--burst-unconfined needs"):
            SemiPDConfig.from_namespace(_parse("--burst-unconfined", *argv), which)
    stock = SemiPDConfig.from_namespace(_parse("--no-semi-pd", "--burst-unconfined",
                                               "--sm-partition", "none"), which)
    assert not stock.enabled  # stock SGLang ignores semi-PD's flags


class _Runner:
    def __init__(self, stream) -> None:
        self.stream = stream


class _DecodeWorker(_SemiPDMixin):
    """The decode worker's streams with a burst split: its last entry is the top split's
    stream object (``partition.streams.build_split_streams``)."""

    semipd_role = "decode"

    def __init__(self) -> None:
        from sglang_semipd.partition.streams import current_capture_stream

        streams = ["green-0", "green-1", "green-2"]
        streams.append(streams[-1])
        self.semipd_streams = SimpleNamespace(mode="green", streams=streams)
        self.captures: list = []

        def init_decode_cuda_graph() -> None:
            self.captures.append(current_capture_stream())
            mr.decode_cuda_graph_runner = _Runner(current_capture_stream())

        mr = SimpleNamespace(attn_backend="b0", decode_cuda_graph_runner=_Runner("green-1"),
                             _get_attention_backend=lambda: "bn",
                             init_decode_cuda_graph=init_decode_cuda_graph)
        self.tp_worker = SimpleNamespace(model_runner=mr)


def test_the_decode_side_of_the_burst_split_replays_the_top_splits_graphs():
    w = _DecodeWorker()
    w.semipd_capture_split_graphs(1)
    runners = w.semipd_graph_runners
    assert w.captures == ["green-0", "green-2"]  # no second capture on the shared stream
    assert runners[BURST] is runners[2] and runners[2].stream == "green-2"
    w.semipd_activate(BURST)
    assert w.tp_worker.model_runner.decode_cuda_graph_runner is runners[2]


def test_the_benchmark_profiles_name_the_burst_split(monkeypatch):
    """``benchmark.compare.server_splits`` reads ``/server_info``; the burst split is the top
    split's SM counts there, and the profiles call it ``all/<decode>``."""
    from benchmark import compare
    from benchmark.phase_profile import _split_name
    from sglang_semipd.testing import server

    state = {"splits": [[40, 92], [104, 28], [104, 28]], "burst_split": 2, "split": 0}
    monkeypatch.setattr(server, "http_json",
                        lambda url, *a, **k: {"internal_states": [{"semipd": state}]})
    splits = compare.server_splits("http://127.0.0.1:1")
    assert [_split_name(i, splits) for i in range(3)] == ["40/92", "104/28", "all/28"]
    assert state["splits"][2] == [104, 28]  # the server's own list is left alone
    state["burst_split"] = None
    assert compare.server_splits("http://127.0.0.1:1")[2] == [104, 28]


def test_server_info_names_the_burst_split():
    """``/server_info``'s ``semipd`` state (the prefill worker's ``_semipd_state``)."""
    from sglang_semipd.partition.resize import WorkerResizeState
    from sglang_semipd.workers import make_prefill_scheduler_cls

    worker = object.__new__(make_prefill_scheduler_cls())
    worker.semipd_streams = SimpleNamespace(mode="green", splits=with_burst_split(H100))
    worker.semipd_resize = WorkerResizeState("prefill", BURST)
    state = worker._semipd_state()
    assert state["burst_split"] == BURST and state["split"] == BURST
    assert state["splits"][BURST] == [104, 28]  # the top split's SMs, as planned
    worker.semipd_streams = SimpleNamespace(mode="green", splits=H100)
    worker.semipd_resize = WorkerResizeState("prefill", 1)
    assert worker._semipd_state()["burst_split"] is None
