"""The comparison driver on the CPU: systems, commands, prepared workloads, dry run."""

from __future__ import annotations

import json
import sys

import pytest

from benchmark import compare
from benchmark.report import (CHUNK_SIZES, CHUNKED_PREFIX, STATIC_PREFIX, STATIC_SHARES,
                              SWEEPS, SYSTEMS, check_summary_shape)
from sglang_semipd.testing.server import ServerProcess, ServerStartError, free_port


def test_every_reported_system_has_a_run():
    named = set(compare.SYSTEM_RUNS)
    for system in SYSTEMS:
        if system == "sglang_chunked_best":
            assert {f"{CHUNKED_PREFIX}{c}" for c in CHUNK_SIZES} <= named
        elif system in SWEEPS:
            assert {f"{STATIC_PREFIX}{s:g}" for s in STATIC_SHARES} <= named
        else:
            assert system in named


def test_server_commands_share_flags_and_differ_by_system():
    cmds = {s: compare.server_command(s, "/m", "dummy", 31400) for s in compare.SYSTEM_RUNS}
    for s, cmd in cmds.items():
        assert cmd[1:3] == ["-m", compare.SYSTEM_RUNS[s][0]]
        assert " ".join(compare.COMMON_FLAGS) in " ".join(cmd)
    # what SGLang 0.5.17's ServerArgs requires of PD multiplexing (it asserts both)
    assert cmds["sglang_pdmux"][-4:] == ["--enable-pdmux", "--chunked-prefill-size", "-1",
                                         "--disable-overlap-schedule"]
    assert cmds["sglang_chunked_2048"][-2:] == ["--chunked-prefill-size", "2048"]
    assert cmds["semipd_mps"][-4:] == ["--sm-partition", "mps", *compare.SEMIPD_CHUNK]
    assert cmds["semipd_green_static_0.375"][-6:] == ["--partition-policy", "static",
                                                      "--prefill-sm-share", "0.375",
                                                      "--chunked-prefill-size", "2048"]
    for s, cmd in cmds.items():  # every semi-PD summary system prefills in the stock run's
        if s.startswith("semipd_"):  # chunks (the diag_* runs of earlier defaults do not)
            assert " ".join(compare.SEMIPD_CHUNK) in " ".join(cmd), s


