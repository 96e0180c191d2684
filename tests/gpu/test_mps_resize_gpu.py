"""On the GPU host: ``--sm-partition mps`` resizes by swapping in a standby worker pair.

A semi-PD server (tiny bf16 model) under ``--sm-partition mps`` is asked for another prefill
share while 32 long requests decode. Required: a standby pair starts and is swapped in
(``standby_swap`` in the scheduler's trace), every request in flight during the swap completes
with all its tokens (the old pair finished them), the old pair retires (``retired``) and its
processes are gone, requests after the swap are served with the same greedy output as before,
and at idle the shared pool holds nothing."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_semipd.testing.server import (ServerProcess, http_json, pool_leaks,
                                          python_module_cmd, semipd_pool_report)
from sglang_semipd.trace import read_trace

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 27
FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch",
         "--grammar-backend", "none", "--mem-fraction-static", "0.8",
         "--max-total-tokens", "100000", "--cuda-graph-max-bs-decode", "32",
         "--sm-partition", "mps", "--sm-splits", "0.25,0.5,0.75", "--prefill-sm-share", "0.5")


@pytest.fixture(scope="module")
def server(tiny_bf16, gpu_log_dir):
    trace = os.path.join(gpu_log_dir, "trace_mps_resize.jsonl")
    if os.path.exists(trace):
        os.unlink(trace)
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_bf16),
                            "--port", str(PORT), *FLAGS)
    env = dict(os.environ, SGLANG_SEMIPD_TRACE=trace)
    with ServerProcess(cmd, PORT, os.path.join(gpu_log_dir, "server_mps_resize.log"),
                       env=env) as s:
        s.trace = trace
        yield s


def _gen(server, ids, n):
    return http_json(server.url + "/generate", {"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": n, "ignore_eos": True}}, timeout=600)


def _wait(trace: str, kind: str, timeout_s: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = [r for r in read_trace(trace) if r["kind"] == kind]
        if rows:
            return rows[-1]
        time.sleep(0.5)
    raise AssertionError(f"no {kind} in the trace after {timeout_s:.0f} s")


def test_a_resize_swaps_pairs_and_loses_nothing(server):
    probe = list(range(11, 140))
    before = _gen(server, probe, 24)["output_ids"]
    with ThreadPoolExecutor(32) as pool:
        futs = [pool.submit(_gen, server, list(range(200 + k, 300 + k)), 1500)
                for k in range(32)]
        time.sleep(2.0)
        assert http_json(server.url + "/set_internal_state",
                         {"server_args": {"semipd_prefill_sm_share": 0.75}}) == [True]
        swap = _wait(server.trace, "standby_swap")
        assert swap["generation"] == 1 and swap["old_in_flight"] > 0, swap
        after = _gen(server, probe, 24)["output_ids"]  # the new pair serves it
        outs = [f.result() for f in futs]
    assert all(o["meta_info"]["completion_tokens"] == 1500 for o in outs)
    assert after == before
    retired = _wait(server.trace, "retired", timeout_s=120)
    assert retired["generation"] == 0
    info = http_json(server.url + "/server_info")["internal_states"][0]["semipd"]
    split = info["splits"][info["split"]]
    assert split[0] / sum(split) == pytest.approx(0.75, abs=0.07), info
    report = semipd_pool_report(server.url)
    assert report["ok"] and not report["errors"], report
    assert pool_leaks(report) == {"leaked_slots": 0, "lock_refs_left": 0, "req_rows_left": 0}
