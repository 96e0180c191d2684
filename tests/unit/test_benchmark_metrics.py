"""CPU tests of benchmark/metrics.py and benchmark/report.py on hand-computed examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark import metrics as M
from benchmark import report as R


def _req(ttft: float, tpot: float, out: int = 11, ok: bool = True) -> M.RequestResult:
    itls = [tpot] * (out - 1)
    return M.RequestResult(ok, ttft, ttft + sum(itls), 100, out, itls)


def test_tpot_and_meets() -> None:
    r = M.RequestResult(True, 0.2, 1.2, 10, 11, [0.1] * 10)
    assert r.tpot == pytest.approx(0.1)
    assert M.RequestResult(True, 0.2, 0.2, 10, 1).tpot == 0.0
    assert M.meets(r, M.SLO(0.2, 0.1))
    assert not M.meets(r, M.SLO(0.19, 0.1))
    assert not M.meets(r, M.SLO(0.2, 0.09))
    assert not M.meets(M.RequestResult(False, 0.1, 0.5, 10, 5), M.SLO(9, 9))
    # TPOT ~19 ms but two 0.9-s stalls: P99 ITL fails a 50 ms-ish target while TPOT passes
    spiky = M.RequestResult(True, 0.1, 0.1 + 1.8 + 98 * 0.001, 10, 101, [0.9, 0.9] + [0.001] * 98)
    assert spiky.tpot == pytest.approx(0.01898) and spiky.itl_p99 == pytest.approx(0.9)
    assert M.meets(spiky, M.SLO(0.2, 0.02))
    assert not M.meets(spiky, M.SLO(0.2, 0.05, itl_p99=True))


def test_attainment_and_summary() -> None:
    res = [_req(0.1, 0.05), _req(0.5, 0.05), _req(0.1, 0.3), _req(0.1, 0.05, ok=False)]
    assert M.attainment(res, M.SLO(0.3, 0.15)) == pytest.approx(0.25)
    assert M.attainment([], M.SLO(1, 1)) == 0.0
    s = M.latency_summary([_req(t, 0.01) for t in (0.1, 0.2, 0.3, 0.4, 0.5)], duration_s=2.0)
    assert s["ttft"]["mean"] == pytest.approx(0.3)
    assert s["ttft"]["p90"] == pytest.approx(0.46)  # linear: 0.4 + 0.6 * 0.1
    assert s["ttft"]["p99"] == pytest.approx(0.496)
    assert s["tpot"]["p90"] == pytest.approx(0.01)
    assert s["e2e"]["mean"] == pytest.approx(0.4)
    assert s["request_throughput"] == pytest.approx(2.5)
    assert s["output_throughput_tok_s"] == pytest.approx(27.5)
    assert s["request_throughput_from_first_token"] == pytest.approx(5 / 1.9)  # 2.0 - 0.1
    assert M.latency_summary([])["ttft"]["mean"] is None
    assert M.latency_summary([])["request_throughput_from_first_token"] is None


def test_throughput_from_the_first_token_leaves_out_a_shared_wait() -> None:
    """An ``inf`` run whose first tokens all waited 12 s (as one of stock SGLang's did on the
    DeepSeek-V2-Lite shape, before any request reached its scheduler): bench_serving's
    throughput counts the wait, the figure from the first token does not; a failed
    request's TTFT does not count."""
    stalled = [_req(12.0 + 0.01 * i, 0.05) for i in range(40)] + [_req(0.0, 0.05, ok=False)]
    s = M.latency_summary(stalled, duration_s=20.0)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["request_throughput_from_first_token"] == pytest.approx(40 / 8.0)
    assert M.latency_summary(stalled, duration_s=11.0)["request_throughput_from_first_token"] \
        is None  # a duration shorter than the first TTFT: no span to count over


def test_goodput() -> None:
    pts = {1.0: 1.0, 2.0: 0.95, 3.0: 0.85, 4.0: 0.5}
    assert M.goodput(pts) == 2.0
    assert M.goodput(pts, interpolate=True) == pytest.approx(2.5)
    assert M.goodput({1.0: 0.5}) is None
    assert M.goodput({1.0: 0.95, 2.0: 0.92}, interpolate=True) == 2.0
    # highest passing rate wins even after a dip
    assert M.goodput([(1.0, 0.95), (2.0, 0.8), (3.0, 0.91)]) == 3.0