def test_prepare_then_dry_run(tmp_path, capsys):
    index = compare.prepare(tmp_path, num=12)
    assert set(index) == {"sharegpt", "azure_conv", "long"}
    for name, meta in index.items():
        lines = (tmp_path / meta["file"]).read_text().splitlines()
        assert len(lines) == meta["requests"] == len(meta["prompt_lens"])
        assert json.loads(lines[0])["messages"][0]["role"] == "user"
    compare.main(["run", "--workloads", str(tmp_path), "--model-dir", "/m", "--dry-run",
                  "--systems", "sglang_chunked_512,semipd_none,semipd_green_slo",
                  "--rates", "1,2"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("sglang_chunked_512: -m sglang.launch_server")
    assert out[1].startswith("semipd_none:") and "x 3 workloads" in out[1]
    # the SLO policy gets each workload's own (tight) targets: one server per SLO set
    slo_lines = sorted(line for line in out if line.startswith("semipd_green_slo:"))
    assert len(slo_lines) == 2
    assert "--slo-ttft-ms 2250 --slo-tpot-ms 130" in slo_lines[0]
    assert "x 1 workloads x rates [1.0, 2.0]: requests {'long': [" in slo_lines[0]  # longbench
    assert "--slo-ttft-ms 300 --slo-tpot-ms 150" in slo_lines[1]
    assert "x 2 workloads" in slo_lines[1]  # sharegpt and azure_conv


def test_static_splits_share_one_server_pinned_in_turn(tmp_path, capsys):
    compare.prepare(tmp_path, num=12)
    statics = [f"{STATIC_PREFIX}{x:g}" for x in STATIC_SHARES]
    compare.main(["run", "--workloads", str(tmp_path), "--model-dir", "/m", "--dry-run",
                  "--systems", ",".join(["semipd_none", *statics]), "--rates", "1"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("semipd_none:")
    assert out[1].startswith(",".join(statics) + ":")  # one server, the splits in turn
    assert f"--prefill-sm-share {STATIC_SHARES[0]:g}" in out[1]
    assert compare.PINNED == {s: x for s, x in zip(statics, STATIC_SHARES)}


def test_requests_per_rate_follow_the_duration():
    meta = {"requests": 400}
    assert compare.requests_at(meta, 4.0, None) == 400  # the whole workload
    assert compare.requests_at(meta, 4.0, 15.0) == 60
    assert compare.requests_at(meta, 0.5, 15.0) == 20  # at least --min-requests
    assert compare.requests_at(meta, 64.0, 15.0) == 400  # at most all
    assert compare.requests_at(meta, 2.5, 15.0, min_requests=5) == 38
    assert compare.requests_at(meta, float("inf"), 15.0) == 400  # the unconstrained run


def test_runs_of_several_calls_merge_into_one_report(tmp_path, bench_record):
    """Two device calls wrote run files into one directory; the report covers both, notes the
    system that did not start and the ones not run, and keeps each call's command."""
    wl = tmp_path / "wl"
    index = compare.prepare(wl, num=12)
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"gpu": "H100", "model": "llama8b",
                                               "commands": ["call 1", "call 2"]}))
    (out / "notes.json").write_text(json.dumps({"sglang_pdmux": "did not start: boom"}))
    for run, ttft in (("sglang_chunked_2048", 0.2), ("semipd_green_slo", 0.1)):
        for rate in (1, 2):  # rate 2 of the chunked run misses the TTFT SLO (0.3 s)
            rec = bench_record(12, ttft * (2 if rate == 2 and "chunked" in run else 1), 0.05)
            compare.run_file(out, run, "sharegpt", rate).write_text(
                json.dumps({"other": "line"}) + "\n" + json.dumps(rec) + "\n")
    (out / "semipd_none_sharegpt_x.jsonl").write_text("{}")  # not a run file: skipped
    found = compare.collect(out, index)
    assert set(found["sharegpt"]) == {"sglang_chunked_2048", "semipd_green_slo"}
    assert sorted(found["sharegpt"]["semipd_green_slo"]) == [1.0, 2.0]
    assert found["azure_conv"] == {} and found["long"] == {}
    summary = compare.write_merged_report(out, index)
    gp = summary["workloads"]["sharegpt"]["goodput_req_s"]
    assert gp["semipd_green_slo"] == 2.0 and gp["sglang_chunked_best"] == 1.0
    assert gp["sglang_pdmux"] is None and gp["semipd_mps"] is None
    assert summary["notes"]["sglang_pdmux"] == "did not start: boom"
    assert summary["notes"]["semipd_mps"] == "not run"
    assert summary["command"] == "call 1 && call 2"
    assert not check_summary_shape(json.loads((out / "summary.json").read_text()))


def test_device_calls_merge_into_the_results_directory(tmp_path, bench_record):
    wl = tmp_path / "wl"
    index = compare.prepare(wl, num=12)
    calls = []
    for k, (run, note) in enumerate((("semipd_none", {"sglang_pdmux": "did not start: x"}),
                                      ("sglang_pdmux", {}))):
        call = tmp_path / f"call{k}"
        call.mkdir()
        (call / "meta.json").write_text(json.dumps({"gpu": "H100", "model": "llama8b",
                                                    "commands": [f"call {k}"]}))
        (call / "notes.json").write_text(json.dumps(note))
        rec = dict(bench_record(12, 0.1, 0.05), generated_texts=["long text"] * 12)
        compare.run_file(call, run, "sharegpt", 4).write_text(json.dumps(rec) + "\n")
        (call / "bench_x.log").write_text("not a run file")
        calls.append(call)
    out = tmp_path / "results"
    assert [compare.merge_call(c, out) for c in calls] == [1, 1]
    assert sorted(p.name for p in out.iterdir() if "jsonl" in p.name) == [
        "semipd_none_sharegpt_4.jsonl.gz", "sglang_pdmux_sharegpt_4.jsonl.gz"]
    kept = compare.last_record(out / "semipd_none_sharegpt_4.jsonl.gz")
    assert "generated_texts" not in kept and kept["ttfts"] == [0.1] * 12
    assert json.loads((out / "meta.json").read_text())["commands"] == ["call 0", "call 1"]
    assert json.loads((out / "notes.json").read_text()) == {}  # pdmux ran in the second call
    compare.merge_call(calls[0], out)  # merging again adds no command twice, no stale note
    assert json.loads((out / "meta.json").read_text())["commands"] == ["call 0", "call 1"]
    assert json.loads((out / "notes.json").read_text()) == {}
    summary = compare.write_merged_report(out, index)
    assert summary["workloads"]["sharegpt"]["goodput_req_s"]["sglang_pdmux"] == 4.0
    other = tmp_path / "h200"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"gpu": "H200", "model": "llama8b"}))
    with pytest.raises(ValueError, match="H200"):
        compare.merge_call(other, out)
    (other / "meta.json").write_text(json.dumps({"gpu": "H100", "model": "dsv2-lite"}))
    with pytest.raises(ValueError, match="dsv2-lite"):
        compare.merge_call(other, out)


