"""On the GPU host: the decode worker running out of KV slots retracts requests and loses
nothing.

A semi-PD server (tiny bf16 model, SGLang's deterministic inference so that outputs do not
depend on batch composition) gets a pool far smaller than its load needs: 48 concurrent
requests of ~200 prompt + 200 output tokens against 4,096 slots. SGLang admits on an estimate
of future decode tokens, so the decode worker must retract. Required: the log shows retraction,
every request returns exactly ``max_new_tokens`` tokens, each output equals the same prompt's
output sent alone, and at idle the shared pool holds nothing."""

from __future__ import annotations

import os
import random

import pytest

from sglang_semipd.testing.server import (RETRACT_LOG, SMALL_POOL_FLAGS, ServerProcess,
                                          greedy_generate, greedy_generate_all, pool_leaks,
                                          python_module_cmd, semipd_pool_report)

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 25
FLAGS = SMALL_POOL_FLAGS
N, PROMPT, OUT = 48, 200, 200


@pytest.fixture(scope="module")
def server(tiny_bf16, gpu_log_dir):
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_bf16),
                            "--port", str(PORT), *FLAGS)
    with ServerProcess(cmd, PORT, os.path.join(gpu_log_dir, "server_semipd_retract.log")) as s:
        yield s


def test_retraction_under_a_small_pool_loses_nothing(server):
    rng = random.Random(3)
    prompts = [[rng.randrange(100, 40000) for _ in range(PROMPT + k)] for k in range(N)]
    together = greedy_generate_all(server.url, prompts, OUT)
    log = server.log_path.read_text(errors="replace")
    # SGLang's own warning (its ServerArgs dump also says "retraction_policy", so a bare
    # "retract" would always be found)
    assert RETRACT_LOG in log, "the load never made the decode worker retract"
    for out in together:
        assert out["meta_info"]["completion_tokens"] == OUT, out["meta_info"]
        assert out["meta_info"]["finish_reason"]["type"] == "length"
    alone = [greedy_generate(server.url, p, OUT) for p in prompts[:8]]
    for a, b in zip(alone, together[:8]):
        assert a["output_ids"] == b["output_ids"]
    report = semipd_pool_report(server.url)
    assert report["ok"] and not report["errors"], report
    assert pool_leaks(report) == {"leaked_slots": 0, "lock_refs_left": 0, "req_rows_left": 0}
