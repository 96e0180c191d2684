"""benchmark.slo_controller's load plan (CPU): the two phases, the rate step and the optional mix
step, deterministic in the seed."""

from __future__ import annotations

from benchmark.slo_controller import attainment_of, load_plan, parse


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