def test_a_server_started_again_keeps_the_earlier_calls_profiles_and_peak(tmp_path):
    """Session 13 reran semipd_green_slo on ShareGPT at four rates: its call's
    ``profile_semipd_green_slo_sharegpt.json`` replaced the one holding session 11's 40, 48
    and inf profiles. Profiles merge by run stem now, memory keeps the higher peak."""
    out = tmp_path / "results"
    for k, (rates, peak, runs) in enumerate(((("8", "inf"), 900, ["a", "b"]),
                                             (("8", "24"), 700, ["b", "c"]))):
        call = tmp_path / f"call{k}"
        call.mkdir()
        (call / "meta.json").write_text(json.dumps({"gpu": "H100", "model": "llama8b"}))
        (call / "profile_x_sharegpt.json").write_text(json.dumps(
            {f"x_sharegpt_{r}": {"call": k} for r in rates}))
        (call / "memory_x_sharegpt.json").write_text(json.dumps(
            {"runs": runs, "peak_gpu_mib": peak, "samples": [k]}))
        compare.merge_call(call, out)
    assert json.loads((out / "profile_x_sharegpt.json").read_text()) == {
        "x_sharegpt_8": {"call": 1}, "x_sharegpt_inf": {"call": 0}, "x_sharegpt_24": {"call": 1}}
    assert json.loads((out / "memory_x_sharegpt.json").read_text()) == {
        "runs": ["a", "b", "c"], "peak_gpu_mib": 900, "samples": [0]}


def test_the_unconstrained_run_gives_max_throughput_and_no_goodput(bench_out):
    """Rate inf (`--rates ...,inf`): its run file parses, it sets max throughput and never
    goodput; the notes say which values are only bounds."""
    index, out = bench_out.index, bench_out.out
    for rate in (1, 2, float("inf")):  # meets the SLO at 1 and 2 req/s and all at once
        bench_out.write("semipd_none", rate, 0.1, 0.05)
    for rate, ttft in ((1, 0.1), (2, 0.9)):  # misses at 2 req/s, no unconstrained run
        bench_out.write("semipd_green_slo", rate, ttft, 0.05)
    assert compare.run_file(out, "semipd_none", "sharegpt", float("inf")).name == \
        "semipd_none_sharegpt_inf.jsonl"
    summary = compare.write_merged_report(out, index)
    w = summary["workloads"]["sharegpt"]
    assert w["goodput_req_s"]["semipd_none"] == 2.0  # not inf
    assert w["max_throughput_req_s"]["semipd_none"] == pytest.approx(10.0)  # 12 in 1.2 s
    assert "goodput >= 2" in summary["notes"]["semipd_none"]
    assert "no rate-inf run" not in summary["notes"]["semipd_none"]
    assert w["goodput_req_s"]["semipd_green_slo"] == 1.0
    assert summary["notes"]["semipd_green_slo"] == (
        "sharegpt: max throughput of the swept rates only (no rate-inf run); "
        "no results for workload azure_conv; no results for workload long")
    assert not check_summary_shape(summary)
    assert (out / "plots" / "sharegpt_attainment.png").stat().st_size > 1000


