"""benchmark.details (per-rate metrics under every SLO set, goodput per set and over an SLO
scale sweep, peak GPU memory) and the GPU-memory sampler behind the last."""

from __future__ import annotations

import json
import sys
import time

import pytest

from benchmark import compare
from benchmark.common import PeakGpuMemory
from sglang_semipd.testing.server import wait_until


def test_the_sampler_keeps_the_peak_summed_over_gpus(tmp_path):
    """A real subprocess per poll, printing MiB per GPU as nvidia-smi does (from a file the
    test changes)."""
    f = tmp_path / "used"
    f.write_text("100\n")
    cmd = [sys.executable, "-c", f"print(open({str(f)!r}).read())"]
    with PeakGpuMemory(interval_s=0.02, cmd=cmd) as mem:
        wait_until(lambda: mem.samples >= 2)
        f.write_text("300\n20\n")  # two GPUs
        seen = mem.samples
        wait_until(lambda: mem.samples >= seen + 2)
        f.write_text("50\n")
    assert mem.peak_mib == 320


def test_the_sampler_without_a_gpu_reports_none():
    with PeakGpuMemory(interval_s=0.02, cmd=["/nonexistent/nvidia-smi"]) as mem:
        time.sleep(0.1)
    assert mem.peak_mib is None and mem.samples == 0


