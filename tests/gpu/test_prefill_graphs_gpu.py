"""On the GPU host: ``--prefill-graphs`` (the prefill worker replays SGLang's prefill CUDA
graphs, captured once per split on the split's green stream) changes no output and leaks
nothing.

Stock SGLang 0.5.17 replays prefill CUDA graphs for a Llama-type model by default (its
"breakable" graphs, up to 2,048 tokens); without the flag semi-PD's prefill worker runs every
prefill eagerly. The risks of the flag: a graph captured on one split's stream runs on that
split's SMs only, so a resize must swap in the runner captured on the new split; and the
worker's memory must hold a set of prefill graphs per split. Required:

* the server log says the prefill worker captured prefill graphs for all five default splits,
  and SGLang logged a prefill batch that ran on a graph;
* two waves (the cache flushed before each) of 24 concurrent prompts of 20-400 tokens, the
  first started on a 25% prefill share and the second on 75%, with the split also flipped
  every 0.1 s during each wave, return exactly ``max_new_tokens`` tokens each, equal to stock SGLang's for the same prompt
  sent alone (the same flags on ``--no-semi-pd``, started first);
* the prefill worker logged running on at least two splits; at idle the shared pool holds
  nothing.

(The first GPU run, session 19, flipped only in the background every 0.3 s: the tiny model
finished the whole load within one flip, so the split never changed under load.)"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from sglang_semipd.testing.server import (SMALL_POOL_FLAGS, ServerProcess, flush_cache,
                                          greedy_generate_all, http_json, pool_leaks,
                                          python_module_cmd, random_prompts, semipd_pool_report,
                                          stock_greedy_outputs)

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 41
FLAGS = SMALL_POOL_FLAGS
N, OUT = 24, 32
SHARES = (0.25, 0.75)
CAPTURED_LOG = "prefill CUDA graphs captured for 5 splits"  # semipd_capture_split_graphs
GRAPH_PREFILL = "cuda graph: True"  # in SGLang's "Prefill batch, ..." line
PREFILL_RESIZED = re.compile(r"resize #\d+: prefill runs (\d+/\d+) from iteration")
PROMPTS = random_prompts(17, (20 + 16 * k for k in range(N)))


@pytest.fixture(scope="module")
def stock_outputs(tiny_bf16, gpu_log_dir) -> list[list[int]]:
    return stock_greedy_outputs(str(tiny_bf16), PORT, FLAGS,
                                os.path.join(gpu_log_dir, "server_stock_graphs_ref.log"),
                                PROMPTS, OUT)


def _set_share(url: str, share: float) -> int:
    http_json(url + "/set_internal_state", {"server_args": {
        "semipd_slo_policy": 0, "semipd_prefill_sm_share": share}})
    return http_json(url + "/server_info")["internal_states"][0]["semipd"]["split"]


def _flip_splits(url: str, stop: threading.Event, first: int) -> None:
    i = first + 1
    while not stop.wait(0.1):
        _set_share(url, SHARES[i % 2])
        i += 1


def _wave(url: str, first: int) -> tuple[int, list[dict]]:
    """One wave of the load on an empty cache (so every prompt is prefilled in full), started
    on ``SHARES[first]`` and flipped in the background."""
    time.sleep(0.5)  # the decode worker frees a finished request just after its answer
    flush_cache(url)
    split = _set_share(url, SHARES[first])
    stop = threading.Event()
    flipper = threading.Thread(target=_flip_splits, args=(url, stop, first))
    flipper.start()
    try:
        outs = greedy_generate_all(url, PROMPTS, OUT)
    finally:
        stop.set()
        flipper.join(30)
    return split, outs


def test_prefill_graphs_per_split_match_stock_and_leak_nothing(stock_outputs, tiny_bf16,
                                                                gpu_log_dir):
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_bf16),
                            "--port", str(PORT), "--prefill-graphs",
                            "--partition-policy", "static", *FLAGS)
    with ServerProcess(cmd, PORT, os.path.join(gpu_log_dir, "server_semipd_graphs.log")) as s:
        text = s.log_path.read_text(errors="replace")
        assert CAPTURED_LOG in text, "the prefill worker did not capture graphs per split"
        waves = [_wave(s.url, first) for first in range(len(SHARES))]
        assert len({split for split, _ in waves}) == 2, f"both waves began on one split: {waves}"
        for wave, (_, outs) in enumerate(waves):
            for k, (out, stock) in enumerate(zip(outs, stock_outputs)):
                assert out["meta_info"]["completion_tokens"] == OUT, (wave, k, out["meta_info"])
                assert out["output_ids"] == stock, f"wave {wave}, prompt {k}: differs from stock"
        text = s.log_path.read_text(errors="replace")
        prefill_splits = set(PREFILL_RESIZED.findall(text))
        assert len(prefill_splits) >= 2, f"the prefill worker ran on {prefill_splits} only"
        assert any("Prefill batch" in line and GRAPH_PREFILL in line
                   for line in text.splitlines()), "no prefill batch ran on a CUDA graph"
        time.sleep(0.5)
        report = semipd_pool_report(s.url)
        assert report["ok"] and not report["errors"], report
        assert pool_leaks(report) == {"leaked_slots": 0, "lock_refs_left": 0,
                                      "req_rows_left": 0}