def test_merged_runs_are_compact_and_score_like_the_originals(tmp_path):
    """TTFTs and ITLs kept to 10 us: the merged file gives the same attainment, TTFT, TPOT
    and ITL statistics within 10 us (E2E within 2 ms), at a fraction of the size."""
    import random

    from benchmark.metrics import SLO, attainment, latency_summary

    rng = random.Random(0)
    wl = tmp_path / "wl"
    index = compare.prepare(wl, num=40)
    call = tmp_path / "call"
    call.mkdir()
    (call / "meta.json").write_text(json.dumps({"gpu": "H100", "model": "m"}))
    n = 12
    rec = {"duration": 2.0, "completed": n, "input_lens": [2] * n, "errors": [""] * n,
           "ttfts": [rng.uniform(0.05, 0.5) for _ in range(n)], "output_lens": [300] * n,
           "itls": [[rng.uniform(0.005, 0.03) for _ in range(299)] for _ in range(n)],
           "generated_texts": ["x" * 1000] * n}
    raw = compare.run_file(call, "semipd_none", "sharegpt", 8)
    raw.write_text(json.dumps(rec) + "\n")
    assert compare.merge_call(call, tmp_path / "out") == 1
    merged = tmp_path / "out" / "semipd_none_sharegpt_8.jsonl.gz"
    assert merged.stat().st_size < raw.stat().st_size / 4
    meta = {**index["sharegpt"], "prompt_lens": [2] * n}
    a, b = compare.load_point(raw, meta), compare.load_point(merged, meta)
    assert a.rate == b.rate == 8.0
    for slo in (SLO(0.3, 0.02), SLO(0.4, 0.025, True)):
        assert attainment(a.results, slo) == attainment(b.results, slo)
    sa, sb = latency_summary(a.results, 2.0), latency_summary(b.results, 2.0)
    # each value is off by <= 5 us; an E2E sums 300 of them
    for key, tol in (("ttft", 1e-5), ("tpot", 1e-5), ("itl", 1e-5), ("e2e", 2e-3)):
        for stat in ("mean", "p99"):
            assert sa[key][stat] == pytest.approx(sb[key][stat], abs=tol)


def test_the_warm_up_replays_the_first_workload_at_the_lowest_finite_rate():
    index = {"sharegpt": {"requests": 400}, "azure_conv": {"requests": 400}}
    assert compare.warmup_plan(index, [16.0, float("inf"), 4.0], 32) == ("sharegpt", 4.0, 32)
    assert compare.warmup_plan({"long": {"requests": 10}}, [1.0], 32) == ("long", 1.0, 10)
    assert compare.warmup_plan(index, [float("inf")], 32) is None
    assert compare.warmup_plan(index, [4.0], 0) is None
    # its output is no run file: merges and reports never see it
    assert not "warmup_semipd_none.jsonl".startswith(tuple(r + "_" for r in compare.SYSTEM_RUNS))


def test_a_server_that_dies_at_start_is_noted_with_its_exception(tmp_path):
    """The note of a system that did not start names the error from the server's log (as
    stock SGLang 0.5.17's --enable-pdmux raised in its scheduler on the H100)."""
    script = ("import sys, traceback\n"
              "print('Scheduler hit an exception: Traceback (most recent call last):')\n"
              "try:\n    object().gpu_id\nexcept AttributeError:\n"
              "    traceback.print_exc(); sys.stdout.flush(); sys.exit(3)\n")
    server = ServerProcess([sys.executable, "-c", script], free_port(), tmp_path / "server.log")
    with pytest.raises(ServerStartError) as info:
        server.start()
    why = compare.start_failure(str(info.value))
    assert why.startswith("did not start: server exited with 3 during start-up; see ")
    assert why.endswith("AttributeError: 'object' object has no attribute 'gpu_id'")
    assert compare.start_failure("server not healthy after 600s") == \
        "did not start: server not healthy after 600s"


def test_stack_sampling_wraps_every_server_in_the_sampled_launcher(monkeypatch):
    monkeypatch.setenv(compare.SAMPLES_ENV, "/tmp/samples")
    for s in ("sglang_chunked_8192", "semipd_green_slo"):
        cmd = compare.server_command(s, "/m", "dummy", 31400)
        assert cmd[1:4] == ["-m", "benchmark.sampled_server", compare.SYSTEM_RUNS[s][0]]
        assert cmd[4:6] == ["--model-path", "/m"]