def test_details_cover_every_slo_set_the_scale_sweep_and_peak_memory(bench_out):
    index, out = bench_out.index, bench_out.out
    # TTFT 0.35 s: misses the tight ShareGPT SLO (0.3 s), meets the loose one (0.4 s);
    # ITL 0.06 s meets TPOT 0.15 s but not the tpot50 set's 50 ms P99 ITL
    for rate in (1, 2, float("inf")):
        bench_out.write("semipd_none", rate, 0.35, 0.06)
    (out / "memory_semipd_none_sharegpt.json").write_text(json.dumps(
        {"runs": ["semipd_none"], "peak_gpu_mib": 70123, "samples": 9}))
    (out / "memory_sglang_pdmux_sharegpt.json").write_text(json.dumps(
        {"runs": ["sglang_pdmux"], "peak_gpu_mib": None, "samples": 0}))
    compare.write_merged_report(out, index)
    details = json.loads((out / "details.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    w = details["workloads"]["sharegpt"]
    assert list(w["slo_sets"]) == ["tight", "loose", "tpot50"]
    rd = w["runs"]["semipd_none"]
    assert rd["goodput_req_s"] == {"tight": None, "loose": 2.0, "tpot50": None}
    sweep = rd["slo_scale_goodput_req_s"]
    assert sweep["0.5"] is None and sweep["1"] is None and sweep["1.25"] == 2.0
    assert rd["peak_gpu_mib"] == 70123
    assert [row["rate"] for row in rd["curve"]] == [1.0, 2.0, "inf"]
    row = rd["curve"][0]
    assert row["attainment"] == {"tight": 0.0, "loose": 1.0, "tpot50": 0.0}
    assert row["ttft"]["p90"] == pytest.approx(0.35) and row["itl"]["p99"] == pytest.approx(0.06)
    assert details["workloads"]["azure_conv"]["runs"] == {}
    md = (out / "details.md").read_text()
    assert "| semipd_none | inf | 0.00 | 1.00 | 0.00 | 350.0/350.0/350.0 |" in md
    # the inf run served its 12 requests in 1.2 s, the first token 0.35 s in: 14.1 req/s
    assert rd["saturation_req_s"] == pytest.approx(12 / 0.85)
    assert rd["goodput_up_to_saturation_req_s"] == rd["goodput_req_s"]
    assert ("- `semipd_none`: tight n/a, loose 2, tpot50 n/a; up to saturation (14.1 req/s): "
            "tight n/a, loose 2, tpot50 n/a; scale sweep:") in md
    assert (out / "plots" / "sharegpt_slo_scale.png").stat().st_size > 1000
    assert not (out / "plots" / "azure_conv_slo_scale.png").exists()
    assert "## azure_conv\n\nNo runs yet." in md and "| semipd_none | 1 | 0.00 |" in md


def test_rates_above_the_saturation_do_not_count_toward_goodput_up_to_it(bench_out):
    # every run meets the tight SLO, 32 req/s too, above the 10.9 req/s the inf run served
    # (12 requests in 1.2 s, the first token 0.1 s in)
    for rate in (1, 2, 32, float("inf")):
        bench_out.write("sglang_chunked_2048", rate, 0.1, 0.06)
    bench_out.write("sglang_chunked_8192", 1, 0.1, 0.06)  # no inf run: saturation unknown
    compare.write_merged_report(bench_out.out, bench_out.index)
    runs = json.loads((bench_out.out / "details.json").read_text())["workloads"]["sharegpt"]["runs"]
    rd = runs["sglang_chunked_2048"]
    assert rd["goodput_req_s"] == {"tight": 32.0, "loose": 32.0, "tpot50": None}
    assert rd["saturation_req_s"] == pytest.approx(12 / 1.1)
    assert rd["goodput_up_to_saturation_req_s"] == {"tight": 2.0, "loose": 2.0, "tpot50": None}
    assert runs["sglang_chunked_8192"]["saturation_req_s"] is None
    assert runs["sglang_chunked_8192"]["goodput_up_to_saturation_req_s"] == {
        "tight": None, "loose": None, "tpot50": None}
    md = (bench_out.out / "details.md").read_text()
    assert ("- `sglang_chunked_2048`: tight 32, loose 32, tpot50 n/a; up to saturation "
            "(10.9 req/s): tight 2, loose 2, tpot50 n/a; scale sweep:") in md
    assert "- `sglang_chunked_8192`: tight 1, loose 1, tpot50 n/a; scale sweep:" in md
    summary = json.loads((bench_out.out / "summary.json").read_text())
    assert summary["workloads"]["sharegpt"]["goodput_req_s"]["sglang_chunked_best"] == 32.0
    assert "sharegpt: goodput up to saturation (10.9 req/s): 2 req/s" in \
        summary["notes"]["sglang_chunked_best"]


def test_memory_files_travel_with_a_merge(tmp_path):
    call = tmp_path / "call"
    call.mkdir()
    (call / "meta.json").write_text(json.dumps({"gpu": "H100", "model": "m"}))
    (call / "memory_semipd_none_sharegpt.json").write_text('{"runs": ["semipd_none"]}\n')
    compare.merge_call(call, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "memory_semipd_none_sharegpt.json").read_text()) == \
        {"runs": ["semipd_none"]}


def _trace(path, events) -> list[dict]:
    """A real scheduler trace (sglang_semipd.trace, the protocol's records)."""
    from sglang_semipd import protocol as P
    from sglang_semipd.trace import Trace, read_trace

    t = Trace(str(path))
    for e in events:
        if e[0] == "it":
            _, role, split, start, dur, tokens, *queued = e
            t.write("iteration", P.IterationStat(role=role, iteration=0, split=split,
                                                 mode="extend" if role == "prefill" else "decode",
                                                 batch_size=tokens if role == "decode" else 1,
                                                 tokens=tokens, start=start,
                                                 end=start + dur, queued=sum(queued)))
        else:
            t.write("resize", P.Resize(seq=1, split=e[1], sent_at=e[2]), reason="test")
    t.close()
    return read_trace(path)


def test_a_phase_profile_splits_busy_time_by_role_and_split(tmp_path):
    from benchmark.phase_profile import main_split, profile_window

    rows = _trace(tmp_path / "t.jsonl", [
        ("it", "prefill", 2, 10.0, 0.5, 4000), ("it", "decode", 2, 10.0, 0.02, 64),
        ("resize", 0, 10.6),
        ("it", "decode", 0, 10.7, 0.01, 64), ("it", "decode", 0, 10.8, 0.01, 64),
        ("it", "decode", 0, 10.9, 0.01, 64),
        ("it", "prefill", 0, 12.5, 1.0, 9000)])  # after the window
    prof = profile_window(rows, 10.0, 12.0, splits=[[40, 92], [72, 60], [104, 28]])
    assert prof["window_s"] == pytest.approx(2.0)
    assert prof["prefill"]["iterations"] == 1 and prof["prefill"]["tokens"] == 4000
    assert prof["prefill"]["busy_share"] == pytest.approx(0.25)
    assert prof["prefill"]["busy_share_by_split"] == {"104/28": pytest.approx(1.0)}
    dec = prof["decode"]
    assert dec["iterations"] == 4 and dec["busy_s"] == pytest.approx(0.05)
    assert dec["busy_share_by_split"] == {"104/28": pytest.approx(0.4), "40/92": pytest.approx(0.6)}
    assert dec["iteration_ms"]["p50"] == pytest.approx(10.0)
    assert prof["resizes"] == 1 and main_split(prof) == "40/92"
    assert prof["prefill"]["queued_gap_ms"] is None  # nothing waited
    # like with like: ms per 1,024 prefill tokens, decode steps at a batch of 32 or more
    assert prof["prefill"]["speed_by_split"] == {"104/28": {"n": 1, "p50": pytest.approx(128.0)}}
    assert dec["speed_by_split"] == {"104/28": {"n": 1, "p50": pytest.approx(20.0)},
                                     "40/92": {"n": 3, "p50": pytest.approx(10.0)}}
    empty = profile_window(rows, 0.0, 1.0)
    assert empty["decode"]["iteration_ms"] is None and main_split(empty) is None


def test_the_profile_measures_prefill_idle_time_while_requests_wait(tmp_path):
    """The gaps after iterations that left requests waiting (on the H100, 14.6 ms at the
    median next to 16 ms iterations); a gap after an iteration with nothing waiting is idle
    for want of work and does not count."""
    from benchmark.phase_profile import profile_window

    rows = _trace(tmp_path / "t.jsonl", [
        ("it", "prefill", 1, 1.000, 0.016, 900, 3), ("it", "prefill", 1, 1.030, 0.016, 900, 2),
        ("it", "prefill", 1, 1.056, 0.016, 900, 0), ("it", "prefill", 1, 1.500, 0.016, 900, 1),
        ("it", "prefill", 1, 1.520, 0.016, 900, 0), ("it", "decode", 1, 1.0, 0.01, 8, 5)])
    gaps = profile_window(rows, 0.0, 2.0)["prefill"]["queued_gap_ms"]
    assert gaps["n"] == 3  # after the iterations at 1.000, 1.030 and 1.500
    assert gaps["p50"] == pytest.approx(10.0) and gaps["p90"] == pytest.approx(13.2)
    assert profile_window(rows, 0.0, 2.0)["decode"]["queued_gap_ms"] is None  # no next one
    # 900-token prefills are launch-bound and a batch of 8 is no decode speed: none given
    assert profile_window(rows, 0.0, 2.0)["prefill"]["speed_by_split"] == {}
    assert profile_window(rows, 0.0, 2.0)["decode"]["speed_by_split"] == {}


def test_profiles_of_traced_runs_reach_the_details(bench_out, tmp_path):
    index, out = bench_out.index, bench_out.out
    for rate in (1, 2):
        bench_out.write("semipd_green_slo", rate, 0.1, 0.02)
    rows = _trace(tmp_path / "t.jsonl", [("it", "decode", 1, 5.5, 0.02, 8),
                                         ("it", "prefill", 1, 5.6, 0.1, 900)])
    compare.write_profiles(out / "profile_semipd_green_slo_sharegpt.json", rows,
                           {"semipd_green_slo_sharegpt_1": (5.0, 6.0)}, [[40, 92], [72, 60]])
    compare.write_merged_report(out, index)
    curve = json.loads((out / "details.json").read_text())[
        "workloads"]["sharegpt"]["runs"]["semipd_green_slo"]["curve"]
    assert curve[0]["profile"]["decode"]["busy_share_by_split"] == {"72/60": 1.0}
    assert "profile" not in curve[1]  # rate 2 was not traced
    md = (out / "details.md").read_text()
    assert "| semipd_green_slo | 1 | 0.10 | 100.0 | n/a | 0.02 | 20.0 | 72/60 | 0 |" in md
    assert "| semipd_green_slo | 1 | n/a | n/a |" in md  # 900 tokens, a batch of 8: no speed


def test_the_details_set_one_splits_speed_against_anothers(bench_out, tmp_path):
    """The comparison behind findings 10 (H100: a 2,048-token chunk in 61 ms unconfined
    against 74 ms on 104 SMs; decode steps 41 ms next to it against 19 ms), in the report."""
    index, out = bench_out.index, bench_out.out
    bench_out.write("semipd_green_slo", 1, 0.1, 0.02)
    rows = _trace(tmp_path / "t.jsonl", [
        ("it", "prefill", 1, 5.0, 0.074, 2048), ("it", "prefill", 1, 5.1, 0.074, 2048),
        ("it", "prefill", 2, 5.2, 0.061, 2048), ("it", "prefill", 2, 5.3, 0.02, 40),
        ("it", "decode", 1, 5.0, 0.019, 64), ("it", "decode", 2, 5.2, 0.041, 64)])
    compare.write_profiles(out / "profile_semipd_green_slo_sharegpt.json", rows,
                           {"semipd_green_slo_sharegpt_1": (5.0, 6.0)},
                           [[40, 92], [104, 28], ["all", 28]])
    compare.write_merged_report(out, index)
    md = (out / "details.md").read_text()
    assert "decode step ms (batch >= 32)" in md
    assert ("| semipd_green_slo | 1 | 104/28: 37.0 (2), all/28: 30.5 (1) | "
            "104/28: 19.0 (1), all/28: 41.0 (1) |") in md


def test_a_decode_stall_shows_as_max_itl_though_per_request_p99_itl_passes(bench_out):
    """The stall the H100 showed on stock SGLang's long-prompt runs: a request's one gap of
    seconds among ~200 short ones stays under its own P99 ITL, so the tpot50 set passes it;
    the table's ITL max column is what shows it."""
    from benchmark.metrics import PAPER_SLOS, attainment, results_from_details

    rec = {"duration": 1.0, "completed": 1, "ttfts": [0.1], "output_lens": [201],
           "input_lens": [8000], "errors": [""], "itls": [[0.02] * 199 + [3.0]]}
    (res,) = results_from_details(rec, input_lens=[8000])
    assert res.itl_p99 < 0.05 and attainment([res], PAPER_SLOS["sharegpt"]["tpot50"]) == 1.0
    compare.run_file(bench_out.out, "semipd_none", "sharegpt", 1).write_text(
        json.dumps(rec) + "\n")
    compare.write_merged_report(bench_out.out, bench_out.index)
    md = (bench_out.out / "details.md").read_text()
    assert "ITL P99/max (ms)" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| semipd_none | 1 |"))
    assert "| 20.0/3000.0 |" in row
    itl = json.loads((bench_out.out / "details.json").read_text())[
        "workloads"]["sharegpt"]["runs"]["semipd_none"]["curve"][0]["itl"]
    assert itl["max"] == pytest.approx(3.0)


def test_runs_no_green_context_confines_name_their_real_partition(bench_out, tmp_path):
    """``none`` and ``mps`` runs trace the planned green pair nearest their share; the
    profile's split column says what actually held instead."""
    assert compare.partition_label("semipd_none") == "all SMs (none)"
    assert compare.partition_label("semipd_mps") == "MPS threads 50%/50%"
    for run in ("semipd_green_slo", "semipd_green_static_0.625", "sglang_chunked_2048"):
        assert compare.partition_label(run) is None
    rows = _trace(tmp_path / "t.jsonl", [("it", "decode", 1, 5.5, 0.02, 8),
                                         ("it", "prefill", 1, 5.6, 0.1, 900)])
    for run in ("semipd_none", "semipd_mps", "semipd_green_static_0.625"):
        bench_out.write(run, 1, 0.1, 0.02)
        compare.write_profiles(bench_out.out / f"profile_{run}_sharegpt.json", rows,
                               {f"{run}_sharegpt_1": (5.0, 6.0)}, [[40, 92], [72, 60]])
    compare.write_merged_report(bench_out.out, bench_out.index)
    md = (bench_out.out / "details.md").read_text()
    assert "| semipd_none | 1 | 0.10 | 100.0 | n/a | 0.02 | 20.0 | all SMs (none) | 0 |" in md
    assert "| semipd_mps | 1 | 0.10 | 100.0 | n/a | 0.02 | 20.0 | MPS threads 50%/50% | 0 |" in md
    assert "| semipd_green_static_0.625 | 1 | 0.10 | 100.0 | n/a | 0.02 | 20.0 | 72/60 | 0 |" in md


def test_the_summary_notes_say_what_an_unpartitioned_system_ran_on(bench_out):
    bench_out.write("semipd_mps", 1, 0.1, 0.02)
    summary = compare.write_merged_report(bench_out.out, bench_out.index)
    note = summary["notes"]["semipd_mps"]
    assert note.startswith("ran on MPS threads 50%/50%; sharegpt: goodput >= 1 req/s")
    # the description explains no missing results: those are still noted
    assert note.endswith("no results for workload azure_conv; no results for workload long")
    assert summary["notes"]["semipd_none"] == "not run"  # no label for a system that did not run
    assert "ran on" not in summary["notes"].get("semipd_green_slo", "")
