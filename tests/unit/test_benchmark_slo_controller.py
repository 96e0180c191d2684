"""benchmark.slo_controller on the CPU: the load plan (two phases, the rate step and the optional mix
step, deterministic in the seed), attainment, and the split over time from the scheduler's trace."""

from __future__ import annotations

from sglang_semipd import protocol as P
from sglang_semipd.trace import Trace, read_trace

from benchmark.slo_controller import attainment_of, load_plan, parse, share_at, split_changes


def _args(*extra: str):
    return parse(["--model-dir", "m", "--rate", "10", "--phase-s", "20", "--input-len", "64",
                  "--output-len", "32", *extra])


def test_default_step_doubles_the_rate_and_keeps_the_mix():
    plan, phases = load_plan(_args())
    assert [p["rate"] for p in phases] == [10.0, 20.0]
    assert phases[0]["end_s"] == phases[1]["start_s"] == 20.0 and phases[1]["end_s"] == 40.0
    first = [r for r in plan if r[0] < 20.0]
    second = [r for r in plan if r[0] >= 20.0]
    assert 140 <= len(first) <= 260 and 320 <= len(second) <= 480  # Poisson, ~200 and ~400
    assert all(len(ids) == 64 and out == 32 for _, ids, out in plan)
    times = [t for t, _, _ in plan]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 40.0


def test_a_mix_step_changes_prompt_and_output_lengths_at_the_step():
    plan, phases = load_plan(_args("--step-factor", "1.5", "--step-input-len", "512",
                                   "--step-output-len", "8"))
    assert phases[1]["rate"] == 15.0
    assert (phases[1]["input_len"], phases[1]["output_len"]) == (512, 8)
    assert all((len(ids), out) == ((64, 32) if t < 20.0 else (512, 8)) for t, ids, out in plan)


def test_the_plan_is_the_same_for_the_same_seed_only():
    a, _ = load_plan(_args())
    b, _ = load_plan(_args())
    c, _ = load_plan(_args("--seed", "1"))
    assert a == b and a != c


def test_attainment_counts_both_slos_and_errors():
    ok = {"arrival": 0.0, "first": 0.2, "end": 1.2, "tokens": 11}  # TTFT 0.2, TPOT 0.1
    slow_first = dict(ok, first=0.6, end=1.6)
    slow_tokens = dict(ok, end=3.2)
    assert attainment_of([ok, slow_first, slow_tokens, {"arrival": 0.0, "error": "x"}],
                         0.5, 0.15) == 0.25
    assert attainment_of([], 0.5, 0.15) is None


def test_the_split_over_time_comes_from_every_resize_in_the_trace(tmp_path):
    """Policy moves and pins alike are resize commands in the scheduler's trace."""
    splits = [[40, 92], [72, 60], [104, 28]]
    trace = Trace(str(tmp_path / "t.jsonl"))
    trace.write("decision", {"t": 0.5, "share": 0.55, "previous": 0.55})  # a hold: no resize
    trace.write("resize", P.Resize(seq=1, split=2, sent_at=1.0), reason="slo")
    trace.write("resize_ack", P.ResizeAck(role="prefill", seq=1, split=2, iteration=3,
                                          applied_at=1.001), latency_ms=1.0)
    trace.write("resize", P.Resize(seq=2, split=0, sent_at=2.0), reason="set_internal_state")
    trace.close()
    changes = split_changes(read_trace(tmp_path / "t.jsonl"), splits)
    assert changes == [(1.0, 104 / 132), (2.0, 40 / 132)]
    assert [share_at(changes, t, 72 / 132) for t in (0.9, 1.5, 2.5)] == \
        [72 / 132, 104 / 132, 40 / 132]
