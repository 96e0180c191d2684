"""On the GPU host: ``--burst-unconfined`` (the prefill worker leaves its green context for an
ordinary stream on all SMs while requests wait too long for a first token) changes no output
and leaks nothing.

The risks: the prefill worker's burst split is the only split on an ordinary stream (its
kernels then share the decode worker's SMs under MPS), the decode worker's side of it replays
the most prefill-heavy split's decode graphs (one stream, one set of graphs), and the
controller must come back from it. With a 5 ms TTFT target a burst starts once a request
has waited 2.5 ms for its first token, which the tiny model's load reaches at once: the
requests do not stream, and their first token counts at their hand-off to decode (before
2026-12-07 only at their finish, and the test passed with a 20 ms target; a wave's prefill
batch of 24 prompts may take about that long, so 20 ms no longer surely starts a burst).
Required:

* two waves (the cache flushed before each) of 24 concurrent prompts of 20-400 tokens return
  exactly ``max_new_tokens`` tokens each, equal to stock SGLang's for the same prompt sent
  alone (the same flags on ``--no-semi-pd``, started first);
* the server log shows bursts (a resize to ``all/28``-style split, both workers running on
  it) and the moves back (``burst-end``), and the decode worker captured its decode graphs
  for the five planned splits only (the burst split shares the top one's);
* at idle the shared pool holds nothing."""

from __future__ import annotations

import os
import re
import time

import pytest

from sglang_semipd.testing.server import (SMALL_POOL_FLAGS, ServerProcess, flush_cache,
                                          greedy_generate_all, pool_leaks, python_module_cmd,
                                          random_prompts, semipd_pool_report,
                                          stock_greedy_outputs)

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 43
FLAGS = SMALL_POOL_FLAGS
N, OUT = 24, 32
DECODE_GRAPHS_LOG = "decode CUDA graphs captured for 5 splits"  # semipd_capture_split_graphs
BURST_RESIZE = re.compile(r"resize #\d+ to all/\d+ prefill/decode SMs \(burst: ")
BURST_APPLIED = re.compile(r"resize #\d+: (prefill|decode) runs all/\d+ from iteration")
BURST_END = "(burst-end: "
PROMPTS = random_prompts(23, (20 + 16 * k for k in range(N)))


@pytest.fixture(scope="module")
def stock_outputs(tiny_bf16, gpu_log_dir) -> list[list[int]]:
    return stock_greedy_outputs(str(tiny_bf16), PORT, FLAGS,
                                os.path.join(gpu_log_dir, "server_stock_burst_ref.log"),
                                PROMPTS, OUT)


def _wave(url: str) -> list[dict]:
    time.sleep(0.5)  # the decode worker frees a finished request just after its answer
    flush_cache(url)
    return greedy_generate_all(url, PROMPTS, OUT)


def test_burst_unconfined_matches_stock_and_leaks_nothing(stock_outputs, tiny_bf16,
                                                           gpu_log_dir):
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_bf16),
                            "--port", str(PORT), "--burst-unconfined", "--slo-ttft-ms", "5",
                            *FLAGS)
    with ServerProcess(cmd, PORT, os.path.join(gpu_log_dir, "server_semipd_burst.log")) as s:
        text = s.log_path.read_text(errors="replace")
        assert DECODE_GRAPHS_LOG in text, "the decode worker captured graphs for the burst split"
        assert re.search(r"splits \(prefill/decode SMs\) .*, all/\d+, starting", text), \
            "no burst split planned"
        waves = [_wave(s.url) for _ in range(2)]
        for wave, outs in enumerate(waves):
            for k, (out, stock) in enumerate(zip(outs, stock_outputs)):
                assert out["meta_info"]["completion_tokens"] == OUT, (wave, k, out["meta_info"])
                assert out["output_ids"] == stock, f"wave {wave}, prompt {k}: differs from stock"
        time.sleep(1.0)  # the controller's move back after the last first token
        text = s.log_path.read_text(errors="replace")
        assert BURST_RESIZE.search(text), "no burst was started"
        assert {m.group(1) for m in BURST_APPLIED.finditer(text)} == {"prefill", "decode"}
        assert BURST_END in text, "no burst ended"
        report = semipd_pool_report(s.url)
        assert report["ok"] and not report["errors"], report
        assert pool_leaks(report) == {"leaked_slots": 0, "lock_refs_left": 0,
                                      "req_rows_left": 0}
