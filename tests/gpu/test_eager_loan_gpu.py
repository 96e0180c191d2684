"""On the GPU host: ``--eager-loan`` (the prefill side's SMs lent to decode whenever no request
waits for its first token, taken back by the next request) changes no output and leaks
nothing.

The risk is the rate of resizes: every arrival next to a decoding request ends a loan and the
end of every prefill starts one, so both workers switch splits (and decode its CUDA graphs)
tens of times a second, with requests arriving in between. Required:

* 24 prompts of 20-400 tokens sent 60 ms apart, each generating 64 tokens (so requests decode
  while others arrive), return exactly 64 tokens each, equal to stock SGLang's for the same
  prompt sent alone (the same flags on ``--no-semi-pd``, started first); twice, the cache
  flushed before each wave;
* the scheduler's trace has eager loans and their ends (``eager-loan`` to the loan split and
  ``eager-reclaim``), and both workers acknowledged resizes to the loan split;
* the server log has no INFO line per eager resize (they are logged at DEBUG);
* at idle the shared pool holds nothing."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_semipd.testing.server import (SMALL_POOL_FLAGS, ServerProcess, flush_cache,
                                          greedy_generate, pool_leaks, python_module_cmd,
                                          random_prompts, semipd_pool_report,
                                          stock_greedy_outputs)
from sglang_semipd.trace import TRACE_ENV, read_trace

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 47
FLAGS = SMALL_POOL_FLAGS
N, OUT, GAP_S = 24, 64, 0.06
PROMPTS = random_prompts(29, (20 + 16 * k for k in range(N)))


@pytest.fixture(scope="module")
def stock_outputs(tiny_bf16, gpu_log_dir) -> list[list[int]]:
    return stock_greedy_outputs(str(tiny_bf16), PORT, FLAGS,
                                os.path.join(gpu_log_dir, "server_stock_eager_ref.log"),
                                PROMPTS, OUT)


def _staggered_wave(url: str) -> list[dict]:
    time.sleep(0.5)  # the decode worker frees a finished request just after its answer
    flush_cache(url)

    def one(k: int) -> dict:
        time.sleep(k * GAP_S)
        return greedy_generate(url, PROMPTS[k], OUT)

    with ThreadPoolExecutor(N) as pool:
        return list(pool.map(one, range(N)))


def test_eager_loans_match_stock_and_leak_nothing(stock_outputs, tiny_bf16, gpu_log_dir):
    trace = os.path.join(gpu_log_dir, "trace_eager_loan.jsonl")
    if os.path.exists(trace):
        os.unlink(trace)
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_bf16),
                            "--port", str(PORT), "--eager-loan", *FLAGS)
    env = dict(os.environ, **{TRACE_ENV: trace})
    with ServerProcess(cmd, PORT, os.path.join(gpu_log_dir, "server_semipd_eager.log"),
                       env=env) as s:
        waves = [_staggered_wave(s.url) for _ in range(2)]
        for wave, outs in enumerate(waves):
            for k, (out, stock) in enumerate(zip(outs, stock_outputs)):
                assert out["meta_info"]["completion_tokens"] == OUT, (wave, k, out["meta_info"])
                assert out["output_ids"] == stock, f"wave {wave}, prompt {k}: differs from stock"
        rows = read_trace(trace)
        modes = [r["mode"] for r in rows if r["kind"] == "decision"]
        loans, ends = modes.count("eager-loan"), modes.count("eager-reclaim")
        assert loans >= 5 and ends >= 5, f"eager loans {loans}, their ends {ends}"
        lent = {r["split"] for r in rows if r["kind"] == "resize"
                and str(r.get("reason", "")).startswith("eager-loan")}
        assert len(lent) == 1, f"eager loans went to splits {lent}"
        acked = {r["role"] for r in rows if r["kind"] == "resize_ack" and r["split"] in lent}
        assert acked == {"prefill", "decode"}, acked
        text = s.log_path.read_text(errors="replace")
        assert "(eager-loan: " not in text and "(eager-reclaim: " not in text, \
            "eager resizes logged at INFO"
        report = semipd_pool_report(s.url)
        assert report["ok"] and not report["errors"], report
        assert pool_leaks(report) == {"leaked_slots": 0, "lock_refs_left": 0,
                                      "req_rows_left": 0}