def test_goodput_up_to_saturation_leaves_out_the_rates_above_it() -> None:
    # stock SGLang on ShareGPT (session 11): the tight SLO still met at 48 req/s, but its
    # rate-inf run served 26.5 req/s; the rates above that only hid a growing backlog
    pts = {8.0: 1.0, 16.0: 1.0, 24.0: 0.99, 32.0: 0.97, 40.0: 0.91, 48.0: 0.94}
    assert M.goodput(pts) == 48.0
    assert M.goodput_up_to(pts, 26.5) == 24.0
    assert M.goodput_up_to(pts, 24.0) == 24.0  # a rate equal to the saturation counts
    assert M.goodput_up_to(pts, 7.0) is None  # no swept rate is sustainable
    assert M.goodput_up_to(pts, None) is None  # unknown without an inf run
    assert M.goodput_up_to({8.0: 0.95, 16.0: 0.85}, 20.0, interpolate=True) == pytest.approx(12.0)
    curve = [{"rate": 8.0, "request_throughput": 6.0},
             {"rate": float("inf"), "request_throughput": 10.1,
              "request_throughput_from_first_token": 14.4}]
    assert M.saturation_rate(curve) == 14.4  # a shared wait before the first token left out
    curve[1].pop("request_throughput_from_first_token")
    curve[1]["rate"] = "inf"  # as details.json writes it
    assert M.saturation_rate(curve) == 10.1
    assert M.saturation_rate(curve[:1]) is None


def test_the_report_notes_goodput_up_to_saturation_where_it_differs(tmp_path: Path) -> None:
    slo = M.SLO(0.3, 0.15)
    runs = {"semipd_green_slo": _runs({1.0: 0.1, 2.0: 0.1, 4.0: 0.1}),
            "sglang_chunked_2048": _runs({1.0: 0.1, 2.0: 0.1, 4.0: 0.1})}
    # rate inf: 10 requests in 4 s, first tokens 0.1 s in: saturation 10 / 3.9 = 2.56 req/s
    runs["semipd_green_slo"][float("inf")] = R.RunPoint(float("inf"), [_req(0.1, 0.05)] * 10,
                                                        duration_s=4.0)
    summary = R.build_summary("H100", "llama8b", {"sharegpt": (slo, runs)})
    w = summary["workloads"]["sharegpt"]
    assert w["goodput_req_s"]["semipd_green_slo"] == 4.0  # the record's goodput is unchanged
    assert "sharegpt: goodput up to saturation (2.6 req/s): 2 req/s" in \
        summary["notes"]["semipd_green_slo"]
    # no inf run: no saturation known, no such note
    assert "saturation" not in summary["notes"]["sglang_chunked_best"]
    assert R.check_summary_shape(summary) == []


def test_slo_sets_and_scale_sweep() -> None:
    assert M.PAPER_SLOS["sharegpt"]["tight"] == M.SLO(0.3, 0.15)
    assert M.PAPER_SLOS["longbench"]["loose"] == M.SLO(3.0, 0.18)
    assert M.PAPER_SLOS["sharegpt"]["tpot50"].itl_p99
    assert M.SLO(0.4, 0.2).scaled(0.5) == M.SLO(0.2, 0.1)
    runs = {1.0: [_req(0.1, 0.05)] * 10, 2.0: [_req(0.25, 0.05)] * 10, 4.0: [_req(0.7, 0.05)] * 10}
    sweep = M.slo_scale_sweep(runs, M.SLO(0.3, 0.15), scales=(0.5, 1.0, 2.0, 3.0))
    assert sweep == {0.5: 1.0, 1.0: 2.0, 2.0: 2.0, 3.0: 4.0}


def test_details_reader(tmp_path: Path) -> None:
    rec = {"request_rate": 2.0, "duration": 3.0, "completed": 1,
           "input_lens": [10, 12], "output_lens": [3, 0], "ttfts": [0.1, 0.0],
           "itls": [[0.05, 0.07], []], "generated_texts": ["a", ""], "errors": ["", "boom"]}
    p = tmp_path / "out.jsonl"
    p.write_text(json.dumps({"request_rate": 1.0}) + "\n" + json.dumps(rec) + "\n")
    rows = M.read_details_jsonl(p)
    assert len(rows) == 1
    summary, res = rows[0]
    assert summary == {"request_rate": 2.0, "duration": 3.0, "completed": 1}
    assert res[0].success and res[0].e2e == pytest.approx(0.22) and res[0].tpot == pytest.approx(0.06)
    assert not res[1].success and res[1].output_len == 0
    assert [r.input_len for r in M.results_from_details(rec, input_lens=[7, 8])] == [7, 8]


