"""On the GPU host: ``--sm-partition mps`` resizes by swapping in a standby worker pair.

A semi-PD server (tiny bf16 model) under ``--sm-partition mps`` is asked for another prefill
share while 16 clients keep long requests decoding. Required: a standby pair starts and is
swapped in (``standby_swap`` in the scheduler's trace) with requests in flight; every request
completes with all its tokens (the old pair finishes its own); the old pair retires
(``retired``); a probe sent alone gets the same greedy output before and after; the server
reports the new split; and at idle the shared pool holds nothing."""

from __future__ import annotations

import os
import threading
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
    # a standby pair takes about a minute to start and a 2,000-token request a few seconds, so
    # the load keeps 16 requests in flight until the swap (each thread sends one after another)
    stop, outs, lock = threading.Event(), [], threading.Lock()

    def keep_busy(k: int) -> None:
        while not stop.is_set():
            out = _gen(server, list(range(200 + k, 300 + k)), 2000)
            with lock:
                outs.append(out)

    with ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(keep_busy, k) for k in range(16)]
        time.sleep(2.0)
        assert http_json(server.url + "/set_internal_state",
                         {"server_args": {"semipd_prefill_sm_share": 0.75}}) == [True]
        swap = _wait(server.trace, "standby_swap")
        time.sleep(1.0)  # a few requests reach the new pair too
        stop.set()
        for f in futs:
            f.result()
    assert swap["generation"] == 1 and swap["old_in_flight"] > 0, swap
    assert len(outs) > 16
    assert all(o["meta_info"]["completion_tokens"] == 2000 for o in outs)
    after = _gen(server, probe, 24)["output_ids"]  # alone, like before, on the new pair
    assert after == before
    retired = _wait(server.trace, "retired", timeout_s=120)
    assert retired["generation"] == 0
    info = http_json(server.url + "/server_info")["internal_states"][0]["semipd"]
    split = info["splits"][info["split"]]
    assert split[0] / sum(split) == pytest.approx(0.75, abs=0.07), info
    report = semipd_pool_report(server.url)
    assert report["ok"] and not report["errors"], report
    assert pool_leaks(report) == {"leaked_slots": 0, "lock_refs_left": 0, "req_rows_left": 0}
