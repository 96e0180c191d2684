"""``benchmark.client_overhead``: SGLang's bench_serving at ``inf`` against the stub server
(real bench_serving, real HTTP over a local port, the stub in its own process)."""

from __future__ import annotations

import json

from benchmark import client_overhead, compare


def test_every_request_is_timed_against_the_stub(tmp_path):
    compare.prepare(tmp_path / "wl", num=12)
    out = tmp_path / "co.json"
    result = client_overhead.main(["--workloads", str(tmp_path / "wl"), "--num", "12",
                                   "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["requests"] == saved["completed"] == 12 == len(saved["ttfts_s"])
    assert all(t > 0 for t in saved["ttfts_s"])
    assert saved["ttft_min_s"] <= saved["ttft_p50_s"] <= saved["ttft_max_s"]
    assert "--request-rate inf" in saved["command"] and "sglang-oai-chat" in saved["command"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["workload"] == "sharegpt.jsonl"