def _runs(ttft_by_rate: dict[float, float], n: int = 10) -> dict[float, R.RunPoint]:
    return {rate: R.RunPoint(rate, [_req(t, 0.05)] * n, duration_s=n / rate)
            for rate, t in ttft_by_rate.items()}


def test_report_shape_chunked_selection_and_plots(tmp_path: Path) -> None:
    slo = M.SLO(0.3, 0.15)
    runs = {"sglang_chunked_512": _runs({1.0: 0.1, 2.0: 0.5}),
            "sglang_chunked_2048": _runs({1.0: 0.1, 2.0: 0.2, 3.0: 0.9}),
            "sglang_pdmux": _runs({1.0: 0.5}),
            "semipd_green_slo": _runs({1.0: 0.1, 2.0: 0.1, 3.0: 0.1}),
            "semipd_green_static_0.25": _runs({1.0: 0.1, 2.0: 0.9}),
            "semipd_green_static_0.5": _runs({1.0: 0.1, 2.0: 0.1, 3.0: 0.9})}
    summary = R.write_report(tmp_path, "NVIDIA H100", "llama-8b", {"sharegpt": (slo, runs)},
                             notes={"semipd_mps": "MPS daemon unavailable"},
                             slo_names={"sharegpt": "tight"})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary) == {"gpu", "model", "workloads", "notes"}
    w = summary["workloads"]["sharegpt"]
    assert set(w) == {"slo", "goodput_req_s", "max_throughput_req_s"}
    assert set(w["goodput_req_s"]) == set(R.SYSTEMS) == set(w["max_throughput_req_s"])
    assert w["goodput_req_s"]["sglang_chunked_best"] == 2.0
    assert "2048" in summary["notes"]["sglang_chunked_best"]
    assert w["goodput_req_s"]["semipd_green_slo"] == 3.0
    assert w["max_throughput_req_s"]["semipd_green_slo"] == pytest.approx(3.0)
    assert w["goodput_req_s"]["sglang_pdmux"] is None and "sglang_pdmux" in summary["notes"]
    assert w["goodput_req_s"]["semipd_green_static"] == 2.0
    assert "sharegpt=0.5" in summary["notes"]["semipd_green_static"]
    for s in ("semipd_mps", "semipd_none"):
        assert w["goodput_req_s"][s] is None and w["max_throughput_req_s"][s] is None
        assert summary["notes"][s]
    assert summary["notes"]["semipd_mps"] == "MPS daemon unavailable"
    assert w["slo"]["ttft_s"] == 0.3 and w["slo"]["name"] == "tight"
    assert R.check_summary_shape(summary) == []
    md = (tmp_path / "summary.md").read_text()
    assert "| sharegpt |" in md and "semipd_green_slo" in md and "n/a" in md
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert {p.name for p in pngs} == {"sharegpt_attainment.png", "sharegpt_latency_p90.png", "goodput.png"}
    for p in pngs:
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_workload_without_runs_gets_no_plots(tmp_path: Path) -> None:
    slo = M.SLO(0.3, 0.15)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "long_attainment.png").write_bytes(b"from an earlier report")
    summary = R.write_report(tmp_path, "NVIDIA H100", "dsv2", {
        "sharegpt": (slo, {"semipd_green_slo": _runs({1.0: 0.1})}),
        "long": (slo, {"semipd_green_slo": {}}), "azure_conv": (slo, {})})
    assert set(summary["workloads"]) == {"sharegpt", "long", "azure_conv"}  # the record keeps them
    assert summary["workloads"]["long"]["goodput_req_s"]["semipd_green_slo"] is None
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {
        "sharegpt_attainment.png", "sharegpt_latency_p90.png", "goodput.png"}


def test_check_summary_shape_flags_problems() -> None:
    bad = {"gpu": "g", "model": "m", "notes": {},
           "workloads": {"w": {"slo": {}, "goodput_req_s": {s: None for s in R.SYSTEMS},
                               "max_throughput_req_s": {s: 1.0 for s in R.SYSTEMS}}}}
    assert len(R.check_summary_shape(bad)) == len(R.SYSTEMS)
    assert R.check_summary_shape({"gpu": "g"})
